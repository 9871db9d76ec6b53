"""The validate gate on a tiny real Fashion-MNIST version: passes clean data, names what fails."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, tiny_params

from tasks import validate as V

XSS_CLASS = "<script>alert(1)</script>"
XSS_LABEL = "<img src=x onerror=alert(1)>"


def _make_version(tmp_path: Path, ingested, mutate=None, *, classes=None, extra=None):
    """Copy the fixture's version into tmp_path (manifest changed by `mutate`); return its params."""
    _, result = ingested
    src, dst = Path(result.out_dir), tmp_path / "data" / "ingest"
    dst.mkdir(parents=True)
    df = pd.read_parquet(src / "manifest.parquet")
    (mutate(df) if mutate else df).to_parquet(dst / "manifest.parquet", index=False)
    shutil.copy(src / "version.json", dst / "version.json")
    (dst / "classes.json").write_text(json.dumps(classes or result.classes))
    return tiny_params(tmp_path, extra)


def _validate(params, tmp_path: Path) -> V.ValidateResult:
    ingest_dir = Path(params.paths.data) / "ingest"
    return V.validate(ingest_dir / "manifest.parquet", params=params.validate_, report_dir=tmp_path / "report",
                      classes=json.loads((ingest_dir / "classes.json").read_text()), version="vtest")


def test_gate_passes_on_ingested_version(tmp_path, ingested):
    params = _make_version(tmp_path, ingested)
    result = V.run(params)
    assert result.success and not result.failures and not result.errors
    assert result.version == ingested[1].version and result.n_rows == ingested[1].n_images
    report_dir = tmp_path / "reports" / "validate"
    summary = json.loads((report_dir / "summary.json").read_text())
    assert summary["success"] is True and summary["version"] == result.version
    assert [e["name"] for e in summary["expectations"]] == list(V.CHECKS)
    assert all(e["status"] == "passed" and e["unexpected_count"] == 0 for e in summary["expectations"])
    assert "PASSED" in (report_dir / "index.html").read_text()
    assert (report_dir / "params.resolved.yaml").is_file()
    assert all(f"| {name} |" in V.markdown_summary(result) for name in V.CHECKS)


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


@pytest.mark.parametrize(
    ("mutate", "name", "count", "extra"),
    [
        (_relabel, "label_in_class_map", 3, None),
        (_duplicate_id, "unique_sample_id", 2, None),
        (_null_path, "no_nulls", 1, None),
        (_too_wide, "image_size_in_bounds", 1, None),
        (None, "min_per_class", 20, ["validate.min_per_class=1000"]),  # 10 classes x 2 splits
    ],
)
def test_bad_manifest_fails_naming_expectation(tmp_path, ingested, mutate, name, count, extra):
    params = _make_version(tmp_path, ingested, mutate, extra=extra)
    with pytest.raises(V.ValidationFailed) as info:
        V.run(params)
    message, result = str(info.value), info.value.result
    assert f"- {name} (" in message and f"{count} unexpected" in message
    assert result.failures == [name] and not result.success
    entry = next(e for e in result.expectations if e["name"] == name)
    assert entry["unexpected_count"] == count and entry["examples"]
    example = entry["examples"][0]
    assert f"label={example['label']!r}" in message  # example rows are named in the message
    summary = json.loads((tmp_path / "reports" / "validate" / "summary.json").read_text())
    assert summary["success"] is False and summary["failures"] == [name]


def _leak(df):
    train, test = df.index[df["split"] == "train"][0], df.index[df["split"] == "test"][0]
    df.loc[train, "content_hash"] = df.loc[test, "content_hash"]
    return df


def test_leakage_is_a_warning_unless_severity_is_error(tmp_path, ingested):
    result = V.run(_make_version(tmp_path / "warn", ingested, _leak))
    assert result.success and result.warnings == ["no_cross_split_content"] and not result.failures
    entry = next(e for e in result.expectations if e["name"] == "no_cross_split_content")
    assert entry["status"] == "failed" and entry["unexpected_count"] == 2
    assert {e["split"] for e in entry["examples"]} == {"train", "test"}

    strict = ["validate.severity.no_cross_split_content=error"]
    with pytest.raises(V.ValidationFailed, match="no_cross_split_content") as info:
        V.run(_make_version(tmp_path / "strict", ingested, _leak, extra=strict))
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)  # flows may pickle it


def test_html_escapes_data_and_loads_nothing_external(tmp_path, ingested):
    def inject(df):
        df.loc[0, "label"] = XSS_LABEL
        return df

    classes = [*ingested[1].classes, XSS_CLASS]  # a class with no images: min_per_class shows it
    result = _validate(_make_version(tmp_path, ingested, inject, classes=classes), tmp_path)
    assert not result.success
    page = Path(result.html_path).read_text()
    assert XSS_CLASS not in page and XSS_LABEL not in page and "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x" in page
    assert "http://" not in page and "https://" not in page


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
