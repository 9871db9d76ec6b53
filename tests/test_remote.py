"""A dataset version travels between machines through a DVC remote, configuration only.

The remote here is a local folder; an object store (s3://, gs://, azure://) is the same commands
with another URL and credentials in .dvc/config.local (README, "Scaling out"). The second
"machine" is a git clone with no DVC cache of its own: `dvc pull` must give it the same bytes.
"""

from __future__ import annotations

import subprocess

from bench.project import dvc, make_project
from tests.conftest import TINY_OVERRIDES


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=cwd, check=True,
                   capture_output=True)


def _files(root) -> dict[str, bytes]:
    # Files only: DVC versions files, and an empty folder (an unused images/<hh>/ fan-out) is not one.
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_clone_pulls_the_version_from_the_remote(tmp_path):
    project = make_project(tmp_path / "project", [*TINY_OVERRIDES, "ingest.limit_per_split=40"])
    remote = tmp_path / "object-store"
    assert dvc(project, "remote", "add", "-d", "store", str(remote)).returncode == 0
    repro = dvc(project, "repro", "ingest")
    assert repro.returncode == 0, repro.stderr
    push = dvc(project, "push", "ingest")
    assert push.returncode == 0, push.stderr
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "version")

    clone = tmp_path / "other-machine"
    _git(tmp_path, "clone", "-q", str(project), str(clone))
    assert not (clone / "data" / "ingest").exists()  # git carries dvc.lock, not the data
    pull = dvc(clone, "pull", "ingest")
    assert pull.returncode == 0, pull.stderr
    pulled, original = _files(clone / "data" / "ingest"), _files(project / "data" / "ingest")
    assert len(original) > 80 and pulled == original  # every image, table and version.json, byte for byte
    status = dvc(clone, "status", "ingest")
    assert "up to date" in status.stdout, status.stdout + status.stderr
