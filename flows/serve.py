"""PixelOps in the Prefect UI: deployments with parameter forms, served or on a work pool.

    pixelops serve                  start the server on 127.0.0.1 (unless up) and serve the
                                    deployments from this process; Ctrl-C stops serving, then
                                    the server it started (that order: a server stopped under
                                    served flows hangs on shutdown)
    pixelops deploy --pool NAME     register the same deployments on a Prefect work pool (type
                                    process, created if missing); `prefect worker start --pool
                                    NAME` on any machine that has the project runs them

Deployments (flow / deployment name): pixelops-pipeline/pipeline, pixelops-ingest/ingest,
pixelops-curate/curate, pixelops-tune/tune. Their parameters are params.yaml's sections as the
typed models of tasks/params.py, so the UI renders a form; the defaults are params.yaml's values
when the deployments were registered (flows/forms.py says what a changed form does).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pixelops.server import bound_client_retries
from tasks.env import configure_environment

configure_environment()
bound_client_retries()  # before flows.ingest imports prefect

from flows.forms import form_defaults
from flows.ingest import ingest_flow
from flows.pipeline import curate_flow, pipeline
from flows.tune import tune_flow
from tasks.params import Params, load_params

CODE_ROOT = Path(__file__).resolve().parents[1]
TAGS = ["pixelops"]

# deployment name -> (flow, its params.yaml sections, entrypoint for pools, description)
DEPLOYMENTS = {
    "pipeline": (pipeline, ("ingest", "validate", "pretrain", "curate", "tune", "train", "evaluate", "export"),
                 "flows/pipeline.py:pipeline",
                 "Every stage, each skipped when dvc.lock says it is up to date; report and artifacts at the end."),
    "ingest": (ingest_flow, ("ingest",), "flows/ingest.py:ingest_flow",
               "A source becomes the project's dataset version (optionally sharded over a local Dask cluster)."),
    "curate": (curate_flow, ("curate",), "flows/pipeline.py:curate_flow",
               "The stages up to curate: the version data teams open in the FiftyOne App."),
    "tune": (tune_flow, ("tune", "train"), "flows/tune.py:tune_flow",
             "An Optuna sweep over tune.space (journal file or PostgreSQL storage)."),
}


def _parameters(params: Params, root: Path, sections: tuple[str, ...]) -> dict:
    return {"root": str(root), **form_defaults(params, sections)}


def deployments(root: Path | str = ".") -> list:
    """RunnerDeployments for `prefect.serve`, with parameter defaults from root/params.yaml."""
    root = Path(root).resolve()
    params = load_params(root / "params.yaml")
    return [flow.to_deployment(name=name, parameters=_parameters(params, root, sections), description=text,
                               tags=TAGS)
            for name, (flow, sections, _, text) in DEPLOYMENTS.items()]


def serve(root: Path | str = ".") -> None:
    """Start (or reuse) the server, serve until interrupted, then stop what was started, in order."""
    import prefect

    from pixelops import server

    params = load_params(Path(root) / "params.yaml")
    s = params.server
    info, started = server.start(s.host, s.port, timeout_s=s.startup_timeout_s)
    os.environ["PREFECT_API_URL"] = info.url
    print(f"Prefect server {'started' if started else 'already running'}: UI {info.ui} (pid {info.pid}, "
          f"log {info.log})", flush=True)
    try:
        prefect.serve(*deployments(root))  # returns on SIGINT/SIGTERM, after its runs are stopped
    finally:
        if started:
            server.stop()
            print(f"Prefect server stopped (pid {info.pid})", flush=True)


def deploy_to_pool(pool: str, root: Path | str = ".") -> list[str]:
    """Register the deployments on process work pool `pool` (created if missing); their ids."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    root = Path(root).resolve()
    params = load_params(root / "params.yaml")
    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
            if found.type != "process":
                raise ValueError(f"work pool {pool!r} is of type {found.type!r}; these deployments need a "
                                 "'process' pool (the workers run the project's code from its folder)")
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    ids = []
    for name, (flow, sections, entrypoint, text) in DEPLOYMENTS.items():
        # The worker pulls nothing: it runs the code in CODE_ROOT (same machine or a shared path).
        remote = flow.from_source(source=str(CODE_ROOT), entrypoint=entrypoint)
        ids.append(str(remote.deploy(name=name, work_pool_name=pool, parameters=_parameters(params, root, sections),
                                     description=text, tags=TAGS, build=False, push=False, print_next_steps=False)))
    return ids


def main(argv: list[str]) -> int:
    if argv[:1] == ["deploy"]:
        pool = argv[argv.index("--pool") + 1] if "--pool" in argv else "pixelops"
        for i in deploy_to_pool(pool):
            print(i)
        return 0
    serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
