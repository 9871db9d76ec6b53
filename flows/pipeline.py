"""The pipeline as a Prefect flow: ingest → validate → pretrain → curate → tune → train → evaluate → review.

Each stage is one Prefect task that calls pixelops.stages.run_stage: DVC's lock file decides
whether the stage is up to date (so this flow and `dvc repro` agree), the stage function
does the work, and the stage is committed to dvc.lock. Prefect's own result cache is off for
these tasks: a second record of "done" could disagree with DVC's, which is keyed by the
content of each stage's deps, params section and source.

Run:  python -m flows.pipeline            (ephemeral local Prefect server, nothing to start)
"""

from __future__ import annotations

import sys
import time

from tasks.env import configure_environment

configure_environment()

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.tune import tune_wiring
from pixelops.stages import STAGES, prepare_curation, run_stage
from tasks.params import load_params
from tasks.validate import ValidationFailed

# Retries only where the world is flaky: reading the source, talking to FiftyOne's database.
RETRIES = {"ingest": 2, "curate": 2}


def _stage_task(name: str):
    retries = RETRIES.get(name, 0)

    @task(name=name, retries=retries, retry_delay_seconds=[2, 5, 15][:retries] or 0, cache_policy=NO_CACHE)
    def stage_task(root: str) -> dict:
        params = load_params(f"{root}/params.yaml")
        extra = tune_wiring(params) if name == "tune" else {}  # each trial a task run, workers flow runs
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


@flow(name="pixelops-pipeline")
def pipeline(root: str = ".") -> dict:
    """Run every stage in order; each is skipped when DVC records it as up to date."""
    t0 = time.perf_counter()
    prepare_task(root)
    outcomes = []
    for name in STAGES:
        try:
            outcomes.append(STAGE_TASKS[name](root))
        except ValidationFailed as e:
            _publish_validation_failure(e)
            raise
    _publish_results(root)
    return {"stages": outcomes, "seconds": round(time.perf_counter() - t0, 2)}


def main() -> int:
    result = pipeline()
    for o in result["stages"]:
        print(f"{o['stage']:<9} {'skipped' if o['skipped'] else 'ran':<8} {o['seconds']:>8.1f}s")
    from tasks.report import summary_text

    print(summary_text("."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
