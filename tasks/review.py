"""Stage review: the fine-tuned model's view of the data, in FiftyOne: predictions, mistakenness.

Inputs:  data/train/ (model.pt, model.json), data/curate/ (manifest, curation.json), images.
Outputs: data/review/
    predictions.parquet  sample_id, split, label, predicted, confidence, mistakenness, rank
                         (1 = most likely mislabeled)
    review.json          model hash, embeddings cache file, counts, the likely-mislabeled size
    and on the FiftyOne dataset of the version: fields `predictions` (Classification with
    logits) and `mistakenness` (FiftyOne Brain), saved views `likely-mislabeled` (the top
    `curate.signals.mislabeled_fraction` of train and val samples by mistakenness) and
    `mistakes` (prediction differs from the label), and FiftyOne's evaluation run `eval_test`
    of the kept test samples (the numbers of the evaluate stage, in the App's Evaluations panel).
Params:  `curate:` (database, signals), `evaluate.batch_size`.

Every sample is scored, excluded ones included, so a curator sees why an excluded image
was odd. Mistakenness on training samples is measured after fitting them: a sample the model
could not fit despite seeing its label is the classic mislabeling signal.

    python -m tasks.review
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from tasks import curate_fiftyone
from tasks.io import atomic_write_bytes, atomic_write_json, save_table
from tasks.params import Params, ParamsError, load_params

HELD_OUT = "test"
EVAL_KEY = "eval_test"  # FiftyOne evaluation run of the test split (App: Evaluations)


def score(model_dir: Path, curate_dir: Path, *, batch_size: int, cache_dir: Path):
    """(rows with predicted/confidence, logits (N, C), embeddings) from the fine-tuned model."""
    from tasks.data import build_eval_transform, image_channels, load_images
    from tasks.embeddings import EMBEDDING_LAYERS, cache_path, embedding_key, extract, model_hash
    from tasks.io import load_table, read_json
    from tasks.train import load_trained

    model, spec, meta = load_trained(Path(model_dir))
    info = read_json(Path(curate_dir) / "curation.json")
    if meta["dataset_version"] != info["version"]:
        raise ValueError(f"{model_dir}: model was trained on {meta['dataset_version']}, curated data is {info['version']}")
    rows = load_table(Path(curate_dir) / "manifest.parquet").to_pandas()
    channels = image_channels(rows)
    images = load_images(rows, Path(info["images_root"]), size=spec.image_size, channels=channels)
    normalize = build_eval_transform(mean=spec.mean, std=spec.std, channels=channels)
    # One pass for both: the hook in extract() captures embeddings while logits come out.
    logits_out: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda _m, _i, out: logits_out.append(out.float()))
    try:
        vectors = extract(model, images, normalize, batch_size=batch_size, arch=spec.arch)
    finally:
        handle.remove()
    logits = torch.cat(logits_out)
    probs = logits.softmax(1)
    classes = meta["classes"]
    rows["predicted"] = [classes[i] for i in probs.argmax(1).tolist()]
    rows["confidence"] = probs.max(1).values.numpy()
    key = embedding_key(model, spec.arch)
    emb_file = cache_path(cache_dir, info["version"], key, spec.image_size)
    emb_info = {"model_hash": model_hash(model), "key": key, "file": str(emb_file),
                "layer": EMBEDDING_LAYERS.get(spec.arch)}
    return rows, logits.numpy(), vectors, emb_info, info


def _to_fiftyone(fo, dataset, rows: pd.DataFrame, logits: np.ndarray, fraction: float) -> pd.Series:
    import fiftyone.brain as fob
    from fiftyone import ViewField as F

    order = {sid: i for i, sid in enumerate(rows["sample_id"])}
    sids = dataset.values("sample_id")
    preds = [fo.Classification(label=rows["predicted"].iat[order[s]], confidence=float(rows["confidence"].iat[order[s]]),
                               logits=logits[order[s]].tolist()) for s in sids]
    dataset.set_values("predictions", preds, progress=False)
    fob.compute_mistakenness(dataset, "predictions", label_field="ground_truth", use_logits=True, progress=False)
    scores = dict(zip(dataset.values("sample_id"), dataset.values("mistakenness")))
    candidates = dataset.match(F("split") != HELD_OUT)
    k = max(1, round(fraction * len(candidates)))
    dataset.save_view("likely-mislabeled", candidates.sort_by("mistakenness", reverse=True).limit(k), overwrite=True)
    dataset.save_view("mistakes", dataset.match(F("predictions.label") != F("ground_truth.label")), overwrite=True)
    return rows["sample_id"].map(scores)


def _fiftyone_evaluation(dataset) -> dict:
    """FiftyOne's own evaluation run on the kept test samples (what the evaluate stage scores), so
    the App's evaluation panel shows the report's numbers; re-run replaces the previous one."""
    from fiftyone import ViewField as F

    test = dataset.match((F("split") == HELD_OUT) & (F("excluded") == False))  # a query expression
    if EVAL_KEY in dataset.list_evaluations():
        dataset.delete_evaluation(EVAL_KEY)
    results = test.evaluate_classifications("predictions", gt_field="ground_truth", eval_key=EVAL_KEY)
    return {"eval_key": EVAL_KEY, "n": len(test), "accuracy": float(results.metrics()["accuracy"])}


def review(model_dir: Path, curate_dir: Path, *, params: Params, out_dir: Path) -> dict:
    start = time.perf_counter()
    rows, logits, vectors, emb_info, info = score(model_dir, curate_dir, batch_size=params.evaluate.batch_size,
                                                  cache_dir=params.paths.cache)
    if info.get("dataset_name"):
        with curate_fiftyone.connected(params.curate.database) as fo:
            dataset = fo.load_dataset(info["dataset_name"])
            rows["mistakenness"] = _to_fiftyone(fo, dataset, rows, logits, params.curate.signals.mislabeled_fraction)
            fo_eval = _fiftyone_evaluation(dataset)
    else:  # curate.fiftyone off: predictions only; mistakenness is FiftyOne Brain's
        rows["mistakenness"] = np.nan
        fo_eval = None
    out = rows[["sample_id", "split", "label", "predicted", "confidence", "mistakenness"]].copy()
    out["rank"] = out["mistakenness"].rank(ascending=False, method="first").astype("Int64")
    save_table(pa.Table.from_pandas(out, preserve_index=False), Path(out_dir) / "predictions.parquet")
    buf = io.BytesIO()
    np.savez(buf, sample_ids=rows["sample_id"].to_numpy(dtype=str), vectors=vectors.astype(np.float16))
    atomic_write_bytes(Path(emb_info["file"]), buf.getvalue())  # fine-tuned embeddings, cached by model hash
    summary = {
        "dataset_name": info["dataset_name"],
        "version": info["version"],
        "embeddings": emb_info,
        "n_samples": len(out),
        "n_mistakes": int((out["predicted"] != out["label"]).sum()),
        "fiftyone_evaluation": fo_eval,
        "likely_mislabeled": round(params.curate.signals.mislabeled_fraction * int((out["split"] != HELD_OUT).sum())),
        "seconds": round(time.perf_counter() - start, 2),
    }
    atomic_write_json(Path(out_dir) / "review.json", summary)
    return summary


def run(params: Params) -> dict:
    from tasks.train import dataset_task

    data = Path(params.paths.data)
    if dataset_task(data / "curate") == "detection":
        # Mistakenness here is for class labels; a detection version's review is the App itself.
        summary = {"task": "detection", "n_samples": 0, "dataset_name": None, "n_mistakes": 0,
                   "likely_mislabeled": 0, "skipped": "classification only"}
        atomic_write_json(data / "review" / "review.json", summary)
        return summary
    return review(data / "train", data / "curate", params=params, out_dir=data / "review")


def main(argv: list[str] | None = None) -> int:
    from tasks.env import configure_environment

    configure_environment()
    try:
        summary = run(load_params(overrides=list(argv or [])))
    except (ParamsError, ValueError, curate_fiftyone.FiftyOneSyncError) as e:
        print(f"review: {e}", file=sys.stderr)
        return 2
    print(f"reviewed {summary['n_samples']} samples of {summary['dataset_name']}: {summary['n_mistakes']} "
          f"predictions differ from the label; view likely-mislabeled holds {summary['likely_mislabeled']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
