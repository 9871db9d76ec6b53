"""Static, offline HTML report of an Optuna sweep: no JavaScript, no CDN, PNGs beside the page.

Inputs:  an optuna.Study (any storage; only its public API is used) and the epochs each trial asked for.
Outputs: <out_dir>/index.html        trials table, plots, pruning savings, the caller's chosen best
         <out_dir>/history.png       objective per trial (pruned at their last report) + best-so-far line
         <out_dir>/intermediate.png  learning curves: the value reported per epoch, for every trial
         <out_dir>/importances.png   parameter importances, only when they can mean something
         <out_dir>/trials.csv        one row per trial
         <out_dir>/summary.json      the dict write_tune_report returns
Params:  none of its own; tasks/tune.py passes epochs_requested from its `tune:` section.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from tasks import safe_csv
from tasks.io import atomic_write_bytes, atomic_write_json, atomic_write_text

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _seconds(t: FrozenTrial) -> float | None:
    # duration is None until the trial has both a start and a completion time.
    return None if t.duration is None else round(t.duration.total_seconds(), 3)


def trials_table(study: optuna.Study) -> list[dict]:
    """One plain dict per trial of `study`, ordered by trial number (states as their names)."""
    return [
        {"number": t.number, "state": t.state.name, "value": t.value, "params": dict(t.params),
         "epochs_run": len(t.intermediate_values), "epochs_requested": t.user_attrs.get("epochs_requested"),
         "seconds": _seconds(t), "user_attrs": dict(t.user_attrs)}
        for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    ]


def pruning_savings(study: optuna.Study, *, epochs_requested: int) -> dict:
    """Epochs actually run by finished (complete + pruned) trials against what they would have run.

    Args:
        study: the sweep.
        epochs_requested: epochs each trial asks for; the same for all trials.
    Returns: epochs_run, epochs_requested, ratio (None with no finished trial), n_complete, n_pruned, n_failed.
    """
    if isinstance(epochs_requested, bool) or not isinstance(epochs_requested, int) or epochs_requested < 1:
        raise ValueError(f"epochs_requested must be an int >= 1, got {epochs_requested!r}")
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in _FINISHED]
    run = sum(len(t.intermediate_values) for t in finished)
    requested = len(finished) * epochs_requested
    return {"epochs_run": run, "epochs_requested": requested, "ratio": run / requested if requested else None,
            "n_complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "n_pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "n_failed": sum(t.state == TrialState.FAIL for t in trials)}


def _importances(study: optuna.Study, complete: list[FrozenTrial]) -> tuple[dict | None, str | None]:
    """(importances, None) or (None, why not): a sweep report must survive a degenerate study."""
    if len(complete) < 2:
        return None, f"needs at least 2 completed trials, the study has {len(complete)}"
    names = sorted({k for t in complete for k in t.params})
    if not any(len({repr(t.params.get(k)) for t in complete}) > 1 for k in names):
        return None, f"no parameter varies across the {len(complete)} completed trials"
    if len({t.value for t in complete}) == 1:
        return None, f"all {len(complete)} completed trials have the same value"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            imp = optuna.importance.get_param_importances(study)
        except Exception as e:  # noqa: BLE001 -- a diagnostic: its failure is the reported reason, not a crash
            return None, f"optuna.importance failed: {type(e).__name__}: {e}"
    # optuna warns (e.g. "too few trials ... importances will be equal") when the numbers are filler.
    if caught:
        return None, "optuna.importance warned: " + "; ".join(sorted({str(w.message) for w in caught}))
    if not imp:
        return None, "optuna.importance returned no parameters"
    return {k: float(v) for k, v in imp.items()}, None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; also keeps the import cheap
    import matplotlib.pyplot as plt

    return plt


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # tight: keeps the below-axes legends in frame
    plt.close(fig)
    return buf.getvalue()


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def history_png(trials: list[FrozenTrial], *, maximize: bool) -> bytes:
    """Objective per trial number: complete as dots, pruned as crosses at their last report, best so far."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if not complete and not pruned:
        _empty(ax, "no finished trials yet: nothing to plot")
        ax.set_title("Optimization history")
        return _png(fig, plt)
    if pruned:
        ax.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                   marker="x", color="#999", label="pruned (last reported value)", zorder=2)
    if complete:
        xs, ys = [t.number for t in complete], [t.value for t in complete]
        ax.scatter(xs, ys, color="#1f77b4", label="complete", zorder=3)
        best, run = [], None
        for y in ys:
            run = y if run is None else (max(run, y) if maximize else min(run, y))
            best.append(run)
        # Extend the step to the last finished trial: the best known when the sweep stopped.
        last = max(t.number for t in complete + pruned)
        ax.step(xs + [last], best + [best[-1]], where="post", color="#d62728", label="best so far", zorder=4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"objective ({'maximize' if maximize else 'minimize'})")
    ax.set_title("Optimization history")
    ax.grid(alpha=0.3)
    # Below the axes, so the legend never hides points.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, frameon=False)
    return _png(fig, plt)


def intermediate_png(trials: list[FrozenTrial], *, best_number: int | None) -> bytes:
    """Learning curves: each trial's reported value per epoch; pruned dashed grey, best trial thick."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    curves = [t for t in trials if t.intermediate_values]
    ax.set_title("Learning curves (intermediate values)")
    if not curves:
        _empty(ax, "no trial reported intermediate values")
        return _png(fig, plt)
    styles = {TrialState.COMPLETE: {"color": "#1f77b4", "ls": "-", "alpha": 0.6, "lw": 1.2},
              TrialState.PRUNED: {"color": "#999", "ls": "--", "alpha": 0.7, "lw": 1.0}}
    other = {"color": "#ff7f0e", "ls": ":", "alpha": 0.8, "lw": 1.2}  # running / failed: still or never finished
    for t in curves:
        steps = sorted(t.intermediate_values)
        style = dict(styles.get(t.state, other))
        if t.number == best_number:
            style.update(color="#d62728", alpha=1.0, lw=2.5)
        if len(steps) == 1:  # a one-epoch curve has no line to draw; a dot keeps it visible
            style.update(marker="o", ms=3)
        ax.plot(steps, [t.intermediate_values[s] for s in steps], zorder=3 if t.number == best_number else 2,
                **style)
    handles = [Line2D([], [], label="complete", **styles[TrialState.COMPLETE]),
               Line2D([], [], label="pruned", **styles[TrialState.PRUNED]),
               Line2D([], [], label="running / failed", **other)]
    if best_number is not None:
        handles.append(Line2D([], [], color="#d62728", lw=2.5, label=f"best (trial {best_number})"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (reported step)")
    ax.set_ylabel("intermediate value")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=len(handles), frameon=False)
    return _png(fig, plt)


def importances_png(importances: dict[str, float]) -> bytes:
    """Horizontal bars, most important on top, each labelled with its share."""
    plt = _pyplot()
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(items)), dpi=100)
    ax.barh([k for k, _ in items], [v for _, v in items], color="#1f77b4")
    for i, (_, v) in enumerate(items):
        ax.text(v + 0.01, i, f"{v:.3f}", va="center", fontsize=9)
    ax.set_xlim(0, max(1.0, max(v for _, v in items) + 0.12))
    ax.set_xlabel("importance (normalized to sum 1; optuna's default evaluator)")
    ax.set_title("Hyperparameter importance")
    return _png(fig, plt)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _kv(d: dict) -> list[str]:
    return [f"{k}={_fmt(v)}" for k, v in sorted(d.items())]


def save_trials_csv(rows: list[dict], path: Path) -> None:
    """One row per trial, one param_<name> column per parameter, user attributes as JSON; string
    cells that a spreadsheet would run (= + - @ ...) are quoted (tasks.safe_csv)."""
    names = sorted({k for r in rows for k in r["params"]})
    buf = io.StringIO()
    w = safe_csv.writer(buf, lineterminator="\n")
    w.writerow(["number", "state", "value", "epochs_run", "epochs_requested", "seconds",
                *(f"param_{n}" for n in names), "user_attrs"])
    for r in rows:
        w.writerow([r["number"], r["state"], r["value"], r["epochs_run"], r["epochs_requested"], r["seconds"],
                    *(r["params"].get(n, "") for n in names), json.dumps(r["user_attrs"], default=str)])
    atomic_write_text(path, buf.getvalue())


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}: {{ s.study_name }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}
th{background:#f3f3f3}.muted{color:#666}.box{background:#f6f8fa;padding:.8rem 1rem;border-radius:4px}
code{font-size:.9em}img{max-width:100%}
</style></head><body>
<h1>{{ title }}</h1>
<p class="muted">study <code>{{ s.study_name }}</code> · direction {{ s.direction }} · optuna {{ s.optuna_version }}
· {{ s.counts.COMPLETE }} complete, {{ s.counts.PRUNED }} pruned, {{ s.counts.FAIL }} failed,
{{ s.counts.RUNNING }} running, {{ s.counts.WAITING }} waiting</p>
{% if best %}<div class="box"><strong>Selected</strong><table>
{% for k, v in best %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table></div>{% endif %}
{% if s.best_trial is not none %}<p>Best completed trial: <strong>#{{ s.best_trial }}</strong>,
value {{ fmt(s.best_value) }}, {{ kv(s.best_params)|join(", ") }}</p>
{% else %}<p>No completed trial yet: there is no best trial.</p>{% endif %}
<p>Pruned trials stopped early: {{ p.epochs_run }} epochs run of {{ p.epochs_requested }} requested
({{ "ratio %.2f"|format(p.ratio) if p.ratio is not none else "no finished trials" }}).</p>
<h2>Optimization history</h2>
{% if not s.counts.COMPLETE %}<p class="muted">No completed trials: history shows no objective values.</p>{% endif %}
<img src="history.png" alt="objective value per trial number, with the best value so far">
<h2>Learning curves</h2>
<img src="intermediate.png" alt="intermediate value per epoch for each trial; pruned trials dashed">
<h2>Parameter importance</h2>
{% if s.importances %}<img src="importances.png" alt="parameter importances">
<p class="muted">From the {{ s.counts.COMPLETE }} completed trials only: pruning keeps the good region, so these
rank parameters among survivors{% if s.counts.COMPLETE < 10 %}, and with under 10 trials they are noisy{% endif %}.</p>
{% else %}<p class="muted">Not computed: {{ s.importances_reason }}.</p>{% endif %}
<h2>Trials</h2>
<table><tr><th>#</th><th>state</th><th>value</th><th>epochs run / requested</th><th>seconds</th><th>params</th>
<th>notes</th></tr>
{% for r in rows %}<tr><td>{{ r.number }}</td><td>{{ r.state }}</td><td>{{ fmt(r.value) }}</td>
<td>{{ r.epochs_run }} / {{ r.epochs_requested if r.epochs_requested is not none else "?" }}</td>
<td>{{ fmt(r.seconds) }}</td><td>{{ kv(r.params)|join(", ") }}</td>
<td>{{ kv(r.user_attrs_shown)|join(", ") }}</td></tr>
{% endfor %}</table>
<p class="muted">For an interactive view of the same study, run <code>optuna-dashboard {{ storage }}</code>
on the storage the sweep wrote to (an in-memory study has none to open). Data: trials.csv, summary.json.</p>
</body></html>
"""


def render_tune_report(summary: dict, rows: list[dict], *, title: str, storage: str | None) -> str:
    from jinja2 import Environment

    env = Environment(autoescape=True)  # study names, param values and attrs are data: always escaped
    # epochs_requested has its own column; the other user_attrs (retry_of, fail_reason ...) are notes.
    rows = [{**r, "user_attrs_shown": {k: v for k, v in r["user_attrs"].items() if k != "epochs_requested"}}
            for r in rows]
    best = summary.get("selected")
    best_rows = [(k, ", ".join(_kv(v)) if isinstance(v, dict) else _fmt(v)) for k, v in (best or {}).items()]
    return env.from_string(_PAGE).render(s=summary, p=summary["pruning"], rows=rows, best=best_rows,
                                         title=title, storage=storage or "<storage URL>", fmt=_fmt, kv=_kv)


def write_tune_report(study: optuna.Study, out_dir: Path, *, epochs_requested: int, best: dict | None = None,
                      title: str = "Hyperparameter sweep", storage: str | None = None) -> dict:
    """Write the sweep's report into `out_dir` (index.html, PNGs, trials.csv, summary.json).

    Args:
        study: a single-objective study, in any state (running, failed and waiting trials are fine).
        out_dir: folder for the report; created if missing, files replaced atomically.
        epochs_requested: epochs each trial asks for (pruning savings are measured against it).
        best: what the caller selected (e.g. trial, value, params, final_model), shown at the top.
        title: page heading.
        storage: the storage URL, for the optuna-dashboard hint; a placeholder when None.
    Returns: the summary dict also written to summary.json.
    """
    if len(study.directions) != 1:
        raise ValueError(f"study {study.study_name!r}: report needs a single objective, "
                         f"got directions {[d.name for d in study.directions]}")
    out_dir = Path(out_dir)
    savings = pruning_savings(study, epochs_requested=epochs_requested)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    best_trial = study.best_trial if complete else None
    importances, reason = _importances(study, complete)
    summary = {
        "study_name": study.study_name, "direction": "maximize" if maximize else "minimize",
        "optuna_version": optuna.__version__,
        "best_trial": best_trial.number if best_trial else None,
        "best_value": best_trial.value if best_trial else None,
        "best_params": dict(best_trial.params) if best_trial else {},
        "pruning": savings, "counts": {s.name: sum(t.state == s for t in trials) for s in TrialState},
        "n_trials": len(trials), "importances": importances, "importances_reason": reason, "selected": best,
    }
    atomic_write_bytes(out_dir / "history.png", history_png(trials, maximize=maximize))
    atomic_write_bytes(out_dir / "intermediate.png",
                       intermediate_png(trials, best_number=summary["best_trial"]))
    if importances:
        atomic_write_bytes(out_dir / "importances.png", importances_png(importances))
    else:  # a stale plot from an earlier run of the same folder would contradict the page
        (out_dir / "importances.png").unlink(missing_ok=True)
    rows = trials_table(study)
    save_trials_csv(rows, out_dir / "trials.csv")
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "index.html", render_tune_report(summary, rows, title=title, storage=storage))
    return summary
