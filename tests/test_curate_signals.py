"""Curation signals and decisions on a small real dataset with planted near-duplicates.

The source is real Fashion-MNIST images written as class folders, plus copies the test
plants: upscaled to 56 px and re-encoded as JPEG (so not byte-identical), within train
(near-duplicates) and from test into train (leakage). FiftyOne runs against the session's
database service (tests/conftest.py); embeddings come from the project's pretrained backbone.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tasks import curate as cur
from tasks import curation
from tasks.ingest import ingest, load_registry
from tasks.io import load_table
from tasks.params import IngestParams, SourceParams
from tests.conftest import tiny_params

N_NEAR, N_LEAK = 5, 3


def _jpeg_copy(src: Path, dest: Path) -> None:
    image = Image.open(src).convert("L").resize((56, 56), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    dest.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def planted(ingested, tmp_path_factory):
    """(params, ingest result, {source file name: what it is a copy of}) for a planted source."""
    _, result0 = ingested
    tmp = tmp_path_factory.mktemp("planted")
    rows = load_table(Path(result0.out_dir) / "manifest.parquet").to_pandas()
    src = tmp / "source"
    for row in rows.itertuples():
        folder = src / row.split / row.label.replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{row.sample_id}.png").write_bytes((Path(result0.out_dir) / row.path).read_bytes())
    train, test = rows[rows.split == "train"], rows[rows.split == "test"]
    copies = {}
    for kind, picked, n in (("near", train, N_NEAR), ("leak", test, N_LEAK)):
        for row in picked.iloc[::37].head(n).itertuples():
            name = f"{kind}-copy-{row.sample_id}.jpg"
            _jpeg_copy(Path(result0.out_dir) / row.path, src / "train" / row.label.replace("/", "-") / name)
            copies[name] = (kind, f"{row.sample_id}.png")
    params = tiny_params(tmp, ["ingest.limit_per_split=null"])
    result = ingest(SourceParams(path=src, format="image-folder"), out_dir=params.paths.data / "ingest",
                    params=IngestParams(source=SourceParams(path=src, format="image-folder"), workers=1),
                    registry=params.paths.versions)
    return params, result, copies


def _curate(params, **over):
    p = params.curate.model_copy(update=over) if over else params.curate
    return cur.curate(params.paths.data / "ingest", params=p, out_dir=params.paths.data / "curate",
                      train=params.train, curation_dir=params.paths.curation, cache_dir=params.paths.cache,
                      registry=params.paths.versions, seed=params.seed)


@pytest.fixture(scope="module")
def curated(planted):
    params, result, copies = planted
    first = _curate(params)
    manifest = load_table(params.paths.data / "curate" / "manifest.parquet").to_pandas()
    signals = load_table(params.paths.data / "curate" / "signals.parquet").to_pandas()
    # source file name -> sample_id, to find the planted copies and their originals
    by_file = {Path(k).name: s for k, s in zip(manifest["source_key"], manifest["sample_id"])}
    return params, result, copies, first, manifest, signals, by_file


def test_planted_near_duplicates_are_found(curated):
    _, _, copies, _, _, signals, by_file = curated
    s = signals.set_index("sample_id")
    for name, (kind, original) in copies.items():
        copy_id, orig_id = by_file[name], by_file[original]
        pair = {s.at[copy_id, "near_duplicate_of"], s.at[orig_id, "near_duplicate_of"]}
        assert copy_id in pair or orig_id in pair, f"{kind} copy {name} not paired with {original}"
    flagged = s["near_duplicate_of"].notna().sum()
    assert flagged < 0.05 * len(s), f"{flagged} of {len(s)} flagged: threshold too loose for real images"


def test_planted_cross_split_copy_is_leakage_and_excluded_from_train(curated):
    _, _, copies, result, manifest, signals, by_file = curated
    s, m = signals.set_index("sample_id"), manifest.set_index("sample_id")
    for name, (kind, original) in copies.items():
        copy_id = by_file[name]
        if kind == "leak":
            assert s.at[copy_id, "leaks_with"] == by_file[original]
            assert m.at[copy_id, "excluded"] and m.at[copy_id, "exclusion_reason"] == f"near-leak:test:{by_file[original]}"
            assert not m.at[by_file[original], "excluded"]  # the test image stays
        else:
            assert pd.isna(s.at[copy_id, "leaks_with"])
    assert result.reasons["near-leak"] >= N_LEAK
    assert result.n_excluded < 0.05 * len(manifest)  # the rule excludes copies, not the split


def test_signals_are_fields_and_saved_views(curated):
    import fiftyone as fo

    _, _, _, result, _, _, by_file = curated
    ds = fo.load_dataset(result.dataset_name)
    schema = ds.get_field_schema()
    for field in ("uniqueness", "representativeness", "near_duplicate_of", "leaks_with"):
        assert field in schema
    assert {"near-duplicates", "leaky", "least-unique", "duplicates"} <= set(ds.list_saved_views())
    leaky_ids = set(ds.load_saved_view("leaky").values("sample_id"))
    assert all(by_file[n] in leaky_ids for n, (k, _) in curated[2].items() if k == "leak")
    assert len(ds.load_saved_view("near-duplicates")) >= 2 * (N_NEAR + N_LEAK)


def test_tags_become_a_curation_file_and_a_new_version(curated):
    import fiftyone as fo
    from fiftyone import ViewField as F

    params, ingest_result, _, first, manifest, _, _ = curated
    ds = fo.load_dataset(first.dataset_name)
    kept_train = manifest[(manifest.split == "train") & ~manifest.excluded]["sample_id"].tolist()
    to_exclude, to_relabel = kept_train[:4], kept_train[4:6]
    ds.select_by("sample_id", to_exclude).tag_samples("exclude")
    ds.select_by("sample_id", [to_relabel[0]]).tag_samples("relabel:Bag")
    sample = ds.match(F("sample_id") == to_relabel[1]).first()
    sample["corrected_label"] = fo.Classification(label="Sandal")
    sample.tags.append("relabel")
    sample.save()

    pulled = cur.pull(params)
    assert pulled["decisions"] == {"exclude": 4, "relabel": 2}
    decisions = pd.read_csv(pulled["file"])
    assert list(decisions.columns) == list(curation.DECISION_COLUMNS)
    assert set(decisions.loc[decisions.action == "exclude", "sample_id"]) == set(to_exclude)
    assert decisions["source"].str.startswith("curator:").all()

    second = _curate(params)
    assert second.curated_version != first.curated_version
    out = load_table(params.paths.data / "curate" / "manifest.parquet").to_pandas().set_index("sample_id")
    assert len(out) == len(manifest)  # nothing dropped
    assert out.loc[to_exclude, "excluded"].all()
    assert out.loc[to_exclude, "exclusion_reason"].str.startswith("curator:").all()
    assert out.at[to_relabel[0], "label"] == "Bag" and out.at[to_relabel[1], "label"] == "Sandal"
    assert out.loc[to_relabel, "label_original"].notna().all()
    assert second.n_excluded == first.n_excluded + 4
    applied = load_table(params.paths.data / "curate" / "curation.parquet").to_pandas()
    assert set(applied["source"].str.split(":").str[0]) == {"rule", "curator"}

    info = json.loads((params.paths.data / "curate" / "curation.json").read_text())
    entries = {e["version"]: e for e in load_registry(params.paths.versions)}
    entry = entries[second.curated_version]
    assert entry["kind"] == "curation" and entry["parent"] == ingest_result.version
    assert entry["curation_sha256"] == info["curation_sha256"] and entry["decisions_file"] == pulled["file"]
    assert entry["kept_per_split"]["train"] == info["kept_per_split"]["train"]
    assert ingest_result.version in entries  # the parent is still registered, its files untouched
    assert len(load_table(Path(ingest_result.out_dir) / "manifest.parquet")) == len(manifest)
    # the App shows the decisions: relabel is the ground truth now, exclusions are marked
    assert ds.match(F("sample_id") == to_relabel[0]).first().ground_truth.label == "Bag"


def test_resync_is_idempotent(curated):
    import fiftyone as fo

    params, _, _, first, manifest, signals, _ = curated
    outputs = {f: (params.paths.data / "curate" / f).read_bytes() for f in ("curation.json", "manifest.parquet")}
    again = _curate(params)
    # the outputs are DVC-tracked inputs of training: byte-identical, or the model retrains
    assert outputs == {f: (params.paths.data / "curate" / f).read_bytes() for f in outputs}
    assert again.fiftyone["action"] == "unchanged"
    # computed embeddings the first time, cached ones now: the same signals either way
    cached = load_table(params.paths.data / "curate" / "signals.parquet").to_pandas()
    pd.testing.assert_frame_equal(cached, signals)
    ds = fo.load_dataset(first.dataset_name)
    assert len(ds) == len(manifest) == len(set(ds.values("sample_id")))
    assert again.fiftyone["n_samples"] == len(manifest)


def test_bad_decision_file_names_file_line_and_rule(curated, tmp_path):
    _, result, *_ = curated
    bad = tmp_path / f"{result.version}.csv"
    bad.write_text("sample_id,action,label,reason,source\nnot-a-sample,exclude,,x,curator:me\n")
    with pytest.raises(curation.CurationError, match=rf"{bad}, line 2: sample_id 'not-a-sample'"):
        curation.read_decisions(bad, classes=result.classes, sample_ids={"a"})
