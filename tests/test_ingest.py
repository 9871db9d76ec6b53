"""Ingest on real Fashion-MNIST idx files and on an image-folder tree with broken files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.ingest import IngestError, ingest
from tasks.io import MANIFEST_SCHEMA, sha256_file
from tasks.params import SourceParams


def test_idx_version_is_content_addressed(ingested):
    params, result = ingested
    out = Path(result.out_dir)
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.schema.names == MANIFEST_SCHEMA.names
    assert result.per_split == {"test": 300, "train": 300}
    assert result.classes[0] == "T-shirt/top" and len(result.classes) == 10
    rows = manifest.to_pylist()
    # every row's file exists and its name is the sha256 of its bytes
    for row in rows[:50]:
        path = out / row["path"]
        assert sha256_file(path) == row["content_hash"] and row["content_hash"] in path.name
        assert (row["width"], row["height"], row["mode"]) == (28, 28, "L")
    assert len({r["sample_id"] for r in rows}) == len(rows)
    info = json.loads((out / "version.json").read_text())
    assert info["version"] == result.version and result.version.startswith("v")


def test_same_source_same_version(ingested, tmp_path):
    params, first = ingested
    again = ingest(params.ingest.source, out_dir=tmp_path / "ingest", limit_per_split=300)
    assert again.version == first.version
    smaller = ingest(params.ingest.source, out_dir=tmp_path / "ingest", limit_per_split=200)
    assert smaller.version != first.version  # different content, different version
    assert not list(tmp_path.glob(".ingest.*"))  # no staging folders left behind


def _folder_tree(root: Path) -> None:
    for split in ("train", "test"):
        for label, colour in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
            d = root / split / label
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (16 + i, 12), colour).save(d / f"{i}.png")
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "train" / "dog" / "empty.png").write_bytes(b"")
    (root / "train" / "dog" / "notes.txt").write_text("hello")


def test_image_folder_quarantines_bad_files(tmp_path):
    src = tmp_path / "src"
    _folder_tree(src)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    result = ingest(SourceParams(path=src), out_dir=tmp_path / "out")
    assert result.n_images == 12 and result.classes == ["cat", "dog"]
    q = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    reasons = {Path(r["source_key"]).name: r["reason"] for r in q}
    assert reasons["broken.jpg"].startswith("decode-error")
    assert reasons["empty.png"] == "empty-file"
    assert reasons["notes.txt"].startswith("unsupported-extension")
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before  # sources untouched


def test_failed_ingest_keeps_previous_version(ingested, tmp_path):
    params, _ = ingested
    out = tmp_path / "ingest"
    good = ingest(params.ingest.source, out_dir=out, limit_per_split=20)
    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    (empty / "train" / "cat" / "x.png").write_bytes(b"garbage")
    with pytest.raises(IngestError, match="no readable images"):
        ingest(SourceParams(path=empty), out_dir=out)
    assert json.loads((out / "version.json").read_text())["version"] == good.version


def test_missing_source_says_what_to_install(tmp_path):
    with pytest.raises(IngestError, match="not found"):
        ingest(SourceParams(path=tmp_path / "nope"), out_dir=tmp_path / "out")
