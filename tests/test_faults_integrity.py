"""Corruption: a flipped byte in DVC's cache, in an epoch checkpoint or in a model is found, never used.

Every fault is a real flipped bit in a real file written by the real stage; positions are
spread over the whole file (headers, pickles, tensor data, zip directory) with a fixed seed.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from bench.project import make_project, set_param
from pixelops.integrity import cache_path, verify
from pixelops.stages import run_stage
from pixelops.versions import VersionError, checkout
from tasks import checkpoints, evaluate, train
from tasks.params import load_params
from tests.conftest import TINY_OVERRIDES

FLIPS = 40  # positions per checkpoint file


def _flip(path, pos: int, bit: int = 0x10) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[pos] ^= bit
    path.write_bytes(bytes(data))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def trained(trained_tiny):
    return trained_tiny


def _run_folder(params):
    (folder,) = (params.paths.cache / "train").iterdir()
    return folder


def test_a_flipped_byte_in_a_checkpoint_is_never_resumed_from(trained, tmp_path, capsys):
    params = trained
    folder = _run_folder(params)
    newest = checkpoints.epoch_path(folder, 2)
    original_bytes = newest.read_bytes()
    original = torch.load(newest, weights_only=True)
    model, _, _ = train.load_trained(params.paths.data / "train")
    key = original["run_key"]
    rng = random.Random(0)
    refused = harmless = 0
    for pos in sorted(rng.sample(range(len(original_bytes)), FLIPS)):
        work = tmp_path / "ckpt"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(folder, work)
        _flip(checkpoints.epoch_path(work, 2), pos)
        state, path = checkpoints.load_latest(work, key=key, model=model, epochs=2)
        if path.name == "epoch-0001.pt":  # refused by name, and the previous epoch used instead
            refused += 1
            assert "epoch-0002.pt: corrupted" in capsys.readouterr().err
        else:  # a flip that changes nothing loaded (zip metadata): what loads is the original, exactly
            harmless += 1
            assert _same(state, original), f"byte {pos}: a corrupted checkpoint was loaded as valid"
    assert refused >= FLIPS * 0.7, (refused, harmless)  # most of the file is tensor data


def test_a_corrupted_newest_checkpoint_resumes_from_the_one_before(trained, tmp_path):
    """End to end: the run resumes from epoch 1 and ends with the uninterrupted run's exact weights."""
    params = trained
    folder = _run_folder(params)
    reference = (params.paths.data / "train" / "model.pt").read_bytes()
    newest = checkpoints.epoch_path(folder, 2)
    keep = newest.read_bytes()
    _flip(newest, len(keep) // 2)
    out = tmp_path / "resumed"
    try:
        recipe, _ = train.final_params(params)
        result = train.train(params.paths.data / "curate", params=recipe, out_dir=out, seed=params.seed,
                             cache_dir=params.paths.cache)
    finally:
        newest.write_bytes(keep)
    meta = json.loads((out / "model.json").read_text())
    assert meta["resumed_after_epoch"] == 1 and result.epochs_run == 2
    assert (out / "model.pt").read_bytes() == reference


def test_a_corrupted_model_is_refused_by_evaluate(trained, tmp_path):
    params = trained
    model_pt = params.paths.data / "train" / "model.pt"
    keep = model_pt.read_bytes()
    rng = random.Random(1)
    try:
        for pos in rng.sample(range(len(keep)), 5):
            model_pt.write_bytes(keep)
            _flip(model_pt, pos)
            with pytest.raises(checkpoints.CorruptFile, match="model.pt"):
                evaluate.run(params)
    finally:
        model_pt.write_bytes(keep)
    assert not (params.paths.reports / "evaluate" / "metrics.json").exists()  # nothing was reported from it


def _cache_file_of(project, relpath: str):
    """The cache object of data/ingest/<relpath> in the current version."""
    import yaml
    from dvc.repo import Repo

    md5 = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["ingest"]["outs"][0]["md5"]
    with Repo(str(project)) as repo:
        odb = repo.cache.local
        entry = next(e for e in json.loads(cache_path(odb, md5).read_text()) if e["relpath"] == relpath)
        return cache_path(odb, entry["md5"])


def _version(project) -> str:
    return json.loads((project / "data" / "ingest" / "version.json").read_text())["version"]


def test_a_flipped_byte_in_dvc_cache_is_found_refused_and_repaired(tmp_path, monkeypatch):
    from pixelops.cli import main as cli

    project = make_project(tmp_path / "p", [*TINY_OVERRIDES, "ingest.limit_per_split=30"])
    (project / ".dvc" / "config").write_text("[core]\n    remote = local\n['remote \"local\"']\n    url = ../remote\n")
    monkeypatch.chdir(project)
    run_stage("ingest", load_params())
    first = _version(project)
    manifest = (project / "data" / "ingest" / "manifest.parquet").read_bytes()
    image = min((project / "data" / "ingest" / "images").rglob("*.png"))
    image_rel = str(image.relative_to(project / "data" / "ingest"))
    assert verify(load_params()).ok
    assert cli(["push", "ingest"]) == 0  # as `pixelops ingest` does when a remote is set

    # Found: the cache copies of one image and of the manifest, one flipped bit each.
    bad = [_cache_file_of(project, image_rel), _cache_file_of(project, "manifest.parquet")]
    _flip(bad[0], 40)
    _flip(bad[1], 100)
    report = verify(load_params())
    assert {o.cache_path for o in report.corrupted} == set(bad)
    assert f"data/ingest/{image_rel}" in report.describe() and "pixelops verify --repair" in report.describe()
    assert cli(["verify"]) == 1
    assert cli(["push", "ingest"]) == 1  # never pushed, so the remote's good copies stay good

    # Refused: checking that version out again stops, and the workspace keeps the current version.
    set_param(project, "ingest.limit_per_split", 20)
    run_stage("ingest", load_params())
    second = _version(project)
    with pytest.raises(VersionError, match="corrupted"):
        checkout(first, load_params())
    assert _version(project) == second and not (project / "data" / ".ingest.checkout").exists()

    # Repaired from the remote, by hash (the workspace holds the second version, so it cannot help).
    repaired = verify(load_params(), repair=True)
    # (DVC deletes a corrupted object it trips over, so one of them may be missing rather than corrupted)
    assert repaired.ok and not repaired.missing and set(bad) <= {o.cache_path for o in repaired.repaired}
    assert 1 <= len(list((project / ".dvc" / "tmp" / "corrupt").iterdir())) <= 2  # kept for inspection
    checkout(first, load_params())
    assert _version(project) == first
    assert (project / "data" / "ingest" / "manifest.parquet").read_bytes() == manifest


def test_repair_restores_from_the_workspace_without_a_remote(tmp_path, monkeypatch):
    project = make_project(tmp_path / "p", [*TINY_OVERRIDES, "ingest.limit_per_split=20"])
    monkeypatch.chdir(project)
    run_stage("ingest", load_params())
    bad = _cache_file_of(project, "manifest.parquet")
    _flip(bad, 7)
    assert not verify(load_params()).ok
    repaired = verify(load_params(), repair=True)
    assert repaired.ok and [o.cache_path for o in repaired.repaired] == [bad]
    assert bad.read_bytes() == (project / "data" / "ingest" / "manifest.parquet").read_bytes()
