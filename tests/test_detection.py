"""Detection: tiling, the Faster R-CNN builder and training, on the real deepforest tree crowns.

The deepforest package ships NEON aerial images with Pascal VOC boxes (single class "Tree");
they are copied, never imported. The end-to-end test arranges one scene as a VOC source whose
ImageSets/Main lists give a train and a spatially held-out test split (bench.detection), ingests
and curates it (FiftyOne off) and trains 5 short epochs on 200-px tiles with one thread: 45 s
on an idle 2-core machine, about 60 s on a busy one; the other tests take seconds.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from defusedxml.ElementTree import parse as defused_parse
from PIL import Image

from tasks import detection as det
from tasks import detection_data as dd
from tasks.io import ANNOTATION_SCHEMA, save_table
from tasks.weights import WeightsError, hub_checkpoint_dir
from tests.conftest import tiny_params

DEEPFOREST = Path(importlib.util.find_spec("deepforest").submodule_search_locations[0]) / "data"
TRAIN_IMAGE = "2019_YELL_2_541000_4977000_image_crop"  # 1249×1035 px, 279 crowns
TEST_IMAGE = "OSBS_029"                                # 400×400 px, 61 crowns


def _voc_boxes(stem: str) -> np.ndarray:
    """The XML's boxes as the VOC reader stores them: (xmin - 1, ymin - 1, xmax, ymax)."""
    root = defused_parse(DEEPFOREST / f"{stem}.xml").getroot()
    raw = [[float(o.find(f"bndbox/{t}").text) for t in ("xmin", "ymin", "xmax", "ymax")] for o in root.iter("object")]
    return np.asarray(raw) - np.array([1, 1, 0, 0])


# --------------------------------------------------------------------------- tiling


def test_windows_cover_the_image_with_overlap_and_edge_aligned_last_tile():
    windows = det.dd.tile_windows(1249, 1035, tile_size=200, overlap=0.2)
    xs, ys = sorted({w[0] for w in windows}), sorted({w[1] for w in windows})
    assert len(windows) == len(xs) * len(ys) == 8 * 7
    assert xs[:3] == [0, 160, 320] and xs[-1] == 1249 - 200 and ys[-1] == 1035 - 200
    assert all(x1 - x0 == 200 and y1 - y0 == 200 for x0, y0, x1, y1 in windows)
    assert dd.tile_windows(150, 90, tile_size=200, overlap=0.2) == [(0, 0, 150, 90)]   # small: one tile
    assert dd.tile_windows(400, 150, tile_size=200, overlap=0.0) == [(0, 0, 200, 150), (200, 0, 400, 150)]
    with pytest.raises(ValueError, match="overlap"):
        dd.tile_windows(100, 100, tile_size=50, overlap=1.0)


def test_clip_keeps_boxes_by_visible_share_in_tile_coordinates():
    boxes = np.array([[110, 120, 150, 160],    # inside: kept, shifted by the window's corner
                      [180, 100, 220, 140],    # half inside: kept at min_visible 0.5, clipped
                      [190, 100, 230, 140],    # a quarter inside: dropped
                      [50, 50, 80, 80],        # outside
                      [199.5, 100, 260, 140]])  # a sliver under 1 px wide: dropped
    kept, mask = dd.clip_boxes(boxes, (100, 100, 200, 200), min_visible=0.5)
    assert mask.tolist() == [True, True, False, False, False]
    np.testing.assert_allclose(kept, [[10, 20, 50, 60], [80, 0, 100, 40]])
    assert dd.clip_boxes(boxes, (100, 100, 200, 200), min_visible=0.25)[1].tolist()[:3] == [True, True, True]
    empty, mask = dd.clip_boxes(np.zeros((0, 4)), (0, 0, 10, 10), min_visible=0.5)
    assert empty.shape == (0, 4) and mask.shape == (0,)


def test_real_crowns_tiled_whole_image_is_one_tile():
    boxes = _voc_boxes(TEST_IMAGE)
    labels = np.ones(len(boxes), np.int64)
    assert len(boxes) == 61
    whole = dd.tile_image("s", 400, 400, boxes, labels, tile_size=400, overlap=0.2, min_visible=0.5)
    assert len(whole) == 1 and len(whole[0].boxes) == 61
    tiles = dd.tile_image("s", 400, 400, boxes, labels, tile_size=200, overlap=0.2, min_visible=0.5)
    assert len(tiles) == 9
    for t in tiles:
        assert t.boxes.dtype == np.float32 and t.labels.dtype == np.int64 and len(t.boxes) == len(t.labels)
        assert (t.boxes >= 0).all() and (t.boxes <= 200).all()
        assert (t.boxes[:, 2:] - t.boxes[:, :2] >= dd.MIN_BOX_SIDE).all()
    # every crown's centre lies in some tile, so with min_visible 0.5 almost all survive tiling
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    seen = sum(any(x0 <= cx < x1 and y0 <= cy < y1 for x0, y0, x1, y1 in (t.window for t in tiles))
               for cx, cy in centres)
    assert seen == 61 and sum(len(t.boxes) for t in tiles) >= 61


def test_load_boxes_maps_labels_and_exif_orientation(tmp_path):
    rows = pd.DataFrame({"sample_id": ["a", "b", "c"], "width": [100, 100, 50], "height": [50, 50, 50],
                         "exif_orientation": [1, 6, 1]})
    ann = pd.DataFrame({"sample_id": ["a", "b", "b"], "label": ["Tree", "Tree", "Snag"],
                        "x1": [10.0, 10.0, 0.0], "y1": [5.0, 5.0, 0.0], "x2": [30.0, 30.0, 5.0], "y2": [25.0, 25.0, 5.0]})
    save_table(__import__("pyarrow").Table.from_pandas(ann, schema=ANNOTATION_SCHEMA, preserve_index=False),
               tmp_path / "annotations.parquet")
    boxes = dd.load_boxes(tmp_path, rows, ["Tree", "Snag"])
    np.testing.assert_allclose(boxes["a"][0], [[10, 5, 30, 25]])
    np.testing.assert_allclose(boxes["b"][0][0], [25, 10, 45, 30])   # rotated 90° like load_canonical
    assert boxes["b"][1].tolist() == [1, 2] and boxes["c"][0].shape == (0, 4)   # c: background
    with pytest.raises(ValueError, match="Snag"):
        dd.load_boxes(tmp_path, rows, ["Tree"])


def test_dataset_items_padding_and_seeded_box_aware_flips():
    image = torch.from_numpy(np.asarray(Image.open(DEEPFOREST / f"{TEST_IMAGE}.png").convert("RGB")).copy())
    images = {"osbs": image.permute(2, 0, 1).contiguous(), "bg": torch.full((3, 64, 90), 7, dtype=torch.uint8)}
    boxes = _voc_boxes(TEST_IMAGE).astype(np.float32)
    tiles = dd.tile_image("osbs", 400, 400, boxes, np.ones(len(boxes)), tile_size=200, overlap=0.2, min_visible=0.5)
    tiles += dd.tile_image("bg", 90, 64, np.zeros((0, 4)), np.zeros(0), tile_size=200, overlap=0.2, min_visible=0.5)
    train = dd.TileDataset(tiles, images, tile_size=200, transform=dd.build_train_transform(jitter=0.0))
    image0, target0 = train.raw(0)
    assert image0.shape == (3, 200, 200) and image0.dtype == torch.uint8
    assert target0["boxes"].format.value == "XYXY" and tuple(target0["boxes"].canvas_size) == (200, 200)
    assert target0["labels"].dtype == torch.int64 and (target0["labels"] == 1).all()

    bg_image, bg_target = train.raw(len(tiles) - 1)                 # smaller than a tile: zero-padded
    assert bg_image.shape == (3, 200, 200) and int(bg_image[:, :64, :90].min()) == 7
    assert int(bg_image[:, 64:, :].max()) == 0 and bg_target["boxes"].shape == (0, 4)

    train.set_epoch_seed(3)
    a, b = train[0], train[0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])   # seeded per item
    assert a[0].dtype == torch.float32 and float(a[0].max()) <= 1.0
    flips = set()
    for seed in range(12):  # each flip maps the boxes with the pixels
        train.set_epoch_seed(seed)
        x, t = train[0]
        raw = image0.float() / 255
        for flip_h, flip_v in ((False, False), (True, False), (False, True), (True, True)):
            ref = raw.flip(-1) if flip_h else raw
            ref = ref.flip(-2) if flip_v else ref
            if torch.allclose(x, ref):
                expect = target0["boxes"].clone()
                if flip_h:
                    expect[:, [0, 2]] = 200 - expect[:, [2, 0]]
                if flip_v:
                    expect[:, [1, 3]] = 200 - expect[:, [3, 1]]
                assert torch.allclose(t["boxes"], expect)
                flips.add((flip_h, flip_v))
    assert len(flips) >= 3


# --------------------------------------------------------------------------- the detector


def _random_targets(n: int, size: int, *, empty_last: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        k = 0 if empty_last and i == n - 1 else 3
        xy = torch.rand(k, 2, generator=g) * (size - 40)
        wh = 12 + torch.rand(k, 2, generator=g) * 25
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.ones(k, dtype=torch.int64)})
    return out


def test_mobilenet_v2_detector_from_hub_cache_weights(tmp_path):
    torch.manual_seed(0)
    model, spec = det.build_detector("fasterrcnn_mobilenet_v2", 1, weights="IMAGENET1K_V1",
                                     trainable_backbone_layers=3, image_size=128)
    assert spec.weights_sha256.startswith("b0353104") and spec.frozen_bn and spec.backbone_stages == 14
    body = model.backbone                                                           # features[:14], stride 16
    assert body.out_channels == 96 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    trains = [i for i, block in enumerate(body) if any(p.requires_grad for p in block.parameters())]
    assert trains == [11, 12, 13]
    assert all(p.requires_grad for p in model.roi_heads.parameters())
    assert model.roi_heads.box_predictor.cls_score.out_features == 2                # background + Tree

    images = [torch.rand(3, 128, 128) for _ in range(2)]
    model.train()
    losses = model(images, _random_targets(2, 128, empty_last=True))              # an empty target is fine
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert body[0][0].weight.grad is None and body[13].conv[0][0].weight.grad is not None  # frozen stem
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4 and out[0]["labels"].dtype == torch.int64
    assert (out[0]["scores"] >= spec.score_threshold).all()

    rebuilt = det.rebuild_detector(det.DetectorSpec(**json.loads(json.dumps(spec.__dict__))), model.state_dict())
    with torch.no_grad():
        again = rebuilt.eval()(images)
    assert torch.equal(out[0]["boxes"], again[0]["boxes"])


def test_detector_arguments_and_missing_weights_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"allowed 0\.\.14"):
        det.build_detector("fasterrcnn_mobilenet_v2", 1, weights="IMAGENET1K_V1", trainable_backbone_layers=15,
                           image_size=128)
    with pytest.raises(ValueError, match="unknown detection arch"):
        det.build_detector("yolo", 1, weights=None, trainable_backbone_layers=0, image_size=128)
    if not (hub_checkpoint_dir() / "mobilenet_v3_large-8738ca79.pth").exists():
        with pytest.raises(WeightsError, match="mobilenet_v3_large-8738ca79.pth"):
            det.build_detector("fasterrcnn_mobilenet_v3_large_fpn", 1, weights="IMAGENET1K_V1",
                               trainable_backbone_layers=3, image_size=128)
    # A backbone file given by path is loaded the same way (here: an untrained MobileNetV3 saved to disk).
    from torchvision.models import mobilenet_v3_large

    torch.manual_seed(0)
    source = mobilenet_v3_large()
    torch.save(source.state_dict(), tmp_path / "mnv3.pth")
    model, spec = det.build_detector("fasterrcnn_mobilenet_v3_large_fpn", 2, weights=str(tmp_path / "mnv3.pth"),
                                     trainable_backbone_layers=2, image_size=128)
    assert spec.backbone_stages == 6 and spec.weights_sha256 and spec.anchor_sizes[0][0] == 16
    body = model.backbone.body
    assert torch.equal(body["0"][0].weight, source.features[0][0].weight)
    assert next(n for n, p in body.named_parameters() if p.requires_grad).startswith("13.")  # last 2 stages
    with torch.no_grad():  # the halved anchors fit the builder's RPN head
        assert model.eval()([torch.rand(3, 128, 128)])[0]["boxes"].shape[1] == 4
    scratch, spec = det.build_detector("fasterrcnn_mobilenet_v3_large_fpn", 2, weights=None,
                                       trainable_backbone_layers=2, image_size=128)
    assert not spec.frozen_bn and all(p.requires_grad for p in scratch.parameters())  # from scratch: all train


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def curated_crowns(tmp_path_factory):
    """The deepforest scene as a VOC source (bench.detection): left 849 px + a background image
    for train, the right 400 px for test; ingested and curated with FiftyOne off."""
    from bench.detection import deepforest_source
    from tasks.curate import curate
    from tasks.ingest import ingest
    from tasks.params import IngestParams, SourceParams

    tmp = tmp_path_factory.mktemp("crowns")
    params = tiny_params(tmp, ["curate.fiftyone=false", "train.detection.tile_size=200", "train.detection.epochs=5",
                               "train.detection.lr=0.04", "train.detection.batch_size=2"])
    source = SourceParams(path=deepforest_source(tmp / "voc"), format="voc")
    ingest(source, out_dir=tmp / "ingest", params=IngestParams(source=source, workers=1))
    curate(tmp / "ingest", params=params.curate, out_dir=tmp / "curate", train=params.train,
           curation_dir=tmp / "curation", cache_dir=tmp / "cache")
    return params, tmp


def test_training_beats_the_untrained_detector_on_held_out_tiles(curated_crowns, capsys):
    from bench.detection import untrained_scores

    params, tmp = curated_crowns
    curate_dir, out_dir = tmp / "curate", tmp / "train"
    rows, classes, info = dd.load_version(curate_dir)
    assert classes == ["Tree"] and sorted(rows["split"]) == ["test", "train", "train"]
    train_tiles = dd.build_tiles(rows[rows["split"] == "train"], dd.load_boxes(info["images_root"], rows, classes),
                                 tile_size=200, overlap=0.2, min_visible=0.5)
    assert sum(len(t.boxes) == 0 for t in train_tiles) >= 1          # the background image: an empty target

    before = untrained_scores(curate_dir, params.train, seed=0)
    result = det.train_detection(curate_dir, params=params.train, out_dir=out_dir, seed=0, cache_dir=tmp / "cache")
    meta = json.loads((out_dir / "model.json").read_text())
    assert result.epochs_run == 5 and result.val is None and len(meta["history"]) == 5
    assert all(np.isfinite(e["loss"]) and e["tiles_per_second"] > 0 for e in meta["history"])
    assert meta["n_train_tiles"] == len(train_tiles) == 43 and meta["dataset_version"] == info["version"]
    assert meta["spec"]["arch"] == "fasterrcnn_mobilenet_v2" and meta["tiling"]["tile_size"] == 200
    assert 0 < meta["parameters"]["trainable"] < meta["parameters"]["total"] and result.images_per_second > 0
    # Measured (5 epochs, seeds 0-2): trained 0.26-0.30 mAP@.50 on the 21 held-out tiles; untrained 0.01-0.02.
    test = result.test
    assert test["n_tiles"] == 21 and test["map_50"] > max(0.15, 5 * before["map_50"]), (before, test)
    assert test["map"] > before["map"] and test["per_class_ap"]["Tree"] == test["map"]

    again = det.evaluate_detection(out_dir, curate_dir, "test")
    assert again["map_50"] == pytest.approx(test["map_50"], abs=1e-4) and again["tiles_per_second"] > 0
    with pytest.raises(ValueError, match="no kept rows in split 'val'"):
        det.evaluate_detection(out_dir, curate_dir, "val")

    capsys.readouterr()
    resumed = det.train_detection(curate_dir, params=params.train, out_dir=tmp / "train2", seed=0,
                                  cache_dir=tmp / "cache")   # every epoch is checkpointed: nothing to train
    assert "resuming after epoch 5/5" in capsys.readouterr().out
    meta2 = json.loads((tmp / "train2" / "model.json").read_text())
    assert meta2["resumed_after_epoch"] == 5 and meta2["model_sha256"] == meta["model_sha256"]
    assert resumed.test["map_50"] == pytest.approx(test["map_50"], abs=1e-4)


def test_training_refuses_a_classification_version(tmp_path, params_tiny):
    (tmp_path / "ingest").mkdir()
    (tmp_path / "ingest" / "version.json").write_text(json.dumps({"version": "v1", "task": "classification"}))
    (tmp_path / "curation.json").write_text(json.dumps({"version": "v1", "images_root": str(tmp_path / "ingest")}))
    with pytest.raises(ValueError, match="task is 'classification'"):
        det.train_detection(tmp_path, params=params_tiny.train, out_dir=tmp_path / "out")


def test_stage_doors_dispatch_a_detection_version(curated_crowns):
    """train/evaluate/review `run(params)` (what dvc repro and the flow call) take the detection
    path for a detection version; train resumes the checkpointed run above, so this is quick."""
    from tasks import evaluate, review, train

    params, tmp = curated_crowns
    (tmp / "data").mkdir(exist_ok=True)
    (tmp / "data" / "curate").symlink_to(tmp / "curate")
    assert train.dataset_task(tmp / "data" / "curate") == "detection"
    result = train.run(params)
    assert isinstance(result, det.DetectionResult) and result.epochs_run == 5
    metrics = evaluate.run(params)
    headline = json.loads((tmp / "reports" / "metrics.json").read_text())
    assert headline["map_50"] == pytest.approx(metrics["map_50"]) and headline["map_50"] > 0.15
    page = (tmp / "reports" / "evaluate" / "index.html").read_text()  # per-class AP and PR curves, offline
    assert f"{metrics['per_class_ap']['Tree']:.4f}" in page and "data:image/png;base64," in page
    assert "https://" not in page and "http://" not in page
    curve = metrics["pr_curves"]["precision"]["Tree"]
    assert len(curve) == 101 and curve[0] >= curve[-1]  # interpolated precision falls with recall
    assert review.run(params)["skipped"] == "classification only"
