"""Stage validate: the data gate between ingest and curate.

Inputs:  data/ingest/ (`paths.data`/ingest): manifest.parquet, classes.json, version.json
Outputs: reports/validate/ (`paths.reports`/validate)
    summary.json          for machines: overall success, dataset version, and per expectation its
                          severity, status, observed value, unexpected count and example rows
    index.html            the same for people: one self-contained page (inline style, no external
                          assets), every string from the data escaped
    params.resolved.yaml  the params this report was made with
Params:  `validate:` section (allowed_splits, min_per_class, size bounds, severity per expectation).

One expectation per key of `validate.severity`: label_in_class_map, no_nulls, unique_sample_id,
split_allowed, image_size_in_bounds, min_per_class, no_cross_split_content. A failing `error`
expectation fails the gate (`run` raises ValidationFailed); a failing `warn` one is reported only.
An expectation that cannot be evaluated at all (a missing column, a wrong type) is a suite error,
listed apart from data failures; it fails the gate when its severity is `error`.

Great Expectations (GX Core 1.x, in-memory ephemeral context) evaluates every rule. Bad data never
raises here; only unreadable inputs do.
"""

from __future__ import annotations

import html
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from tasks.io import MANIFEST_SCHEMA, atomic_write_json, atomic_write_text, load_table, read_json
from tasks.params import Params, SeverityParams, ValidateParams, dump_resolved

CHECKS = tuple(SeverityParams.model_fields)  # expectation names, in params.yaml order
EXAMPLE_COLUMNS = ("sample_id", "path", "label", "split")
MAX_EXAMPLES = 5
LEAK_COLUMN = "n_splits_with_content"  # derived: splits in which the row's content_hash occurs
COUNT_COLUMN = "count"


class ValidationFailed(ValueError):
    """The gate failed; the message names each failing expectation with counts and examples."""

    def __init__(self, result: ValidateResult):
        super().__init__(failure_message(result))
        self.result = result

    def __reduce__(self):  # unpickling (e.g. Prefect results) must rebuild from the result, not the text
        return (type(self), (self.result,))


@dataclass(frozen=True)
class ValidateResult:
    success: bool
    version: str | None
    n_rows: int
    expectations: list[dict]  # name, rule, severity, status, success, observed, unexpected_count, ...
    failures: list[str]  # error-severity expectations whose data failed
    warnings: list[str]  # warn-severity expectations whose data failed
    errors: list[str]  # expectations that could not be evaluated (suite errors)
    summary_path: str
    html_path: str


def _rules(p: ValidateParams, n_classes: int) -> dict[str, str]:
    """One readable sentence per expectation, shown in the report and the failure message."""
    return {
        "label_in_class_map": f"label is one of the {n_classes} classes in classes.json",
        "no_nulls": "no manifest column has a null value",
        "unique_sample_id": "sample_id is unique",
        "split_allowed": f"split is one of {', '.join(p.allowed_splits)}",
        "image_size_in_bounds": f"width in [{p.min_width}, {p.max_width}] and "
        f"height in [{p.min_height}, {p.max_height}]",
        "min_per_class": f"every class has at least {p.min_per_class} images in every split present",
        "no_cross_split_content": "no image content (content_hash) occurs in more than one split",
    }


# --------------------------------------------------------------------------- derived frames


def _add_leak_column(df: pd.DataFrame) -> None:
    # GX has no "value occurs under two keys" expectation; counting, per row, the splits that
    # share its content_hash turns leakage into a column bound, so GX reports the leaked rows
    # themselves (sample_id, path) as examples.
    df[LEAK_COLUMN] = df.groupby("content_hash")["split"].transform("nunique")


def _class_counts(df: pd.DataFrame, classes: list[str], allowed_splits: list[str]) -> pd.DataFrame:
    """Rows per (split, label) over every class x split present, zeros included."""
    # groupby has no row for a class absent from a split, so reindex over the full grid;
    # otherwise a missing class would pass. An empty manifest counts over the allowed splits
    # so that it fails instead of passing vacuously.
    splits = sorted(df["split"].dropna().unique()) or list(allowed_splits)
    grid = pd.MultiIndex.from_product([splits, classes], names=["split", "label"])
    counts = df.groupby(["split", "label"]).size().reindex(grid, fill_value=0)
    return counts.rename(COUNT_COLUMN).reset_index()


# --------------------------------------------------------------------------- GX suites


def _manifest_suite(gx, classes: list[str], p: ValidateParams, columns: list[str]):
    E = gx.expectations
    suite = gx.ExpectationSuite(name="manifest")
    expectations = [
        ("label_in_class_map", E.ExpectColumnValuesToBeInSet(column="label", value_set=classes)),
        *[("no_nulls", E.ExpectColumnValuesToNotBeNull(column=c)) for c in columns],
        ("unique_sample_id", E.ExpectColumnValuesToBeUnique(column="sample_id")),
        ("split_allowed", E.ExpectColumnValuesToBeInSet(column="split", value_set=p.allowed_splits)),
        ("image_size_in_bounds",
         E.ExpectColumnValuesToBeBetween(column="width", min_value=p.min_width, max_value=p.max_width)),
        ("image_size_in_bounds",
         E.ExpectColumnValuesToBeBetween(column="height", min_value=p.min_height, max_value=p.max_height)),
        ("no_cross_split_content", E.ExpectColumnValuesToBeBetween(column=LEAK_COLUMN, max_value=1)),
    ]
    for name, expectation in expectations:
        expectation.meta = {"check": name}  # several GX expectations may make one named check
        suite.add_expectation(expectation)
    return suite


def _counts_suite(gx, p: ValidateParams):
    # min_per_class is a GX expectation too, run on the (split, label) counts frame rather than
    # on the manifest: GX has no per-group row-count expectation for pandas.
    suite = gx.ExpectationSuite(name="class_counts")
    suite.add_expectation(gx.expectations.ExpectColumnValuesToBeBetween(
        column=COUNT_COLUMN, min_value=p.min_per_class, meta={"check": "min_per_class"}))
    return suite


def _validate_frame(context, name: str, df: pd.DataFrame, suite) -> list:
    batch = (context.data_sources.add_pandas(name).add_dataframe_asset(name)
             .add_batch_definition_whole_dataframe(name).get_batch(batch_parameters={"dataframe": df}))
    # SUMMARY: counts plus the row index of the first few unexpected rows. No
    # `unexpected_index_column_names`: GX then reads every unexpected row cell by cell (15 s on
    # 70k bad rows); we look the few example rows up ourselves instead.
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES}
    return list(batch.validate(suite, result_format=result_format).results)


def _gx_context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")  # in memory: no files, no Data Docs (CDN assets)
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return gx, context


# --------------------------------------------------------------------------- results


def _plain(value):
    """A JSON-able scalar: numpy scalars unwrapped, NaN/NA as None."""
    if hasattr(value, "item"):
        value = value.item()
    try:
        return None if pd.isna(value) else value
    except (TypeError, ValueError):
        return value


def _raised(result) -> str | None:
    """The message of an expectation that raised; GX stores it flat or per metric."""
    info = result.exception_info or {}
    infos = [info] if "raised_exception" in info else list(info.values())
    messages = [i.get("exception_message") for i in infos if isinstance(i, dict) and i.get("raised_exception")]
    return "; ".join(dict.fromkeys(m for m in messages if m)) or None


def _observed(results) -> dict:
    """Per checked column: rows seen, unexpected count, and some distinct unexpected values."""
    out = {}
    for r in results:
        if _raised(r):
            continue
        res = r.result or {}
        # Only a sample: with SUMMARY, GX's partial_unexpected_counts count the partial list only.
        values = [_plain(v) for v in res.get("partial_unexpected_list") or []]
        out[r.expectation_config.kwargs["column"]] = {
            "element_count": _plain(res.get("element_count")),
            "unexpected_count": _plain(res.get("unexpected_count")),
            "sample_unexpected_values": list(dict.fromkeys(values)),
        }
    return out


def _examples(results, frame: pd.DataFrame) -> list[dict]:
    """Up to MAX_EXAMPLES unexpected rows: their id, path, label, split and the checked value."""
    rows = []
    for r in results:
        column = r.expectation_config.kwargs["column"]
        keep = [c for c in dict.fromkeys((*EXAMPLE_COLUMNS, COUNT_COLUMN, column)) if c in frame.columns]
        for index in (r.result or {}).get("partial_unexpected_index_list") or []:
            rows.append({c: _plain(frame.at[index, c]) for c in keep})
    return rows[:MAX_EXAMPLES]


def _entry(name: str, rule: str, severity: str, results: list, frame, error: str | None) -> dict:
    messages = [error] if error else list(dict.fromkeys(m for r in results if (m := _raised(r))))
    ok = not messages and all(r.success for r in results)
    return {
        "name": name,
        "rule": rule,
        "severity": severity,
        "status": "error" if messages else "passed" if ok else "failed",
        "success": ok,
        "observed": _observed(results),
        "unexpected_count": sum(int(_plain((r.result or {}).get("unexpected_count")) or 0) for r in results),
        "examples": _examples(results, frame),
        "error": "; ".join(messages) or None,
    }


def _missing(df: pd.DataFrame, columns: tuple[str, ...]) -> str | None:
    absent = [c for c in columns if c not in df.columns]
    return f"column(s) {', '.join(absent)} not in the manifest (has: {', '.join(df.columns)})" if absent else None


# --------------------------------------------------------------------------- the stage


def load_manifest(path: Path | str) -> pd.DataFrame:
    """Read a manifest into pandas; raise naming the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found (run the ingest stage first)")
    try:
        return load_table(path).to_pandas()
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: cannot read the manifest as Parquet: {e}") from e


def validate(manifest_path: Path, *, classes: list[str], params: ValidateParams, report_dir: Path,
             version: str | None = None) -> ValidateResult:
    """Run the validation suite on a manifest and write summary.json + index.html to `report_dir`.

    Args: the manifest (Parquet), the class names, the `validate:` params, the report folder and
    the dataset version to name in the report. Returns a ValidateResult; never raises on bad data.
    """
    df = load_manifest(manifest_path)
    columns = list(dict.fromkeys([*MANIFEST_SCHEMA.names, *df.columns]))  # schema ones must exist
    pre_errors = {
        "no_cross_split_content": _missing(df, ("content_hash", "split")),
        "min_per_class": _missing(df, ("split", "label")),
    }
    if not pre_errors["no_cross_split_content"]:
        _add_leak_column(df)
    gx, context = _gx_context()
    frames = [("manifest", df, _manifest_suite(gx, classes, params, columns))]
    frame_of = dict.fromkeys(CHECKS, df)  # where each check's example rows are looked up
    if not pre_errors["min_per_class"]:
        frame_of["min_per_class"] = _class_counts(df, classes, params.allowed_splits)
        frames.append(("class_counts", frame_of["min_per_class"], _counts_suite(gx, params)))
    by_check: dict[str, list] = {name: [] for name in CHECKS}
    for name, frame, suite in frames:
        try:
            results = _validate_frame(context, name, frame, suite)
        except gx.exceptions.GreatExpectationsError as e:  # GX could not run the suite: all are suite errors
            for exp in suite.expectations:
                check = exp.meta["check"]
                pre_errors[check] = pre_errors.get(check) or f"{type(e).__name__}: {e}"
            continue
        for r in results:
            if not pre_errors.get(r.expectation_config.meta["check"]):
                by_check[r.expectation_config.meta["check"]].append(r)

    rules = _rules(params, len(classes))
    severity = params.severity.model_dump()
    entries = [_entry(n, rules[n], severity[n], by_check[n], frame_of[n], pre_errors.get(n)) for n in CHECKS]
    failed = [e for e in entries if e["status"] == "failed"]
    errors = [e["name"] for e in entries if e["status"] == "error"]
    result = ValidateResult(
        success=not any(e["severity"] == "error" and not e["success"] for e in entries),
        version=version,
        n_rows=len(df),
        expectations=entries,
        failures=[e["name"] for e in failed if e["severity"] == "error"],
        warnings=[e["name"] for e in failed if e["severity"] == "warn"],
        errors=errors,
        summary_path=str(Path(report_dir) / "summary.json"),
        html_path=str(Path(report_dir) / "index.html"),
    )
    summary = {"stage": "validate", "manifest": str(manifest_path), "params": params.model_dump(mode="json"),
               **{k: v for k, v in asdict(result).items() if not k.endswith("_path")}}
    atomic_write_json(result.summary_path, summary)
    atomic_write_text(result.html_path, render_html(result))
    return result


def run(params: Params) -> ValidateResult:
    """Validate data/ingest into reports/validate; raise ValidationFailed when the gate fails."""
    ingest_dir = Path(params.paths.data) / "ingest"
    report_dir = Path(params.paths.reports) / "validate"
    for name in ("manifest.parquet", "classes.json", "version.json"):
        if not (ingest_dir / name).is_file():
            raise FileNotFoundError(f"{ingest_dir / name}: not found (run the ingest stage first)")
    result = validate(ingest_dir / "manifest.parquet", classes=list(read_json(ingest_dir / "classes.json")),
                      params=params.validate_, report_dir=report_dir,
                      version=read_json(ingest_dir / "version.json").get("version"))
    dump_resolved(params, report_dir / "params.resolved.yaml")
    if not result.success:
        raise ValidationFailed(result)
    return result


# --------------------------------------------------------------------------- messages and report


def _code(text: str) -> str:
    # Code spans keep data literal in markdown (no HTML, no emphasis); backticks cannot end them.
    return "`" + text.replace("`", "'") + "`"


def _line(e: dict, n_examples: int = 2) -> str:
    if e["status"] == "error":
        return f"- {e['name']} ({e['rule']}): could not be evaluated: {_code(e['error'])}"
    examples = "; ".join(_code(", ".join(f"{k}={v!r}" for k, v in r.items())) for r in e["examples"][:n_examples])
    return f"- {e['name']} ({e['rule']}): {e['unexpected_count']} unexpected" + (f"; e.g. {examples}" if examples else "")


def failure_message(result: ValidateResult) -> str:
    """A readable list (plain text that is also markdown) of what failed, with counts and examples."""
    by_name = {e["name"]: e for e in result.expectations}
    blocking = [by_name[n] for n in result.failures + result.errors if by_name[n]["severity"] == "error"]
    head = (f"Validation {'passed' if result.success else 'failed'} for dataset version {result.version} "
            f"({result.n_rows} rows): {len(blocking)} error-severity expectation(s) did not pass.")
    lines = [head, *(_line(e) for e in blocking)]
    others = [by_name[n] for n in result.warnings + result.errors if by_name[n] not in blocking]
    if others:
        lines += ["Warnings (do not fail the gate):", *(_line(e) for e in others)]
    lines.append(f"Report: {result.html_path}")
    return "\n".join(lines)


def markdown_summary(result: ValidateResult) -> str:
    """A markdown table of every expectation, then the failure details (for a Prefect artifact)."""
    status = "PASSED" if result.success else "FAILED"
    lines = [f"## Validation {status}: dataset version `{result.version}`, {result.n_rows} rows", "",
             "| expectation | severity | status | unexpected |", "|---|---|---|---|"]
    lines += [f"| {e['name']} | {e['severity']} | {e['status']} | {e['unexpected_count']} |"
              for e in result.expectations]
    if result.failures or result.warnings or result.errors:
        lines += ["", failure_message(result)]
    return "\n".join(lines)


_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
.banner{padding:.8em 1em;border-radius:6px;font-size:1.3em;font-weight:600}
.ok{background:#e3f4e6;color:#14532d}.bad{background:#fde8e8;color:#7f1d1d}
table{border-collapse:collapse;width:100%;margin-top:1em}
th,td{border:1px solid #ddd;padding:.35em .5em;text-align:left;vertical-align:top}
th{background:#f5f5f5}td.passed{color:#166534}td.failed{color:#b91c1c;font-weight:600}
td.error{color:#92400e;font-weight:600}table.ex{margin:0;font-size:12px}
code{font-size:12px;word-break:break-all}
"""


def _examples_html(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td><code>{html.escape(str(r.get(c)))}</code></td>" for c in cols)
                   + "</tr>" for r in rows)
    return f'<table class="ex"><tr>{head}</tr>{body}</table>'


def _observed_text(observed: dict) -> str:
    parts = [f"{col}: {o['unexpected_count']} of {o['element_count']} unexpected, e.g. "
             + ", ".join(repr(v) for v in o["sample_unexpected_values"])
             for col, o in observed.items() if o["unexpected_count"]]
    return "; ".join(parts) or "all rows as expected"


def _row_html(e: dict) -> str:
    status = e["status"] if e["status"] != "failed" or e["severity"] == "error" else "failed (warn)"
    detail = e["error"] or _observed_text(e["observed"])
    cells = [f"<b>{html.escape(e['name'])}</b><br>{html.escape(e['rule'])}", html.escape(e["severity"]),
             html.escape(status), str(e["unexpected_count"]), f"<code>{html.escape(detail)}</code>",
             _examples_html(e["examples"])]
    tds = "".join(f'<td class="{html.escape(e["status"])}">{c}</td>' if i == 2 else f"<td>{c}</td>"
                  for i, c in enumerate(cells))
    return f"<tr>{tds}</tr>"


def render_html(result: ValidateResult) -> str:
    """The report as one self-contained page: inline style, no scripts or external assets."""
    ok = result.success
    counts = (f"{len(result.failures)} failed, {len(result.warnings)} warnings, "
              f"{len(result.errors)} suite errors, {len(result.expectations)} expectations")
    rows = "".join(_row_html(e) for e in result.expectations)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Validation: {html.escape(str(result.version))}</title><style>{_STYLE}</style></head><body>"
        f'<div class="banner {"ok" if ok else "bad"}">Validation {"PASSED" if ok else "FAILED"}</div>'
        f"<p>Dataset version <code>{html.escape(str(result.version))}</code>, {result.n_rows} rows; "
        f"{counts}. Severity <b>error</b> fails the gate, <b>warn</b> is reported only.</p>"
        "<table><tr><th>expectation</th><th>severity</th><th>status</th><th>unexpected</th>"
        f"<th>observed / error</th><th>examples</th></tr>{rows}</table></body></html>\n"
    )


def main(argv: list[str] | None = None) -> int:
    from tasks.env import configure_environment
    from tasks.params import load_params

    configure_environment()
    try:
        result = run(load_params(overrides=argv or []))
    except ValidationFailed as e:
        print(e, file=sys.stderr)
        return 1
    warned = f"; warnings: {', '.join(result.warnings)}" if result.warnings else ""
    print(f"validation passed: dataset version {result.version}, {result.n_rows} rows, "
          f"{len(result.expectations)} expectations{warned}; report {result.html_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
