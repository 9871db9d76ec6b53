"""Export stage on a tiny real Fashion-MNIST model: parity, int8 accuracy, the gate, the stubs.

One module fixture runs ingest → curate → train (2 epochs, 600 images per split) → export; the
tests check the artifacts against the PyTorch model with their own preprocessing (export.json's
input contract, in numpy) and their own onnxruntime sessions.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from tasks import curate, export, ingest, train
from tasks.data import image_channels, label_indices, load_images
from tasks.io import read_json, sha256_file
from tasks.params import ExportParams
from tests.conftest import tiny_params

EXPORT = ["export.parity_images=128", "export.calibration_images=64", "export.latency_runs=5"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    params = tiny_params(tmp, ["curate.fiftyone=false", "ingest.limit_per_split=600", "train.epochs=2", *EXPORT])
    ingest.run(params)
    curate.run(params)
    train.run(params)
    return params, export.run(params)


def _test_split(params):
    """(uint8 test images, labels) as the curated version holds them."""
    rows, classes, _, root = train.load_training_rows(params.paths.data / "curate")
    rows = rows[rows["split"] == "test"].reset_index(drop=True)
    return load_images(rows, root, size=32, channels=image_channels(rows)), label_indices(rows, classes).numpy()


def _contract_inputs(images: torch.Tensor, contract: dict) -> np.ndarray:
    """export.json's input contract, written out in numpy (not tasks.data.Normalize)."""
    x = images.numpy().astype(np.float32) / 255
    x = np.repeat(x, 3, axis=1) if x.shape[1] == 1 else x
    mean, std = (np.asarray(contract[k], dtype=np.float32).reshape(1, 3, 1, 1) for k in ("mean", "std"))
    return ((x - mean) / std).astype(np.float32)


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _files(folder):
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def test_torchscript_and_onnx_match_pytorch_on_real_test_images(exported):
    params, report = exported
    out, atol = params.paths.data / "export", params.export.parity_atol
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.int8.onnx", "model.onnx",
                                                     "model.torchscript.pt"]
    assert read_json(out / "export.json") == json.loads(json.dumps(report))
    for fmt, artifact in report["artifacts"].items():
        assert artifact["sha256"] == sha256_file(out / artifact["path"]), fmt
        assert artifact["bytes"] == (out / artifact["path"]).stat().st_size > 100_000

    model, _, meta = train.load_trained(params.paths.data / "train")
    images, _ = _test_split(params)
    x = _contract_inputs(images[:128], report["input"])
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    onnx_model = _session(out / "model.onnx")
    for batch in (1, 7, 128):  # the batch dimension is dynamic
        got = onnx_model.run(None, {report["input"]["name"]: x[:batch]})[0]
        assert got.shape == (batch, 10) and np.abs(got - ref[:batch]).max() <= atol
    extra = {"model.json": ""}
    with warnings.catch_warnings():  # torch.jit is deprecated upstream; the format is still asked for
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(out / "model.torchscript.pt"), _extra_files=extra)
    with torch.no_grad():
        assert np.abs(scripted(torch.from_numpy(x)).numpy() - ref).max() <= atol
    for fmt in ("torchscript", "onnx"):
        p = report["parity"][fmt]
        assert p["n_images"] == 128 and 0 <= p["max_abs_diff"] <= atol and p["argmax_agreement"] >= 0.99

    # lineage: the model's dataset version and hash, in export.json and inside both artifacts
    version = read_json(params.paths.data / "curate" / "curation.json")["version"]
    assert report["dataset_version"] == report["lineage"]["dataset_version"] == meta["dataset_version"] == version
    assert report["lineage"]["model_sha256"] == meta["model_sha256"] == sha256_file(
        params.paths.data / "train" / "model.pt")
    assert json.loads(extra["model.json"])["dataset_version"] == version
    import onnx

    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert props["dataset_version"] == version and json.loads(props["classes"])[0] == "T-shirt/top"
    assert report["opset"] == params.export.opset
    assert set(report["latency_ms"]) == {"pytorch", "torchscript", "onnx", "int8"}
    assert all(v > 0 for v in report["latency_ms"].values())


def test_int8_is_smaller_and_reports_the_accuracy_it_has(exported):
    params, report = exported
    out, q = params.paths.data / "export", report["int8"]
    assert report["artifacts"]["int8"]["bytes"] < 0.5 * report["artifacts"]["onnx"]["bytes"]
    assert q["quantization"]["per_channel"] and q["quantization"]["calibration_images"] == 64

    images, labels = _test_split(params)
    x = _contract_inputs(images, report["input"])
    int8 = _session(out / "model.int8.onnx").run(None, {"input": x})[0].argmax(1)
    model, _, _ = train.load_trained(params.paths.data / "train")
    with torch.no_grad():
        fp32 = model.eval()(torch.from_numpy(x)).numpy().argmax(1)
    acc_int8, acc_fp32 = (int8 == labels).mean(), (fp32 == labels).mean()
    one = 1 / len(labels)  # numpy vs torch normalization may round one borderline image differently
    assert q["n_test"] == len(labels) == 600
    assert abs(q["accuracy"] - acc_int8) <= one and abs(q["pytorch_accuracy"] - acc_fp32) <= one
    assert abs(q["accuracy_delta"] - (acc_int8 - acc_fp32)) <= 2 * one
    assert q["accuracy_delta"] == pytest.approx(q["accuracy"] - q["pytorch_accuracy"], abs=1e-6)
    assert acc_fp32 > 0.5 and acc_int8 > 0.4  # 10 classes: chance is 0.1
    assert q["argmax_agreement"] >= 0.8


def test_too_strict_parity_fails_and_writes_nothing(exported, tmp_path):
    params, _ = exported
    data = params.paths.data
    fresh = tmp_path / "export"
    with pytest.raises(export.ExportError, match=r"torchscript: max \|logit difference\| vs PyTorch .* "
                                                 r"exceeds export.parity_atol=1e-12"):
        export.export(data / "train", data / "curate", fresh, num_threads=1,
                      params=ExportParams(formats=["torchscript"], quantize="none", parity_atol=1e-12))
    assert list(tmp_path.iterdir()) == []  # no staging folder, no half export

    good = data / "export"
    before, siblings = _files(good), sorted(p.name for p in data.iterdir())
    with pytest.raises(export.ExportError, match=r"onnx: .* exceeds export.parity_atol=1e-12; nothing written to .*previous export there is kept"):
        export.export(data / "train", data / "curate", good, num_threads=1,
                      params=ExportParams(formats=["onnx"], quantize="none", parity_atol=1e-12))
    assert _files(good) == before and sorted(p.name for p in data.iterdir()) == siblings

    with pytest.raises(ValueError, match="add onnx to export.formats"):
        export.export(data / "train", data / "curate", fresh, num_threads=1,
                      params=ExportParams(formats=["torchscript"], quantize="int8"))


def test_disabled_export_writes_only_the_stub(tmp_path, capsys):
    out = tmp_path / "data" / "export"
    out.mkdir(parents=True)
    (out / "model.onnx").write_bytes(b"stale")  # from an earlier enabled run
    assert export.main([f"paths.data={tmp_path / 'data'}", "export.enabled=false"]) == 0
    assert [p.name for p in out.iterdir()] == ["export.json"]
    assert read_json(out / "export.json") == {"enabled": False}
    assert "export disabled" in capsys.readouterr().out


def test_detection_version_is_not_exported_and_says_why(tmp_path):
    from tasks.io import atomic_write_json

    images = tmp_path / "data" / "ingest"
    atomic_write_json(images / "version.json", {"task": "detection"})
    atomic_write_json(tmp_path / "data" / "curate" / "curation.json", {"version": "vdet", "images_root": str(images)})
    params = tiny_params(tmp_path)
    report = export.run(params)
    assert report["task"] == "detection" and report["artifacts"] == {} and "classification-only" in report["reason"]
    assert [p.name for p in (params.paths.data / "export").iterdir()] == ["export.json"]
    assert read_json(params.paths.data / "export" / "export.json")["dataset_version"] == "vdet"


def test_percentile_over_memory_budget_falls_back_to_minmax(exported, tmp_path, monkeypatch):
    from tasks import export_quant

    params, report = exported
    images, _ = _test_split(params)
    monkeypatch.setattr(export_quant, "PERCENTILE_BUDGET_BYTES", 1)
    settings = export_quant.quantize_int8(params.paths.data / "export" / "model.onnx", tmp_path / "q.onnx",
                                          _contract_inputs(images[:32], report["input"]), scratch_dir=tmp_path)
    assert settings["calibration"] == "minmax" and "budget" in settings["note"]
    assert report["int8"]["quantization"]["calibration"].startswith("percentile")  # the default fits
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]  # the scratch model is gone
    assert _session(tmp_path / "q.onnx").run(None, {"input": _contract_inputs(images[:4], report["input"])})[0].shape \
        == (4, 10)


def test_lora_model_exports_as_a_plain_module_at_a_lower_opset(exported, tmp_path):
    """train.finetune=lora saves merged plain weights: export needs no peft and keeps parity.
    Opset 17 takes the legacy exporter (the dynamo one builds opset 18): covered here too."""
    params, _ = exported
    data = params.paths.data
    lora = params.train.model_copy(update={"finetune": "lora", "epochs": 1, "resume": False})
    train.train(data / "curate", params=lora, out_dir=tmp_path / "train", seed=0)
    model, _, meta = train.load_trained(tmp_path / "train")
    assert meta["finetune"] == "lora"
    assert not [m for m in model.modules() if type(m).__module__.startswith("peft")]
    report = export.export(tmp_path / "train", data / "curate", tmp_path / "export", num_threads=1,
                           params=ExportParams(formats=["onnx"], quantize="none", opset=17, parity_images=64,
                                               latency_runs=3))
    assert report["lineage"]["finetune"] == "lora" and report["parity"]["onnx"]["max_abs_diff"] <= 1e-3
    assert report["opset"] == 17 and "legacy" in report["exporter"]
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["export.json", "model.onnx"]
    images, _ = _test_split(params)
    x = _contract_inputs(images[:3], report["input"])
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(_session(tmp_path / "export" / "model.onnx").run(None, {"input": x})[0] - ref).max() <= 1e-3
