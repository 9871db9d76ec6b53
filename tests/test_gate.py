"""The image gate on a generated bad-input corpus: every file gets its documented reason or facts."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from tasks.gate import (
    REASON_CODES,
    ImageFacts,
    Rejection,
    check_image,
    check_many,
    load_canonical,
    orient_box,
)

MAX_PIXELS = 100_000_000


# --------------------------------------------------------------------------- corpus


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _zeros_png(width: int, height: int) -> bytes:
    """A valid, highly compressible L-mode PNG, written row by row (no big buffer in the test)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _lying_header_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR is patched to claim width x height (CRC fixed, so only the size lies)."""
    data = bytearray(_encode(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _rgb(width=60, height=40) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _marked(width=300, height=200) -> Image.Image:
    """Grey image with a red block in the top-left corner, to see where orientation moves it."""
    img = Image.new("RGB", (width, height), (128, 128, 128))
    img.paste((255, 0, 0), (0, 0, 40, 40))
    return img


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.fixture(scope="module")
def corpus() -> dict[str, bytes]:
    png = _encode(_rgb(), "PNG")
    jpg = _encode(_rgb(), "JPEG")
    palette = Image.new("P", (4, 2))
    palette.putpalette([200, 100, 50, 10, 20, 30] + [0] * 762)
    palette.paste(1, (2, 0, 4, 2))  # left half index 0 (transparent), right half index 1
    return {
        "ok.png": png,
        "empty.png": b"",
        "text.jpg": b"this is not an image, just text named .jpg\n",
        "truncated.jpg": jpg[: len(jpg) // 2],
        "truncated.png": png[: len(png) * 2 // 3],
        "bomb_header.png": _lying_header_png(30000, 30000),
        "cmyk.jpg": _encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95),
        "sixteen.png": _encode(Image.fromarray(np.array([[0, 255, 256, 65535]], dtype=np.uint16)), "PNG"),
        "palette_alpha.png": _encode(palette, "PNG", transparency=0),
        "rgba.png": _encode(Image.new("RGBA", (3, 3), (200, 100, 50, 128)), "PNG"),
        "la.png": _encode(Image.new("LA", (3, 3), (200, 0)), "PNG"),
        "rotated.jpg": _encode(_marked(), "JPEG", exif=_exif(6), quality=95),
        "bad_exif.jpg": _encode(_rgb(), "JPEG", exif=b"Exif\x00\x00not a tiff header at all"),
        "bad_exif_ifd.jpg": _encode(_rgb(), "JPEG", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff"),
        "lab.tif": _encode(Image.new("LAB", (8, 8)), "TIFF"),
        "pcx.jpg": _encode(_rgb(), "PCX"),  # a real image, but a format outside the allow-list
    }


EXPECTED_REASONS = {
    "empty.png": "empty-file",
    "text.jpg": "not-an-image",
    "pcx.jpg": "not-an-image",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "bomb_header.png": "decompression-bomb",
    "bad_exif.jpg": "bad-exif",
    "bad_exif_ifd.jpg": "bad-exif",
    "lab.tif": "unsupported-mode",
}
EXPECTED_FACTS = {  # name: (mode, format, stored_as)
    "ok.png": ("RGB", "PNG", "RGB"),
    "cmyk.jpg": ("CMYK", "JPEG", "RGB"),
    "sixteen.png": ("I;16", "PNG", "L"),
    "palette_alpha.png": ("P", "PNG", "RGB"),
    "rgba.png": ("RGBA", "PNG", "RGB"),
    "la.png": ("LA", "PNG", "L"),
    "rotated.jpg": ("RGB", "JPEG", "RGB"),
}


# --------------------------------------------------------------------------- check_image


@pytest.mark.parametrize("name", sorted(EXPECTED_REASONS))
def test_bad_input_gets_its_reason_code(corpus, name):
    result = check_image(corpus[name], name=name, max_pixels=MAX_PIXELS)
    assert isinstance(result, Rejection), result
    assert result.reason_code == EXPECTED_REASONS[name]
    assert result.reason_code in REASON_CODES
    assert name in result.detail


@pytest.mark.parametrize("name", sorted(EXPECTED_FACTS))
def test_accepted_input_reports_facts(corpus, name):
    facts = check_image(corpus[name], name=name, max_pixels=MAX_PIXELS)
    assert isinstance(facts, ImageFacts), facts
    assert (facts.mode, facts.format, facts.stored_as) == EXPECTED_FACTS[name]


def test_bomb_is_rejected_from_the_header_before_decoding():
    # A real 12000x12000 image under a low cap: rejected, naming the size, without allocating 144 MB.
    result = check_image(_zeros_png(12000, 12000), name="big.png", max_pixels=10_000_000)
    assert result.reason_code == "decompression-bomb"
    assert "144000000" in result.detail and "max_pixels 10,000,000" in result.detail
    # The same file is fine under a cap it fits.
    ok = check_image(_zeros_png(2000, 1000), name="fits.png", max_pixels=2_000_000)
    assert isinstance(ok, ImageFacts) and (ok.width, ok.height) == (2000, 1000)


def test_check_leaves_pillow_globals_as_it_found_them(corpus):
    before = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    for name, data in corpus.items():
        check_image(data, name=name, max_pixels=1000)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


# --------------------------------------------------------------------------- the policy


def test_exif_rotated_jpeg_reports_stored_size_and_loads_displayed(corpus):
    facts = check_image(corpus["rotated.jpg"], name="rotated.jpg", max_pixels=MAX_PIXELS)
    assert (facts.width, facts.height, facts.exif_orientation) == (300, 200, 6)
    assert facts.display_size == (200, 300)
    img = load_canonical(corpus["rotated.jpg"])
    assert img.mode == "RGB" and img.size == facts.display_size
    # Orientation 6 turns the image 90 degrees clockwise: the red top-left block goes top-right.
    red = np.asarray(img)[5:35, -35:-5].mean(axis=(0, 1))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert np.asarray(img)[5:35, 5:35].mean(axis=(0, 1))[0] < 160


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_box_matches_the_pixels(orientation):
    stored = Image.new("L", (60, 40), 0)
    box = (5, 10, 20, 30)
    stored.paste(255, box)
    data = _encode(stored, "PNG", exif=_exif(orientation))
    facts = check_image(data, name="o.png", max_pixels=MAX_PIXELS)
    assert facts.exif_orientation == orientation and (facts.width, facts.height) == (60, 40)
    img = load_canonical(data)
    assert img.size == facts.display_size
    assert img.getbbox() == orient_box(box, width=60, height=40, orientation=orientation)
    # Same transform as Pillow's exif_transpose, which FiftyOne-style viewers follow.
    with Image.open(io.BytesIO(data)) as src:
        assert ImageOps.exif_transpose(src).getbbox() == img.getbbox()


def test_mode_policy(corpus):
    cmyk = np.asarray(load_canonical(corpus["cmyk.jpg"])).astype(int)
    assert cmyk.shape == (30, 40, 3) and abs(cmyk[..., 0].mean() - 255) < 8 and cmyk[..., 1:].mean() < 8

    sixteen = load_canonical(corpus["sixteen.png"])
    assert sixteen.mode == "L" and np.asarray(sixteen).tolist() == [[0, 0, 1, 255]]  # value >> 8

    palette = np.asarray(load_canonical(corpus["palette_alpha.png"]))
    assert palette[0, 0].tolist() == [0, 0, 0]          # transparent: composited on black
    assert palette[0, 3].tolist() == [10, 20, 30]       # opaque: its palette colour

    rgba = np.asarray(load_canonical(corpus["rgba.png"])).astype(int)
    assert np.abs(rgba[0, 0] - [100, 50, 25]).max() <= 1  # value * alpha / 255

    la = load_canonical(corpus["la.png"])
    assert la.mode == "L" and np.asarray(la).max() == 0   # alpha 0 on black

    assert load_canonical(corpus["la.png"], mode="RGB").mode == "RGB"
    assert load_canonical(corpus["ok.png"], mode="L").mode == "L"


def test_load_canonical_refuses_what_the_gate_rejects(corpus):
    with pytest.raises(ValueError, match="unsupported-mode"):
        load_canonical(corpus["lab.tif"])
    with pytest.raises(ValueError, match="bad-exif"):
        load_canonical(corpus["bad_exif.jpg"])


# --------------------------------------------------------------------------- check_many


@pytest.fixture(scope="module")
def on_disk(corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for name, data in corpus.items():
        (root / name).write_bytes(data)
    return root


def _expected(name: str) -> str:
    return EXPECTED_REASONS.get(name, "facts")


def _code(outcome) -> str:
    return outcome.reason_code if isinstance(outcome, Rejection) else "facts"


def test_check_many_two_workers_one_result_per_item_in_order(corpus, on_disk):
    names = sorted(corpus)
    items = []
    for i, name in enumerate(names * 3):  # > one chunk of paths and bytes, mixed
        items.append((100 + i, on_disk / name if i % 2 else corpus[name]))
    items.append((9999, on_disk / "missing.png"))
    results = list(check_many(iter(items), max_pixels=MAX_PIXELS, timeout_s=30, workers=2, chunk_size=8))
    assert [r[0] for r in results] == [i for i, _ in items]
    for (index, outcome, digest), (_, payload), name in zip(results, items, names * 3):
        assert _code(outcome) == _expected(name), (name, outcome)
        data = payload if isinstance(payload, bytes) else payload.read_bytes()
        assert digest == hashlib.sha256(data).hexdigest()
    assert _code(results[-1][1]) == "missing-file" and results[-1][2] == ""
    # In-process gives the same answers (timeouts aside).
    assert list(check_many(items, max_pixels=MAX_PIXELS, timeout_s=30, workers=1)) == results


def test_slow_image_times_out_and_the_stage_goes_on(corpus, tmp_path):
    slow = tmp_path / "slow.png"
    slow.write_bytes(_zeros_png(12000, 12000))  # ~0.5 s to inflate on one free core; 140 KB on disk
    small = corpus["ok.png"]
    items = [(0, small), (1, slow), (2, small), (3, small), (4, slow), (5, small)]
    results = list(check_many(items, max_pixels=200_000_000, timeout_s=0.1, workers=2))
    assert [r[0] for r in results] == [0, 1, 2, 3, 4, 5]
    assert [_code(r[1]) for r in results] == ["facts", "timeout", "facts", "facts", "timeout", "facts"]
    assert "slow.png" in results[1][1].detail and results[1][2] == ""


def test_in_process_timeout_is_judged_after_the_decode(corpus, tmp_path):
    slow = tmp_path / "slow.png"
    slow.write_bytes(_zeros_png(6000, 6000))
    results = list(check_many([(0, slow), (1, corpus["ok.png"])], max_pixels=MAX_PIXELS, timeout_s=1e-4, workers=1))
    assert _code(results[0][1]) == "timeout" and "in-process" in results[0][1].detail


def test_check_many_rejects_arguments_and_items_it_cannot_use():
    with pytest.raises(ValueError, match="timeout_s"):
        check_many([], max_pixels=1, timeout_s=0, workers=1)
    with pytest.raises(TypeError, match="item 7"):
        list(check_many([(7, 12345)], max_pixels=1, timeout_s=1, workers=1))
    assert list(check_many([], max_pixels=1, timeout_s=1, workers=2)) == []


def _reader_of(fifo: Path) -> int | None:
    """pid of the child process that has `fifo` open (Linux /proc), else None."""
    import multiprocessing

    for child in multiprocessing.active_children():
        try:
            fds = list(Path(f"/proc/{child.pid}/fd").iterdir())
            if any(os.readlink(fd) == str(fifo) for fd in fds):
                return child.pid
        except OSError:
            continue
    return None


@pytest.mark.skipif(not Path("/proc/self/fd").exists() or not hasattr(os, "mkfifo"), reason="needs Linux /proc")
def test_hung_read_times_out_and_a_dead_worker_costs_one_image(corpus, tmp_path):
    # A fifo with no writer blocks the worker in open(): a hang that no CPU speed can finish.
    fifo = tmp_path / "hang.png"
    os.mkfifo(fifo)
    small = corpus["ok.png"]
    items = [(0, small), (1, fifo), (2, small), (3, small)]
    results = list(check_many(items, max_pixels=MAX_PIXELS, timeout_s=1.0, workers=2, chunk_size=2))
    assert [(r[0], _code(r[1])) for r in results] == [(0, "facts"), (1, "timeout"), (2, "facts"), (3, "facts")]

    # Kill the worker stuck on the fifo: that image becomes decode-error, the others still pass.
    def kill_the_reader():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:  # succeeds once a worker has the fifo open for reading
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.05)
                continue
            pid = None
            while pid is None and time.monotonic() < deadline:
                pid = _reader_of(fifo)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            os.close(fd)
            return

    killer = threading.Thread(target=kill_the_reader, daemon=True)
    killer.start()
    results = list(check_many(items, max_pixels=MAX_PIXELS, timeout_s=120, workers=2, chunk_size=2))
    killer.join(5)
    assert [(r[0], _code(r[1])) for r in results] == [(0, "facts"), (1, "decode-error"), (2, "facts"), (3, "facts")]
    assert "died" in results[1][1].detail


def test_a_lagging_worker_does_not_stall_the_window(corpus, tmp_path):
    # chunk_size=1 makes the look-ahead window 8 items: the fast worker fills it while the other
    # decodes a slow image; once that image is done the window moves and work must flow again.
    slow = tmp_path / "slow.png"
    slow.write_bytes(_zeros_png(8000, 8000))
    items = [(0, slow)] + [(i, corpus["ok.png"]) for i in range(1, 40)]
    out: list = []
    runner = threading.Thread(target=lambda: out.extend(
        check_many(items, max_pixels=MAX_PIXELS, timeout_s=60, workers=2, chunk_size=1)), daemon=True)
    runner.start()
    runner.join(60)
    assert not runner.is_alive(), "check_many stalled"
    assert [(r[0], _code(r[1])) for r in out] == [(i, "facts") for i in range(40)]
