"""Stage validate: the data gate between ingest and curate.

Inputs:  data/ingest/ (`paths.data`/ingest): manifest.parquet (the images table), annotations.parquet
         (detection: one row per box), classes.json, version.json (its "task" picks the suite)
Outputs: reports/validate/ (`paths.reports`/validate)
    summary.json          for machines: overall success, dataset version, task, dataset counts, and per
                          expectation its severity, status, observed value, unexpected count and example rows
    index.html            the same for people: one self-contained page (inline style, no scripts, no
                          external assets), every string from the data escaped
    params.resolved.yaml  the params this report was made with
Params:  `validate:` section (allowed splits and split shares, per-class minimum and imbalance, size
         and box bounds, severity per expectation).

Great Expectations (GX Core 1.x, in-memory ephemeral context) evaluates every rule on flat tables:
the images table, small derived tables (share of images per split, count per split x class,
imbalance per split) and, for detection, the boxes table joined to its images
(tasks/validate_detection.py). File and pixel checks belong to ingest; this stage checks labels,
boxes and the dataset's shape.

One expectation per key of `validate.severity`; classification runs CLASSIFICATION_CHECKS, detection
all of CHECKS. A failing `error` expectation fails the gate (`run` raises ValidationFailed, `main`
exits 1, the report is written first); a failing `warn` one is reported only. An expectation that
cannot be evaluated at all (a missing column, a wrong type) is a suite error, listed apart from
data failures; it fails the gate when its severity is `error`. Bad data never raises here; only
unreadable inputs do.
"""

from __future__ import annotations

import html
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa

from tasks import validate_detection as D
from tasks.io import (
    ANNOTATION_SCHEMA,
    MANIFEST_SCHEMA,
    atomic_write_json,
    atomic_write_text,
    load_table,
    read_json,
)
from tasks.params import Params, SeverityParams, ValidateParams, dump_resolved

CHECKS = tuple(SeverityParams.model_fields)  # expectation names, in params.yaml order
CLASSIFICATION_CHECKS = tuple(c for c in CHECKS if c not in D.BOX_CHECKS)
TASK_CHECKS = {"classification": CLASSIFICATION_CHECKS, "detection": CHECKS}
EXAMPLE_COLUMNS = ("sample_id", "source_key", "path", "label", "split")  # of an images-table row
MAX_EXAMPLES = 5
LEAK_COLUMN = "n_splits_with_content"  # derived: splits in which the row's content_hash occurs
COUNT_COLUMN = "count"
IMBALANCE_COLUMN = "imbalance"


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
    n_rows: int  # images
    expectations: list[dict]  # name, rule, severity, status, success, observed, unexpected_count, ...
    failures: list[str]  # error-severity expectations whose data failed
    warnings: list[str]  # warn-severity expectations whose data failed
    errors: list[str]  # expectations that could not be evaluated (suite errors)
    summary_path: str
    html_path: str
    task: str = "classification"
    # n_images, per_split, split_fraction, per_class, class_imbalance; detection: n_boxes, images_without_boxes
    stats: dict = field(default_factory=dict)


@dataclass
class _Frame:
    """One flat table GX validates, the expectations run on it, and the columns its examples show."""

    name: str
    df: pd.DataFrame
    example_columns: tuple[str, ...]
    items: list = field(default_factory=list)  # (check, GX expectation)


def _rules(p: ValidateParams, classes: list[str], task: str) -> dict[str, str]:
    """One readable sentence per expectation, shown in the report and the failure message."""
    unit = "boxes" if task == "detection" else "images"
    bounds = ", ".join(f"{s} [{p.split_fraction[s][0]:g}, {p.split_fraction[s][1]:g}]"
                       for s in p.allowed_splits if s in p.split_fraction)
    return {
        "label_in_class_map": f"{'every box label' if task == 'detection' else 'label'} is one of the "
        f"{len(classes)} classes in classes.json",
        "no_nulls": "no column of the images table (but label, null for detection) nor of the annotations "
        "table has a null value" if task == "detection" else "no manifest column has a null value",
        "unique_sample_id": "sample_id is unique",
        "split_allowed": f"split is one of {', '.join(p.allowed_splits)}",
        "split_fraction_in_bounds": f"each split's share of the images is within [min, max]: {bounds or 'any'}",
        "image_size_in_bounds": f"width in [{p.min_width}, {p.max_width}] and "
        f"height in [{p.min_height}, {p.max_height}]",
        "min_per_class": f"every class has at least {p.min_per_class} {unit} in every split present",
        "class_imbalance": f"in every split, {unit} of the largest class / of the smallest non-empty class "
        f"<= {p.max_class_imbalance:g}",
        "no_cross_split_content": "no image content (content_hash) occurs in more than one split",
        **D.rules(p),
    }


# --------------------------------------------------------------------------- derived frames


def _add_leak_column(df: pd.DataFrame) -> None:
    # GX has no "value occurs under two keys" expectation; counting, per row, the splits that
    # share its content_hash turns leakage into a column bound, so GX reports the leaked rows
    # themselves (sample_id, path) as examples.
    df[LEAK_COLUMN] = df.groupby("content_hash")["split"].transform("nunique")


def _splits(images: pd.DataFrame, allowed_splits: list[str]) -> list[str]:
    """The allowed splits present, in allowed_splits order; all allowed ones if none is present.

    An unknown split is split_allowed's finding; counting its classes would report it again.
    """
    present = set(images["split"].dropna().unique()) if "split" in images.columns else set()
    return [s for s in allowed_splits if s in present] or list(allowed_splits)


def _class_counts(labelled: pd.DataFrame, classes: list[str], splits: list[str]) -> pd.DataFrame:
    """Rows per (split, label) over every class x split present, zeros included."""
    # groupby has no row for a class absent from a split, so reindex over the full grid;
    # otherwise a missing class would pass. An empty table counts over the allowed splits
    # so that it fails instead of passing vacuously.
    grid = pd.MultiIndex.from_product([splits, classes], names=["split", "label"])
    counts = labelled.groupby(["split", "label"]).size().reindex(grid, fill_value=0)
    return counts.rename(COUNT_COLUMN).reset_index()


def _class_balance(counts: pd.DataFrame) -> pd.DataFrame:
    """Per split: the largest and the smallest non-empty class and their ratio (NaN: no labels)."""
    # Absent classes are min_per_class's finding; counting them here would make every such
    # split an infinite imbalance and report the same defect twice.
    rows = []
    for split, group in counts.groupby("split", sort=False):
        present = group[group[COUNT_COLUMN] > 0].sort_values(COUNT_COLUMN, kind="stable")
        big, small = (present.iloc[-1], present.iloc[0]) if len(present) else (None, None)
        rows.append({"split": split,
                     "largest_class": None if big is None else big["label"],
                     "largest_count": None if big is None else int(big[COUNT_COLUMN]),
                     "smallest_class": None if small is None else small["label"],
                     "smallest_count": None if small is None else int(small[COUNT_COLUMN]),
                     IMBALANCE_COLUMN: math.nan if big is None else big[COUNT_COLUMN] / small[COUNT_COLUMN]})
    return pd.DataFrame(rows, columns=["split", "largest_class", "largest_count", "smallest_class",
                                       "smallest_count", IMBALANCE_COLUMN])


def _split_fractions(images: pd.DataFrame, p: ValidateParams) -> pd.DataFrame:
    """One row per allowed or present split: its images, share of all images and allowed bounds."""
    counts = images["split"].value_counts()
    total = int(counts.sum())
    splits = [*p.allowed_splits, *sorted(set(counts.index) - set(p.allowed_splits))]
    rows = [{"split": s, "n_images": int(counts.get(s, 0)),
             "fraction": (int(counts.get(s, 0)) / total) if total else 0.0,
             "min_fraction": p.split_fraction.get(s, (0.0, 1.0))[0],
             "max_fraction": p.split_fraction.get(s, (0.0, 1.0))[1]} for s in splits]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- GX suites


def _images_items(E, classes: list[str], p: ValidateParams, columns: list[str], task: str) -> list:
    return [
        *([("label_in_class_map", E.ExpectColumnValuesToBeInSet(column="label", value_set=classes))]
          if task == "classification" else []),
        *[("no_nulls", E.ExpectColumnValuesToNotBeNull(column=c)) for c in columns],
        ("unique_sample_id", E.ExpectColumnValuesToBeUnique(column="sample_id")),
        ("split_allowed", E.ExpectColumnValuesToBeInSet(column="split", value_set=p.allowed_splits)),
        ("image_size_in_bounds",
         E.ExpectColumnValuesToBeBetween(column="width", min_value=p.min_width, max_value=p.max_width)),
        ("image_size_in_bounds",
         E.ExpectColumnValuesToBeBetween(column="height", min_value=p.min_height, max_value=p.max_height)),
        ("no_cross_split_content", E.ExpectColumnValuesToBeBetween(column=LEAK_COLUMN, max_value=1)),
    ]


def _expectation_columns(expectation) -> list[str]:
    return [c for a in ("column", "column_A", "column_B") if (c := getattr(expectation, a, None))]


def _batches(frame: _Frame):
    """(name, columns, items): the frame's expectations grouped by the column(s) they check."""
    groups: dict[tuple[str, ...], list] = {}
    for check, expectation in frame.items:
        groups.setdefault(tuple(_expectation_columns(expectation)), []).append((check, expectation))
    for i, (columns, items) in enumerate(groups.items()):
        yield f"{frame.name}.{i}", [c for c in columns if c in frame.df.columns], items


def _for_gx(df: pd.DataFrame) -> pd.DataFrame:
    """Numeric columns as int64/float64: GX compares other dtypes (int32 width, int8) value by value."""
    casts = {c: "int64" for c, t in df.dtypes.items() if pd.api.types.is_integer_dtype(t)
             and not pd.api.types.is_extension_array_dtype(t) and t != "int64"}
    return df.astype(casts) if casts else df


def _validate_batch(gx, context, table, name: str, df: pd.DataFrame, items: list) -> list:
    """GX results of `items` (check, expectation) on `df`, validated as suite `name`."""
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for check, expectation in items:
        expectation.meta = {"check": check}  # several GX expectations may make one named check
        suite.add_expectation(expectation)
    # A validation definition reads the dataframe once; batch.validate() would load (and hash)
    # it a second time.
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=table, suite=suite))
    # SUMMARY: counts plus the row index of the first few unexpected rows. No
    # `unexpected_index_column_names`: GX then reads every unexpected row cell by cell (15 s on
    # 70k bad rows); we look the few example rows up ourselves instead.
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES}
    return list(definition.run(batch_parameters={"dataframe": df}, result_format=result_format).results)


def _gx_context():
    """GX, an ephemeral context, and the one whole-dataframe batch definition every table goes through."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")  # in memory: no files, no Data Docs (CDN assets)
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    # One data source for all tables: the context re-serializes its whole config on every
    # add_*, which grows with each source added (half a second for 27 sources).
    table = (context.data_sources.add_pandas("validate").add_dataframe_asset("tables")
             .add_batch_definition_whole_dataframe("table"))
    return gx, context, table


# --------------------------------------------------------------------------- results


def _plain(value):
    """A JSON-able scalar: numpy scalars unwrapped, NaN/NA as None, infinities as text."""
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item"):
        value = value.item()
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        return value
    return str(value) if isinstance(value, float) and math.isinf(value) else value


def _raised(result) -> str | None:
    """The message of an expectation that raised; GX stores it flat or per metric."""
    info = result.exception_info or {}
    infos = [info] if "raised_exception" in info else list(info.values())
    messages = [i.get("exception_message") for i in infos if isinstance(i, dict) and i.get("raised_exception")]
    return "; ".join(dict.fromkeys(m for m in messages if m)) or None


def _checked(config) -> list[str]:
    """The column(s) an expectation checks."""
    kw = config.kwargs
    return [kw["column"]] if "column" in kw else [kw[k] for k in ("column_A", "column_B") if k in kw]


def _label(config) -> str:
    kw = config.kwargs
    if "column" in kw:
        return kw["column"]
    return f"{kw['column_A']} {'>=' if kw.get('or_equal') else '>'} {kw['column_B']}"


def _observed(results, frames: list[_Frame]) -> dict:
    """Per checked column: rows seen, unexpected count and share, and some distinct unexpected values.

    Keyed by column, prefixed by its table unless that is the images table ("boxes.sample_id").
    """
    out = {}
    for r, frame in zip(results, frames):
        if _raised(r):
            continue
        res = r.result or {}
        # Only a sample: with SUMMARY, GX's partial_unexpected_counts count the partial list only.
        values = [_plain(v) for v in res.get("partial_unexpected_list") or []]
        prefix = "" if frame.name == "images" else f"{frame.name}."
        out[prefix + _label(r.expectation_config)] = {
            "element_count": _plain(res.get("element_count")),
            "unexpected_count": _plain(res.get("unexpected_count")),
            "unexpected_percent": _plain(res.get("unexpected_percent")),
            "sample_unexpected_values": list(dict.fromkeys(values)),
        }
    return out


def _examples(results, frames: list[_Frame]) -> list[dict]:
    """Up to MAX_EXAMPLES unexpected rows: their ids, file, label, split and the checked values."""
    rows = []
    for r, frame in zip(results, frames):
        cols = (*frame.example_columns, *_checked(r.expectation_config))
        keep = [c for c in dict.fromkeys(cols) if c in frame.df.columns]
        for index in (r.result or {}).get("partial_unexpected_index_list") or []:
            rows.append({c: _plain(frame.df.at[index, c]) for c in keep})
    return rows[:MAX_EXAMPLES]


def _entry(name: str, rule: str, severity: str, evaluated: list, error: str | None) -> dict:
    """One expectation's report from its (GX result, frame) pairs or the reason it could not run."""
    results, frames = [r for r, _ in evaluated], [f for _, f in evaluated]
    messages = [error] if error else list(dict.fromkeys(m for r in results if (m := _raised(r))))
    if not messages and not results:
        messages = ["no expectation was evaluated"]  # never pass a check that did not run
    ok = not messages and all(r.success for r in results)
    return {
        "name": name,
        "rule": rule,
        "severity": severity,
        "status": "error" if messages else "passed" if ok else "failed",
        "success": ok,
        "observed": _observed(results, frames),
        "unexpected_count": sum(int(_plain((r.result or {}).get("unexpected_count")) or 0) for r in results),
        "examples": _examples(results, frames),
        "error": "; ".join(messages) or None,
    }


def _missing(df: pd.DataFrame, columns: tuple[str, ...], table: str = "manifest") -> str | None:
    absent = [c for c in columns if c not in df.columns]
    return f"column(s) {', '.join(absent)} not in the {table} (has: {', '.join(df.columns)})" if absent else None


# --------------------------------------------------------------------------- the stage


def _load(path: Path | str, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found (run the ingest stage first)")
    try:
        return load_table(path).to_pandas()
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: cannot read the {what} as Parquet: {e}") from e


def load_manifest(path: Path | str) -> pd.DataFrame:
    """Read a manifest into pandas; raise naming the file when it cannot be read."""
    return _load(path, "manifest")


def load_annotations(path: Path | str) -> pd.DataFrame:
    """Read an annotations table into pandas; raise naming the file when it cannot be read."""
    return _load(path, "annotations table")


def _frames(images: pd.DataFrame, ann: pd.DataFrame | None, classes: list[str], p: ValidateParams, gx,
            task: str) -> tuple[list[_Frame], dict[str, str], dict]:
    """The flat tables to validate with their expectations, the checks that cannot run (missing
    columns, with the reason), and dataset counts for the report."""
    E = gx.expectations
    schema = [c for c in MANIFEST_SCHEMA.names if not (task == "detection" and c == "label")]
    null_columns = list(dict.fromkeys([*schema, *(c for c in images.columns if c not in MANIFEST_SCHEMA.names)]))
    errors = {"no_cross_split_content": _missing(images, ("content_hash", "split")),
              "split_fraction_in_bounds": _missing(images, ("split",))}
    if not errors["no_cross_split_content"]:
        _add_leak_column(images)
    image_cols = tuple(c for c in EXAMPLE_COLUMNS if task == "classification" or c != "label")
    img = _Frame("images", images, image_cols, _images_items(E, classes, p, null_columns, task))
    frames = [img]
    stats: dict = {"n_images": len(images)}
    if "split" in images.columns:
        stats["per_split"] = {str(k): int(v) for k, v in images["split"].value_counts(sort=False).items()}

    labelled = images  # what min_per_class / class_imbalance count: images, or boxes for detection
    errors["min_per_class"] = _missing(images, ("split", "label"))
    if task == "detection":
        boxes = D.box_frame(ann, images, tolerance=p.box_tolerance)
        box = _Frame("boxes", boxes, D.BOX_EXAMPLE_COLUMNS, [
            ("label_in_class_map", E.ExpectColumnValuesToBeInSet(column="label", value_set=classes)),
            *[("no_nulls", E.ExpectColumnValuesToNotBeNull(column=c))
              for c in dict.fromkeys([*ANNOTATION_SCHEMA.names, *ann.columns])]])
        frames.append(box)
        errors.update({c: D.missing(c, ann, images) for c in D.BOX_CHECKS})
        if not errors["max_boxes_per_image"]:
            images[D.N_BOXES] = D.boxes_per_image(images, ann)
            stats["images_without_boxes"] = int((images[D.N_BOXES] == 0).sum())
        for check, where, expectation in D.expectations(E, p):
            if not errors[check]:
                (box if where == "boxes" else img).items.append((check, expectation))
        stats["n_boxes"] = len(ann)
        labelled = boxes
        errors["min_per_class"] = (_missing(ann, ("sample_id", "label"), "annotations")
                                   or _missing(images, ("sample_id", "split")))
    errors["class_imbalance"] = errors["min_per_class"]
    if "label" in labelled.columns:
        stats["per_class"] = {str(k): int(v) for k, v in labelled["label"].value_counts().sort_index().items()}

    if not errors["split_fraction_in_bounds"]:
        shares = _Frame("split_fractions", _split_fractions(images, p), ("split", "n_images"), [
            ("split_fraction_in_bounds", E.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="fraction", column_B="min_fraction", or_equal=True)),
            ("split_fraction_in_bounds", E.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="max_fraction", column_B="fraction", or_equal=True))])
        frames.append(shares)
        stats["split_fraction"] = {r.split: round(r.fraction, 4) for r in shares.df.itertuples()}
    if not errors["min_per_class"]:
        counts = _class_counts(labelled, classes, _splits(images, p.allowed_splits))
        # min_per_class and class_imbalance are GX expectations too, on small derived frames:
        # GX has no per-group row-count expectation for pandas.
        frames.append(_Frame("class_counts", counts, ("split", "label"), [
            ("min_per_class", E.ExpectColumnValuesToBeBetween(column=COUNT_COLUMN, min_value=p.min_per_class))]))
        balance = _class_balance(counts)
        frames.append(_Frame("class_balance", balance, (
            "split", "largest_class", "largest_count", "smallest_class", "smallest_count"), [
            ("class_imbalance", E.ExpectColumnValuesToBeBetween(
                column=IMBALANCE_COLUMN, max_value=p.max_class_imbalance))]))
        stats["class_imbalance"] = {r.split: _plain(round(r.imbalance, 2)) for r in balance.itertuples()}
    return frames, {k: v for k, v in errors.items() if v}, stats


def validate(manifest_path: Path, *, classes: list[str], params: ValidateParams, report_dir: Path,
             version: str | None = None, task: str = "classification",
             annotations_path: Path | None = None) -> ValidateResult:
    """Run the validation suite for `task` and write summary.json + index.html to `report_dir`.

    Args: the images table (Parquet), the class names, the `validate:` params, the report folder,
    the dataset version to name in the report, the task ("classification" or "detection") and,
    for detection, the annotations table (one row per box). Returns a ValidateResult; never
    raises on bad data, only on unreadable inputs or bad arguments.
    """
    if task not in TASK_CHECKS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASK_CHECKS)}")
    if task == "detection" and annotations_path is None:
        raise ValueError("task 'detection': annotations_path (annotations.parquet, one row per box) is required")
    images = load_manifest(manifest_path)
    ann = load_annotations(annotations_path) if task == "detection" else None
    gx, context, table = _gx_context()
    frames, pre_errors, stats = _frames(images, ann, classes, params, gx, task)
    checks = TASK_CHECKS[task]
    by_check: dict[str, list] = {name: [] for name in CHECKS}
    for frame in frames:
        # One GX batch per checked column (or column pair), holding only that column: GX copies
        # the whole batch frame to filter each expectation's rows, so a wide frame would be
        # copied, string columns and all, once per expectation (3x slower on 1M boxes).
        for name, columns, items in _batches(frame):
            try:
                results = _validate_batch(gx, context, table, name, _for_gx(frame.df[columns]), items)
            except gx.exceptions.GreatExpectationsError as e:  # GX could not run it: suite errors
                for check, _ in items:
                    pre_errors[check] = pre_errors.get(check) or f"{type(e).__name__}: {e}"
                continue
            for r in results:
                if not pre_errors.get(r.expectation_config.meta["check"]):
                    by_check[r.expectation_config.meta["check"]].append((r, frame))

    rules = _rules(params, classes, task)
    severity = params.severity.model_dump()
    entries = [_entry(n, rules[n], severity[n], by_check[n], pre_errors.get(n)) for n in checks]
    failed = [e for e in entries if e["status"] == "failed"]
    result = ValidateResult(
        success=not any(e["severity"] == "error" and not e["success"] for e in entries),
        version=version,
        n_rows=len(images),
        expectations=entries,
        failures=[e["name"] for e in failed if e["severity"] == "error"],
        warnings=[e["name"] for e in failed if e["severity"] == "warn"],
        errors=[e["name"] for e in entries if e["status"] == "error"],
        summary_path=str(Path(report_dir) / "summary.json"),
        html_path=str(Path(report_dir) / "index.html"),
        task=task,
        stats=stats,
    )
    summary = {"stage": "validate", "manifest": str(manifest_path), "params": params.model_dump(mode="json"),
               "annotations": None if annotations_path is None else str(annotations_path),
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
    info = read_json(ingest_dir / "version.json")
    task = info.get("task", "classification")
    if task not in TASK_CHECKS:
        raise ValueError(f"{ingest_dir / 'version.json'}: task {task!r}, expected one of {', '.join(TASK_CHECKS)}")
    result = validate(ingest_dir / "manifest.parquet", classes=list(read_json(ingest_dir / "classes.json")),
                      params=params.validate_, report_dir=report_dir, version=info.get("version"), task=task,
                      annotations_path=ingest_dir / "annotations.parquet" if task == "detection" else None)
    dump_resolved(params, report_dir / "params.resolved.yaml")
    if not result.success:
        raise ValidationFailed(result)
    return result


# --------------------------------------------------------------------------- messages and report


def _code(text: str) -> str:
    # Code spans keep data literal in markdown (no HTML, no emphasis); no backtick or line break ends them.
    return "`" + text.replace("`", "'").replace("\r", " ").replace("\n", " ") + "`"


def _line(e: dict, n_examples: int = 2) -> str:
    if e["status"] == "error":
        return f"- {e['name']} ({e['rule']}): could not be evaluated: {_code(e['error'])}"
    examples = "; ".join(_code(", ".join(f"{k}={v!r}" for k, v in r.items())) for r in e["examples"][:n_examples])
    return f"- {e['name']} ({e['rule']}): {e['unexpected_count']} unexpected" + (f"; e.g. {examples}" if examples else "")


def _size(result: ValidateResult) -> str:
    """E.g. "classification, 600 images" or "detection, 3 images, 98 boxes"."""
    boxes = f", {result.stats['n_boxes']} boxes" if "n_boxes" in result.stats else ""
    return f"{result.task}, {result.n_rows} images{boxes}"


def failure_message(result: ValidateResult) -> str:
    """A readable list (plain text that is also markdown) of what failed, with counts and examples."""
    by_name = {e["name"]: e for e in result.expectations}
    blocking = [by_name[n] for n in result.failures + result.errors if by_name[n]["severity"] == "error"]
    head = (f"Validation {'passed' if result.success else 'failed'} for dataset version {result.version} "
            f"({_size(result)}): {len(blocking)} error-severity expectation(s) did not pass.")
    lines = [head, *(_line(e) for e in blocking)]
    others = [by_name[n] for n in result.warnings + result.errors if by_name[n] not in blocking]
    if others:
        lines += ["Warnings (do not fail the gate):", *(_line(e) for e in others)]
    lines.append(f"Report: {result.html_path}")
    return "\n".join(lines)


def markdown_summary(result: ValidateResult) -> str:
    """A markdown table of every expectation, then the failure details (for a Prefect artifact)."""
    status = "PASSED" if result.success else "FAILED"
    lines = [f"## Validation {status}: dataset version `{result.version}`, {_size(result)}", "",
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


def _stats_html(stats: dict) -> str:
    """Dataset counts: images and share per split, labels (images or boxes) per class and their
    imbalance, images without boxes."""
    parts = []
    for key, title in (("per_split", "images per split"), ("split_fraction", "share of images per split"),
                       ("per_class", "per class"), ("class_imbalance", "largest / smallest class per split")):
        if stats.get(key):
            cells = ", ".join(f"<code>{html.escape(str(k))}</code>: {v}" for k, v in stats[key].items())
            parts.append(f"<li>{title}: {cells}</li>")
    if "images_without_boxes" in stats:
        parts.append(f"<li>images without boxes (allowed): {stats['images_without_boxes']}</li>")
    return f"<ul>{''.join(parts)}</ul>" if parts else ""


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
        f"<p>Dataset version <code>{html.escape(str(result.version))}</code> ({html.escape(_size(result))}); "
        f"{counts}. Severity <b>error</b> fails the gate, <b>warn</b> is reported only.</p>{_stats_html(result.stats)}"
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
    print(f"validation passed: dataset version {result.version} ({_size(result)}), "
          f"{len(result.expectations)} expectations{warned}; report {result.html_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
