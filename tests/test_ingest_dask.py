"""Sharded ingest (tasks/ingest_shards.py, flows/ingest.py) publishes the version one process publishes.

Real data only: Fashion-MNIST images written as PNG files plus corrupt files, the idx files
themselves, deepforest's VOC boxes, a zip archive. The flow runs under Prefect's test harness
on a real local Dask cluster of 2 worker processes; the other cases shard in this process
(the same gate_shard code the Dask workers run) to stay fast.
"""

from __future__ import annotations

import gzip
import json
import shutil
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from bench.project import make_project
from tasks.formats import _read_idx
from tasks.ingest import ingest
from tasks.ingest_shards import ShardError, gate_shard, ingest_sharded, plan_shards
from tasks.params import IngestParams, SourceParams
from tests.conftest import TINY_OVERRIDES
from tests.test_ingest import _deepforest_voc

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _fmnist_folder(dest: Path, per_split: dict[str, int]) -> Path:
    """Real Fashion-MNIST images as PNG files in dest/<split>/<label>/, plus three corrupt files."""
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz", 0x00000803)
        labels = _read_idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz", 0x00000801)
        for i in range(per_split[split]):
            d = dest / split / str(int(labels[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(d / f"{i:05d}.png")
    good = (dest / "train" / "0").iterdir().__next__().read_bytes()
    (dest / "train" / "0" / "zz-truncated.png").write_bytes(good[: len(good) // 2])
    (dest / "train" / "1" / "zz-empty.png").write_bytes(b"")
    (dest / "test" / "2" / "zz-text.png").write_text("not an image")
    return dest


def _assert_same_version(a: Path, b: Path) -> None:
    """Same version id, same tables (row for row), same stored image files (byte for byte)."""
    info_a, info_b = (json.loads((d / "version.json").read_text()) for d in (a, b))
    assert info_a == info_b
    for name in ("manifest", "annotations", "quarantine", ):
        ta, tb = pq.read_table(a / f"{name}.parquet"), pq.read_table(b / f"{name}.parquet")
        assert ta.equals(tb), name
    files_a = {p.relative_to(a): p.read_bytes() for p in (a / "images").rglob("*") if p.is_file()}
    files_b = {p.relative_to(b): p.read_bytes() for p in (b / "images").rglob("*") if p.is_file()}
    assert files_a == files_b and files_a


def test_flow_on_dask_matches_single_process(harness, tmp_path, monkeypatch):
    from flows.ingest import ingest_flow
    from pixelops.stages import is_up_to_date
    from tasks.ingest import load_registry

    src = _fmnist_folder(tmp_path / "src", {"train": 240, "test": 120})
    project = make_project(tmp_path / "project", [
        *TINY_OVERRIDES, f"ingest.source.path={src}", "ingest.source.format=image-folder",
        "ingest.source.classes=null", "ingest.max_bad_fraction=0.05", "ingest.limit_per_split=null"])
    monkeypatch.chdir(project)  # paths in params.yaml are relative to the project, as for `dvc repro`
    from tasks.params import load_params

    params = load_params(project / "params.yaml")
    plain = ingest(params.ingest.source, out_dir=tmp_path / "plain", params=params.ingest)

    first = ingest_flow(root=str(project), dask_workers=2)
    assert not first["skipped"] and first["version"] == plain.version
    assert plain.n_images == 360 and plain.n_quarantined == 3
    _assert_same_version(tmp_path / "plain", project / "data" / "ingest")
    reasons = {r["source_key"].rsplit("/", 1)[1]: r["reason"]
               for r in pq.read_table(project / "data" / "ingest" / "quarantine.parquet").to_pylist()}
    assert reasons["zz-empty.png"] == "empty-file" and set(reasons) == {"zz-truncated.png", "zz-empty.png",
                                                                          "zz-text.png"}
    # DVC records the run (so `dvc repro` skips it), the registry line has its DVC hash,
    # and a second run of the flow is skipped.
    assert is_up_to_date("ingest", project)
    entry = load_registry(project / params.paths.versions)[-1]
    assert entry["version"] == plain.version and entry["dvc_md5"]
    again = ingest_flow(root=str(project), dask_workers=2)
    assert again["skipped"] and again["version"] == plain.version


def test_idx_with_limit_per_split_across_the_split_boundary(tmp_path):
    # 3 shards over 2 × 150 items: the middle shard spans the end of train and the start of test.
    params = IngestParams(source=SourceParams(path=FMNIST, format="idx", classes=None), limit_per_split=150,
                          workers=1)
    plain = ingest(params.source, out_dir=tmp_path / "plain", params=params)
    sharded = ingest_sharded(params.source, out_dir=tmp_path / "sharded", params=params, n_shards=3)
    assert sharded.version == plain.version and sharded.per_split == {"test": 150, "train": 150}
    _assert_same_version(tmp_path / "plain", tmp_path / "sharded")


def test_voc_detection_from_a_zip_archive(tmp_path):
    folder = _deepforest_voc(tmp_path / "voc")
    archive = tmp_path / "voc.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(folder.iterdir()):
            z.write(p, f"voc/{p.name}")
    results = {}
    for name, path in (("folder", folder), ("zip", archive)):
        params = IngestParams(source=SourceParams(path=path, format="voc"), workers=1)
        plain = ingest(params.source, out_dir=tmp_path / f"{name}-plain", params=params)
        sharded = ingest_sharded(params.source, out_dir=tmp_path / f"{name}-sharded", params=params, n_shards=2)
        assert sharded.version == plain.version and sharded.n_annotations == 61 + 37
        _assert_same_version(tmp_path / f"{name}-plain", tmp_path / f"{name}-sharded")
        results[name] = sharded.version
    assert results["zip"] == results["folder"]  # the shards read the archive extracted once
    assert not list(tmp_path.glob(".*.partial"))


def test_idx_file_replaced_under_the_shards_fails_and_publishes_nothing(tmp_path):
    src = tmp_path / "idx"
    shutil.copytree(FMNIST, src)
    params = IngestParams(source=SourceParams(path=src, format="idx", classes=None), limit_per_split=40, workers=1)

    def replace_then_gate(source, p, shards):  # the train images change after ingest listed them
        path = src / "train-images-idx3-ubyte.gz"
        raw = bytearray(gzip.decompress(path.read_bytes()))
        raw[16: 16 + 28 * 28 * 40] = bytes(255 - b for b in raw[16: 16 + 28 * 28 * 40])  # first 40 inverted
        path.write_bytes(gzip.compress(raw, compresslevel=1))
        return [gate_shard(source, p, s) for s in shards]

    with pytest.raises(ShardError, match="other bytes than the reader"):
        ingest_sharded(params.source, out_dir=tmp_path / "out", params=params, n_shards=2,
                       run_shards=replace_then_gate)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial"))


def test_plan_shards_contiguous_and_balanced():
    shards = plan_shards([0, 1, 2, 3, 7, 8, 9], 3, n_items=10)
    assert [s.ranges for s in shards] == [((0, 3),), ((3, 4), (7, 8)), ((8, 10),)]
    assert [s.size for s in shards] == [3, 2, 2]
    assert plan_shards([], 4, n_items=10) == [] and len(plan_shards([5], 4, n_items=10)) == 1
    with pytest.raises(ValueError, match="outside the listing"):
        plan_shards([10], 2, n_items=10)
    with pytest.raises(ValueError, match="positive number"):
        plan_shards([1], 0, n_items=10)
