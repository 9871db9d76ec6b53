"""What a format reader yields: the neutral shape between source formats and the ingest stage.

Readers (tasks/formats.py) turn a source folder into a `SourceDataset`; the image gate
(tasks/gate.py) decodes each item's bytes; tasks/ingest.py writes the canonical tables.
Boxes are absolute pixel xyxy in the image as stored (before any EXIF rotation).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Task = Literal["classification", "detection"]


class SourceError(ValueError):
    """A source or label file breaks a rule; the message names the file, the row and the rule."""


@dataclass(frozen=True)
class Box:
    label: str
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass
class SourceItem:
    split: str                       # train | val | test
    source_key: str                  # path relative to the source root, or an idx index
    label: str | None = None         # classification label (None in detection)
    boxes: list[Box] | None = None   # detection boxes; [] is a background image, kept and counted
    path: Path | None = None         # the image file, read by the gate (never modified)
    data: bytes | None = None        # or the encoded bytes in memory (idx sources)


@dataclass
class SourceDataset:
    task: Task
    classes: list[str]               # class names in label-index order
    items: Iterable[SourceItem]
    format: str = ""
    # original category id (COCO/YOLO) -> class name, persisted with the version
    category_map: dict[int, str] = field(default_factory=dict)
