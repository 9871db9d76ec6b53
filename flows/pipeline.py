"""The pipeline as a Prefect flow: ingest → validate → pretrain → curate → tune → train → evaluate → review.

Each stage is one Prefect task that calls pixelops.stages.run_stage: DVC's lock file decides
whether the stage is up to date (so this flow and `dvc repro` agree), the stage function
does the work, and the stage is committed to dvc.lock. Prefect's own result cache is off for
these tasks: a second record of "done" could disagree with DVC's, which is keyed by the
content of each stage's deps, params section and source.

Parameters: the params.yaml sections as typed models (flows/forms.py): the Prefect UI shows
them as a form, and what a run changes is written into params.yaml first. A run holds the
project's DVC writer lock (pixelops/repo_lock.py) from that edit to its last commit, and
model stages on CUDA hold a slot of the `gpu` concurrency limit (flows/concurrency.py).

Run:  python -m flows.pipeline            (ephemeral local Prefect server, nothing to start)
      pixelops serve                      (the Prefect server and UI deployments; README)
"""

from __future__ import annotations

import os
import sys
import time

from pixelops.server import PrefectUnreachable, bound_client_retries, reachable_api
from tasks.env import configure_environment

configure_environment()
bound_client_retries()  # before prefect reads its settings

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.concurrency import ensure_gpu_limit, gpu_slot
from flows.forms import apply_form
from flows.tune import tune_wiring
from pixelops.stages import STAGES, enter_project, prepare_curation, repo_writer, run_stage
from tasks.params import (
    CurateParams,
    EvaluateParams,
    ExportParams,
    IngestParams,
    PretrainParams,
    TrainParams,
    TuneParams,
    ValidateParams,
    load_params,
)
from tasks.validate import ValidationFailed

# Retries only where the world is flaky: reading the source, talking to FiftyOne's database.
RETRIES = {"ingest": 2, "curate": 2}
# Stages that put a model on the device; tune's trials take their own slots (flows/tune.py).
MODEL_STAGES = {"pretrain", "train", "evaluate", "review", "export"}


def _stage_task(name: str):
    retries = RETRIES.get(name, 0)

    @task(name=name, retries=retries, retry_delay_seconds=[2, 5, 15][:retries] or 0, cache_policy=NO_CACHE)
    def stage_task(root: str) -> dict:
        params = load_params(f"{root}/params.yaml")
        extra = tune_wiring(params) if name == "tune" else {}  # each trial a task run, workers flow runs
        with gpu_slot(name in MODEL_STAGES and ensure_gpu_limit(params)):
            outcome = run_stage(name, params, root=root, **extra)
        get_run_logger().info("%s %s in %.1fs", name, "up to date, skipped" if outcome.skipped else "ran",
                              outcome.seconds)
        return {"stage": name, "skipped": outcome.skipped, "seconds": round(outcome.seconds, 2)}

    return stage_task


STAGE_TASKS = {name: _stage_task(name) for name in STAGES}


@task(name="prepare-curation", retries=2, retry_delay_seconds=[2, 5], cache_policy=NO_CACHE)
def prepare_task(root: str) -> dict:
    """FiftyOne's database up and the curators' App tags pulled, as `pixelops run` does."""
    return prepare_curation(load_params(f"{root}/params.yaml"), root)


def _publish_validation_failure(error) -> None:
    """Publish the failing expectations so the flow run in the UI shows why it stopped."""
    from tasks.validate import markdown_summary

    create_markdown_artifact(key="validation-report", markdown=markdown_summary(error.result),
                             description="Great Expectations gate: failed")


def _publish_results(root: str) -> None:
    """The run's summary, per-class table and report link, on the flow run in the UI."""
    from tasks.report import per_class_table, report_uri, summary_markdown

    create_markdown_artifact(key="pipeline-summary", markdown=summary_markdown(root), description="PixelOps run")
    rows = per_class_table(root)
    if rows:
        create_table_artifact(key="per-class-metrics", table=rows, description="Test split, per class")
    uri = report_uri(root)
    if uri:
        create_link_artifact(key="evaluation-report", link=uri, link_text="evaluation report (HTML)",
                             description="Self-contained page: open it from the machine that ran the flow")


def run_stages(root: str, names: tuple[str, ...], form: dict, *, purpose: str) -> list[dict]:
    """The form's changes into params.yaml, then `names` in order, all under the writer lock."""
    logger = get_run_logger()
    root = enter_project(root)
    params = load_params(f"{root}/params.yaml")
    outcomes = []
    with repo_writer(params, root, purpose, say=logger.warning):
        apply_form(root, form, say=logger.info)
        prepare_task(root)
        for name in names:
            try:
                outcomes.append(STAGE_TASKS[name](root))
            except ValidationFailed as e:
                _publish_validation_failure(e)
                raise
    return outcomes


def _purpose(flow: str) -> str:
    from prefect.runtime import flow_run

    return f"{flow} flow run {flow_run.name or ''} (pid {os.getpid()})".replace("  ", " ")


@flow(name="pixelops-pipeline")
def pipeline(root: str = ".", ingest: IngestParams | None = None, validation: ValidateParams | None = None,
             pretrain: PretrainParams | None = None, curate: CurateParams | None = None,
             tune: TuneParams | None = None, train: TrainParams | None = None,
             evaluate: EvaluateParams | None = None, export: ExportParams | None = None) -> dict:
    """Run every stage in order; each is skipped when DVC records it as up to date.

    Each section left empty (None) is taken from params.yaml as it is; a given one is a form:
    its changed values are written into params.yaml before the run (flows/forms.py).
    `validation` is params.yaml's `validate:` (a parameter cannot be named after pydantic's
    own `validate`).
    """
    t0 = time.perf_counter()
    form = {"ingest": ingest, "validate": validation, "pretrain": pretrain, "curate": curate, "tune": tune,
            "train": train, "evaluate": evaluate, "export": export}
    outcomes = run_stages(root, STAGES, form, purpose=_purpose("pixelops-pipeline"))
    _publish_results(".")  # run_stages entered the project
    return {"stages": outcomes, "seconds": round(time.perf_counter() - t0, 2)}


@flow(name="pixelops-curate")
def curate_flow(root: str = ".", curate: CurateParams | None = None) -> dict:
    """The stages up to curate (each skipped when up to date): the version data teams open in FiftyOne."""
    t0 = time.perf_counter()
    names = STAGES[: STAGES.index("curate") + 1]
    outcomes = run_stages(root, names, {"curate": curate}, purpose=_purpose("pixelops-curate"))
    return {"stages": outcomes, "seconds": round(time.perf_counter() - t0, 2)}


def main() -> int:
    try:
        with reachable_api():
            result = pipeline()
    except PrefectUnreachable as e:
        print(f"pipeline: {e}", file=sys.stderr)
        return 1
    for o in result["stages"]:
        print(f"{o['stage']:<9} {'skipped' if o['skipped'] else 'ran':<8} {o['seconds']:>8.1f}s")
    from tasks.report import summary_text

    print(summary_text("."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
