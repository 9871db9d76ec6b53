"""Fuzz the image gate (tasks/gate.py) with real images mutated by Hypothesis.

Seeds are real pictures: Fashion-MNIST items and NEON tree-crown crops shipped with deepforest,
with the EXIF block of a real DJI photo, saved in every allowed format and in the modes the gate
has a policy for (L, 1, I;16, P + transparency, LA, RGBA, CMYK, EXIF-rotated JPEG, animated GIF,
multi-page TIFF, lossy and lossless WebP). Mutations: byte flips, truncation, deletions, inserted
and repeated runs, 16/32-bit size fields, header splices from another format, PNG chunks and JPEG
segments with valid CRCs and lengths, EXIF blocks edited in place, a wrong file name.

Properties a user relies on:
  * `check_image` returns ImageFacts or a Rejection with one of REASON_CODES naming the image,
    never raises, and answers fast (a decompression bomb is refused from its header);
  * an accepted image loads with `load_canonical` (the loader of training) at the size and mode
    the facts promise, so nothing the gate lets in fails later;
  * `check_many` in worker processes gives the same verdicts as `check_image`, with the sha256.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import random
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from tasks.gate import (
    ACCEPTED_MODES,
    ALLOWED_FORMATS,
    REASON_CODES,
    ImageFacts,
    Rejection,
    check_image,
    check_many,
    load_canonical,
)
from tests.fuzz_inputs import FAST, SLOW, apply_edits, byte_edits

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
_spec = importlib.util.find_spec("deepforest")  # data files only: never imported
DEEPFOREST = Path(_spec.submodule_search_locations[0]) / "data" if _spec else Path("/nonexistent")
MAX_PIXELS = 1_000_000
SLOW_CHECK_S = 5.0  # far above any honest decode of these small images (~1-20 ms): a hang, not a slow disk


# --------------------------------------------------------------------------- seeds


def _fashion(i: int) -> np.ndarray:
    """A Fashion-MNIST item (28x28 L), or a stand-in gradient when the Debian package is not installed."""
    if FASHION.is_file():
        raw = gzip.decompress(FASHION.read_bytes())
        return np.frombuffer(raw, np.uint8, 28 * 28, 16 + i * 28 * 28).reshape(28, 28)
    return (np.add.outer(np.arange(28), np.arange(28)) * 4 + i).astype(np.uint8)


def _crown(box=(100, 120, 148, 160)) -> Image.Image:
    """A 48x40 crop of a NEON aerial image with tree crowns (deepforest), else a stand-in."""
    if (DEEPFOREST / "OSBS_029.png").is_file():
        with Image.open(DEEPFOREST / "OSBS_029.png") as img:
            return img.convert("RGB").crop(box)
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))


def _real_exif(orientation: int | None = None) -> bytes:
    """The EXIF block of a real drone photo (DJI, with GPS), its orientation optionally changed."""
    exif = Image.Exif()
    photo = DEEPFOREST / "AWPE Pigeon Lake 2020 DJI_0005.JPG"
    if photo.is_file():
        with Image.open(photo) as img:
            exif = img.getexif()
    if orientation is not None:
        exif[0x0112] = orientation
    return exif.tobytes()


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _orientation_exif(orientation: int) -> Image.Exif:
    """Only the orientation tag: libtiff cannot write the DJI block's sub-IFD offsets into a TIFF."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _animated(first: Image.Image, fmt: str, **kw) -> bytes:
    """Two frames (an animated GIF, a multi-page TIFF): only the first is checked and used."""
    return _encode(first, fmt, save_all=True, append_images=[first.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], **kw)


SEEDS = {  # name: how to make it (built once, on first use)
    "fmnist.png": lambda: _encode(Image.fromarray(_fashion(0)), "PNG"),
    "fmnist.bmp": lambda: _encode(Image.fromarray(_fashion(1)), "BMP"),
    "fmnist-1bit.png": lambda: _encode(Image.fromarray(_fashion(2)).convert("1"), "PNG"),
    "fmnist-16bit.tif": lambda: _encode(Image.fromarray(_fashion(3).astype(np.uint16) * 257), "TIFF"),
    "fmnist-lossless.webp": lambda: _encode(Image.fromarray(_fashion(4)), "WEBP", lossless=True),
    "fmnist-anim.gif": lambda: _animated(Image.fromarray(_fashion(5)), "GIF", duration=50),
    "crown.jpg": lambda: _encode(_crown(), "JPEG", quality=90, exif=_real_exif()),
    "crown-rotated.jpg": lambda: _encode(_crown(), "JPEG", quality=90, exif=_real_exif(6)),
    "crown-progressive.jpg": lambda: _encode(_crown().convert("L"), "JPEG", progressive=True, exif=_real_exif(8)),
    "crown-cmyk.jpg": lambda: _encode(_crown().convert("CMYK"), "JPEG", quality=85),
    "crown-rgba.png": lambda: _encode(_with_alpha(_crown()), "PNG", exif=_real_exif(3)),
    "crown-la.png": lambda: _encode(_with_alpha(_crown().convert("L")), "PNG"),
    "crown-palette.png": lambda: _encode(_crown().quantize(16), "PNG", transparency=0),
    "crown-16bit.png": lambda: _encode(Image.fromarray(np.asarray(_crown().convert("L"), np.uint16) * 257), "PNG"),
    "crown-lossy.webp": lambda: _encode(_with_alpha(_crown()), "WEBP", quality=60, exif=_real_exif(5)),
    "crown-lzw.tif": lambda: _encode(_crown(), "TIFF", compression="tiff_lzw", exif=_orientation_exif(7)),
    "crown-pages.tif": lambda: _animated(_crown(), "TIFF"),
    "crown.gif": lambda: _encode(_crown(), "GIF"),
}
SEED_NAMES = sorted(SEEDS)
IMAGE_MARKERS = (b"IHDR", b"IDAT", b"PLTE", b"tRNS", b"eXIf", b"\xff\xc0", b"\xff\xc2", b"\xff\xc4", b"\xff\xda",
                 b"\xff\xdb", b"Exif\x00\x00", b"II*\x00", b"MM\x00*", b"NETSCAPE2.0", b"\x21\xf9", b"\x2c\x00",
                 b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"BM", b"\x00\x01\x01\x00")


def _with_alpha(img: Image.Image) -> Image.Image:
    alpha = Image.linear_gradient("L").resize(img.size)
    out = img.convert("LA" if img.mode == "L" else "RGBA")
    out.putalpha(alpha)
    return out


@functools.cache
def seed(name: str) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SEEDS[name]()


# --------------------------------------------------------------------------- structural mutations


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _structural(data: bytes, op) -> bytes:
    """Format-aware edits that keep the container valid (CRCs, lengths) so the decoder, not the framing, is hit."""
    kind, *args = op
    if kind == "png-chunk" and data.startswith(b"\x89PNG") and (at := data.find(b"IHDR")) > 0:
        chunk_type, payload, before_iend = args
        where = data.rfind(b"IEND") - 4 if before_iend else at + 4 + 13 + 4
        return data[:where] + _png_chunk(chunk_type, payload) + data[where:]
    if kind == "dims":
        width, height = args
        if data.startswith(b"\x89PNG"):
            ihdr = bytearray(data[12:29])
            ihdr[4:12] = struct.pack(">II", width, height)
            return data[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(bytes(ihdr))) + data[33:]
        if data.startswith(b"\xff\xd8") and (at := max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))) > 0:
            return data[: at + 5] + struct.pack(">HH", height & 0xFFFF, width & 0xFFFF) + data[at + 9 :]
        if data.startswith(b"GIF8"):
            return data[:6] + struct.pack("<HH", width & 0xFFFF, height & 0xFFFF) + data[10:]
        if data.startswith(b"BM"):
            return data[:18] + struct.pack("<ii", width & 0x7FFFFFFF, height & 0x7FFFFFFF) + data[26:]
        if data[:4] in (b"II*\x00", b"MM\x00*"):  # TIFF: ImageWidth / ImageLength entries of the first IFD
            return _tiff_dims(data, width, height)
        return data
    if kind == "jpeg-segment" and data.startswith(b"\xff\xd8"):
        marker, payload = args
        return data[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload + data[2:]
    if kind == "exif-edit" and (at := data.find(b"Exif\x00\x00")) >= 0:
        start = at + 6
        end = min(len(data), start + 600)
        edited = apply_edits(data[start:end], args[0])[: end - start].ljust(end - start, b"\x00")
        return data[:start] + edited + data[end:]  # same length: the segment length stays right
    if kind == "splice":
        donor, n = args
        return seed(donor)[:n] + data[n:]
    return data


def _tiff_dims(data: bytes, width: int, height: int) -> bytes:
    endian = "<" if data[:2] == b"II" else ">"
    out = bytearray(data)
    (ifd,) = struct.unpack(endian + "I", data[4:8])
    if ifd + 2 > len(data):
        return data
    (count,) = struct.unpack(endian + "H", data[ifd : ifd + 2])
    for i in range(count):
        at = ifd + 2 + 12 * i
        if at + 12 > len(data):
            break
        (tag,) = struct.unpack(endian + "H", data[at : at + 2])
        if tag in (256, 257):
            value = width if tag == 256 else height
            out[at + 2 : at + 12] = struct.pack(endian + "HII", 4, 1, value)  # LONG, count 1
    return bytes(out)


_PNG_TYPES = [b"IHDR", b"PLTE", b"tRNS", b"eXIf", b"iCCP", b"zTXt", b"iTXt", b"tEXt", b"acTL", b"fcTL", b"fdAT",
              b"IDAT", b"IEND", b"gAMA", b"sBIT", b"pHYs", b"cHRM", b"sRGB", b"bKGD", b"hIST", b"caBX", b"zzZz"]
_BIG = st.sampled_from([0, 1, 65535, 65536, 46341, 2**24, 2**31 - 1, 2**31, 2**32 - 1])
structural = st.one_of(
    st.tuples(st.just("png-chunk"), st.sampled_from(_PNG_TYPES), st.one_of(st.binary(max_size=64), st.sampled_from([
        zlib.compress(b"\x00" * 5_000_000), b"Raw profile type exif\x00\x00" + b"A" * 40,  # a zTXt/iCCP bomb
        struct.pack(">IIIIIHHBB", 1, 2**31, 2**31, 0, 0, 1, 1, 0, 0)])), st.booleans()),
    st.tuples(st.just("dims"), _BIG, _BIG),
    st.tuples(st.just("jpeg-segment"), st.integers(0xC0, 0xFE), st.binary(max_size=80)),
    st.tuples(st.just("exif-edit"), byte_edits((b"\x01\x12", b"\x87\x69", b"\x88\x25"), max_ops=3)),
    st.tuples(st.just("splice"), st.sampled_from(SEED_NAMES), st.integers(1, 64)),
)
NAMES = st.sampled_from(["a.png", "photo.JPG", "scan.tif", "no-extension", "x.gif", "ünïcode name.webp",
                         "train/cat/7.bmp"])


@st.composite
def mutated_images(draw):
    """(seed name, bytes) of one real image after 0-4 structural and 1-4 byte edits."""
    name = draw(st.sampled_from(SEED_NAMES))
    data = seed(name)
    for op in draw(st.lists(structural, max_size=2)):
        data = _structural(data, op)
    if draw(st.booleans()):
        # mostly past the magic number: a broken signature only reaches "not-an-image", not a decoder
        keep = draw(st.sampled_from([0, 8, 8, 8]))
        data = data[:keep] + apply_edits(data[keep:], draw(byte_edits(IMAGE_MARKERS)))
    return name, data


# --------------------------------------------------------------------------- the properties


def _judge(data: bytes, *, name: str, max_pixels: int = MAX_PIXELS, record=event) -> ImageFacts | Rejection:
    """check_image's verdict, asserting what every verdict promises; `record` counts the outcomes."""
    start = time.perf_counter()
    outcome = check_image(data, name=name, max_pixels=max_pixels)
    took = time.perf_counter() - start
    assert took < SLOW_CHECK_S, f"check_image took {took:.1f} s on {len(data)} bytes"
    if isinstance(outcome, Rejection):
        record(f"rejected: {outcome.reason_code}")
        assert outcome.reason_code in REASON_CODES, outcome
        assert name in outcome.detail, outcome
        return outcome
    assert isinstance(outcome, ImageFacts), outcome
    record(f"accepted: {outcome.format} {outcome.mode}")
    assert outcome.width >= 1 and outcome.height >= 1 and outcome.width * outcome.height <= max_pixels
    assert outcome.mode in ACCEPTED_MODES and outcome.format in (*ALLOWED_FORMATS, "MPO"), outcome
    assert 1 <= outcome.exif_orientation <= 8 and outcome.stored_as in ("L", "RGB"), outcome
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's palette-transparency notes are not verdicts
        img = load_canonical(data)
    assert (img.size, img.mode) == (outcome.display_size, outcome.stored_as), (outcome, img)
    return outcome


def test_every_seed_is_accepted_as_what_it_is():
    """The seeds are good images: the gate accepts each, so mutations start from the accepted side."""
    want = {"fmnist-1bit.png": "1", "fmnist-16bit.tif": "I;16", "crown-cmyk.jpg": "CMYK", "crown-rgba.png": "RGBA",
            "crown-la.png": "LA", "crown-palette.png": "P", "crown-16bit.png": "I;16"}
    for name in SEED_NAMES:
        facts = _judge(seed(name), name=name, record=print)
        assert isinstance(facts, ImageFacts), (name, facts)
        assert facts.mode == want.get(name, facts.mode), (name, facts)
    assert _judge(seed("crown-rotated.jpg"), name="r", record=print).exif_orientation == 6


@settings(FAST, max_examples=400)  # ~2 ms each: the gate's decoders get the most examples
@given(image=mutated_images(), name=NAMES, max_pixels=st.sampled_from([MAX_PIXELS, MAX_PIXELS, 1500, 100_000_000]))
def test_mutated_image_is_accepted_and_loads_or_gets_a_reason_code(image, name, max_pixels):
    _judge(image[1], name=name, max_pixels=max_pixels)


@FAST
@given(seed_name=st.sampled_from([n for n in SEED_NAMES if not n.endswith(".webp")]),  # headers _structural patches
       width=st.integers(1001, 2**31 - 1), height=st.integers(1001, 2**31 - 1))
def test_a_header_claiming_too_many_pixels_is_refused_before_decoding(seed_name, width, height):
    """A header that claims width x height > max_pixels never becomes facts and costs no decode."""
    data = _structural(seed(seed_name), ("dims", width, height))
    outcome = _judge(data, name="bomb", max_pixels=MAX_PIXELS)
    assert isinstance(outcome, Rejection) or outcome.width * outcome.height <= MAX_PIXELS


PATH_TOKENS = ["a.png", "sub", "/", "..", ".", "\x00", "x" * 300, "missing.jpg", " ", "~", "a.png/"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gate-paths")
    (root / "a.png").write_bytes(seed("fmnist.png"))
    (root / "sub").mkdir()
    return root


@FAST
@given(parts=st.lists(st.sampled_from(PATH_TOKENS), min_size=1, max_size=5))
@example(parts=["\x00"]).via("regression: a NUL in a path raised ValueError out of check_many (workers=1)")
@example(parts=["x" * 300])
def test_any_path_item_is_checked_or_missing(image_dir, parts):
    """A path item the worker cannot read (a folder, a NUL byte, a name too long) is missing-file, not a crash."""
    path = image_dir / "".join(parts)
    ((_, outcome, digest),) = check_many([(0, path)], max_pixels=MAX_PIXELS, timeout_s=30, workers=1)
    if isinstance(outcome, Rejection):
        event(f"rejected: {outcome.reason_code}")
        assert outcome.reason_code == "missing-file" and digest == "", outcome
    else:
        event("accepted")
        assert digest == hashlib.sha256(seed("fmnist.png")).hexdigest()


def test_check_many_in_workers_agrees_with_check_image(image_dir):
    """The pool path (pickling, worker processes) gives each mutated image the verdict check_image gives."""
    rng = random.Random(7)
    items = []
    for i in range(48):
        data = seed(SEED_NAMES[i % len(SEED_NAMES)])
        for _ in range(rng.randint(0, 3)):
            at = rng.randrange(len(data))
            data = rng.choice([data[:at], data[:at] + bytes([data[at] ^ rng.randint(1, 255)]) + data[at + 1 :],
                               data[:at] + rng.randbytes(8) + data[at:]])
        items.append((i, data))
    paths = [(100, image_dir / "a.png"), (101, image_dir / "sub"), (102, str(image_dir / "a\x00.png"))]
    got = list(check_many(items + paths, max_pixels=MAX_PIXELS, timeout_s=30, workers=2, chunk_size=8))
    assert [i for i, _, _ in got] == [i for i, _ in items + paths]
    for (i, outcome, digest), (_, data) in zip(got, items, strict=False):
        direct = check_image(data, name=f"<bytes item {i}>", max_pixels=MAX_PIXELS)
        assert outcome == direct, (i, outcome, direct)
        assert digest == hashlib.sha256(data).hexdigest()
    assert isinstance(got[-3][1], ImageFacts) and [o.reason_code for _, o, _ in got[-2:]] == ["missing-file"] * 2


def test_regression_palette_alpha_beyond_256_entries_is_rejected():
    """Found by the fuzz: a tRNS chunk with more alphas than a palette can have (257+) passed the gate,
    then load_canonical raised ValueError ("palette index out of range") in training. Now: decode-error."""
    img = Image.new("P", (8, 8))
    img.putpalette([0, 0, 0, 255, 255, 255])
    data = _structural(_encode(img, "PNG"), ("png-chunk", b"tRNS", b"\x80" * 257, True))
    with pytest.raises(ValueError, match="palette index"):
        load_canonical(data)  # what training would have hit
    outcome = _judge(data, name="p.png", record=print)
    assert isinstance(outcome, Rejection) and outcome.reason_code == "decode-error", outcome


# --------------------------------------------------------------------------- long runs (-m slow)


@pytest.mark.slow
@settings(SLOW, max_examples=5000)
@given(image=mutated_images(), name=NAMES, max_pixels=st.sampled_from([MAX_PIXELS, MAX_PIXELS, 1500, 100_000_000]))
def test_mutated_image_long(image, name, max_pixels):
    _judge(image[1], name=name, max_pixels=max_pixels)
