"""One writer at a time per project: a second run waits with a message, or fails clearly; forms.

Real processes contend for the lock (fcntl is per process); the form tests edit a real
params.yaml and check that comments survive and only changed keys are written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from pixelops.repo_lock import RepoBusy, holder, lock_path, writer_lock
from tests.conftest import ROOT

HOLD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from pixelops.repo_lock import writer_lock
    with writer_lock(sys.argv[1], purpose="holder test run", timeout_s=0):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _hold(project: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT)), str(project), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _dvc_project(tmp_path: Path) -> Path:
    (tmp_path / ".dvc").mkdir()
    return tmp_path


def test_second_writer_waits_with_a_message_then_goes_on(tmp_path):
    project = _dvc_project(tmp_path)
    proc = _hold(project, 2.0)
    said = []
    t0 = time.monotonic()
    with writer_lock(project, purpose="second run", timeout_s=60, poll_s=0.1, say=said.append):
        waited = time.monotonic() - t0
        assert holder(project)["purpose"] == "second run" and holder(project)["pid"] == os.getpid()
    proc.wait(timeout=10)
    assert waited >= 1.0  # it really waited for the holder
    assert "waiting for the DVC repository" in said[0] and "holder test run" in said[0]
    assert f"pid {proc.pid}" in said[0]
    assert "free after" in said[-1]
    assert lock_path(project).parent == project / ".dvc" / "tmp"  # beside DVC's own lock


def test_busy_repository_fails_clearly_and_changes_nothing(tmp_path):
    project = _dvc_project(tmp_path)
    proc = _hold(project, 30)
    try:
        ran = []
        with (pytest.raises(RepoBusy, match=r"busy: pid \d+ .*holder test run.*server.repo_lock_timeout_s=0.5"),
              writer_lock(project, purpose="impatient run", timeout_s=0.5, poll_s=0.1, say=lambda m: None)):
            ran.append(True)
        assert not ran
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    project = _dvc_project(tmp_path)
    proc = _hold(project, 60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with writer_lock(project, purpose="after the crash", timeout_s=0):  # the kernel released it
        pass


def test_reentrant_within_one_process(tmp_path):
    project = _dvc_project(tmp_path)
    with (writer_lock(project, purpose="flow run", timeout_s=0),
          writer_lock(project, purpose="its stage task", timeout_s=0)):
        assert holder(project)["purpose"] == "flow run"


def test_pixelops_cli_waits_for_a_running_flow(tmp_path):
    """`pixelops run` in a project whose lock another run holds: waits, says who, gives up clearly."""
    from bench.project import make_project
    from tests.conftest import TINY_OVERRIDES

    project = make_project(tmp_path / "project", [*TINY_OVERRIDES, "server.repo_lock_timeout_s=1"])
    proc = _hold(project, 30)
    try:
        out = subprocess.run([sys.executable, "-m", "pixelops.cli", "run"], cwd=project, capture_output=True,
                             text=True, timeout=120, check=False)
    finally:
        proc.kill()
        proc.wait()
    assert out.returncode == 1
    assert "waiting for the DVC repository" in out.stdout + out.stderr
    assert "the DVC repository is busy" in out.stderr and "Nothing was changed" in out.stderr
    assert not (project / "data").exists()  # no stage ran


# --------------------------------------------------------------------------- forms


def test_form_changes_are_the_keys_that_differ_from_the_form_defaults(params_tiny):
    from flows.forms import changes, form_defaults
    from tasks.params import TrainParams

    defaults = form_defaults(params_tiny, ("train", "validate"))
    assert set(defaults) == {"train", "validation"}
    same = TrainParams.model_validate(defaults["train"])
    assert changes({"train": same}, defaults) == []
    edited = TrainParams.model_validate({**defaults["train"], "epochs": 7, "augment": {
        **defaults["train"]["augment"], "policy": "trivialaugment"}})
    assert sorted(changes({"train": edited}, defaults)) == ['train.augment.policy="trivialaugment"', "train.epochs=7"]
    # an API call with one key: only that key counts, the rest stays with params.yaml
    assert changes({"train": TrainParams.model_validate({"epochs": 2})}, defaults) == ["train.epochs=2"]


def test_apply_form_writes_params_yaml_keeping_comments(tmp_path):
    import shutil

    from flows.forms import apply_form
    from tasks.params import TrainParams, load_params

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_text()
    applied = apply_form(str(tmp_path), {"train": TrainParams.model_validate({"epochs": 9, "lr": 0.0005})},
                         say=lambda m: None)
    assert sorted(applied) == ["train.epochs=9", "train.lr=0.0005"]
    after = (tmp_path / "params.yaml").read_text()
    assert load_params(tmp_path / "params.yaml").train.epochs == 9
    assert [ln for ln in before.splitlines() if ln.lstrip().startswith("#")] == \
        [ln for ln in after.splitlines() if ln.lstrip().startswith("#")]  # comments kept
    assert yaml.safe_load(after)["ingest"] == yaml.safe_load(before)["ingest"]
    with pytest.raises(Exception, match="epochs"):  # invalid values are refused before writing
        apply_form(str(tmp_path), {"train": TrainParams.model_construct(epochs=-1, _fields_set={"epochs"})},
                   say=lambda m: None)
    assert (tmp_path / "params.yaml").read_text() == after
