"""The tune stage as Prefect flows: every trial a task run, every extra worker a flow run.

    python -m flows.tune                  the sweep of params.yaml's `tune:` (what the stage does)
    python -m flows.tune worker ARGS      one more worker on an existing study; what
                                          `tune.workers: N` starts N-1 times, each its own flow
                                          run on the same Prefect server (ARGS: tasks.tune.parse_worker_args)

Across machines: point each machine's PREFECT_API_URL at one Prefect server and `tune.storage`
at one PostgreSQL database, then run a worker there (by hand or as a deployment on a work
pool); Optuna hands each process its own trials.

A trial's task run is named `trial-<number>` and publishes a table artifact with its values and
outcome. On a GPU the trial holds a slot of the global concurrency limit `gpu`
(flows/concurrency.py: one slot per visible GPU), so parallel trials never oversubscribe it.
"""

from __future__ import annotations

import os
import re
import sys

from pixelops.server import PrefectUnreachable, bound_client_retries, reachable_api
from tasks.env import configure_environment

configure_environment()
bound_client_retries()  # before prefect reads its settings

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client

from flows.concurrency import ensure_gpu_limit, gpu_slot
from tasks import tune as tune_stage
from tasks.params import Params, TrainParams, TuneParams, load_params


def _artifact_key(study: str, number: int) -> str:
    return re.sub(r"[^a-z0-9-]", "-", f"{study}-trial-{number}".lower())


def trial_runner(study: str, gpu: bool):
    """A tasks.tune run_trial that makes each trial a Prefect task run."""

    @task(name="trial", cache_policy=NO_CACHE)
    def trial(number: int, values: dict, run) -> dict:
        with gpu_slot(gpu):
            outcome = run()
        row = {"trial": number, **{f"param {k}": v for k, v in values.items()},
               **{k: outcome.get(k) for k in ("state", "value", "epochs_run", "epochs_requested", "seconds")}}
        create_table_artifact(key=_artifact_key(study, number), table=[row],
                              description=f"study {study}, trial {number}: {outcome['state']}")
        return outcome

    def run_trial(number: int, values: dict, run) -> dict:
        return trial.with_options(task_run_name=f"trial-{number}")(number, values, run)

    return run_trial


def tune_wiring(params: Params) -> dict:
    """tasks.tune.run's keyword arguments inside a flow: trials as task runs, workers as flow runs."""
    if not params.tune.enabled:
        return {}
    _share_server_with_workers()
    return {"run_trial": trial_runner(tune_stage.study_for(params), ensure_gpu_limit(params)),
            "worker_cmd": [sys.executable, "-m", "flows.tune", "worker"]}


@flow(name="pixelops-tune")
def tune_flow(root: str = ".", tune: TuneParams | None = None, train: TrainParams | None = None) -> dict:
    """The sweep alone (not recorded in dvc.lock): trials, best.json and the report.

    `tune` and `train` are forms over params.yaml's sections (flows/forms.py): changed values
    (the space, trial count, the base recipe, `enabled`) are written into params.yaml first.
    """
    from flows.forms import apply_form
    from pixelops.stages import enter_project, repo_writer

    logger = get_run_logger()
    root = enter_project(root)
    with repo_writer(load_params(f"{root}/params.yaml"), root, f"pixelops-tune flow run (pid {os.getpid()})",
                     say=logger.warning):
        apply_form(root, {"tune": tune, "train": train}, say=logger.info)
        params = load_params(f"{root}/params.yaml")
        result = tune_stage.run(params, **tune_wiring(params))
    return {"study": result.study, "best_value": result.best_value, "best_params": result.best_params,
            "complete": result.n_complete, "pruned": result.n_pruned, "failed": result.n_failed}


@flow(name="pixelops-tune-worker")
def tune_worker(params_file: str, study: str, index: int = 0, threads: int | None = None,
                deadline: float | None = None) -> list[dict]:
    """One worker of an existing study: trials until the study has its count."""
    args = tune_stage.parse_worker_args(["--params", params_file, "--study", study, "--index", str(index),
                                         *(["--threads", str(threads)] if threads else []),
                                         "--deadline", str(deadline or 0)])
    params = args.pop("params")
    return tune_stage.run_worker(params, args.pop("name"), **args,
                                 run_trial=trial_runner(study, ensure_gpu_limit(params)))


def _share_server_with_workers() -> None:
    """Worker processes report to this flow's Prefect server, ephemeral or not."""
    if not os.environ.get("PREFECT_API_URL"):
        with get_client(sync_client=True) as client:
            os.environ["PREFECT_API_URL"] = str(client.api_url)


def main(argv: list[str]) -> int:
    try:
        with reachable_api():
            if argv[:1] == ["worker"]:
                a = tune_stage.parse_worker_args(argv[1:])
                spec = argv[argv.index("--params") + 1]
                tune_worker(spec, a["name"], a["index"], a["threads"], a["deadline"])
            else:
                print(tune_flow())
    except PrefectUnreachable as e:
        print(f"tune flow: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
