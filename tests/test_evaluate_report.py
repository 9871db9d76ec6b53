"""The evaluation report end to end on real images whose class name is an HTML attack:
escaping, offline assets, model card lineage, plot data, and the comparison with the previous run."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from tasks import curate, evaluate, ingest, train
from tasks.io import load_table
from tests.conftest import tiny_params

EVIL = '<img src=x onerror=alert(1)> & "q"'  # a legal folder name, so a legal class name
CLASSES = {"Trouser": "Trouser", "Bag": "Bag", "Sneaker": EVIL}


@pytest.fixture(scope="module")
def evaluated(ingested, tmp_path_factory):
    """3 classes of real Fashion-MNIST images as class folders, one named EVIL; trained and
    evaluated twice, the second time with another learning rate."""
    params0, result0 = ingested
    tmp = tmp_path_factory.mktemp("evil")
    rows = load_table(Path(result0.out_dir) / "manifest.parquet").to_pandas()
    src = tmp / "source"
    for row in rows[rows.label.isin(list(CLASSES))].itertuples():
        folder = src / row.split / CLASSES[row.label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{row.sample_id}.png").write_bytes((Path(result0.out_dir) / row.path).read_bytes())
    overrides = ["curate.fiftyone=false", f"ingest.source={{path: '{src}', format: image-folder}}",
                 "ingest.limit_per_split=null", "evaluate.bootstrap=200", "evaluate.gallery=6"]
    params = tiny_params(tmp, overrides)
    ingest.run(params)
    curate.run(params)
    train.run(params)
    first = evaluate.run(params)
    first_html = (params.paths.reports / "evaluate" / "index.html").read_text()
    params2 = tiny_params(tmp, overrides + ["train.lr=0.0005"])
    train.run(params2)
    second = evaluate.run(params2)
    return params2, first, first_html, second


def _report(params) -> Path:
    return params.paths.reports / "evaluate"


def test_class_name_is_escaped_everywhere(evaluated):
    params, _, first_html, _ = evaluated
    html = (_report(params) / "index.html").read_text()
    for page in (first_html, html):
        assert "<img src=x" not in page and "onerror=alert(1)&gt;" in page
        assert "&lt;img src=x onerror=alert(1)&gt; &amp; &#34;q&#34;" in page
    card = (_report(params) / "model_card.md").read_text()
    assert not re.search(r"(?<!\\)<img", card) and r"\<img src=x onerror=alert(1)\>" in card


def test_page_loads_nothing_from_outside(evaluated):
    params, *_ = evaluated
    html = (_report(params) / "index.html").read_text()
    assert not re.search(r"https?://", html)
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    assert len(sources) >= 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    links = re.findall(r'href="([^"]*)"', html)
    assert set(links) <= {"model_card.md", "metrics.json"}
    assert all((_report(params) / link).is_file() for link in links)


def test_metrics_calibration_intervals_and_gallery(evaluated):
    params, _, _, second = evaluated
    m = json.loads((_report(params) / "metrics.json").read_text())
    assert m["accuracy"] == pytest.approx(second.accuracy) and m["n_test"] == second.n_test
    lo, hi = m["intervals"]["accuracy"]
    assert lo <= m["accuracy"] <= hi and hi - lo < 0.3
    assert m["top_k"] == 3 and m["top_k_accuracy"] == 1.0  # 3 classes: the top 3 always hold the truth
    assert 0 <= m["calibration"]["ece"] <= 1 and sum(b["count"] for b in m["calibration"]["bins"]) == m["n_test"]
    assert sum(c["support"] for c in m["per_class"].values()) == m["n_test"]
    wrong = m["n_test"] - round(m["accuracy"] * m["n_test"])
    mistakes = m["confident_mistakes"]
    assert len(mistakes) == min(6, wrong)
    assert all(g["true"] != g["pred"] for g in mistakes)
    assert [g["confidence"] for g in mistakes] == sorted((g["confidence"] for g in mistakes), reverse=True)


def test_plot_data_for_dvc(evaluated):
    params, _, _, second = evaluated
    with open(_report(params) / "plots" / "confusion.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == second.n_test and {r["actual"] for r in rows} == set(CLASSES.values())
    correct = sum(r["actual"] == r["predicted"] for r in rows)
    assert correct / len(rows) == pytest.approx(second.accuracy)
    with open(_report(params) / "plots" / "calibration.csv") as f:
        assert sum(int(r["count"]) for r in csv.DictReader(f)) == second.n_test


def test_model_card_names_the_training_data_version(evaluated):
    params, *_ = evaluated
    meta = json.loads((params.paths.data / "train" / "model.json").read_text())
    card = (_report(params) / "model_card.md").read_text()
    assert f"Dataset version **{meta['dataset_version']}**" in card
    assert meta["model_sha256"] in card and "## Limitations" in card and "## Intended use" in card
    assert f"- lr: {0.0005}" in card


def test_second_run_is_compared_with_the_first(evaluated):
    params, first, first_html, second = evaluated
    assert "No earlier run" in first_html
    m = json.loads((_report(params) / "metrics.json").read_text())
    cmp = m["comparison"]
    assert cmp is not None and not cmp["data"]["changed"]
    assert cmp["params_changed"]["lr"][1] == 0.0005 and cmp["params_changed"]["lr"][0] != 0.0005
    assert cmp["metrics"]["accuracy"]["previous"] == pytest.approx(first.accuracy)
    assert cmp["metrics"]["accuracy"]["delta"] == pytest.approx(second.accuracy - first.accuracy)
    history = [json.loads(line) for line in (params.paths.reports / "history.jsonl").read_text().splitlines()]
    assert [h["lineage"]["run"] for h in history][-1] == m["comparison"]["previous_run"] or len(history) == 2
    runs = sorted(p.name for p in (params.paths.reports / "runs").iterdir())
    assert len(runs) == 2 and all((params.paths.reports / "runs" / r / "index.html").is_file() for r in runs)
    html = (_report(params) / "index.html").read_text()
    assert cmp["previous_run"] in html and "Since the previous run" in html and "top-3 accuracy" in html
