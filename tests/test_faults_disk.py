"""Disk full while writing a dataset version, a checkpoint and a report: a clear error, nothing lost.

The disk is real and really full: a small tmpfs mounted for the test, filled to leave N bytes
free, so the kernel itself answers ENOSPC wherever the stage (or DVC, pyarrow, torch) happens
to be writing. N is swept so the failure lands at different points of each write sequence.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess

import pytest
import yaml

from bench.project import make_project, set_param
from pixelops.stages import run_stage
from tasks import checkpoints, evaluate, ingest, train
from tasks.io import DiskFull
from tasks.params import load_params
from tests.conftest import TINY_OVERRIDES, tiny_params

KB = 1024


@contextlib.contextmanager
def tmpfs(path, size_mb: int):
    """A real filesystem of `size_mb` MiB at `path` (needs root: mount)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): run the tests as root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(fs, leave: int):
    """Take all free space on `fs` but `leave` bytes; returns the filler file (delete it to free)."""
    filler = fs / "filler"
    filler.unlink(missing_ok=True)
    st = os.statvfs(fs)
    size = st.f_bavail * st.f_frsize - leave
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(size, 0))
    return filler


def _snapshot(root, names) -> dict[str, bytes]:
    out = {}
    for name in names:
        p = root / name
        files = sorted(p.rglob("*")) if p.is_dir() else [p] if p.is_file() else []
        out |= {str(f.relative_to(root)): f.read_bytes() for f in files if f.is_file()}
    return out


def _no_space(err: BaseException) -> bool:
    text = "".join(str(e) for e in (err, err.__cause__, err.__context__) if e).lower()
    return "no space left on device" in text or "a full disk" in text


def _whole_version(folder) -> str:
    """The version id in `folder`, after checking every file its manifest names is there, whole."""
    import pyarrow.parquet as pq

    from tasks.io import sha256_file

    manifest = pq.read_table(folder / "manifest.parquet").to_pylist()
    assert all(sha256_file(folder / row["path"]) == row["content_hash"] for row in manifest)
    return json.loads((folder / "version.json").read_text())["version"]


def _versions(project) -> list[str]:
    return [json.loads(line)["version"] for line in (project / "dataset-versions.jsonl").read_text().splitlines()]


def test_disk_full_while_writing_a_dataset_version(tmp_path, monkeypatch):
    from dvc.repo import Repo

    with tmpfs(tmp_path / "fs", 48) as fs:
        project = make_project(fs / "p", [*TINY_OVERRIDES, "ingest.limit_per_split=30"])
        monkeypatch.chdir(project)
        run_stage("ingest", load_params())
        first = _whole_version(project / "data" / "ingest")
        recorded = _snapshot(project, ["dvc.lock"])
        set_param(project, "ingest.limit_per_split", 60)
        second = ingest.run(tiny_params(tmp_path / "reference", ["ingest.limit_per_split=60"])).version
        errors = []
        for leave in range(0, 4096 * KB, 48 * KB):  # until there is room: each step fails a little later
            filler = fill(fs, leave)
            try:
                outcome = run_stage("ingest", load_params())
            except Exception as e:  # noqa: BLE001 - which error depends on where the disk ran out
                errors.append(f"{type(e).__name__}: {e}")
                assert _no_space(e), f"{leave} bytes free: unclear error {e!r}"
                # The published version is the previous one or the whole new one, never part of one;
                # dvc.lock and the registry still describe the previous one (`dvc status`: changed).
                assert _whole_version(project / "data" / "ingest") in {first, second}
                assert _snapshot(project, ["dvc.lock"]) == recorded, f"{leave} bytes free"
                assert _versions(project) in ([first], [first, second])
                assert not (project / "data" / ".ingest.partial").exists()
                filler.unlink()
                continue
            filler.unlink()
            break
        print("\n".join(errors))
        assert len(errors) >= 8 and not outcome.skipped and outcome.result.per_split == {"train": 60, "test": 60}
        assert _whole_version(project / "data" / "ingest") == outcome.result.version
        with Repo(str(project)) as repo:
            assert repo.status(targets=["ingest"]) == {}
        assert outcome.result.version == second and _versions(project) == [first, second]


@pytest.fixture
def trained(trained_tiny):
    return trained_tiny


def _with_paths(params, **paths):
    return params.model_copy(update={"paths": params.paths.model_copy(update=paths)})


def test_disk_full_while_writing_a_checkpoint(trained, tmp_path):
    recipe, _ = train.final_params(trained)
    reference = (trained.paths.data / "train" / "model.pt").read_bytes()
    ckpt_bytes = max((trained.paths.cache / "train").rglob("epoch-*.pt")).stat().st_size
    for leave in (0, ckpt_bytes // 2, ckpt_bytes - 64 * KB):
        with tmpfs(tmp_path / "fs", max(8, 3 * ckpt_bytes // 2**20)) as fs:
            fillers = []
            out = tmp_path / f"out-{leave}"

            def full_after_epoch_1(record, leave=leave, fs=fs, fillers=fillers):
                if record["epoch"] == 1:
                    fillers.append(fill(fs, leave))

            with pytest.raises(DiskFull, match=r"no space left on device writing .*epoch-0002\.pt") as err:
                train.train(trained.paths.data / "curate", params=recipe, out_dir=out, seed=trained.seed,
                            cache_dir=fs / "cache", on_epoch=full_after_epoch_1)
            assert err.value.errno == 28
            (folder,) = (fs / "cache" / "train").iterdir()
            assert [p.name for p in folder.iterdir()] == ["epoch-0001.pt"]  # no temp file, no half epoch 2
            assert checkpoints.load_file(folder / "epoch-0001.pt")["epoch"] == 1
            assert not (out / "model.pt").exists()
            fillers[0].unlink()
            result = train.train(trained.paths.data / "curate", params=recipe, out_dir=out, seed=trained.seed,
                                 cache_dir=fs / "cache")
            meta = json.loads((out / "model.json").read_text())
            assert meta["resumed_after_epoch"] == 1 and result.epochs_run == 2
            assert (out / "model.pt").read_bytes() == reference  # exact resume after the disk was freed


def test_disk_full_while_writing_the_report(trained, tmp_path):
    with tmpfs(tmp_path / "fs", 16) as fs:
        params = _with_paths(trained, reports=fs / "reports")
        evaluate.run(params)
        kept = ["reports/evaluate", "reports/metrics.json", "reports/history.jsonl", "reports/runs"]
        before = _snapshot(fs, kept)
        page = before["reports/evaluate/index.html"]
        faults = 0
        for leave in (0, 8 * KB, 32 * KB, 96 * KB, 160 * KB, 256 * KB):
            filler = fill(fs, leave)
            try:
                evaluate.run(params)
            except OSError as e:
                faults += 1
                assert _no_space(e), f"{leave} bytes free: unclear error {e!r}"
                assert _snapshot(fs, kept) == before, f"{leave} bytes free: the previous report changed"
            else:  # enough room: the report was replaced whole
                assert _snapshot(fs, ["reports/evaluate"])["reports/evaluate/index.html"] != b""
            assert not [p for p in (fs / "reports").rglob("*") if ".tmp" in p.name or p.name.startswith(".evaluate")]
            filler.unlink()
        print(f"report: {faults} of 6 fill levels failed the write")
        assert faults >= 4
        assert page in _snapshot(fs, ["reports/runs"]).values()  # the first run's page kept in runs/
        history = (fs / "reports" / "history.jsonl").read_text().splitlines()
        assert 1 <= len(history) <= 1 + 6 - faults  # one line per finished evaluation, none for failed ones
        assert yaml.safe_load((fs / "reports" / "metrics.json").read_text())["n_test"] == 200
        shutil.rmtree(fs / "reports")
