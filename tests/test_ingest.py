"""Ingest: real Fashion-MNIST idx, real deepforest VOC boxes, archives, bad input, SIGKILL."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from tasks.archive import ArchiveError
from tasks.ingest import IngestError, ingest, load_registry
from tasks.io import MANIFEST_SCHEMA, sha256_file
from tasks.params import IngestParams, SourceParams
from tests.conftest import ROOT, TINY_OVERRIDES


def _params(source: Path, **kw) -> IngestParams:
    return IngestParams(source=SourceParams(path=source, format=kw.pop("format", "auto")), workers=1, **kw)


def test_idx_version_is_content_addressed(ingested):
    params, result = ingested
    out = Path(result.out_dir)
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.schema.names == MANIFEST_SCHEMA.names
    assert result.per_split == {"test": 300, "train": 300} and result.task == "classification"
    assert result.classes[0] == "T-shirt/top" and len(result.classes) == 10
    rows = manifest.to_pylist()
    for row in rows[:50]:  # every file exists and is named by the sha256 of its bytes
        path = out / row["path"]
        assert sha256_file(path) == row["content_hash"] and row["content_hash"] in path.name
        assert (row["width"], row["height"], row["mode"]) == (28, 28, "L")
    assert len({r["sample_id"] for r in rows}) == len(rows)
    ann = pq.read_table(out / "annotations.parquet").to_pylist()
    assert len(ann) == 600 and ann[0]["x1"] is None  # classification: one label row per image
    assert json.loads((out / "version.json").read_text())["version"] == result.version
    registry = load_registry(params.paths.versions)
    assert registry[-1]["version"] == result.version and registry[-1]["per_split"] == result.per_split


def test_same_content_same_version(ingested, tmp_path):
    params, first = ingested
    again = ingest(params.ingest.source, out_dir=tmp_path / "ingest", params=params.ingest)
    assert again.version == first.version
    smaller = ingest(params.ingest.source, out_dir=tmp_path / "ingest",
                     params=params.ingest.model_copy(update={"limit_per_split": 200}))
    assert smaller.version != first.version
    assert not list(tmp_path.glob(".ingest.partial")) and not list(tmp_path.glob(".ingest.old"))


def _deepforest_voc(dest: Path) -> Path:
    data = Path(importlib.util.find_spec("deepforest").submodule_search_locations[0]) / "data"
    dest.mkdir(parents=True)
    for stem in ("OSBS_029", "SOAP_061"):
        shutil.copy(data / f"{stem}.png", dest)
        shutil.copy(data / f"{stem}.xml", dest)
    Image.new("RGB", (64, 64)).save(dest / "background.png")  # an image with no boxes is kept
    return dest


def test_detection_voc_boxes_and_background(tmp_path):
    src = _deepforest_voc(tmp_path / "voc")
    result = ingest(SourceParams(path=src, format="voc"), out_dir=tmp_path / "out",
                    params=_params(src, format="voc"))
    assert result.task == "detection" and result.n_annotations == 61 + 37
    ann = pq.read_table(tmp_path / "out" / "annotations.parquet").to_pandas()
    images = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pandas().set_index("sample_id")
    per_image = ann.groupby("sample_id").size()
    assert sorted(per_image.tolist()) == [37, 61]
    joined = ann.join(images[["width", "height"]], on="sample_id")
    assert (joined.x1 >= 0).all() and (joined.x2 <= joined.width).all() and (joined.y2 <= joined.height).all()
    assert set(ann.label) <= set(result.classes)


def _pets(root: Path) -> Path:
    for split in ("train", "test"):
        for label, colour in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
            d = root / split / label
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (16 + i, 12), colour).save(d / f"{i}.png")
    return root


def test_bad_images_quarantined_with_reasons_sources_untouched(tmp_path):
    src = _pets(tmp_path / "src")
    (src / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "train" / "dog" / "empty.png").write_bytes(b"")
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    result = ingest(SourceParams(path=src), out_dir=tmp_path / "out", params=_params(src, max_bad_fraction=0.5))
    assert result.n_images == 12 and result.classes == ["cat", "dog"]
    q = {Path(r["source_key"]).name: r for r in pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()}
    assert q["empty.png"]["reason"] == "empty-file" and q["broken.jpg"]["reason"] in {"not-an-image", "truncated"}
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before  # never rewritten


def test_too_many_bad_images_publish_nothing(ingested, tmp_path):
    params, _ = ingested
    out = tmp_path / "ingest"
    good = ingest(params.ingest.source, out_dir=out, params=params.ingest.model_copy(update={"limit_per_split": 20}))
    src = _pets(tmp_path / "src")
    for i in range(3):
        (src / "train" / "cat" / f"bad{i}.png").write_bytes(b"garbage")
    with pytest.raises(IngestError, match="over ingest.max_bad_fraction=0.01"):
        ingest(SourceParams(path=src), out_dir=out, params=_params(src))
    assert json.loads((out / "version.json").read_text())["version"] == good.version


def test_zip_archive_source_and_unsafe_archive(tmp_path):
    src = _pets(tmp_path / "pets")
    good = tmp_path / "pets.zip"
    with zipfile.ZipFile(good, "w") as z:
        for p in sorted(src.rglob("*.png")):
            z.write(p, p.relative_to(tmp_path).as_posix())
    from_folder = ingest(SourceParams(path=src), out_dir=tmp_path / "a", params=_params(src))
    from_zip = ingest(SourceParams(path=good), out_dir=tmp_path / "b", params=_params(good))
    assert from_zip.n_images == from_folder.n_images == 12
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../escaped.png", b"x")
    with pytest.raises(ArchiveError, match="escaped.png"):
        ingest(SourceParams(path=evil), out_dir=tmp_path / "b", params=_params(evil))
    assert not (tmp_path / "escaped.png").exists() and from_zip.version == json.loads(
        (tmp_path / "b" / "version.json").read_text())["version"]


def test_missing_source_says_what_to_install(tmp_path):
    with pytest.raises(IngestError, match="dataset-fashion-mnist"):
        ingest(SourceParams(path=tmp_path / "fashion-mnist"), out_dir=tmp_path / "out")


def _project(tmp: Path, limit: int) -> Path:
    from tasks.params import apply_overrides, load_raw

    raw = apply_overrides(load_raw(ROOT / "params.yaml"), [*TINY_OVERRIDES, f"ingest.limit_per_split={limit}"])
    tmp.mkdir()
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp


def _ingest_proc(project: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "tasks.ingest"], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_keeps_previous_version_and_rerun_completes(tmp_path):
    project = _project(tmp_path / "p", 3000)
    first = _ingest_proc(project)
    t0 = time.perf_counter()
    assert first.wait(timeout=300) == 0, first.stderr.read()
    full = time.perf_counter() - t0
    version = json.loads((project / "data" / "ingest" / "version.json").read_text())["version"]
    # change the content (fewer images) so a finished run would publish a different version
    text = (project / "params.yaml").read_text().replace("limit_per_split: 3000", "limit_per_split: 2500")
    (project / "params.yaml").write_text(text)
    for fraction in (0.15, 0.4, 0.65, 0.9):
        proc = _ingest_proc(project)
        time.sleep(full * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        info = json.loads((project / "data" / "ingest" / "version.json").read_text())
        if info["version"] != version:  # the kill came after publication: the new version is whole
            assert pq.read_table(project / "data" / "ingest" / "manifest.parquet").num_rows == 5000
            break
        assert pq.read_table(project / "data" / "ingest" / "manifest.parquet").num_rows == 6000
    (project / "params.yaml").write_text(text.replace("limit_per_split: 2500", "limit_per_split: 3000"))
    rerun = _ingest_proc(project)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert json.loads((project / "data" / "ingest" / "version.json").read_text())["version"] == version


def test_reingest_reuses_unchanged_files_and_noop(tmp_path, monkeypatch):
    from tasks import gate
    from tasks.ingest_cache import verify_version

    src = _pets(tmp_path / "src")
    first = ingest(SourceParams(path=src), out_dir=tmp_path / "out", params=_params(src))
    checked = []
    real = gate.check_many
    monkeypatch.setattr(gate, "check_many", lambda work, **kw: (checked.extend(w[0] for w in work), real(work, **kw))[1])
    noop = ingest(SourceParams(path=src), out_dir=tmp_path / "out", params=_params(src))
    assert noop.version == first.version and checked == []  # nothing decoded or hashed
    Image.new("RGB", (30, 30), (1, 2, 3)).save(src / "train" / "cat" / "new.png")
    changed = ingest(SourceParams(path=src), out_dir=tmp_path / "out", params=_params(src))
    assert changed.version != first.version and changed.n_images == 13
    assert len(checked) == 1  # only the new file went through the gate
    assert verify_version(tmp_path / "out") == []
    victim = next((tmp_path / "out" / "images").rglob("*.png"))
    victim.write_bytes(b"tampered")
    assert verify_version(tmp_path / "out") == [str(victim.relative_to(tmp_path / "out"))]


def test_exact_duplicates_are_reported_same_name_is_not(tmp_path):
    src = tmp_path / "src"
    for label, shade in (("cat", 10), ("dog", 200)):
        (src / "train" / label).mkdir(parents=True)
        (src / "test" / label).mkdir(parents=True)
        Image.new("L", (8, 8), shade).save(src / "train" / label / "a.png")
        Image.new("L", (8, 8), shade + 1).save(src / "test" / label / "a.png")  # same name, other bytes
    shutil.copy(src / "train" / "cat" / "a.png", src / "train" / "dog" / "copy.png")  # same bytes
    result = ingest(SourceParams(path=src), out_dir=tmp_path / "out", params=_params(src))
    info = json.loads((tmp_path / "out" / "version.json").read_text())
    assert result.n_images == 5 and info["n_duplicate_images"] == 1 and info["n_unique_files"] == 4
