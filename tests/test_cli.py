"""The `pixelops` console script: help everywhere, DVC-style overrides, readable failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bench.project import make_project
from pixelops.cli import main
from tests.conftest import TINY_OVERRIDES

PIXELOPS = [sys.executable, "-m", "pixelops.cli"]


def _cli(*args, cwd):
    return subprocess.run([*PIXELOPS, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))


@pytest.mark.parametrize("sub", ["run", "ingest", "validate", "pretrain", "curate", "train", "evaluate", "app", "status",
                                 "versions", "checkout", "push"])
def test_help_everywhere(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0 and "usage: pixelops" in capsys.readouterr().out


def test_bad_override_is_one_paragraph_without_traceback(tmp_path):
    project = make_project(tmp_path / "p", TINY_OVERRIDES)
    before = (project / "params.yaml").read_text()
    proc = _cli("run", "-S", "train.epoch=3", cwd=project)
    assert proc.returncode == 1
    assert "unknown key train.epoch" in proc.stderr and "Traceback" not in proc.stderr
    assert (project / "params.yaml").read_text() == before  # a rejected override changes nothing


def test_ingest_image_folder_prints_version_and_records_it(tmp_path, monkeypatch):
    project = make_project(tmp_path / "p", TINY_OVERRIDES)
    src = tmp_path / "pets"
    for split in ("train", "test"):
        for label, colour in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
            (src / split / label).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 20 + i), colour).save(src / split / label / f"{i}.png")
    (src / "train" / "dog" / "bad.png").write_bytes(b"nope")
    proc = _cli("ingest", str(src), "--format", "image-folder", "-S", "ingest.max_bad_fraction=0.5", cwd=project)
    assert proc.returncode == 0, proc.stderr
    version = json.loads((project / "data" / "ingest" / "version.json").read_text())["version"]
    assert f"dataset version {version} (new)" in proc.stdout
    assert "1 quarantined {'not-an-image': 1}" in proc.stdout
    assert str(src) in (project / "params.yaml").read_text()  # the project's source is now this folder
    again = _cli("ingest", str(src), cwd=project)
    assert again.returncode == 0 and f"{version} (unchanged)" in again.stdout
