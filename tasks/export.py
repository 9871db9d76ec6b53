"""Stage export: the trained classifier as TorchScript, ONNX and int8 ONNX, each checked against PyTorch.

Inputs:  data/train/ (model.pt, model.json), data/curate/ (manifest, curation.json), images.
Outputs: data/export/ (`paths.data`/export), replaced as a whole:
    model.torchscript.pt   traced and frozen TorchScript; model.json inside (extra file "model.json")
    model.onnx             ONNX at opset `export.opset` (torch.onnx's dynamo exporter; the legacy
                           one below opset 18), dynamic batch; classes and lineage in metadata_props
    model.int8.onnx        ONNX Runtime static int8 (QDQ), calibrated on train images (tasks.export_quant)
    export.json            per artifact: path, sha256, bytes; parity with PyTorch on test images;
                           int8 test accuracy vs fp32; single-image CPU latency; lineage; versions
Params:  `export:` section; `train.num_threads` (threads for torch and onnxruntime).

Every artifact takes what the PyTorch model takes: float32 (N, 3, S, S), S = spec.image_size,
pixels / 255 normalized with spec.mean / spec.std per channel, grayscale repeated to 3 channels
(tasks.data.Normalize); it returns (N, n_classes) logits. export.json's "input" says so.

Parity gate: TorchScript and ONNX logits on `export.parity_images` test images must be within
`export.parity_atol` of PyTorch's (max absolute difference), else ExportError, and out_dir keeps
the previous export. Everything is written into a staging folder beside out_dir and swapped in
at the end; int8 is reported (accuracy delta, agreement), not gated.

LoRA models (train.finetune: lora) need nothing special: train saves the adapters merged into
plain torchvision weights, and tasks.train.load_trained rebuilds a plain nn.Module without peft.
Detection versions are not exported yet (export.json says why); `export.enabled: false` writes
export.json {"enabled": false} only.
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from tasks.data import build_eval_transform, image_channels, label_indices, load_images
from tasks.io import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from tasks.params import ExportParams, Params
from tasks.train import load_trained, load_training_rows, predict_logits

ARTIFACTS = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx", "int8": "model.int8.onnx"}
INPUT, OUTPUT = "input", "logits"
BATCH = 256  # inference batch for parity and accuracy
DYNAMO_MIN_OPSET = 18  # below: the legacy exporter (save_onnx)
WARMUP_RUNS = 5  # untimed single-image runs first (TorchScript's profiling executor optimizes on run 2)
DETECTION_REASON = (
    "export is classification-only for now: a detector's output (a variable number of boxes after "
    "non-maximum suppression) needs its own ONNX graph and a box-matching parity check, not a logit "
    "comparison; the detection model stays in data/train/model.pt")


class ExportError(ValueError):
    """An exported model's logits differ from PyTorch's beyond `export.parity_atol`."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
    """A private folder beside `out_dir` that replaces it on success and vanishes on failure.

    The swap is two renames in one folder: out_dir → .<name>.old-*, staging → out_dir; the old
    one is then deleted. A crash between the two leaves the previous export in .<name>.old-*.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700; the output gets a plain mkdir's mode
        yield stage
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old)  # onto the empty folder just made: a unique free name
        try:
            os.replace(stage, out_dir)
        except BaseException:
            if old is not None:
                os.replace(old, out_dir)
            raise
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone already after a successful swap


def write_stub(out_dir: Path, report: dict) -> dict:
    """Replace `out_dir` with a folder holding only export.json = `report`; return `report`."""
    with _staged(out_dir) as stage:
        atomic_write_json(stage / "export.json", report)
    return report


def _sample(n: int, k: int, seed: int = 0) -> np.ndarray:
    """k indices of range(n), reproducibly, in order; all of them when k ≥ n."""
    return np.arange(n) if k >= n else np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


@torch.no_grad()
def batched_logits(fn: Callable[[torch.Tensor], np.ndarray], images: torch.Tensor, normalize) -> np.ndarray:
    """fn's float32 logits for uint8 images, normalized batch by batch (the full test split of
    large images never sits in memory as float)."""
    return np.concatenate([np.asarray(fn(normalize(images[i : i + BATCH])), dtype=np.float32)
                           for i in range(0, len(images), BATCH)])


@torch.no_grad()
def latency_ms(fn: Callable, x, runs: int) -> float:
    """Median wall time of fn(x) in milliseconds over `runs` calls, after WARMUP_RUNS untimed ones."""
    for _ in range(WARMUP_RUNS):
        fn(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 4)


def ort_session(path: Path, num_threads: int):
    """A CPU onnxruntime session with `num_threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = num_threads, 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_runner(session) -> Callable[[torch.Tensor], np.ndarray]:
    return lambda x: session.run(None, {INPUT: x.numpy()})[0]


def save_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, model_json: dict):
    """Trace and freeze `model` on `example`, write it atomically, return it reloaded from disk."""
    # torch.jit is deprecated upstream (FutureWarning on every call) but is still the format asked for.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        with torch.no_grad():
            frozen = torch.jit.freeze(torch.jit.trace(model, example))
        buf = io.BytesIO()
        torch.jit.save(frozen, buf, _extra_files={"model.json": json.dumps(model_json, sort_keys=True)})
        atomic_write_bytes(path, buf.getvalue())
        return torch.jit.load(str(path), map_location="cpu")


def save_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, *, opset: int,
              metadata: dict) -> tuple[int, str]:
    """Export `model` to ONNX at `opset` with a dynamic batch dimension, check it, write it
    atomically; return (the graph's opset, the exporter used).

    opset ≥ DYNAMO_MIN_OPSET: torch.onnx's dynamo exporter (torch.export + onnxscript). Below
    it, the legacy TorchScript-based exporter: the dynamo exporter builds opset-18 graphs, and
    for lower opsets onnx's version converter failed on MobileNetV2 (measured for 13, 16, 17)
    and the exporter then silently kept 18.
    """
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's notice
        if opset >= DYNAMO_MIN_OPSET:
            exporter = "torch.onnx.export(dynamo=True)"
            proto = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT],
                                      output_names=[OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                      external_data=False, verbose=False).model_proto
        else:
            exporter, buf = "torch.onnx.export(dynamo=False), legacy TorchScript-based", io.BytesIO()
            torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset, input_names=[INPUT],
                              output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
            proto = onnx.load_from_string(buf.getvalue())
    got = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if got != opset:
        raise ValueError(f"export.opset={opset}: {exporter} produced opset {got}")
    onnx.helper.set_model_props(proto, {k: json.dumps(v) if not isinstance(v, str) else v
                                        for k, v in metadata.items()})
    onnx.checker.check_model(proto, full_check=True)
    atomic_write_bytes(path, proto.SerializeToString())
    return got, exporter


def _parity(ref: np.ndarray, got: np.ndarray) -> dict:
    return {"max_abs_diff": float(np.abs(got - ref).max()),
            "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).mean()), "n_images": len(ref)}


def _gate(parity: dict, atol: float, out_dir: Path) -> None:
    for fmt, p in parity.items():
        if not p["max_abs_diff"] <= atol:  # NaN fails too
            raise ExportError(f"{fmt}: max |logit difference| vs PyTorch {p['max_abs_diff']:.3g} on "
                              f"{p['n_images']} test images exceeds export.parity_atol={atol:g}; nothing "
                              f"written to {out_dir} (a previous export there is kept)")


def _artifact(stage: Path, name: str) -> dict:
    return {"path": name, "sha256": sha256_file(stage / name), "bytes": (stage / name).stat().st_size}


def _versions() -> dict:
    import onnx
    import onnxruntime
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__, "python": platform.python_version()}


def _load_split(rows, images_root: Path, split: str, size: int, classes: list[str], k: int | None = None):
    part = rows[rows["split"] == split].reset_index(drop=True)
    if k is not None:
        part = part.iloc[_sample(len(part), k)].reset_index(drop=True)
    images = load_images(part, images_root, size=size, channels=image_channels(part))
    return images, label_indices(part, classes)


def _check_inputs(model_dir: Path, meta: dict, version: str, params: ExportParams) -> None:
    if params.quantize == "int8" and "onnx" not in params.formats:
        raise ValueError(f"export.quantize=int8 quantizes the fp32 ONNX model: add onnx to export.formats "
                         f"(got {params.formats}) or set export.quantize=none")
    if sha256_file(model_dir / "model.pt") != meta.get("model_sha256"):
        raise ValueError(f"{model_dir}/model.pt: sha256 differs from model.json's model_sha256 "
                         f"{meta.get('model_sha256')}: the folder mixes two training runs")
    if version != meta["dataset_version"]:
        raise ValueError(f"{model_dir}: model was trained on {meta['dataset_version']}, "
                         f"curated data is {version}")


def export(model_dir: Path, curate_dir: Path, out_dir: Path, *, params: ExportParams,
           num_threads: int = 2) -> dict:
    """Export the classifier in `model_dir` to `params.formats` (and int8), gated on parity.

    model_dir:   the train stage's output (model.pt, model.json).
    curate_dir:  the curated version the model was trained on: its test split checks parity and
                 accuracy, `params.calibration_images` of its train split calibrate int8.
    out_dir:     replaced as a whole by the artifacts and export.json, only when every step passed.
    params:      the `export:` section.
    num_threads: torch and onnxruntime intra-op threads (latencies are measured with these).
    Returns export.json's content. Raises ExportError when TorchScript or ONNX logits differ from
    PyTorch's by more than `params.parity_atol`; ValueError when model and data do not belong
    together, the test split is empty, or int8 is asked without onnx.
    """
    from tasks.export_quant import quantize_int8

    t0 = time.perf_counter()
    torch.set_num_threads(num_threads)
    model_dir, curate_dir, out_dir = Path(model_dir), Path(curate_dir), Path(out_dir)
    model, spec, meta = load_trained(model_dir)  # LoRA: already merged, a plain torchvision module
    model.eval()
    rows, classes, version, images_root = load_training_rows(curate_dir)
    _check_inputs(model_dir, meta, version, params)
    test_x, test_y = _load_split(rows, images_root, "test", spec.image_size, classes)
    if len(test_x) == 0:
        raise ValueError(f"{curate_dir}/manifest.parquet: no test rows to check the export on")
    normalize = build_eval_transform(mean=spec.mean, std=spec.std)
    ref = predict_logits(model, test_x, normalize, batch_size=BATCH, device=torch.device("cpu"),
                         channels_last=False, bf16=False).numpy()
    pidx = _sample(len(test_x), params.parity_images)
    # Embedded in the artifacts too: content only (no paths), so the same model exports to the same bytes.
    lineage = {"dataset_version": version, "curated_version": meta.get("curated_version"),
               "model_sha256": meta["model_sha256"], "arch": spec.arch, "finetune": meta.get("finetune"),
               "classes": classes}
    example = normalize(test_x[:2])  # a batch of 2: with 1 the exporter could specialize the batch dimension
    one = normalize(test_x[:1])
    runs = params.latency_runs
    parity, latency, files, int8 = {}, {"pytorch": latency_ms(model, one, runs)}, {}, None
    exporter = opset = None

    with _staged(out_dir) as stage:
        if "torchscript" in params.formats:
            ts = save_torchscript(model, example, stage / ARTIFACTS["torchscript"],
                                  {**lineage, "spec": {k: v for k, v in meta["spec"].items() if k != "extra"}})
            parity["torchscript"] = _parity(ref[pidx], batched_logits(lambda x: ts(x).numpy(), test_x[pidx],
                                                                normalize))
            latency["torchscript"] = latency_ms(ts, one, runs)
        if "onnx" in params.formats:
            opset, exporter = save_onnx(model, example, stage / ARTIFACTS["onnx"], opset=params.opset,
                                        metadata={**lineage, "mean": list(spec.mean), "std": list(spec.std),
                                                  "image_size": spec.image_size})
            run_fp32 = ort_runner(ort_session(stage / ARTIFACTS["onnx"], num_threads))
            parity["onnx"] = _parity(ref[pidx], batched_logits(run_fp32, test_x[pidx], normalize))
            latency["onnx"] = latency_ms(run_fp32, one, runs)
        _gate(parity, params.parity_atol, out_dir)  # before int8: a failed export costs no calibration

        if params.quantize == "int8":
            calib_x, _ = _load_split(rows, images_root, "train", spec.image_size, classes,
                                     params.calibration_images)
            with torch.no_grad():
                calibration = torch.cat([normalize(calib_x[i : i + BATCH])
                                         for i in range(0, len(calib_x), BATCH)]).numpy()
            settings = quantize_int8(stage / ARTIFACTS["onnx"], stage / ARTIFACTS["int8"], calibration,
                                     input_name=INPUT, scratch_dir=stage)
            run_int8 = ort_runner(ort_session(stage / ARTIFACTS["int8"], num_threads))
            q = batched_logits(run_int8, test_x, normalize)  # the whole test split
            y = test_y.numpy()
            acc, acc_fp32 = float((q.argmax(1) == y).mean()), float((ref.argmax(1) == y).mean())
            int8 = {"accuracy": acc, "pytorch_accuracy": acc_fp32, "accuracy_delta": round(acc - acc_fp32, 6),
                    "argmax_agreement": float((q.argmax(1) == ref.argmax(1)).mean()), "n_test": len(q),
                    "max_abs_diff": float(np.abs(q[pidx] - ref[pidx]).max()), "quantization": settings}
            latency["int8"] = latency_ms(run_int8, one, runs)

        for fmt in [*params.formats, *(["int8"] if int8 else [])]:
            files[fmt] = _artifact(stage, ARTIFACTS[fmt])
        report = {
            "enabled": True,
            "task": "classification",
            "formats": list(files),
            "artifacts": files,
            "source": {"path": str(model_dir / "model.pt"), "sha256": meta["model_sha256"],
                       "bytes": (model_dir / "model.pt").stat().st_size},
            "sizes_bytes": {"pytorch": (model_dir / "model.pt").stat().st_size,
                            **{fmt: f["bytes"] for fmt, f in files.items()}},
            "parity": parity,
            "parity_atol": params.parity_atol,
            "int8": int8,
            "latency_ms": latency,
            "latency": {"what": "one image, CPU, median of export.latency_runs after warm-up", "runs": runs,
                        "warmup_runs": WARMUP_RUNS, "threads": num_threads},
            "input": {"name": INPUT, "dtype": "float32",
                      "shape": ["batch", 3, spec.image_size, spec.image_size],
                      "preprocess": "pixels / 255, minus mean, divided by std, per channel; "
                                    "grayscale repeated to 3 channels",
                      "mean": list(spec.mean), "std": list(spec.std)},
            "output": {"name": OUTPUT, "shape": ["batch", spec.n_classes], "classes": classes},
            "lineage": lineage,
            "dataset_version": version,
            "opset": opset,
            "exporter": exporter,
            "versions": _versions(),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        atomic_write_json(stage / "export.json", report)
    return report


def run(params: Params) -> dict:
    """The stage: export data/train's model; a stub export.json when disabled or for detection."""
    from tasks.train import dataset_task

    data = params.paths.data
    out_dir, curate_dir = data / "export", data / "curate"
    if not params.export.enabled:
        return write_stub(out_dir, {"enabled": False})
    if dataset_task(curate_dir) == "detection":
        return write_stub(out_dir, {"enabled": True, "task": "detection", "formats": [], "artifacts": {},
                                    "dataset_version": read_json(curate_dir / "curation.json").get("version"),
                                    "reason": DETECTION_REASON})
    return export(data / "train", curate_dir, out_dir, params=params.export,
                  num_threads=params.train.num_threads)


def summary(report: dict, out_dir: Path | str = "data/export") -> str:
    """One line for the terminal."""
    if not report.get("enabled"):
        return f"export disabled (export.enabled: false): {out_dir}/export.json only"
    if not report.get("artifacts"):
        return f"nothing exported for {report.get('dataset_version')}: {report.get('reason')}"
    diffs = ", ".join(f"{k} {v['max_abs_diff']:.1e}" for k, v in report["parity"].items())
    lat = ", ".join(f"{k} {v:.2f}" for k, v in report["latency_ms"].items())
    q = report["int8"]
    int8 = (f"; int8 accuracy {q['accuracy']:.4f} ({q['accuracy_delta']:+.4f} vs fp32), "
            f"{report['artifacts']['int8']['bytes'] / 1e6:.1f} MB") if q else ""
    return (f"exported {', '.join(report['formats'])} of {report['dataset_version']}: max logit diff "
            f"{diffs}{int8}; latency ms {lat} → {out_dir}")


def main(argv: list[str] | None = None) -> int:
    from tasks.env import configure_environment
    from tasks.params import load_params

    configure_environment()
    params = load_params(overrides=argv or [])
    print(summary(run(params), params.paths.data / "export"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
