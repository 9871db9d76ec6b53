"""Hostile class names through the real report writers: CSV cells a spreadsheet cannot run, HTML
that shows data as text, markdown whose tables keep their columns.

One tiny real dataset: Fashion-MNIST images of the session's `ingested` version, as a csv label
file whose 8 class names are attacks. It is ingested, validated, given curators' App tags in a
real FiftyOne dataset (pulled to curation/<version>.csv, read back by the curate stage), trained
one epoch and evaluated. The sweep report gets the same names as categorical choices.
"""

from __future__ import annotations

import csv
import io
import re
import uuid
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pandas as pd
import pytest

from tasks import curate, curation, evaluate, ingest, safe_csv, train, validate
from tasks import evaluate_report as er
from tasks.io import load_table
from tasks.model_card import md
from tasks.tune_report import write_tune_report
from tests.conftest import tiny_params

SCRIPT = "<script>alert(1)</script>"
HOSTILE = ['=HYPERLINK("http://x","y")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(1)", SCRIPT, '"quoted, comma"',
           "a|b", r"$\bad$"]  # the last: matplotlib and GitHub's markdown read $...$ as math
RELABEL_TO = (HOSTILE[0], HOSTILE[2])  # curators' relabel tags name classes starting with = and -


# --------------------------------------------------------------------------- checks


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _assert_no_formula(path: Path) -> list[list[str]]:
    """The file's rows, read with the csv module, after checking no cell would run as a formula."""
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    bad = [c for r in rows for c in r if c.startswith(safe_csv.TRIGGERS) and not _is_number(c)]
    assert not bad, f"{path}: cells a spreadsheet would run: {bad}"
    return rows


class _Page(HTMLParser):
    """Elements, attributes and text of a page, as a browser's tokenizer sees them."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_data(self, data):
        self.text.append(data)


def _assert_text_not_markup(html: str, *, shows: list[str]) -> _Page:
    """No script element or event handler in `html`, and each of `shows` is in its text."""
    page = _Page(html)
    assert "script" not in page.tags, "a <script> element came from data"
    assert not [name for name, _ in page.attrs if name.startswith("on")], "an event handler came from data"
    text = "".join(page.text)
    missing = [value for value in shows if value not in text]
    assert not missing, f"not shown as text: {missing}"
    return page


def _markdown_html(text: str) -> str:
    from markdown_it import MarkdownIt

    # CommonMark with raw HTML on (what a careless renderer does), plus GFM tables and strikethrough.
    return MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(text)


def _tables(text: str) -> list[list[list[str]]]:
    """Each rendered table's rows (the cells' markdown source); asserts every row has as many
    cells as its header and every table line of `text` rendered as a row."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    tables: list[list[list[str]]] = []
    for i, t in enumerate(tokens):
        if t.type == "table_open":
            tables.append([])
        elif t.type == "tr_open":
            tables[-1].append([])
        elif t.type in ("th_open", "td_open"):
            tables[-1][-1].append(tokens[i + 1].content if tokens[i + 1].type == "inline" else "")
    for table in tables:
        assert all(len(row) == len(table[0]) for row in table), f"a table row lost its shape: {table}"
    lines = [x for x in text.splitlines() if x.startswith("|") and not re.fullmatch(r"[|:\- ]+", x)]
    assert sum(map(len, tables)) == len(lines), "a table line did not render as a table row"
    return tables


def _unescape_md(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


# --------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def hostile(ingested, tmp_path_factory):
    """Ingest -> validate -> curators' tags pulled from FiftyOne -> curate -> train -> evaluate."""
    _, result0 = ingested
    tmp = tmp_path_factory.mktemp("hostile")
    rows = load_table(Path(result0.out_dir) / "manifest.parquet").to_pandas()
    names = dict(zip(sorted(rows.label.unique())[:len(HOSTILE)], HOSTILE))
    src = tmp / "source"
    (src / "images").mkdir(parents=True)
    with (src / "labels.csv").open("w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["path", "label", "split"])
        for r in rows[rows.label.isin(list(names))].itertuples():
            (src / "images" / f"{r.sample_id}.png").write_bytes((Path(result0.out_dir) / r.path).read_bytes())
            w.writerow([f"images/{r.sample_id}.png", names[r.label], r.split])
    params = tiny_params(tmp, ["curate.fiftyone=false", f"curate.dataset_prefix=escaping-{uuid.uuid4().hex[:8]}",
                               f"ingest.source={{path: '{src / 'labels.csv'}', format: csv}}",
                               "ingest.limit_per_split=null", "evaluate.bootstrap=50", "evaluate.gallery=4"])
    version = ingest.run(params).version
    validated = validate.run(params)
    manifest = load_table(params.paths.data / "ingest" / "manifest.parquet").to_pandas()
    dataset, tagged = _tag_in_fiftyone(params, version, manifest)
    try:
        pulled = curate.pull(params, version)
    finally:
        dataset.delete()
    curate.run(params)
    train.run(params)
    evaluate.run(params)
    return params, validated, tagged, Path(pulled["file"])


def _tag_in_fiftyone(params, version: str, manifest: pd.DataFrame):
    """A curator's App session: two train samples tagged relabel:<hostile class>, one exclude."""
    from tasks import curate_fiftyone

    fo = curate_fiftyone.import_fiftyone(params.curate.database)
    picks = [r for r in manifest[manifest.split == "train"].itertuples() if r.label not in RELABEL_TO][:3]
    relabels = {picks[0].sample_id: RELABEL_TO[0], picks[1].sample_id: RELABEL_TO[1]}
    dataset = fo.Dataset(curate.dataset_name(params.curate.dataset_prefix, version), persistent=True)
    dataset.default_classes = HOSTILE
    images = params.paths.data / "ingest"
    dataset.add_samples([fo.Sample(filepath=str(images / r.path), sample_id=r.sample_id,
                                   tags=[f"relabel:{relabels[r.sample_id]}"] if r.sample_id in relabels
                                   else ["exclude"]) for r in picks])
    return dataset, {"relabel": relabels, "exclude": picks[2].sample_id}


def _report(params) -> Path:
    return params.paths.reports / "evaluate"


def test_csv_cells_never_start_a_formula_and_keep_the_names(hostile):
    params, _, _, decisions = hostile
    plots = _report(params) / "plots"
    for name in ("calibration.csv", "history.csv"):
        _assert_no_formula(plots / name)
    per_class = _assert_no_formula(plots / "per_class.csv")
    assert sorted(safe_csv.restore(r[0]) for r in per_class[1:]) == sorted(HOSTILE)  # nothing lost
    assert all(_is_number(c) for r in per_class[1:] for c in r[1:])  # scores are still numbers
    confusion = _assert_no_formula(plots / "confusion.csv")
    assert {safe_csv.restore(r[0]) for r in confusion[1:]} == set(HOSTILE)
    written = _assert_no_formula(decisions)
    assert {r[2] for r in written[1:]} >= {"'" + c for c in RELABEL_TO}  # the labels, quoted


def test_curators_relabels_survive_the_curation_file(hostile):
    params, _, tagged, decisions = hostile
    read = curation.read_decisions(decisions, classes=HOSTILE, sample_ids={*tagged["relabel"], tagged["exclude"]})
    relabel = read[read.action == "relabel"].set_index("sample_id")["label"].to_dict()
    assert relabel == tagged["relabel"]
    curated = load_table(params.paths.data / "curate" / "manifest.parquet").to_pandas().set_index("sample_id")
    for sid, label in relabel.items():  # the curate stage applied exactly the hostile class names
        assert curated.at[sid, "label"] == label and curated.at[sid, "label_original"] != label
    assert bool(curated.at[tagged["exclude"], "excluded"])


def test_html_reports_show_class_names_as_text(hostile):
    params, validated, _, _ = hostile
    for path in (_report(params) / "index.html", Path(validated.html_path)):
        _assert_text_not_markup(path.read_text(), shows=HOSTILE)


def test_detection_page_shows_class_names_as_text():
    m = {"split": "test", "n_images": 2, "n_tiles": 2, "n_boxes": 3, "dataset_version": SCRIPT,
         "map": 0.5, "map_50": 0.7, "map_75": None, "mar_100": 0.6,
         "per_class_ap": dict.fromkeys(HOSTILE, 0.25), "per_class_ap_50": dict.fromkeys(HOSTILE)}
    page = er.render("evaluate_detection.html.j2", m=m, pr_uri="", code="abc", model_sha="0" * 64)
    _assert_text_not_markup(page, shows=HOSTILE)


def test_model_card_keeps_data_literal_and_tables_whole(hostile):
    params, *_ = hostile
    card = (_report(params) / "model_card.md").read_text()
    assert not re.search(r"(?<!\\)\$", card)  # GitHub renders $...$ as math
    per_class = [t for t in _tables(card) if t[0][0] == "class"]
    assert len(per_class) == 1 and {_unescape_md(row[0]) for row in per_class[0][1:]} <= set(HOSTILE)
    html = _markdown_html(card)
    _assert_text_not_markup(html, shows=HOSTILE)  # the intended-use line names every class
    assert not re.search(r"<(em|del|a|img)\b", html)  # no emphasis, strikethrough or link from a name


def test_validation_markdown_keeps_data_in_code_spans(hostile):
    params, *_ = hostile
    strict = params.validate_.model_copy(update={"min_per_class": 1000})  # fails: examples name classes
    report_dir = params.paths.reports / "validate-strict"
    result = validate.validate(params.paths.data / "ingest" / "manifest.parquet", classes=HOSTILE,
                               params=strict, report_dir=report_dir, version="v")
    assert not result.success
    text = validate.markdown_summary(result)
    assert len(_tables(text)) == 1
    page = _assert_text_not_markup(_markdown_html(text), shows=[])
    assert set(page.tags) <= {"h2", "code", "table", "thead", "tbody", "tr", "th", "td", "p", "ul", "li"}
    assert any(name in "".join(page.text) for name in HOSTILE)  # the examples, as text
    _assert_text_not_markup((report_dir / "index.html").read_text(), shows=[])


def test_validation_markdown_keeps_a_multiline_error_in_its_code_span():
    error = f"column label has a value\n\n{SCRIPT}\r\r| a | b |"  # a suite error quoting data
    entry = {"name": "label_in_class_map", "rule": "label is a class", "severity": "error", "status": "error",
             "success": False, "observed": {}, "unexpected_count": 0, "examples": [], "error": error}
    result = validate.ValidateResult(success=False, version="v", n_rows=1, expectations=[entry], failures=[],
                                     warnings=[], errors=[entry["name"]], summary_path="s.json", html_path="i.html")
    text = validate.markdown_summary(result)
    assert len(_tables(text)) == 1
    page = _assert_text_not_markup(_markdown_html(text), shows=[SCRIPT])
    assert "script" not in page.tags and page.tags.count("code") == 2  # the version, the error


# --------------------------------------------------------------------------- the sweep report


def test_tune_report_quotes_names_and_keeps_numbers(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -1.0, -0.1)
        trial.suggest_categorical("act", HOSTILE)
        trial.set_user_attr("note", SCRIPT)
        return x

    study = optuna.create_study(study_name=SCRIPT, direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    for name in HOSTILE:
        study.enqueue_trial({"act": name})
    study.optimize(objective, n_trials=len(HOSTILE))
    write_tune_report(study, tmp_path, epochs_requested=1, best={"trial": 0, "act": HOSTILE[0]})
    rows = _assert_no_formula(tmp_path / "trials.csv")
    table = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert sorted(safe_csv.restore(r["param_act"]) for r in table) == sorted(HOSTILE)
    by_number = {t.number: t for t in study.trials}
    for r in table:  # negative floats are written as numbers, unchanged
        trial = by_number[int(r["number"])]
        assert r["value"].startswith("-") and float(r["value"]) == trial.value
        assert float(r["param_x"]) == trial.params["x"]
    _assert_text_not_markup((tmp_path / "index.html").read_text(), shows=HOSTILE)


# --------------------------------------------------------------------------- the helpers


@pytest.mark.parametrize("value", [0, 3, -2, -0.5, 1e-9, -1e300, float("-inf"), None, True, False])
def test_numbers_and_non_strings_are_untouched(value):
    assert safe_csv.cell(value) is value
    ours, plain = io.StringIO(), io.StringIO()
    safe_csv.writer(ours, lineterminator="\n").writerow([value])
    csv.writer(plain, lineterminator="\n").writerow([value])
    assert ours.getvalue() == plain.getvalue()  # e.g. -0.5 stays "-0.5", not "'-0.5"


def test_numpy_numbers_are_untouched():
    import numpy as np

    for value in (np.float64(-0.5), np.int64(-3), np.float32(-1.25)):
        assert safe_csv.cell(value) is value


@pytest.mark.parametrize("text", [*HOSTILE, "\tTAB", "\rCR", "-", "=", "'quoted", "''=x", "'-1"])
def test_strings_are_neutralized_and_restored_exactly(text):
    written = safe_csv.cell(text)
    if text.startswith(safe_csv.TRIGGERS):
        assert written == "'" + text
    assert not written.startswith(safe_csv.TRIGGERS)
    assert safe_csv.restore(written) == text
    buf = io.StringIO()
    safe_csv.writer(buf).writerow([text, -0.5])
    (back, number), = csv.reader(io.StringIO(buf.getvalue()))
    assert safe_csv.restore(back) == text and number == "-0.5"


@pytest.mark.parametrize("text", ["", "plain", "a=b", "T-shirt/top", "1-2", " =x", "'s-Hertogenbosch"])
def test_safe_strings_pass_and_hand_written_quotes_stay(text):
    if not text.startswith("'"):
        assert safe_csv.cell(text) == text
    assert safe_csv.restore(text) == text  # a quote that cell() did not add is kept


def test_curation_file_round_trip_with_hostile_ids_and_labels(tmp_path):
    ids = ["=1+1", "-abc", "@x", "'quoted", "+1", "\tx", "plain"]
    rows = [(sid, "relabel", HOSTILE[i % len(HOSTILE)], "relabeled in FiftyOne", "curator:=evil")
            for i, sid in enumerate(ids)] + [("=1+1", "exclude", None, "-reason", "curator:@me")]
    path = curation.decisions_path(tmp_path, "v")
    curation.write_decisions(path, pd.DataFrame(rows, columns=list(curation.DECISION_COLUMNS)))
    _assert_no_formula(path)
    read = curation.read_decisions(path, classes=HOSTILE, sample_ids=set(ids))
    back = [tuple(None if pd.isna(v) else v for v in r) for r in read.itertuples(index=False)]
    assert back == sorted(rows, key=lambda r: (r[0], r[1]))
    assert curation.to_csv(read) == path.read_text()  # read -> write: the same bytes, the same version id


def test_markdown_escape_keeps_each_value_in_one_cell():
    values = [*HOSTILE, "x\r\ny", "`c` *e* _u_ ~~s~~ [l](u) &amp;"]
    text = ("| " + " | ".join(f"h{i}" for i in range(len(values))) + " |\n|" + "---|" * len(values) + "\n"
            + "| " + " | ".join(md(v) for v in values) + " |\n")
    (_, row), = _tables(text)
    assert [_unescape_md(c) for c in row] == [*HOSTILE, "x  y", values[-1]]
    html = _markdown_html(text)
    assert not re.search(r"<(em|del|a|img|code|script)\b", html) and "&amp;amp;" in html
