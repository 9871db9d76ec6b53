"""The detection part of the validate gate: the boxes table and its expectations.

Used by tasks/validate.py (the stage); no I/O here. The annotations table (one row per box,
absolute xyxy pixels in the stored image's grid, tasks/io.py ANNOTATION_SCHEMA) is joined to the
images table for each box's image width, height, split and file name, then a few columns are
derived so that every rule is a plain GX column expectation whose unexpected rows are the boxes
themselves:

    in_manifest     1 when the box's sample_id is an image of the images table, else 0
    overhang_px     how far the box's farthest corner lies outside the image (<= 0: inside)
    min_side_px     min(|x2 - x1|, |y2 - y1|): the box's shorter side
    order_margin_px min(x2 - x1, y2 - y1): > 0 when the corners are in xyxy order (one row per box,
                    so a box out of order in x and in y counts once)
    area_fraction   |x2 - x1| * |y2 - y1| / (width * height)
    looks_xywh      1 when the box reads as (x, y, w, h) stored as (x1, y1, x2, y2), see below
    n_boxes         (images table) boxes per image; 0 for images with no boxes (allowed, counted)

The xywh heuristic. A box looks like xywh when it is impossible as xyxy yet valid as xywh:
x2 <= x1 or y2 <= y1 (corners out of order), and read as x, y, w, h it is a positive-size box
inside the image (w > 0, h > 0, x >= 0, y >= 0, x + w <= width, y + h <= height, all within
`validate.box_tolerance` pixels). A valid xyxy box never matches, so correct data never warns;
boxes valid under both readings (w > x and h > y) cannot be told apart and are not counted, so
the rule undercounts an xywh source rather than overcounting. One such box may be a typo; many
mean a converter wrote xywh. The expectation therefore tolerates up to `validate.xywh_max_fraction`
of all boxes (GX's `mostly`) and is a warning by default; the same boxes also fail
box_coords_ordered, which is what stops the gate.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

BOX_COLUMNS = ("x1", "y1", "x2", "y2")
IMAGE_COLUMNS = ("width", "height", "split", "source_key")  # joined onto each box from the images table
N_BOXES = "n_boxes"
BOX_EXAMPLE_COLUMNS = ("sample_id", "source_key", "split", "label", *BOX_COLUMNS, "width", "height")

# Expectation names (keys of validate.severity, detection only), and the columns each needs in
# (annotations, images table).
BOX_CHECKS = ("box_image_in_manifest", "box_inside_image", "box_positive_size", "box_coords_ordered",
              "box_area_in_bounds", "max_boxes_per_image", "box_not_xywh")
_COORDS_AND_SIZE = ((*BOX_COLUMNS, "sample_id"), ("sample_id", "width", "height"))
NEEDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "box_image_in_manifest": (("sample_id",), ("sample_id",)),
    "box_inside_image": _COORDS_AND_SIZE,
    "box_positive_size": (BOX_COLUMNS, ()),
    "box_coords_ordered": (BOX_COLUMNS, ()),
    "box_area_in_bounds": _COORDS_AND_SIZE,
    "max_boxes_per_image": (("sample_id",), ("sample_id",)),
    "box_not_xywh": _COORDS_AND_SIZE,
}


def rules(p) -> dict[str, str]:
    """One readable sentence per box expectation (p: ValidateParams)."""
    return {
        "box_image_in_manifest": "every box belongs to an image of the images table (sample_id)",
        "box_inside_image": f"every box corner lies inside its image, within {p.box_tolerance:g} px",
        "box_positive_size": f"box width |x2-x1| and height |y2-y1| at least {p.min_box_side:g} px",
        "box_coords_ordered": "x1 < x2 and y1 < y2: corners in xyxy order",
        "box_area_in_bounds": f"box area / image area in [{p.min_box_area:g}, {p.max_box_area:g}]",
        "max_boxes_per_image": f"at most {p.max_boxes_per_image} boxes per image (images with none allowed)",
        "box_not_xywh": f"at most {p.xywh_max_fraction:.0%} of boxes look like xywh stored as xyxy: "
        "out of order as xyxy, inside the image as xywh",
    }


def missing(check: str, ann: pd.DataFrame, images: pd.DataFrame) -> str | None:
    """Why `check` cannot be evaluated (a column absent from a table), or None."""
    need_ann, need_img = NEEDS[check]
    parts = [f"column(s) {', '.join(absent)} not in the {table} (has: {', '.join(map(str, df.columns))})"
             for table, df, need in (("annotations", ann, need_ann), ("images table", images, need_img))
             if (absent := [c for c in need if c not in df.columns])]
    return "; ".join(parts) or None


def box_frame(ann: pd.DataFrame, images: pd.DataFrame, *, tolerance: float) -> pd.DataFrame:
    """The annotations joined to their image (width, height, split, source_key) plus derived columns.

    Derived columns are added only where their inputs exist; `missing()` says which checks then
    cannot run. The row index is the annotations' row number.
    """
    df = ann.reset_index(drop=True)
    if "sample_id" in df.columns and "sample_id" in images.columns:
        # A lookup on the unique image ids rather than a merge: a duplicated id (unique_sample_id's
        # finding) would otherwise duplicate its boxes and inflate every box count.
        first = images.drop_duplicates("sample_id")
        pos = pd.Index(first["sample_id"]).get_indexer(df["sample_id"])
        found = pos >= 0
        df["in_manifest"] = found.astype("int64")
        for c in IMAGE_COLUMNS:
            if c in first.columns:  # position -1 (no such image) reindexes to null
                df[c] = first[c].reset_index(drop=True).reindex(pos).reset_index(drop=True)
    if not all(c in df.columns for c in BOX_COLUMNS):
        return df
    x1, y1, x2, y2 = (df[c].to_numpy(dtype="float64", na_value=np.nan) for c in BOX_COLUMNS)
    w, h = np.abs(x2 - x1), np.abs(y2 - y1)
    df["min_side_px"] = np.minimum(w, h)
    df["order_margin_px"] = np.minimum(x2 - x1, y2 - y1)
    if "width" in df.columns and "height" in df.columns:
        iw, ih = (df[c].to_numpy(dtype="float64", na_value=np.nan) for c in ("width", "height"))
        with np.errstate(invalid="ignore", divide="ignore"):
            df["overhang_px"] = np.maximum.reduce([-x1, -y1, -x2, -y2, x1 - iw, x2 - iw, y1 - ih, y2 - ih])
            df["area_fraction"] = w * h / (iw * ih)
        t = tolerance
        # x1, y1 = x, y and x2, y2 = w, h: out of order as xyxy, a proper box inside the image as xywh
        looks = (((x2 <= x1) | (y2 <= y1)) & (x2 > 0) & (y2 > 0) & (x1 >= -t) & (y1 >= -t)
                 & (x1 + x2 <= iw + t) & (y1 + y2 <= ih + t))
        df["looks_xywh"] = np.where(np.isnan(x1 + x2 + y1 + y2 + iw + ih), np.nan, looks.astype("float64"))
    return df


def boxes_per_image(images: pd.DataFrame, ann: pd.DataFrame) -> pd.Series:
    """Boxes per row of the images table (0 for an image with none), aligned to its index."""
    counts = ann["sample_id"].value_counts()
    return images["sample_id"].map(counts).fillna(0).astype("int64")


def expectations(E, p) -> list[tuple[str, str, object]]:
    """(check, frame, GX expectation) for every box rule; frames are "boxes" and "images"."""
    between = E.ExpectColumnValuesToBeBetween
    return [
        ("box_image_in_manifest", "boxes", between(column="in_manifest", min_value=1)),
        ("box_inside_image", "boxes", between(column="overhang_px", max_value=p.box_tolerance)),
        ("box_positive_size", "boxes", between(column="min_side_px", min_value=p.min_box_side)),
        ("box_coords_ordered", "boxes", between(column="order_margin_px", min_value=0, strict_min=True)),
        ("box_area_in_bounds", "boxes", between(column="area_fraction", min_value=p.min_box_area,
                                                max_value=p.max_box_area)),
        ("max_boxes_per_image", "images", between(column=N_BOXES, max_value=p.max_boxes_per_image)),
        ("box_not_xywh", "boxes", between(column="looks_xywh", max_value=0, mostly=1.0 - p.xywh_max_fraction)),
    ]
