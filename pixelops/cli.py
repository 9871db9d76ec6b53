"""`pixelops`: the same stage functions, for people and scripts.

    pixelops run [--flow] [-S train.epochs=3]   the pipeline through `dvc repro` (or the Prefect flow)
    pixelops ingest SOURCE [--format F]         a source becomes the project's new dataset version
    pixelops validate|curate|train|evaluate|review  one stage (skipped when DVC says it is up to date)
    pixelops versions | checkout ID | push      dataset versions: list, restore from DVC, push to the remote
    pixelops app [--port 5151]                  the current version in the FiftyOne App
    pixelops pull-tags                          App tags -> curation/<version>.csv (run does it too)
    pixelops db start|stop|status               FiftyOne's database service (run starts it)
    pixelops status                             what DVC would rerun
    pixelops server start|stop|status           the project's Prefect server on 127.0.0.1
    pixelops serve                              that server plus the UI deployments (forms)
    pixelops deploy [--pool NAME]               the deployments on a work pool, for `prefect worker`s

`-S key=value` follows DVC's `exp run -S`: for `run` and `ingest` the value is written to
params.yaml (after checking it against the typed params), so dvc.lock records what produced
the outputs. For a single stage it applies to that run only and is not recorded in dvc.lock.
Errors print one paragraph and exit 1; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from pixelops.params_file import set_params_file
from tasks.env import configure_environment
from tasks.params import FORMATS


def _subprocess_env() -> dict:
    # dvc.yaml runs `python -m tasks.<stage>`: the venv's python must come first on PATH.
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def cmd_run(args) -> int:
    # The writer lock covers the params.yaml edit too: a run waiting behind another must not
    # change the params that run's stages are reading.
    with _writer(f"pixelops run (pid {os.getpid()})"):
        return _run_locked(args)


def _writer(purpose: str):
    from pixelops.stages import repo_writer
    from tasks.params import load_params

    return repo_writer(load_params(), ".", purpose)


def _run_locked(args) -> int:
    from tasks.report import summary_text

    if args.set:
        set_params_file(args.set)
    _prepare_curation()
    if args.flow:
        from flows.pipeline import main as flow_main

        return flow_main()
    rc = subprocess.call([sys.executable, "-m", "dvc", "repro", *(["--force"] if args.force else [])],
                         env=_subprocess_env())
    if rc != 0:
        raise RuntimeError(f"dvc repro failed (exit {rc}); the failing stage's message is above")
    from pixelops.versions import sync_registry
    from tasks.params import load_params

    sync_registry(load_params())  # the registry line learns the DVC hash of the current version
    print(summary_text("."))
    return 0


def _prepare_curation() -> None:
    from pixelops.stages import prepare_curation
    from tasks.params import load_params

    prep = prepare_curation(load_params())
    if prep["database"] != "off":
        print(f"FiftyOne database: {prep['database']} at {prep['uri']}")
    if prep["pulled"] and prep["pulled"]["changed"]:
        print(f"curators' tags pulled into {prep['pulled']['file']}: {prep['pulled']['decisions']}")


def _current_version(params) -> str | None:
    path = params.paths.data / "ingest" / "version.json"
    return json.loads(path.read_text())["version"] if path.is_file() else None


def cmd_ingest(args) -> int:
    from pixelops.stages import run_stage
    from tasks.params import load_params

    source = Path(args.source).resolve()
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    with _writer(f"pixelops ingest (pid {os.getpid()})"):
        before = _current_version(load_params())
        set_params_file([f"ingest.source.path={source}", f"ingest.source.format={args.format}",
                         "ingest.source.classes=null", *args.set])
        params = load_params()
        run_stage("ingest", params, record=True)
    from pixelops.versions import sync_registry

    sync_registry(params)
    if not args.no_push and _default_remote():
        cmd_push(argparse.Namespace(stages=["ingest"]))
    info = json.loads((params.paths.data / "ingest" / "version.json").read_text())
    state = "unchanged" if info["version"] == before else "new"
    print(f"dataset version {info['version']} ({state}): {info['n_images']} images {info['per_split']}, "
          f"{info['n_quarantined']} quarantined {info.get('quarantine_reasons') or ''}".rstrip())
    return 0


def _default_remote() -> str | None:
    from dvc.repo import Repo

    with Repo(".") as repo:
        return repo.config["core"].get("remote")


def cmd_stage(args) -> int:
    from pixelops.stages import run_stage
    from tasks.params import load_params

    outcome = run_stage(args.command, load_params(overrides=args.set), record=not args.set)
    if outcome.skipped:
        print(f"{args.command}: up to date (dvc.lock), skipped")
    else:
        print(f"{args.command}: done in {outcome.seconds:.1f}s: {outcome.result}")
    if args.set:
        print(f"note: ran with -S overrides, not recorded in dvc.lock; `pixelops run` brings the "
              f"{args.command} outputs back in line with params.yaml")
    return 0


def cmd_versions(args) -> int:
    from pixelops.versions import list_versions
    from tasks.params import load_params

    entries = list_versions(load_params())
    if not entries:
        print("no dataset versions yet: run `pixelops ingest SOURCE` or `pixelops run`")
        return 0
    print(f"{'version':<14} {'created':<26} {'task':<15} {'images':>8}  {'splits':<28} {'parent':<14} source")
    for e in entries:
        if e.get("kind") == "curation":
            kept = " ".join(f"{k}={v}" for k, v in e["kept_per_split"].items())
            print(f"{e['version']:<14} {e['created']:<26} {'curation':<15} {'':>8}  {kept:<28} {e['parent']:<14} "
                  f"{e['n_excluded']} excluded, {e['n_relabeled']} relabeled ({e.get('decisions_file') or 'rules only'})")
            continue
        splits = " ".join(f"{k}={v}" for k, v in e["per_split"].items())
        stored = "" if e.get("dvc_md5") else "  (not recorded in DVC)"
        print(f"{e['version']:<14} {e['created']:<26} {e['task']:<15} {e['n_images']:>8}  {splits:<28} "
              f"{e['parent'] or '-':<14} {e['source']}{stored}")
    return 0


def cmd_checkout(args) -> int:
    from pixelops.versions import checkout
    from tasks.params import load_params

    entry = checkout(args.version, load_params())
    print(f"dataset version {entry['version']} checked out into data/ingest; params.yaml ingest section "
          "restored; `pixelops run` continues from it")
    return 0


def cmd_verify(args) -> int:
    from pixelops.integrity import verify
    from tasks.params import load_params

    report = verify(load_params(), repair=args.repair)
    print(report.describe())
    return 0 if report.ok else 1


def cmd_push(args) -> int:
    from pixelops.integrity import verify
    from tasks.params import load_params

    report = verify(load_params())  # a remote copy of a corrupted object would spread it
    if not report.ok:
        raise RuntimeError(f"not pushing: {report.describe()}")
    rc = subprocess.call([sys.executable, "-m", "dvc", "push", *args.stages], env=_subprocess_env())
    if rc != 0:
        raise RuntimeError(f"dvc push failed (exit {rc}); check the remote in .dvc/config (`dvc remote list`)")
    return 0


def cmd_app(args) -> int:
    from tasks import curate

    curate.launch_app(args.version, port=args.port)
    return 0


def cmd_db(args) -> int:
    from tasks import fo_service
    from tasks.params import load_params

    spec = fo_service.spec_for(load_params().curate.database)
    info = {"start": fo_service.start, "stop": fo_service.stop, "status": fo_service.status}[args.action](spec)
    state = "reachable" if info["reachable"] else "not running"
    where = f"data {info['dbpath']}" if spec.managed else "your own server"
    print(f"FiftyOne database {info['uri']}: {info.get('action', state)} ({where}; log {spec.logpath})")
    return 0 if args.action != "status" or info["reachable"] else 1


def cmd_pull_tags(args) -> int:
    from tasks import curate
    from tasks.params import load_params

    pulled = curate.pull(load_params(), args.version)
    print(f"{pulled['file']}: {pulled['decisions'] or 'no decisions'}"
          f"{'' if pulled['changed'] else ' (unchanged)'}; `pixelops run` makes the curated version")
    return 0


def cmd_server(args) -> int:
    from pixelops import server
    from tasks.params import load_params

    if args.action == "start":
        s = load_params().server
        info, started = server.start(s.host, s.port, timeout_s=s.startup_timeout_s)
        print(f"Prefect server {'started' if started else 'already running'}: UI {info.ui}, pid {info.pid}, "
              f"log {info.log}\nclients: export PREFECT_API_URL={info.url}")
    elif args.action == "stop":
        info = server.stop()
        print(f"Prefect server stopped (pid {info.pid})" if info else "no Prefect server of this project is running")
    else:
        info = server.status()
        print(f"running: UI {info.ui}, pid {info.pid}" if info else "not running")
    return 0


def cmd_serve(args) -> int:
    from flows.serve import serve

    serve(".")
    return 0


def cmd_deploy(args) -> int:
    from flows.serve import DEPLOYMENTS, deploy_to_pool

    deploy_to_pool(args.pool, ".")
    print(f"deployments {', '.join(DEPLOYMENTS)} registered on work pool {args.pool!r}; run them with "
          f"`prefect worker start --pool {args.pool}` (PREFECT_API_URL set to the server)")
    return 0


def cmd_status(args) -> int:
    from pixelops.repo_lock import clear_dead_dvc_locks

    clear_dead_dvc_locks(".", say=lambda m: print(m, file=sys.stderr))  # left by a killed run
    return subprocess.call([sys.executable, "-m", "dvc", "status", *(["--json"] if args.json else [])],
                           env=_subprocess_env())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixelops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_set(p):
        p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a param, DVC style (e.g. -S train.epochs=3)")
        return p

    run = with_set(sub.add_parser("run", help="run the pipeline (dvc repro; --flow for Prefect)"))
    run.add_argument("--flow", action="store_true", help="run as a Prefect flow instead of dvc repro")
    run.add_argument("--force", action="store_true", help="rerun every stage (dvc repro --force)")
    run.set_defaults(func=cmd_run)

    ing = with_set(sub.add_parser("ingest", help="ingest SOURCE as the project's new dataset version"))
    ing.add_argument("source", help="folder with idx files or class folders")
    ing.add_argument("--format", default="auto", choices=list(FORMATS))
    ing.add_argument("--no-push", action="store_true", help="do not push the version to the DVC remote")
    ing.set_defaults(func=cmd_ingest)

    for name in ("validate", "pretrain", "curate", "tune", "train", "evaluate", "review"):
        with_set(sub.add_parser(name, help=f"run the {name} stage")).set_defaults(func=cmd_stage)

    sub.add_parser("versions", help="list dataset versions (id, date, counts, source, parent)") \
        .set_defaults(func=cmd_versions)
    co = sub.add_parser("checkout", help="make an earlier dataset version current (from DVC's cache)")
    co.add_argument("version")
    co.set_defaults(func=cmd_checkout)
    ver = sub.add_parser("verify", help="rehash DVC's cache objects the project uses; --repair restores bad ones")
    ver.add_argument("--repair", action="store_true",
                     help="move corrupted objects to .dvc/tmp/corrupt/, restore from the workspace or the remote")
    ver.set_defaults(func=cmd_verify)
    push = sub.add_parser("push", help="push outputs to the DVC remote (default: every stage)")
    push.add_argument("stages", nargs="*", help="stages to push, e.g. ingest")
    push.set_defaults(func=cmd_push)

    app = sub.add_parser("app", help="open a dataset version in the FiftyOne App (127.0.0.1)")
    app.add_argument("--port", type=int, default=None, help="default: curate.app_port (5151)")
    app.add_argument("--version", default=None, help="dataset version (default: the current one)")
    app.set_defaults(func=cmd_app)

    db = sub.add_parser("db", help="FiftyOne's database service: start, stop, status")
    db.add_argument("action", choices=["start", "stop", "status"])
    db.set_defaults(func=cmd_db)
    pull = sub.add_parser("pull-tags", help="FiftyOne App tags (exclude, relabel:<class>) -> curation/<version>.csv")
    pull.add_argument("--version", default=None, help="dataset version (default: the current one)")
    pull.set_defaults(func=cmd_pull_tags)

    st = sub.add_parser("status", help="what `dvc repro` would rerun")
    st.add_argument("--json", action="store_true", help="DVC's JSON output")
    st.set_defaults(func=cmd_status)

    srv = sub.add_parser("server", help="the project's Prefect server (127.0.0.1): start, stop, status")
    srv.add_argument("action", choices=["start", "stop", "status"])
    srv.set_defaults(func=cmd_server)
    sub.add_parser("serve", help="start the Prefect server and serve the UI deployments (Ctrl-C stops both)") \
        .set_defaults(func=cmd_serve)
    dep = sub.add_parser("deploy", help="register the deployments on a Prefect process work pool")
    dep.add_argument("--pool", default="pixelops", help="work pool name (created if missing)")
    dep.set_defaults(func=cmd_deploy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_environment()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one readable paragraph for people; the traceback with --debug
        if args.debug:
            raise
        print(f"pixelops {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
