"""A throwaway PixelOps project (git + DVC, tasks/ and dvc.yaml copied, params shrunk).

Used by the pipeline benchmark and the flow tests, so both measure the real doors.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def make_project(dest: Path, overrides: list[str]) -> Path:
    from tasks.params import apply_overrides, load_raw

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "tasks", dest / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", dest / "dvc.yaml")
    (dest / "curation").mkdir(exist_ok=True)  # curators' decisions: a dep of stage curate
    shutil.copy(ROOT / "curation" / "README.md", dest / "curation" / "README.md")
    raw = apply_overrides(load_raw(ROOT / "params.yaml"), overrides)
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True)
    return dest


def set_param(project: Path, key: str, value) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    *sections, name = key.split(".")
    node = raw
    for s in sections:
        node = node[s]
    node[name] = value
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def dvc(project: Path, *args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    """Run the DVC CLI in `project` with this interpreter's venv first on PATH (stage cmds use it)."""
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=timeout)
