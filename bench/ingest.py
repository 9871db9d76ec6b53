"""Ingest throughput and re-ingest cost, against PIL decoding and `dvc add` of the same files.

Two real image sets, written once into a temp folder (not timed):
  fmnist  the Fashion-MNIST images as 28×28 PNG files in an image-folder tree (`size` of them,
          70,000 by default)
  jpegs   300 JPEG crops of 1024×768 from the NEON aerial images shipped in deepforest
For each set, in this run: the ingest stage (all cores), the same files decoded in one
process with PIL (baseline a), `dvc add` of the same folder (baseline b), and a no-op
re-ingest. For fmnist also `dvc add` of the folder packed into one tar (the layout question).
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image


def _fmnist_tree(dest: Path, n: int) -> None:
    from tasks.formats import _read_idx
    from tasks.params import load_params

    root = load_params().ingest.source.path
    done = 0
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 0x00000803)
        labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 0x00000801)
        for i in range(min(len(images), n - done)):
            d = dest / split / str(int(labels[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(d / f"{i:05d}.png")
        done += min(len(images), n - done)


def _jpeg_tree(dest: Path, n: int = 300) -> None:
    data = Path(importlib.util.find_spec("deepforest").submodule_search_locations[0]) / "data"
    big = [Image.open(p).convert("RGB") for p in sorted(data.glob("2019_YELL_2_*.png"))]
    rng = random.Random(0)
    (dest / "train" / "aerial").mkdir(parents=True)
    for i in range(n):
        img = big[i % len(big)]
        x, y = rng.randrange(img.width - 1024), rng.randrange(img.height - 768)
        img.crop((x, y, x + 1024, y + 768)).save(dest / "train" / "aerial" / f"{i:04d}.jpg", quality=90)


def _pil_decode(folder: Path) -> int:
    n = 0
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with Image.open(path) as img:
                img.load()
            n += 1
    return n


def _dvc_add(repo: Path, target: Path) -> float:
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", str(target)], cwd=repo, env=env, check=True)
    return time.perf_counter() - t0


def _measure(name: str, folder: Path, tmp: Path, *, packed: bool) -> dict:
    from tasks.ingest import ingest
    from tasks.params import IngestParams, SourceParams

    src = SourceParams(path=folder, format="image-folder")
    params = IngestParams(source=src, max_bad_fraction=0.0)
    t0 = time.perf_counter()
    n_pil = _pil_decode(folder)
    t_pil = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = ingest(src, out_dir=tmp / f"{name}-out", params=params)
    t_ingest = time.perf_counter() - t0
    t0 = time.perf_counter()
    ingest(src, out_dir=tmp / f"{name}-out", params=params)
    t_noop = time.perf_counter() - t0

    repo = tmp / f"{name}-repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    shutil.copytree(folder, repo / "images")
    figures = {
        "images": n_pil, "ingested": result.n_images,
        "seconds": {"ingest": t_ingest, "pil_decode_one_process": t_pil, "noop_reingest": t_noop,
                    "dvc_add_loose": _dvc_add(repo, repo / "images")},
    }
    if packed:
        with tarfile.open(repo / "images.tar", "w") as tar:
            tar.add(folder, arcname="images")
        figures["seconds"]["dvc_add_packed_tar"] = _dvc_add(repo, repo / "images.tar")
    figures["images_per_second"] = {k: round(n_pil / v, 1) for k, v in figures["seconds"].items()
                                    if k != "noop_reingest"}
    return figures


def run(size: int | None = None) -> dict:
    n = size or 70_000
    out: dict = {"cores": os.cpu_count(), "sets": {}, "ratios": {}}
    with tempfile.TemporaryDirectory(prefix="pixelops-bench-ingest-") as tmp:
        tmp = Path(tmp)
        _fmnist_tree(tmp / "fmnist", n)
        _jpeg_tree(tmp / "jpegs")
        for name, packed in (("fmnist", True), ("jpegs", False)):
            f = _measure(name, tmp / name, tmp, packed=packed)
            out["sets"][name] = f
            s = f["seconds"]
            out["ratios"][f"{name}: ingest speed / PIL one process"] = s["pil_decode_one_process"] / s["ingest"]
            out["ratios"][f"{name}: ingest speed / dvc add"] = s["dvc_add_loose"] / s["ingest"]
            out["ratios"][f"{name}: no-op re-ingest / first ingest"] = s["noop_reingest"] / s["ingest"]
            if packed:
                out["ratios"][f"{name}: dvc add loose / packed tar"] = s["dvc_add_loose"] / s["dvc_add_packed_tar"]
    return out
