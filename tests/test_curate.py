"""Stage curate on a tiny real Fashion-MNIST version, against a real FiftyOne database.

All FiftyOne tests share one module-scoped curation (one database process, started once
by this pytest process, in the temp FIFTYONE_DATABASE_DIR that conftest sets).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tasks import curate as cur
from tasks.io import load_table
from tests.conftest import tiny_params

ROOT = Path(__file__).resolve().parents[1]


def _row(df: pd.DataFrame, split: str, i: int = 0) -> dict:
    return df[df["split"] == split].iloc[i].to_dict()


def _with_injected(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """Add two train copies of a train image (ids sorting before and after the original),
    a train and a val copy of a test image, and a second copy of a test image in test."""
    train, test = _row(df, "train"), _row(df, "test")
    extra = [
        {**train, "sample_id": "0" * 24},                    # sorts first: becomes the kept copy
        {**train, "sample_id": "z" * 24},
        {**test, "sample_id": "leak-train", "split": "train"},
        {**test, "sample_id": "leak-val", "split": "val"},
        {**test, "sample_id": "zz-test-copy"},                # a duplicate inside test
    ]
    ids = {"train": train["sample_id"], "test": test["sample_id"]}
    return pd.concat([df, pd.DataFrame(extra)], ignore_index=True), ids


@pytest.fixture(scope="module")
def manifest_df(ingested) -> pd.DataFrame:
    _, result = ingested
    return load_table(result.manifest).to_pandas()


def test_find_exclusions_marks_duplicates_and_leaks(manifest_df):
    df, ids = _with_injected(manifest_df)
    out = cur.find_exclusions(df, exclude_duplicates=True, exclude_leakage=True)
    by_id = out.set_index("sample_id")
    reason = by_id["exclusion_reason"]

    assert len(out) == len(df) and list(out["sample_id"]) == list(df["sample_id"])  # order kept
    assert reason["0" * 24] is None                                    # first by sample_id is kept
    assert reason[ids["train"]] == "duplicate-of:" + "0" * 24
    assert reason["z" * 24] == "duplicate-of:" + "0" * 24
    assert reason["leak-train"] == "leak:test" and reason["leak-val"] == "leak:test"
    assert not out.loc[out["split"] == "test", "excluded"].any()       # test is never modified
    assert by_id.loc["zz-test-copy", "tags"] == ["duplicate"]          # tagged, not excluded
    assert by_id.loc["leak-train", "tags"] == ["leak"]
    assert int(out["excluded"].sum()) == 4
    assert cur.reason_counts(out) == {"duplicate": 2, "leak": 2}
    assert out.loc[~out["excluded"], "exclusion_reason"].isna().all()


def test_find_exclusions_flags_choose_what_is_excluded(manifest_df):
    df, _ = _with_injected(manifest_df)
    leaks_only = cur.find_exclusions(df, exclude_duplicates=False, exclude_leakage=True)
    assert cur.reason_counts(leaks_only) == {"duplicate": 0, "leak": 2}
    nothing = cur.find_exclusions(df, exclude_duplicates=False, exclude_leakage=False)
    assert not nothing["excluded"].any()
    assert sum("duplicate" in t for t in nothing["tags"]) == 3      # facts are still tagged


def test_find_exclusions_rejects_repeated_sample_ids(manifest_df):
    df = pd.concat([manifest_df, manifest_df.iloc[:1]], ignore_index=True)
    with pytest.raises(cur.CurateError, match=manifest_df["sample_id"].iloc[0]):
        cur.find_exclusions(df, exclude_duplicates=True, exclude_leakage=True)


def test_importing_curate_does_not_import_fiftyone():
    code = "import sys, tasks.curate; sys.exit('fiftyone' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT).returncode == 0


def test_curate_reports_missing_inputs(tmp_path, params_tiny):
    with pytest.raises(cur.CurateError, match="run the ingest stage first"):
        cur.curate(tmp_path / "nowhere", params=params_tiny.curate, out_dir=tmp_path / "curate")


# --------------------------------------------------------------------------- FiftyOne


@pytest.fixture(scope="module")
def curated(ingested, tmp_path_factory):
    params, ingest_result = ingested
    out_dir = tmp_path_factory.mktemp("curated") / "curate"
    result = cur.curate(Path(ingest_result.out_dir), params=params.curate, out_dir=out_dir,
                        curation_dir=params.paths.curation, cache_dir=params.paths.cache)
    return params, ingest_result, result, out_dir


@pytest.fixture(scope="module")
def fo(curated):
    import fiftyone

    return fiftyone


def test_curate_writes_manifest_and_summary(curated):
    _, ingest_result, result, out_dir = curated
    table = load_table(out_dir / "manifest.parquet")
    assert table.schema.equals(cur.CURATED_SCHEMA)
    source = load_table(ingest_result.manifest)
    assert table.num_rows == source.num_rows == result.n_samples
    assert table.column("path").to_pylist() == source.column("path").to_pylist()   # still relative
    info = json.loads((out_dir / "curation.json").read_text())
    assert info["version"] == ingest_result.version == result.version
    assert info["images_root"] == ingest_result.out_dir
    assert info["dataset_name"] == result.dataset_name == f"pixelops-{ingest_result.version}"
    assert info["n_excluded"] == result.n_excluded == sum(result.reasons.values())


def test_fiftyone_dataset_holds_the_version(curated, fo):
    _, ingest_result, result, _ = curated
    ds = fo.load_dataset(result.dataset_name)
    assert ds.persistent and len(ds) == result.n_samples
    splits = {t: n for t, n in ds.count_sample_tags().items() if t in ingest_result.per_split}
    assert splits == ingest_result.per_split      # 300 train, 300 test
    assert ds.default_classes == ingest_result.classes
    assert {"duplicates", "leaky"} <= set(ds.list_saved_views())
    sample = ds.match(fo.ViewField("excluded") == False).first()
    assert os.path.isabs(sample.filepath) and os.path.isfile(sample.filepath)
    assert isinstance(sample.ground_truth, fo.Classification) and sample.ground_truth.label in ds.default_classes
    assert sample.excluded is False and sample.exclusion_reason is None
    manifest = load_table(ingest_result.manifest)
    assert sorted(ds.values("sample_id")) == sorted(manifest.column("sample_id").to_pylist())


def test_curate_twice_is_idempotent(curated, fo):
    params, ingest_result, first, out_dir = curated
    again = cur.curate(Path(ingest_result.out_dir), params=params.curate, out_dir=out_dir,
                       curation_dir=params.paths.curation, cache_dir=params.paths.cache)
    assert again.fiftyone["action"] == "unchanged"
    ds = fo.load_dataset(first.dataset_name)
    ids = ds.values("sample_id")
    assert len(ds) == first.n_samples == len(set(ids))


def test_sync_updates_in_place_and_rebuilds_on_other_ids(curated, fo, manifest_df):
    _, ingest_result, _, _ = curated
    root, classes, name = Path(ingest_result.out_dir), ingest_result.classes, "pixelops-test-sync"
    df, _ = _with_injected(manifest_df)
    df = df[df["split"] != "val"].reset_index(drop=True)   # keep one leak: into train
    marked = cur.find_exclusions(df, exclude_duplicates=True, exclude_leakage=True)
    first = cur.sync_fiftyone(marked, images_root=root, dataset_name=name, classes=classes)
    assert first["action"] == "created" and first["n_samples"] == len(df)
    ds = fo.load_dataset(name)
    assert len(ds.load_saved_view("duplicates")) == 3 and len(ds.load_saved_view("leaky")) == 1
    ds.match(fo.ViewField("sample_id") == "z" * 24).tag_samples("checked")      # a curator's tag

    unmarked = cur.find_exclusions(df, exclude_duplicates=False, exclude_leakage=False)
    second = cur.sync_fiftyone(unmarked, images_root=root, dataset_name=name, classes=classes)
    assert second["action"] == "updated" and len(ds) == len(df)
    assert ds.count_values("excluded") == {False: len(df)}
    assert set(ds.match(fo.ViewField("sample_id") == "z" * 24).first().tags) == {"train", "duplicate", "checked"}

    fewer = unmarked.iloc[:-3]
    third = cur.sync_fiftyone(fewer, images_root=root, dataset_name=name, classes=classes)
    assert third["action"] == "rebuilt"
    assert len(fo.load_dataset(name)) == len(fewer) == len(set(fo.load_dataset(name).values("sample_id")))
    fo.delete_dataset(name)


def test_launch_app_names_a_missing_dataset(curated):
    params = curated[0]
    from tasks.fo_app import AppError

    with pytest.raises(AppError, match="no FiftyOne dataset 'pixelops-vdoesnotexist'"):
        cur.launch_app("vdoesnotexist", params=params)


def test_detection_ground_truth_boxes_in_fiftyone(tmp_path):
    """The deepforest tree crowns (real VOC files): boxes, in FiftyOne's relative format."""
    import fiftyone as fo

    from tasks.ingest import ingest
    from tasks.params import IngestParams, SourceParams
    from tests.test_ingest import _deepforest_voc

    src = _deepforest_voc(tmp_path / "voc")
    source = SourceParams(path=src, format="voc")
    ingested = ingest(source, out_dir=tmp_path / "ingest", params=IngestParams(source=source, workers=1))
    params = tiny_params(tmp_path, ["curate.dataset_prefix=detection"])
    result = cur.curate(tmp_path / "ingest", params=params.curate, out_dir=tmp_path / "curate", train=params.train,
                        curation_dir=tmp_path / "curation", cache_dir=tmp_path / "cache")
    ds = fo.load_dataset(result.dataset_name)
    counts = sorted(len(s.ground_truth.detections) for s in ds.select_fields("ground_truth"))
    assert counts == [37, 61]
    box = ds.match(fo.ViewField("ground_truth.detections").length() > 0).first().ground_truth.detections[0]
    assert box.label in ingested.classes and all(0 <= v <= 1 for v in box.bounding_box)
    again = cur.curate(tmp_path / "ingest", params=params.curate, out_dir=tmp_path / "curate", train=params.train,
                       curation_dir=tmp_path / "curation", cache_dir=tmp_path / "cache")
    assert again.fiftyone["action"] == "unchanged"
