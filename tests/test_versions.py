"""Dataset versions: registry lines, DVC hashes, checkout of an earlier version, push to the remote."""

from __future__ import annotations

import json

import pytest

from bench.project import dvc, make_project, set_param
from pixelops.stages import run_stage
from pixelops.versions import VersionError, checkout, list_versions
from tasks.params import load_params
from tests.conftest import TINY_OVERRIDES


def test_list_checkout_and_push(tmp_path, monkeypatch):
    project = make_project(tmp_path / "p", [*TINY_OVERRIDES, "ingest.limit_per_split=40"])
    (project / ".dvc" / "config").write_text("[core]\n    remote = local\n['remote \"local\"']\n    url = ../remote\n")
    monkeypatch.chdir(project)
    run_stage("ingest", load_params())
    first = json.loads((project / "data" / "ingest" / "version.json").read_text())["version"]
    set_param(project, "ingest.limit_per_split", 30)
    run_stage("ingest", load_params())
    second = json.loads((project / "data" / "ingest" / "version.json").read_text())["version"]

    entries = list_versions(load_params())
    assert [e["version"] for e in entries] == [first, second]
    assert entries[1]["parent"] == first and all(e["dvc_md5"] for e in entries)
    assert entries[0]["per_split"] == {"test": 40, "train": 40} and entries[0]["per_class"]

    checkout(first, load_params())
    assert json.loads((project / "data" / "ingest" / "version.json").read_text())["version"] == first
    assert load_params().ingest.limit_per_split == 40  # params.yaml says what produced it
    status = dvc(project, "status", "ingest")
    assert status.returncode == 0 and "changed" not in status.stdout, status.stdout

    with pytest.raises(VersionError, match="unknown dataset version"):
        checkout("vdoesnotexist", load_params())

    pushed = dvc(project, "push", "ingest")
    assert pushed.returncode == 0, pushed.stderr
    assert any((project / "remote").rglob("*")), "the version's files reached the remote"


def test_curated_versions_sit_between_ingest_versions(tmp_path, monkeypatch):
    project = make_project(tmp_path / "p", [*TINY_OVERRIDES, "ingest.limit_per_split=40", "curate.fiftyone=false",
                                            "validate.min_per_class=1"])
    monkeypatch.chdir(project)
    run_stage("ingest", load_params())
    first = json.loads((project / "data" / "ingest" / "version.json").read_text())["version"]
    run_stage("validate", load_params())
    run_stage("curate", load_params())
    curated = json.loads((project / "data" / "curate" / "curation.json").read_text())["curated_version"]
    set_param(project, "ingest.limit_per_split", 30)
    run_stage("ingest", load_params())
    second = json.loads((project / "data" / "ingest" / "version.json").read_text())["version"]

    entries = {e["version"]: e for e in list_versions(load_params())}
    assert list(entries) == [first, curated, second]
    assert entries[curated]["kind"] == "curation" and entries[curated]["parent"] == first
    assert entries[second]["parent"] == first  # lineage of ingests skips the curation between
    with pytest.raises(VersionError, match=f"{curated} is a curated version of {first}"):
        checkout(curated, load_params())
