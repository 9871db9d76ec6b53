"""SIGKILL at random points of real pipeline runs, and two runs started at once on one repository.

A tiny real project (every stage, FiftyOne curation included) runs through `pixelops run` in
its own process group; the whole group is SIGKILLed at seeded random times, as a power loss or
the OOM killer would. After each kill: what the flow would skip (pixelops.stages.is_up_to_date,
in-process) is what `dvc status` reports, and every stage DVC calls done has whole outputs.
The last run completes with the dataset version and metrics of an uninterrupted run. Slow.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from bench.project import make_project
from tests.conftest import TINY_OVERRIDES

pytestmark = pytest.mark.slow

KILLS = 12
OVERRIDES = [*TINY_OVERRIDES, "train.epochs=3", "curate.dataset_prefix=killtest"]
PIXELOPS = [sys.executable, "-m", "pixelops.cli"]


def _env() -> dict:
    return dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")


def _start(project, *args) -> subprocess.Popen:
    return subprocess.Popen([*PIXELOPS, *args], cwd=project, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 1200) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def _outcome(project) -> dict:
    version = json.loads((project / "data" / "ingest" / "version.json").read_text())["version"]
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    return {"version": version, "metrics": metrics}


def _dvc_changed(project) -> set[str]:
    """Stages `pixelops status` (DVC's status, in another process) says would rerun."""
    status = subprocess.run([*PIXELOPS, "status", "--json"], cwd=project, env=_env(), capture_output=True,
                            text=True, check=False)
    assert status.returncode == 0, status.stderr
    return {name.split(":")[-1] for name in json.loads(status.stdout or "{}")}


def _check_agreement(project) -> set[str]:
    from pixelops.stages import STAGES, is_up_to_date

    changed = _dvc_changed(project)
    with contextlib.chdir(project):  # as a flow run does (params.yaml's paths are relative)
        flow_would_run = {s for s in STAGES if not is_up_to_date(s, project)}
    assert flow_would_run == changed, (flow_would_run, changed)
    done = set(STAGES) - changed
    if "ingest" in done:  # DVC calls it done: the version is whole (every stored image matches its hash)
        import pyarrow.parquet as pq

        from tasks.io import sha256_file

        folder = project / "data" / "ingest"
        for row in pq.read_table(folder / "manifest.parquet").to_pylist():
            assert sha256_file(folder / row["path"]) == row["content_hash"]
    if "train" in done:
        from tasks.checkpoints import load_file

        meta = json.loads((project / "data" / "train" / "model.json").read_text())
        load_file(project / "data" / "train" / "model.pt", sha256=meta["model_sha256"])
    if "evaluate" in done:
        assert json.loads((project / "reports" / "metrics.json").read_text())["n_test"] > 0
    return changed


def test_two_runs_at_once_then_random_kills_then_the_same_result(tmp_path):
    # Two runs at once on one repository: one does the work, the other waits, then finds it done.
    reference = make_project(tmp_path / "reference", OVERRIDES)
    t0 = time.monotonic()
    first, second = _start(reference, "run"), _start(reference, "run")
    outs = [_finish(first), _finish(second)]
    full_s = time.monotonic() - t0
    assert first.returncode == 0 and second.returncode == 0, outs
    assert any("waiting for the DVC repository" in o for o in outs), outs
    assert sum("Running stage 'ingest'" in o for o in outs) == 1  # the work was done once
    registry = (reference / "dataset-versions.jsonl").read_text().splitlines()
    assert len(registry) == 2  # one ingest version and its curated version: nothing mixed or doubled
    assert _dvc_changed(reference) == set()
    expected = _outcome(reference)

    # Random kills of the whole process group, each run continuing from what the last one recorded;
    # a run that finishes first is followed by a forced one (`dvc repro --force`), so there is
    # always work to interrupt, in every stage.
    project = make_project(tmp_path / "killed", OVERRIDES)
    rng = random.Random(10)
    killed_in, attempts, force = [], 0, []
    while len(killed_in) < KILLS and attempts < 3 * KILLS:
        attempts += 1
        proc = _start(project, "run", *force)
        try:
            out = _finish(proc, timeout=rng.uniform(1.0, 0.8 * full_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            running = re.findall(r"Running stage '(\w+)'", out)
            killed_in.append(running[-1] if running else "startup")
            _check_agreement(project)
            force = []
            continue
        assert proc.returncode == 0, out
        force = ["--force"]
    print(f"full run {full_s:.0f}s; {len(killed_in)} kills in {attempts} runs, in stages: {killed_in}")
    assert len(killed_in) == KILLS and len(set(killed_in)) >= 4

    final = _start(project, "run")
    out = _finish(final)
    assert final.returncode == 0, out
    assert _check_agreement(project) == set()
    got = _outcome(project)
    assert got["version"] == expected["version"]
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "n_test"):
        assert got["metrics"][key] == expected["metrics"][key], key
    registry = (project / "dataset-versions.jsonl").read_text().splitlines()
    assert len(registry) == 2  # no version registered twice or half
