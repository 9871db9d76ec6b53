"""Image embeddings from the pipeline's own model, computed once per (model hash, dataset version).

Before training that model is the pretrained backbone of `train.model` (ImageNet weights from
the project's weights mechanism); after training it is the fine-tuned model in data/train.
Never a FiftyOne zoo model: those download at run time. The embedding is the input of the
classifier's last Linear layer (the pooled features), taken with a forward hook so every
torchvision architecture in tasks.models works the same way.

Cache: `<paths.cache>/embeddings/<version>-<model hash>-<image size>.npz` holding sample_ids
and float16 features; the model hash covers every weight, so a new model never reuses it.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from tasks.data import build_eval_transform, image_channels, load_images
from tasks.io import atomic_write_bytes

# Per architecture: the module whose output is pooled onto a GRID×GRID embedding.
EMBEDDING_LAYERS = {"mobilenet_v2": "features.13", "resnet18": "layer3", "resnet18_small": "layer3"}
GRID = 4


@dataclass(frozen=True)
class Embeddings:
    sample_ids: np.ndarray  # str, one per row
    vectors: np.ndarray  # float32 (N, D)
    model_hash: str
    cache_file: Path
    cached: bool  # True when read from the cache


def model_hash(model: nn.Module) -> str:
    """SHA-256 over the parameter and buffer names and bytes (order as in state_dict)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def embedding_key(model: nn.Module, arch: str | None) -> str:
    """The cache key of a model's embeddings: every weight, the layer choice and the grid."""
    return hashlib.sha256(f"{model_hash(model)}:{arch}:{GRID}".encode()).hexdigest()


def _embedding_hook(model: nn.Module, arch: str | None, captured: list):
    modules = dict(model.named_modules())
    name = EMBEDDING_LAYERS.get(arch or "")
    if name in modules:
        def grid(_m, _inputs, out):
            captured.append(nn.functional.adaptive_avg_pool2d(out.float(), GRID).flatten(1))
        return modules[name].register_forward_hook(grid)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__}: no Linear layer to take features from")
    return linears[-1].register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0].float()))


@torch.no_grad()
def extract(model: nn.Module, images: torch.Tensor, normalize, *, batch_size: int,
            arch: str | None = None) -> np.ndarray:
    """Embeddings (see the module doc) for uint8 images, float32 (N, D), in order."""
    captured: list[torch.Tensor] = []
    hook = _embedding_hook(model, arch, captured)
    model.eval()
    try:
        for i in range(0, len(images), batch_size):
            x = normalize(images[i : i + batch_size]).contiguous(memory_format=torch.channels_last)
            model(x)
    finally:
        hook.remove()
    return torch.cat(captured).numpy() if captured else np.zeros((0, 0), np.float32)


def cache_path(cache_dir: Path, version: str, digest: str, image_size: int) -> Path:
    return Path(cache_dir) / "embeddings" / f"{version}-{digest[:16]}-{image_size}.npz"


def _read_cache(path: Path, sample_ids: list[str]) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            cached_ids, vectors = data["sample_ids"], data["vectors"]
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache entry is recomputed, never trusted
    index = {sid: i for i, sid in enumerate(cached_ids.tolist())}
    if any(s not in index for s in sample_ids):
        return None
    return vectors[[index[s] for s in sample_ids]].astype(np.float32)


def embed(model: nn.Module, mean, std, rows: pd.DataFrame, images_root: Path, *, version: str,
          image_size: int, cache_dir: Path, batch_size: int = 512, arch: str | None = None) -> Embeddings:
    """Embeddings of `rows` (sample_id, path, mode) in row order, from the cache when present."""
    digest = embedding_key(model, arch)
    path = cache_path(cache_dir, version, digest, image_size)
    ids = rows["sample_id"].astype(str).tolist()
    vectors = _read_cache(path, ids)
    if vectors is not None:
        return Embeddings(np.asarray(ids), vectors, digest, path, cached=True)
    channels = image_channels(rows)
    images = load_images(rows, images_root, size=image_size, channels=channels)
    normalize = build_eval_transform(mean=mean, std=std, channels=channels)
    # Rounded to the cache's float16 now, so the first run and cached runs see the same numbers.
    vectors = extract(model, images, normalize, batch_size=batch_size, arch=arch).astype(np.float16)
    buf = io.BytesIO()
    np.savez(buf, sample_ids=np.asarray(ids), vectors=vectors)
    atomic_write_bytes(path, buf.getvalue())
    return Embeddings(np.asarray(ids), vectors.astype(np.float32), digest, path, cached=False)


def reduce(vectors: np.ndarray, dim: int, *, seed: int = 0) -> np.ndarray:
    """L2-normalized PCA projection to `dim` dimensions (exact neighbor search cost scales with D).

    Cosine distances between the reduced vectors track those of the full features for
    close pairs, which is all near-duplicate and leakage search needs.
    """
    from sklearn.decomposition import PCA

    x = vectors.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    if x.shape[1] > dim and len(x) > dim:
        x = PCA(n_components=dim, svd_solver="randomized", random_state=seed).fit_transform(x)
        x /= np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    return x.astype(np.float32)
