"""The validate gate on tiny real versions (Fashion-MNIST; deepforest VOC boxes): passes clean data,
names what fails, writes the report first."""

from __future__ import annotations

import importlib.util
import json
import pickle
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, tiny_params
from PIL import Image

from tasks import validate as V
from tasks.params import ParamsError

XSS_CLASS = "<script>alert(1)</script>"
XSS_LABEL = "<img src=x onerror=alert(1)>"
XSS_FILE = "<b>tree</b>.png"


def _make_version(tmp_path: Path, ingested, mutate=None, *, classes=None, extra=None, mutate_ann=None):
    """Copy a version into tmp_path (images table changed by `mutate`, boxes by `mutate_ann`);
    return its params."""
    _, result = ingested
    src, dst = Path(result.out_dir), tmp_path / "data" / "ingest"
    dst.mkdir(parents=True)
    df = pd.read_parquet(src / "manifest.parquet")
    (mutate(df) if mutate else df).to_parquet(dst / "manifest.parquet", index=False)
    ann = pd.read_parquet(src / "annotations.parquet")
    (mutate_ann(ann) if mutate_ann else ann).to_parquet(dst / "annotations.parquet", index=False)
    shutil.copy(src / "version.json", dst / "version.json")
    (dst / "classes.json").write_text(json.dumps(classes or result.classes))
    return tiny_params(tmp_path, extra)


def _validate(params, tmp_path: Path) -> V.ValidateResult:
    ingest_dir = Path(params.paths.data) / "ingest"
    task = json.loads((ingest_dir / "version.json").read_text())["task"]
    return V.validate(ingest_dir / "manifest.parquet", params=params.validate_, report_dir=tmp_path / "report",
                      classes=json.loads((ingest_dir / "classes.json").read_text()), version="vtest", task=task,
                      annotations_path=ingest_dir / "annotations.parquet")


def _entry(result, name: str) -> dict:
    return next(e for e in result.expectations if e["name"] == name)


def _summary(params) -> dict:
    return json.loads((Path(params.paths.reports) / "validate" / "summary.json").read_text())


# --------------------------------------------------------------------------- classification


def test_gate_passes_on_ingested_version(tmp_path, ingested):
    params = _make_version(tmp_path, ingested)
    result = V.run(params)
    assert result.success and not result.failures and not result.errors and not result.warnings
    assert result.version == ingested[1].version and result.n_rows == ingested[1].n_images
    report_dir = tmp_path / "reports" / "validate"
    summary = json.loads((report_dir / "summary.json").read_text())
    assert summary["success"] is True and summary["version"] == result.version and summary["task"] == "classification"
    assert [e["name"] for e in summary["expectations"]] == list(V.CLASSIFICATION_CHECKS)
    assert all(e["status"] == "passed" and e["unexpected_count"] == 0 for e in summary["expectations"])
    assert summary["stats"]["per_split"] == {"train": 300, "test": 300}
    assert "PASSED" in (report_dir / "index.html").read_text()
    assert (report_dir / "params.resolved.yaml").is_file()
    assert all(f"| {name} |" in V.markdown_summary(result) for name in V.CLASSIFICATION_CHECKS)


def _relabel(df):
    df.loc[df.index[:3], "label"] = "Hoodie"
    return df


def _duplicate_id(df):
    df.loc[1, "sample_id"] = df.loc[0, "sample_id"]
    return df


def _null_path(df):
    df.loc[5, "path"] = None
    return df


def _too_wide(df):
    df.loc[2, "width"] = 5000
    return df


def _unknown_split(df):
    df.loc[7, "split"] = "holdout"
    return df


def _no_test_split(df):  # the whole test split lost: test's share under its min, train's over its max
    return df[df["split"] == "train"].reset_index(drop=True)


def _rare_trouser(df):  # 2 Trousers left in train (the rest relabelled), against about 30 of every other class
    trouser = df.index[(df["split"] == "train") & (df["label"] == "Trouser")]
    df.loc[trouser[2:], "label"] = "Pullover"
    return df


@pytest.mark.parametrize(
    ("mutate", "name", "count", "extra"),
    [
        (_relabel, "label_in_class_map", 3, None),
        (_duplicate_id, "unique_sample_id", 2, None),
        (_null_path, "no_nulls", 1, None),
        (_too_wide, "image_size_in_bounds", 1, None),
        (_unknown_split, "split_allowed", 1, None),
        (_no_test_split, "split_fraction_in_bounds", 2, None),  # test 0 < 0.05, train 1.0 > 0.95
        (None, "min_per_class", 20, ["validate.min_per_class=1000"]),  # 10 classes x 2 splits
        (_rare_trouser, "class_imbalance", 1, ["validate.min_per_class=1"]),  # 1 split over the ratio
    ],
)
def test_bad_manifest_fails_naming_expectation(tmp_path, ingested, mutate, name, count, extra):
    params = _make_version(tmp_path, ingested, mutate, extra=extra)
    with pytest.raises(V.ValidationFailed) as info:
        V.run(params)
    message, result = str(info.value), info.value.result
    assert f"- {name} (" in message and f"{count} unexpected" in message
    assert result.failures == [name] and not result.success
    entry = _entry(result, name)
    assert entry["unexpected_count"] == count and entry["examples"]
    example = entry["examples"][0]
    assert f"split={example['split']!r}" in message  # example rows are named in the message
    summary = _summary(params)  # written before the failure was raised
    assert summary["success"] is False and summary["failures"] == [name]


def test_class_imbalance_and_split_share_examples_name_the_culprits(tmp_path, ingested):
    params = _make_version(tmp_path, ingested, _rare_trouser, extra=["validate.min_per_class=1"])
    result = _validate(params, tmp_path)
    example = _entry(result, "class_imbalance")["examples"][0]
    assert example["split"] == "train" and example["smallest_class"] == "Trouser" and example["smallest_count"] == 2
    assert example["imbalance"] > 10

    params = _make_version(tmp_path / "share", ingested, _no_test_split)
    entry = _entry(_validate(params, tmp_path / "share"), "split_fraction_in_bounds")
    assert sorted(entry["examples"], key=lambda r: r["split"]) == [
        {"split": "test", "n_images": 0, "fraction": 0.0, "min_fraction": 0.05},
        {"split": "train", "n_images": 300, "max_fraction": 0.95, "fraction": 1.0}]


def _leak(df):
    train, test = df.index[df["split"] == "train"][0], df.index[df["split"] == "test"][0]
    df.loc[train, "content_hash"] = df.loc[test, "content_hash"]
    return df


def test_warn_only_failure_passes_the_gate_and_shows_in_the_report(tmp_path, ingested, monkeypatch, capsys):
    params = _make_version(tmp_path / "warn", ingested, _leak)
    result = V.run(params)  # the flow's door: returns, so the next stage runs
    assert result.success and result.warnings == ["no_cross_split_content"] and not result.failures
    entry = _entry(result, "no_cross_split_content")
    assert entry["status"] == "failed" and entry["unexpected_count"] == 2
    assert {e["split"] for e in entry["examples"]} == {"train", "test"}
    page = Path(result.html_path).read_text()
    assert "PASSED" in page and "failed (warn)" in page and "1 warnings" in page
    assert "Warnings (do not fail the gate):" in V.markdown_summary(result)

    monkeypatch.chdir(ROOT)  # DVC's door: main() exits 0 and names the warning
    paths = [f"paths.data={params.paths.data}", f"paths.reports={params.paths.reports}"]
    assert V.main(["validate.min_per_class=5", *paths]) == 0
    assert "warnings: no_cross_split_content" in capsys.readouterr().out

    strict = ["validate.severity.no_cross_split_content=error"]
    with pytest.raises(V.ValidationFailed, match="no_cross_split_content") as info:
        V.run(_make_version(tmp_path / "strict", ingested, _leak, extra=strict))
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)  # flows may pickle it


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = set(), set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs.update(name for name, _ in attrs)


def _assert_offline_and_escaped(page: str, *raw: str) -> None:
    """No raw data string, no http(s) reference, and no element or attribute that loads anything."""
    for text in raw:
        assert text not in page
    assert not re.search(r"https?://", page) and "url(" not in page
    parser = _Tags()
    parser.feed(page)
    assert parser.tags <= {"html", "head", "meta", "title", "style", "body", "div", "p", "b", "br", "code",
                           "table", "tr", "th", "td", "ul", "li"}, parser.tags
    assert not parser.attrs & {"src", "href", "srcset", "action", "data"}, parser.attrs


def test_html_escapes_data_and_loads_nothing_external(tmp_path, ingested):
    def inject(df):
        df.loc[0, "label"] = XSS_LABEL
        return df

    classes = [*ingested[1].classes, XSS_CLASS]  # a class with no images: min_per_class shows it
    result = _validate(_make_version(tmp_path, ingested, inject, classes=classes), tmp_path)
    assert not result.success
    page = Path(result.html_path).read_text()
    _assert_offline_and_escaped(page, XSS_CLASS, XSS_LABEL)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x" in page


def test_missing_column_is_a_suite_error_not_a_data_failure(tmp_path, ingested):
    params = _make_version(tmp_path, ingested, lambda df: df.drop(columns=["width", "content_hash"]))
    result = _validate(params, tmp_path)
    assert not result.success and result.failures == []
    assert {"image_size_in_bounds", "no_nulls", "no_cross_split_content"} <= set(result.errors)
    by_name = {e["name"]: e for e in result.expectations}
    assert by_name["image_size_in_bounds"]["status"] == "error" and "width" in by_name["image_size_in_bounds"]["error"]
    assert "content_hash" in by_name["no_cross_split_content"]["error"]
    assert by_name["label_in_class_map"]["status"] == "passed"
    assert "could not be evaluated" in V.failure_message(result)


def test_unreadable_manifest_raises_naming_the_file(tmp_path, ingested):
    params = _make_version(tmp_path, ingested)
    manifest = Path(params.paths.data) / "ingest" / "manifest.parquet"
    manifest.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="manifest.parquet"):
        V.run(params)
    (manifest.parent / "classes.json").unlink()
    with pytest.raises(FileNotFoundError, match="classes.json"):
        V.run(params)


def test_split_bounds_are_checked_when_params_load(tmp_path):
    with pytest.raises(ParamsError, match=r"split_fraction\.test"):
        tiny_params(tmp_path, ["validate.split_fraction.test=[0.6, 0.1]"])


def test_main_exit_codes(tmp_path, ingested, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # main() reads params.yaml from the working directory
    argv = ["validate.min_per_class=5"]
    good = _make_version(tmp_path / "good", ingested)
    paths = [f"paths.data={good.paths.data}", f"paths.reports={good.paths.reports}"]
    assert V.main(argv + paths) == 0
    assert "validation passed" in capsys.readouterr().out

    bad = _make_version(tmp_path / "bad", ingested, _relabel)
    paths = [f"paths.data={bad.paths.data}", f"paths.reports={bad.paths.reports}"]
    assert V.main(argv + paths) == 1
    assert "label_in_class_map" in capsys.readouterr().err


# --------------------------------------------------------------------------- detection

# Both deepforest crops are 400 x 400: OSBS_029 61 "Tree" boxes (train), SOAP_061 9 "Alive" + 28
# "Dead" (test), plus one train image with no boxes. Each class is absent from one split, so the
# per-class minimum is off (0) unless a test sets it.
DETECTION = ["validate.min_per_class=0"]
N_BOXES, N_SOAP = 98, 37


@pytest.fixture(scope="module")
def detected(tmp_path_factory):
    """A tiny real detection version: deepforest's VOC files, split by ImageSets/Main lists."""
    from tasks.ingest import ingest
    from tasks.params import IngestParams, SourceParams

    tmp = tmp_path_factory.mktemp("detected")
    data = Path(importlib.util.find_spec("deepforest").submodule_search_locations[0]) / "data"
    src = tmp / "voc"
    (src / "ImageSets" / "Main").mkdir(parents=True)
    for stem in ("OSBS_029", "SOAP_061"):
        shutil.copy(data / f"{stem}.png", src)
        shutil.copy(data / f"{stem}.xml", src)
    Image.new("RGB", (64, 48)).save(src / "background.png")  # an image with no boxes: allowed, counted
    (src / "background.xml").write_text("<annotation><filename>background.png</filename></annotation>")
    (src / "ImageSets" / "Main" / "train.txt").write_text("OSBS_029\nbackground\n")
    (src / "ImageSets" / "Main" / "test.txt").write_text("SOAP_061\n")
    source = SourceParams(path=src, format="voc")
    result = ingest(source, out_dir=tmp / "ingest", params=IngestParams(source=source, workers=1))
    assert result.task == "detection" and result.n_annotations == N_BOXES
    return None, result


def _boxes_of(ann, images, stem):
    sid = images.loc[images["source_key"].str.contains(stem), "sample_id"].iloc[0]
    return ann.index[ann["sample_id"] == sid]


def test_detection_gate_passes_and_counts_images_without_boxes(tmp_path, detected):
    params = _make_version(tmp_path, detected, extra=DETECTION)
    result = V.run(params)
    assert result.success and not result.failures and not result.errors and not result.warnings, V.failure_message(result)
    assert result.task == "detection" and [e["name"] for e in result.expectations] == list(V.CHECKS)
    assert all(e["status"] == "passed" and e["unexpected_count"] == 0 for e in result.expectations)
    assert result.stats["images_without_boxes"] == 1 and result.stats["n_boxes"] == N_BOXES
    assert result.stats["per_class"] == {"Alive": 9, "Dead": 28, "Tree": 61}
    summary = _summary(params)
    assert summary["task"] == "detection" and summary["stats"]["images_without_boxes"] == 1
    assert "images without boxes (allowed): 1" in Path(result.html_path).read_text()
    assert "98 boxes" in V.markdown_summary(result)


def test_detection_version_without_any_box_passes_and_counts_them(tmp_path, detected):
    params = _make_version(tmp_path, detected, mutate_ann=lambda a: a.iloc[:0], extra=DETECTION)
    result = V.run(params)
    assert result.success and not result.errors, V.failure_message(result)
    assert result.stats["images_without_boxes"] == 3 and result.stats["n_boxes"] == 0


def _set(row: int, **values):
    def mutate(ann):
        old = ann.loc[row].copy()  # every new value is computed from the row as it was
        for column, value in values.items():
            ann.loc[row, column] = value(old) if callable(value) else value
        return ann
    return mutate


@pytest.mark.parametrize(
    ("mutate_ann", "name", "count", "extra"),
    [
        (_set(3, x2=405.5), "box_inside_image", 1, None),          # 5.5 px past a 400 px edge
        (_set(3, x2=lambda r: r.x1 + 0.5), "box_positive_size", 1, None),
        (_set(3, x1=lambda r: r.x2, x2=lambda r: r.x1), "box_coords_ordered", 1, None),  # x corners swapped
        (_set(3, x1=0.0, y1=0.0, x2=400.0, y2=400.0), "box_area_in_bounds", 1, ["validate.max_box_area=0.5"]),
        (_set(3, label="Stump"), "label_in_class_map", 1, None),
        (_set(3, y1=None), "no_nulls", 1, None),
        (_set(3, sample_id="no-such-image"), "box_image_in_manifest", 1, None),
        (None, "max_boxes_per_image", 1, ["validate.max_boxes_per_image=50"]),  # OSBS_029 has 61
        (None, "min_per_class", 4, ["validate.min_per_class=10"]),  # boxes: Alive, Dead in train; Tree, Alive in test
        (None, "class_imbalance", 1, ["validate.max_class_imbalance=3"]),  # test: 28 Dead / 9 Alive
    ],
)
def test_bad_boxes_fail_naming_expectation(tmp_path, detected, mutate_ann, name, count, extra):
    params = _make_version(tmp_path, detected, mutate_ann=mutate_ann, extra=[*DETECTION, *(extra or [])])
    with pytest.raises(V.ValidationFailed) as info:
        V.run(params)
    message, result = str(info.value), info.value.result
    assert result.failures == [name] and not result.errors, message
    assert f"- {name} (" in message and f"{count} unexpected" in message
    entry = _entry(result, name)
    assert entry["unexpected_count"] == count and entry["examples"]
    assert f"split={entry['examples'][0]['split']!r}" in message
    assert _summary(params)["failures"] == [name]


def test_out_of_bounds_and_xywh_boxes(tmp_path, detected):
    images = pd.read_parquet(Path(detected[1].out_dir) / "manifest.parquet")
    expected_xywh = []

    def plant(ann):
        soap = _boxes_of(ann, images, "SOAP_061")  # one source file converted to x, y, w, h
        ann.loc[soap, "x2"] -= ann.loc[soap, "x1"]
        ann.loc[soap, "y2"] -= ann.loc[soap, "y1"]
        b = ann.loc[soap]  # a box valid both ways (w > x and h > y) cannot be told apart
        expected_xywh.append(int(((b.x2 <= b.x1) | (b.y2 <= b.y1)).sum()))
        osbs = _boxes_of(ann, images, "OSBS_029")
        ann.loc[osbs[:2], "x1"] = -12.0  # two boxes reaching past the left edge
        return ann

    params = _make_version(tmp_path, detected, mutate_ann=plant, extra=DETECTION)
    with pytest.raises(V.ValidationFailed) as info:
        V.run(params)
    result, message = info.value.result, str(info.value)
    assert set(result.failures) == {"box_inside_image", "box_coords_ordered"}
    assert result.warnings == ["box_not_xywh"]  # the warning says why the boxes are out of order
    assert _entry(result, "box_inside_image")["unexpected_count"] == 2
    xywh = _entry(result, "box_not_xywh")
    assert xywh["unexpected_count"] == expected_xywh[0] > N_SOAP // 2
    assert {e["source_key"] for e in xywh["examples"]} == {"SOAP_061.png"}
    assert "Warnings (do not fail the gate):\n- box_not_xywh" in message
    assert _entry(result, "box_positive_size")["status"] == "passed"

    # one stray swapped box among 98 is under validate.xywh_max_fraction: no xywh warning
    params = _make_version(tmp_path / "one", detected, mutate_ann=_set(0, x1=lambda r: r.x2, x2=lambda r: r.x1),
                           extra=DETECTION)
    result = _validate(params, tmp_path / "one")
    assert result.failures == ["box_coords_ordered"] and result.warnings == []


def test_detection_missing_box_column_is_a_suite_error(tmp_path, detected):
    params = _make_version(tmp_path, detected, mutate_ann=lambda a: a.drop(columns=["x2"]), extra=DETECTION)
    result = _validate(params, tmp_path)
    assert not result.success and result.failures == []
    assert {"box_inside_image", "box_positive_size", "box_coords_ordered", "box_area_in_bounds",
            "box_not_xywh"} <= set(result.errors)
    assert "x2 not in the annotations" in _entry(result, "box_coords_ordered")["error"]
    for name in ("label_in_class_map", "box_image_in_manifest", "max_boxes_per_image", "split_fraction_in_bounds"):
        assert _entry(result, name)["status"] == "passed", name


def test_detection_needs_its_annotations_table(tmp_path, detected):
    params = _make_version(tmp_path, detected, extra=DETECTION)
    (Path(params.paths.data) / "ingest" / "annotations.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="annotations.parquet"):
        V.run(params)


def test_detection_html_escapes_box_labels_and_file_names(tmp_path, detected):
    def rename(df):
        df.loc[df["source_key"] == "SOAP_061.png", "source_key"] = XSS_FILE
        return df

    def relabel(ann):
        ann.loc[ann["label"] == "Alive", "label"] = XSS_CLASS
        return ann

    params = _make_version(tmp_path, detected, rename, mutate_ann=relabel, extra=DETECTION)
    result = _validate(params, tmp_path)
    assert result.failures == ["label_in_class_map"]
    assert _entry(result, "label_in_class_map")["examples"][0]["source_key"] == XSS_FILE
    page = Path(result.html_path).read_text()
    _assert_offline_and_escaped(page, XSS_CLASS, XSS_FILE)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;tree&lt;/b&gt;.png" in page


def test_gx_counts_match_plain_pandas_on_planted_defects(tmp_path):
    """Every rule's unexpected count equals the same rule written as a pandas mask (bench/validate.py)."""
    from bench.validate import _gx_path, _pandas_path, _write_version

    _write_version(tmp_path / "v", 20_000, defects=True)
    p = tiny_params(tmp_path).validate_
    gx = _gx_path(tmp_path / "v", p, tmp_path / "gx")
    assert gx == _pandas_path(tmp_path / "v", p, tmp_path / "pandas")
    assert all(gx[name] for name in ("box_inside_image", "box_positive_size", "box_coords_ordered", "box_not_xywh",
                                     "box_image_in_manifest", "label_in_class_map", "no_nulls", "max_boxes_per_image"))
