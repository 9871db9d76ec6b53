"""Detection source readers: COCO JSON, Pascal VOC XML and YOLO txt -> `SourceDataset`.

Called through `tasks.formats.read_source`; rules and laziness are described there.

Boxes come out as absolute pixel xyxy in continuous coordinates of the image as stored:
(0, 0) is the top-left corner of the top-left pixel, (W, H) the bottom-right corner of the
image, so a box covering the whole image is (0, 0, W, H) in every format:
    coco  bbox [x, y, w, h]          -> (x, y, x + w, y + h)
    yolo  cls cx cy w h (normalized) -> ((cx - w/2) W, (cy - h/2) H, (cx + w/2) W, (cy + h/2) H),
          W, H the image size as stored (PIL header; EXIF orientation is not applied)
    voc   xmin ymin xmax ymax        -> (xmin - 1, ymin - 1, xmax, ymax)
VOC coordinates are 1-based inclusive pixel indices (the devkit's convention: the whole
image is 1..W), so pixel column xmin covers [xmin - 1, xmin) and xmax covers [xmax - 1, xmax).
This is Detectron2's VOC conversion. Writing VOC back: xmin = x1 + 1, xmax = x2.
VOC `difficult` and COCO `iscrowd` boxes are kept as ordinary boxes.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import yaml
from defusedxml import DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden
from defusedxml import ElementTree as DefusedET
from PIL import Image, UnidentifiedImageError

from tasks.formats import (
    IMAGE_EXTENSIONS,
    SET_FORMAT,
    SPLITS,
    LazyItems,
    SourceRoot,
    class_list,
    files_under,
    limit_items,
    read_text,
    split_dirs,
    split_from_name,
)
from tasks.sources import Box, SourceDataset, SourceError, SourceItem


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    # exact int/float comparison: an integer beyond the float range (JSON allows 4300 digits) is not one
    return _is_int(v) and abs(v) <= 1e308 or isinstance(v, float) and math.isfinite(v)


def _head(path: Path, n: int = 65536) -> str:
    with path.open("rb") as f:
        return f.read(n).decode("utf-8", errors="replace")


def coco_files(path: Path) -> list[Path]:
    """The COCO label file, or the JSON files in a folder (and its annotations/) that look like COCO."""
    if path.is_file():
        return [path]
    dirs = [path, path / "annotations"]
    return [f for d in dirs if d.is_dir() for f in sorted(d.glob("*.json"))
            if f.is_file() and re.search(r'"(images|annotations|categories)"\s*:', _head(f))]


def voc_files(path: Path) -> list[Path]:
    """The XML files of a VOC source: path itself, Annotations/*.xml, or *.xml in the folder."""
    if path.is_file():
        return [path]
    folder = path / "Annotations" if (path / "Annotations").is_dir() else path
    xmls = sorted(f for f in folder.glob("*.xml") if f.is_file())
    return xmls if xmls and "<annotation" in _head(xmls[0], 4096) else []


# --------------------------------------------------------------------------- COCO


class _NonFinite:
    def __init__(self, text: str):
        self.text = text


def _find_non_finite(node, where: str = "") -> str | None:
    """Where in the parsed JSON the first NaN/Infinity sits, e.g. annotations[3] (id 17).bbox[2]."""
    if isinstance(node, _NonFinite):
        return f"{where or 'top level'}: {node.text}"
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        if isinstance(node, dict):
            here = f"{where}.{key}" if where else str(key)
        else:
            here = f"{where}[{key}]" + (f" (id {child['id']})" if isinstance(child, dict) and "id" in child else "")
        if (found := _find_non_finite(child, here)) is not None:
            return found
    return None


def _load_json(f: Path):
    seen: list[str] = []

    def non_finite(text: str) -> _NonFinite:
        seen.append(text)
        return _NonFinite(text)

    try:
        data = json.loads(f.read_bytes(), parse_constant=non_finite)
        where = _find_non_finite(data) if seen else None
    except json.JSONDecodeError as e:
        raise SourceError(f"{f}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise SourceError(f"{f}: not UTF-8 JSON: {e}") from None
    except (ValueError, RecursionError) as e:  # an integer over 4300 digits; nesting deeper than the stack
        raise SourceError(f"{f}: unreadable JSON: {e}") from None
    if seen:
        raise SourceError(f"{f}: {where} is not a JSON number (NaN/Infinity are rejected); "
                          "write a finite number or leave the entry out")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise SourceError(f"{f}: not a COCO detection file: expected an object with lists images, "
                          "annotations and categories")
    return data


def _coco_categories(f: Path, data: dict) -> dict[int, str]:
    cats: dict[int, str] = {}
    for i, c in enumerate(data["categories"]):
        where = f"{f}: categories[{i}]"
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str) \
                or not c["name"].strip():
            raise SourceError(f"{where}: expected an integer id and a non-empty name, got {str(c)[:120]}")
        if c["id"] in cats:
            raise SourceError(f"{where}: category id {c['id']} appears twice")
        if c["name"] in cats.values():
            raise SourceError(f"{where}: category name {c['name']!r} is used by two ids; names must be unique")
        cats[c["id"]] = c["name"]
    if not cats:
        raise SourceError(f"{f}: categories is empty")
    return dict(sorted(cats.items()))


def _coco_items(f: Path, data: dict, cats: dict[int, str], root: SourceRoot, split: str) -> list[SourceItem]:
    boxes: dict[int | str, list[Box]] = {}
    images = []
    for i, im in enumerate(data["images"]):
        where = f"{f}: images[{i}]"
        if not isinstance(im, dict) or not isinstance(im.get("id"), int | str) or isinstance(im.get("id"), bool) \
                or not isinstance(im.get("file_name"), str):
            raise SourceError(f"{where}: expected an id (integer or text) and a file_name, got {str(im)[:120]}")
        if im["id"] in boxes:
            raise SourceError(f"{where}: image id {im['id']!r} appears twice")
        boxes[im["id"]] = []
        images.append((im["id"], im["file_name"], where + f" (id {im['id']}) file_name"))
    for j, a in enumerate(data["annotations"]):
        where = f"{f}: annotations[{j}]" + (f" (id {a['id']})" if isinstance(a, dict) and "id" in a else "")
        if not isinstance(a, dict):
            raise SourceError(f"{where}: expected an object, got {str(a)[:120]}")
        image_id, cid, bbox = a.get("image_id"), a.get("category_id"), a.get("bbox")
        if not isinstance(image_id, int | str) or isinstance(image_id, bool) or image_id not in boxes:
            raise SourceError(f"{where}: image_id {image_id!r} is not an id in images")
        if not _is_int(cid) or cid not in cats:
            raise SourceError(f"{where}: unknown category_id {cid!r}; category ids: {', '.join(map(str, cats))}")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise SourceError(f"{where}: bbox {str(bbox)[:80]} is not [x, y, width, height] (4 finite numbers)")
        x, y, w, h = (float(v) for v in bbox)
        if not math.isfinite(x + w) or not math.isfinite(y + h):
            raise SourceError(f"{where}: bbox {bbox} overflows: x + width or y + height is not a finite number")
        boxes[image_id].append(Box(cats[cid], x, y, x + w, y + h))
    # file_name is looked up under the root, root/images, root/<name>, root/images/<name>, where
    # <name> is the JSON's last _-separated token (instances_val2017.json -> val2017/);
    # the first folder holding the file wins, else the root (a missing file goes to the gate).
    token = f.stem.rsplit("_", 1)[-1]
    bases = [root.path, root.path / "images", root.path / token, root.path / "images" / token]
    bases = [b for b in dict.fromkeys(bases) if b.is_dir()]
    items = []
    for image_id, name, where in images:
        root.image(name, where=where)  # reject escaping paths before probing the candidates
        base = next((b for b in bases if (b / name).exists()), root.path)
        real, key = root.image(name, where=where, base=base)
        items.append(SourceItem(split=split, source_key=key, boxes=boxes[image_id], path=real))
    return items


def read_coco(path: Path, *, fmt: str, classes: list[str] | None, limit: int | None) -> SourceDataset:
    """COCO: one or more JSON files (split from each file name, else train); classes by category id."""
    files = coco_files(path)
    if not files:
        raise SourceError(f"{path}: no COCO .json file (with images, annotations, categories) here or in "
                          f"annotations/; {SET_FORMAT}")
    cats: dict[int, str] | None = None
    items: list[SourceItem] = []
    for f in files:
        data = _load_json(f)
        these = _coco_categories(f, data)
        if cats is None:
            cats, first = these, f
        elif these != cats:
            raise SourceError(f"{f}: categories {these} differ from {first}: {cats}; one source, one class map")
        base = f.parent.parent if f.parent.name.lower() == "annotations" else f.parent
        items += _coco_items(f, data, these, SourceRoot(base), split_from_name(f.stem) or "train")
    names = list(cats.values())
    if classes is not None and list(classes) != names:
        raise SourceError(f"{files[0]}: categories by id are {names} but ingest.source.classes is {list(classes)}; "
                          "set classes to null (COCO names its classes) or make them match")
    return SourceDataset("detection", names, list(limit_items(items, limit)), format="coco", category_map=cats)


# --------------------------------------------------------------------------- Pascal VOC


def _voc_entries(root: Path, xml_dir: Path) -> list[tuple[str, Path]]:
    main = root / "ImageSets" / "Main"
    lists = [(s, main / f"{s}.txt") for s in SPLITS if (main / f"{s}.txt").is_file()]
    if not lists:
        xmls = sorted(xml_dir.glob("*.xml"))
        if not xmls:
            raise SourceError(f"{xml_dir}: no .xml annotation files")
        return [("train", x) for x in xmls]
    entries, source = [], SourceRoot(root)
    for split, listing in lists:  # the split lists define the items, as in the VOC devkit
        for n, line in enumerate(read_text(listing).splitlines(), 1):
            if not line.strip():
                continue
            image_id, where = line.split()[0], f"{listing}: line {n}"
            if "/" in image_id or "\\" in image_id or image_id in (".", ".."):
                raise SourceError(f"{where}: image id {image_id!r} is not a plain file stem")
            source.image(f"{image_id}.xml", where=where, base=xml_dir)  # a name that can be looked up, inside
            if not (xml_dir / f"{image_id}.xml").is_file():
                raise SourceError(f"{where}: image id {image_id!r} has no annotation file {xml_dir}/{image_id}.xml")
            entries.append((split, xml_dir / f"{image_id}.xml"))
    return entries


def _text(parent, tag: str, xml: Path, where: str) -> str:
    el = parent.find(tag)
    if el is None or not (el.text or "").strip():
        raise SourceError(f"{xml}: <{where}> is missing or empty")
    return el.text.strip()


def _parse_voc(xml: Path) -> tuple[str, list[tuple[str, float, float, float, float]]]:
    try:
        tree = DefusedET.parse(xml, forbid_dtd=True)
    except OSError as e:  # a folder named x.xml, no permission
        raise SourceError(f"{xml}: cannot read: {e.strerror or e}") from None
    except DTDForbidden as e:
        raise SourceError(f"{xml}: <!DOCTYPE {e.name}> declaration: DTDs and entity declarations are rejected "
                          "(entity expansion can exhaust memory, external entities can read files)") from None
    except (EntitiesForbidden, ExternalReferenceForbidden) as e:
        raise SourceError(f"{xml}: entity declaration or external reference rejected: {e}") from None
    except DefusedET.ParseError as e:
        raise SourceError(f"{xml}: malformed XML: {e}") from None
    ann = tree.getroot()
    if ann.tag != "annotation":
        raise SourceError(f"{xml}: root element <{ann.tag}>, expected <annotation>")
    objects = []
    for k, obj in enumerate(ann.findall("object"), 1):
        el = f"annotation/object[{k}]"
        name = _text(obj, "name", xml, f"{el}/name")
        coords = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = _text(obj, f"bndbox/{tag}", xml, f"{el}/bndbox/{tag}")
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise SourceError(f"{xml}: <{el}/bndbox/{tag}> is {text!r}, not a finite number")
            coords.append(value)
        objects.append((name, *coords))
    return _text(ann, "filename", xml, "annotation/filename"), objects


def _voc_image_name(filename: str, image_dir: Path, xml: Path) -> str:
    """<filename>, or the one image beside it sharing its stem or the XML's (a .tif named, a .png shipped)."""
    if (image_dir / filename).exists():
        return filename
    stems = dict.fromkeys([Path(filename).stem, xml.stem])
    found = [f"{s}{e}" for s in stems for ext in IMAGE_EXTENSIONS for e in dict.fromkeys([ext, ext.upper()])
             if (image_dir / f"{s}{e}").is_file()]
    return found[0] if len(found) == 1 else filename


def read_voc(path: Path, *, fmt: str, classes: list[str] | None, limit: int | None) -> SourceDataset:
    """Pascal VOC: one XML per image (Annotations/ + JPEGImages/, or XMLs beside the images)."""
    if path.is_file():
        xml_dir = path.parent
    else:
        xml_dir = path / "Annotations" if (path / "Annotations").is_dir() else path
    root_dir = xml_dir.parent if xml_dir.name == "Annotations" else xml_dir
    image_dir = root_dir / "JPEGImages" if xml_dir != root_dir and (root_dir / "JPEGImages").is_dir() else xml_dir
    entries = [("train", path)] if path.is_file() else _voc_entries(root_dir, xml_dir)
    root = SourceRoot(root_dir)
    items, first_seen = [], {}
    for split, xml in entries:
        root.image(xml.relative_to(root_dir), where=f"{xml}")  # an annotation file may not lead out either
        filename, objects = _parse_voc(xml)
        where = f"{xml}: <annotation/filename>"
        root.image(filename, where=where, base=image_dir)
        real, key = root.image(_voc_image_name(filename, image_dir, xml), where=where, base=image_dir)
        for k, (name, *_) in enumerate(objects, 1):
            first_seen.setdefault(name, f"{xml}: <annotation/object[{k}]/name>")
        boxes = [Box(name, x1 - 1, y1 - 1, x2, y2) for name, x1, y1, x2, y2 in objects]
        items.append(SourceItem(split=split, source_key=key, boxes=boxes, path=real))
    names = class_list(first_seen, classes)
    return SourceDataset("detection", names, list(limit_items(items, limit)), format="voc")


# --------------------------------------------------------------------------- YOLO


NAME_FILES = ("data.yaml", "data.yml", "classes.txt", "obj.names")


def _names_from(f: Path) -> list[str]:
    text = read_text(f)
    if f.suffix in (".yaml", ".yml"):
        try:
            names = (yaml.safe_load(text) or {}).get("names")
        except (yaml.YAMLError, AttributeError, ValueError, RecursionError) as e:  # ValueError: a bad date
            raise SourceError(f"{f}: not a YAML mapping with names: ({e})") from None
        if isinstance(names, dict):
            if not all(_is_int(k) for k in names) or sorted(names) != list(range(len(names))):
                raise SourceError(f"{f}: names: keys {sorted(map(repr, names))} are not 0..{len(names) - 1}")
            names = [names[i] for i in range(len(names))]
        if not isinstance(names, list) or not names:
            raise SourceError(f"{f}: names: missing or not a list of class names")
        for i, n in enumerate(names):  # yes/no/null/[a, b] are not names (and str() of an alias bomb never ends)
            if not (isinstance(n, str) and n.strip() or _is_int(n)):
                raise SourceError(f"{f}: names[{i}] is {'empty' if n == '' else type(n).__name__}, not a class "
                                  "name (text or integer); quote names YAML reads otherwise (yes, no, null, 1.5)")
        names = [str(n) for n in names]
    else:
        names = [line.strip() for line in text.splitlines()]
        while names and not names[-1]:
            names.pop()
        if not names or "" in names:
            raise SourceError(f"{f}: line {names.index('') + 1 if '' in names else 1}: empty class name")
    dup = [n for n in names if names.count(n) > 1]
    if dup:
        raise SourceError(f"{f}: class name {dup[0]!r} appears twice; names must be unique")
    return names


def _yolo_names(root: Path, classes: list[str] | None) -> tuple[list[str], str]:
    found = {f: _names_from(f) for d in (root, root / "labels") for n in NAME_FILES if (f := d / n).is_file()}
    if not found:
        if classes is None:
            raise SourceError(f"{root}: no class-names file ({', '.join(NAME_FILES)}) in the root or labels/, "
                              "and ingest.source.classes is null")
        return list(classes), "ingest.source.classes"
    (first, names), *rest = found.items()
    for f, other in rest:
        if other != names:
            raise SourceError(f"{f}: class names {other} differ from {first}: {names}")
    if classes is not None and list(classes) != names:
        raise SourceError(f"{first}: class names {names} differ from ingest.source.classes {list(classes)}; "
                          "set classes to null or make them match")
    return names, str(first)


def _image_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError):
        return None  # the gate decodes it and quarantines it with the reason


def _yolo_boxes(label_file: Path, image: Path, names: list[str], names_from: str) -> list[Box]:
    if not label_file.exists():
        return []  # no txt: a background image
    text = read_text(label_file)
    rows = [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    size = _image_size(image) if rows else None
    boxes = []
    for n, parts in rows:
        where = f"{label_file}: line {n}"
        if len(parts) != 5:
            raise SourceError(f"{where}: {len(parts)} fields, expected 5: class cx cy w h (normalized)")
        try:
            cls, values = float(parts[0]), [float(v) for v in parts[1:]]
        except ValueError:
            raise SourceError(f"{where}: {' '.join(parts)!r}: fields must be numbers (class cx cy w h)") from None
        if not cls.is_integer():
            raise SourceError(f"{where}: class id {parts[0]!r} is not an integer")
        if not 0 <= cls < len(names):
            raise SourceError(f"{where}: class id {int(cls)} out of range: {len(names)} class names "
                              f"(0..{len(names) - 1}) in {names_from}")
        if not all(math.isfinite(v) for v in values):
            raise SourceError(f"{where}: {' '.join(parts)!r}: coordinates must be finite numbers")
        if size is None:
            continue  # unreadable image header: no size to scale by; the gate quarantines the image
        (cx, cy, w, h), (width, height) = values, size
        box = Box(names[int(cls)], (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                  (cy + h / 2) * height)
        if not all(map(math.isfinite, (box.x1, box.y1, box.x2, box.y2))):
            raise SourceError(f"{where}: {' '.join(parts)!r}: the box overflows at the image size {width}x{height}")
        boxes.append(box)
    return boxes


def _iter_yolo(root: SourceRoot, splits: list[tuple[str, Path]], names: list[str], names_from: str,
               limit: int | None):
    images, labels, used = root.path / "images", root.path / "labels", set()
    for split, folder in splits:
        for count, img in enumerate(files_under(folder)):
            if limit is not None and count >= limit:
                break
            real, key = root.image(img.relative_to(root.path), where=str(img))
            label_file = (labels / img.relative_to(images)).with_suffix(".txt")
            used.add(label_file)
            if label_file.exists():
                root.image(label_file.relative_to(root.path), where=str(label_file))
            yield SourceItem(split=split, source_key=key, boxes=_yolo_boxes(label_file, real, names, names_from),
                             path=real)
    if limit is None:
        # A label file without its image, anywhere in labels/ (a split folder images/ lacks too): yielded as
        # a missing image for the gate to count, in the split its folder names, else train.
        for orphan in files_under(labels):
            if orphan.suffix == ".txt" and orphan not in used and orphan.name not in NAME_FILES:
                rel = orphan.relative_to(labels)
                path, _ = root.image(("images" / rel).with_suffix(""), where=str(orphan))  # a name allowed in the root
                yield SourceItem(split=rel.parts[0] if rel.parts[0] in SPLITS else "train", boxes=[], path=path,
                                 source_key=orphan.relative_to(root.path).as_posix())


def read_yolo(path: Path, *, fmt: str, classes: list[str] | None, limit: int | None) -> SourceDataset:
    """YOLO: images/[<split>/]... with labels/[<split>/]....txt, plus a class-names file."""
    if not (path / "images").is_dir() or not (path / "labels").is_dir():
        raise SourceError(f"{path}: a YOLO source needs images/ and labels/ folders; {SET_FORMAT}")
    names, names_from = _yolo_names(path, classes)
    return SourceDataset("detection", names, LazyItems(_iter_yolo, SourceRoot(path), split_dirs(path / "images"), names, names_from, limit),
                         format="yolo", category_map=dict(enumerate(names)))
