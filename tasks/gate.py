"""The image integrity gate: decode every image once, in worker processes, before it enters a version.

Used by the ingest stage (params section `ingest:`: `max_pixels`, `decode_timeout_s`, `workers`);
`load_canonical` is the one image loader that training, evaluation and FiftyOne use.

Inputs:  encoded image bytes, or paths the worker reads itself.
Outputs: `ImageFacts` for an accepted image, or a `Rejection` with one reason code:

    reason code          when
    -------------------  ------------------------------------------------------------------------
    empty-file           0 bytes
    not-an-image         Pillow cannot identify it as one of ALLOWED_FORMATS (text named .jpg, a
                         header-only stub, or a format outside the allow-list such as EPS)
    truncated            the header is fine but the pixel data ends early (Pillow's "image file is
                         truncated", EOFError); ImageFile.LOAD_TRUNCATED_IMAGES is forced False
    decompression-bomb   width*height > max_pixels, read from the header BEFORE any pixel is
                         decoded; Pillow's own DecompressionBombWarning/Error (its limit is set to
                         max_pixels during the check) is raised as an error, never just logged
    unsupported-mode     a Pillow mode outside ACCEPTED_MODES (LAB, HSV, premultiplied RGBa ...)
    bad-exif             an EXIF block is present but its base IFD cannot be read, or the
                         orientation tag is not an integer
    missing-file         a path item that does not exist or cannot be read (detail says which)
    timeout              no result within decode_timeout_s for this one image (see check_many)
    decode-error         anything else Pillow raises on this image (OSError, SyntaxError,
                         ValueError, struct.error ...), or the worker process died while on it

Mode and EXIF policy (one policy; `load_canonical` applies it, `ImageFacts.stored_as` predicts it):

    source                         canonical pixels
    -----------------------------  --------------------------------------------------------------
    L, 1                           L (1 becomes 0/255)
    I;16, I;16L, I;16B, I;16N      L = value >> 8 (the high byte; 65535 -> 255, 255 -> 0); a 16-bit
                                   tRNS colour key is ignored
    I (32-bit int)                 L = clip(value, 0, 65535) >> 8 (treated as 16-bit data)
    F (float)                      L = clip(value, 0, 255), fraction dropped (Pillow's F -> L);
                                   float data in another range must be rescaled before ingest
    LA, L + tRNS                   L composited on BLACK (value * alpha / 255)
    RGB, RGBX, YCbCr               RGB (Pillow's conversion)
    CMYK                           RGB with Pillow's conversion (no ICC profile applied)
    P                              RGB through the palette
    RGBA, PA, P/RGB + tRNS         RGB composited on BLACK (value * alpha / 255, i.e. premultiplied)

    Black, not white: it is what premultiplied alpha gives, matches the zero padding the
    augmentations use, and is what Fashion-MNIST-like dark backgrounds already look like.
    Only the first frame of an animated GIF/WebP/APNG, a multi-page TIFF or a multi-picture
    JPEG (MPO) is checked and used.

    A dataset whose images are all `stored_as == "L"` trains on L (1 channel); any other
    dataset trains on RGB: `load_canonical(data, mode="RGB")` expands L by copying the channel.

    EXIF orientation (tag 274, or XMP tiff:Orientation as Pillow reads it) is applied by
    `load_canonical`: the pixels come out as a viewer displays them (the same transpose
    table as ImageOps.exif_transpose; values other than 2..8 mean "no transform").

    ImageFacts.width/height are AS STORED (the pixel grid of the file, before orientation),
    because box labels are in the stored grid (tasks/sources.py) and validation compares
    boxes with width/height. `ImageFacts.display_size` is the size after orientation, i.e.
    the size `load_canonical` returns. A consumer that calls `load_canonical` on a detection
    image must map its boxes with `orient_box` (same table), or pixels and boxes disagree for
    orientations 2..8. Classification needs nothing more.

Formats: only ALLOWED_FORMATS are opened (PNG, JPEG (with its multi-picture variant MPO), BMP,
GIF, WEBP, TIFF), so a file cannot reach Pillow plugins that shell out (EPS runs Ghostscript)
or that are rarely fuzzed. ImageFacts.format is what the bytes are, whatever the name says.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
import os
import pickle
import signal
import struct
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait as _wait_connections
from pathlib import Path
from typing import Literal

from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

REASON_CODES = (
    "empty-file",
    "not-an-image",
    "truncated",
    "decompression-bomb",
    "unsupported-mode",
    "bad-exif",
    "missing-file",
    "timeout",
    "decode-error",
)
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")  # JPEG includes MPO (multi-picture JPEG)
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
SINGLE_CHANNEL_MODES = frozenset({"1", "L", "LA", "I", "F"}) | SIXTEEN_BIT_MODES
ACCEPTED_MODES = SINGLE_CHANNEL_MODES | {"P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}
ALPHA_MODES = frozenset({"LA", "PA", "RGBA"})

# Same table as PIL.ImageOps.exif_transpose; one table for pixels (load_canonical) and boxes (orient_box).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# What Pillow raises on malformed input (its plugins are parsers written in Python and C).
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    struct.error,
    EOFError,
    ZeroDivisionError,
    NotImplementedError,
    MemoryError,
)

CHUNK_SIZE = 64            # images per message to a worker
_PIPE_SAFE_BYTES = 60_000  # a chunk this small fits an empty pipe (64 KiB): sending it never blocks
_CHUNK_INLINE_BYTES = 48_000  # bytes items packed into one chunk
_WORKER_START_TIMEOUT_S = 120.0
_MAX_DEATHS_IN_A_ROW = 8
_FLUSH_S = 0.5  # a worker sends finished results at least this often within a long chunk


class GateError(ValueError):
    """`load_canonical` was given an image the gate rejects; the message names the reason."""


@dataclass(frozen=True)
class ImageFacts:
    width: int              # as stored in the file (before EXIF orientation)
    height: int
    mode: str               # Pillow mode as decoded (L, RGB, I;16, P, CMYK ...)
    format: str             # Pillow format name (PNG, JPEG, MPO ...): the real type, whatever the name says
    exif_orientation: int   # 1..8; 1 when absent or out of range
    stored_as: str          # "L" or "RGB": the mode load_canonical returns by default

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) after EXIF orientation: the size load_canonical returns."""
        if self.exif_orientation in (5, 6, 7, 8):
            return self.height, self.width
        return self.width, self.height


@dataclass(frozen=True)
class Rejection:
    reason_code: str        # one of REASON_CODES
    detail: str             # names the image and what was found

    def __str__(self) -> str:
        return f"{self.reason_code}: {self.detail}"


class _BadExif(Exception):
    pass


# --------------------------------------------------------------------------- one image


@contextmanager
def _pillow_limits(max_pixels: int):
    """Strict Pillow settings for one check: no truncated loads, bomb warnings are errors.

    These are process globals (restored on exit): in worker processes that is harmless; in
    the calling process (workers=1, or a direct call) do not check images from several threads.
    """
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's other warnings (palette transparency ...) are not verdicts
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _orientation(img: Image.Image) -> int:
    """EXIF orientation 1..8 of a loaded image; raise _BadExif when EXIF is present but unreadable."""
    raw = img.info.get("exif")
    if raw:
        # Pillow's JPEG reader swallows EXIF errors at open; parse again, strictly. A corrupt IFD
        # is reported by Pillow as a UserWarning only, so warnings are errors here.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                Image.Exif().load(raw if isinstance(raw, bytes) else bytes(raw))
            except (*_DECODE_ERRORS, UserWarning) as e:
                raise _BadExif(f"{type(e).__name__}: {e}") from None
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS as e:
        raise _BadExif(f"{type(e).__name__}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadExif(f"orientation tag is {value!r}, not an integer")
    return value if 1 <= value <= 8 else 1


def _stored_as(img: Image.Image) -> str:
    return "L" if img.mode in SINGLE_CHANNEL_MODES else "RGB"


def _inspect(img: Image.Image, *, name: str, max_pixels: int) -> ImageFacts | Rejection:
    width, height = img.size
    if width < 1 or height < 1:
        return Rejection("decode-error", f"{name}: header says {width}x{height}")
    if width * height > max_pixels:
        return Rejection(
            "decompression-bomb",
            f"{name}: header says {width}x{height} = {width * height:,} pixels > max_pixels {max_pixels:,}",
        )
    for stage in ("header", "decoded"):
        if img.mode not in ACCEPTED_MODES:
            return Rejection(
                "unsupported-mode",
                f"{name}: mode {img.mode} ({img.format}, {stage}); accepted: {', '.join(sorted(ACCEPTED_MODES))}",
            )
        if stage == "header":
            img.load()  # full decode: a truncated file fails here, not in training
    if img.mode not in ("L", "RGB") or "transparency" in img.info:
        _apply_mode_policy(img)  # load_canonical's conversion must work too (a tRNS of 257+ alphas fails there)
    return ImageFacts(
        width=width,
        height=height,
        mode=img.mode,
        format=img.format or "",
        exif_orientation=_orientation(img),
        stored_as=_stored_as(img),
    )


def check_image(data: bytes, *, name: str, max_pixels: int) -> ImageFacts | Rejection:
    """Decode one encoded image under the gate's rules.

    Args: data, the file's bytes; name, used in the detail message; max_pixels, the
    width*height cap checked from the header before decoding.
    Returns ImageFacts when accepted, else a Rejection with one of REASON_CODES.
    Pure: reads nothing but `data`; sets Pillow's limits only for the duration of the call.
    """
    if not data:
        return Rejection("empty-file", f"{name}: 0 bytes")
    Image.init()  # registers every plugin once (MPO, WEBP, TIFF are not in Pillow's preinit set)
    with _pillow_limits(max_pixels):
        try:
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
                return _inspect(img, name=name, max_pixels=max_pixels)
        except UnidentifiedImageError:
            return Rejection(
                "not-an-image",
                f"{name}: not one of {', '.join(ALLOWED_FORMATS)} ({len(data)} bytes, starting {data[:8]!r})",
            )
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            return Rejection("decompression-bomb", f"{name}: over max_pixels {max_pixels:,} (Pillow: {e})")
        except _BadExif as e:
            return Rejection("bad-exif", f"{name}: EXIF present but unreadable: {e}")
        except EOFError as e:
            return Rejection("truncated", f"{name}: EOFError: {e}")
        except OSError as e:
            code = "truncated" if "truncated" in str(e).lower() else "decode-error"
            return Rejection(code, f"{name}: {type(e).__name__}: {e}")
        except _DECODE_ERRORS as e:
            return Rejection("decode-error", f"{name}: {type(e).__name__}: {e}")


# --------------------------------------------------------------------------- the canonical loader


def _on_black(img: Image.Image, target: str) -> Image.Image:
    """Composite an image with alpha (LA or RGBA) on black: value * alpha / 255."""
    alpha = img.getchannel("A")
    canvas = Image.new(target, img.size, 0)
    canvas.paste(img.convert(target), (0, 0), alpha)
    return canvas


def _apply_mode_policy(img: Image.Image) -> Image.Image:
    mode = img.mode
    has_alpha = mode in ALPHA_MODES or img.info.get("transparency") is not None
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        import numpy as np

        values = np.asarray(img)
        if mode == "I":
            values = np.clip(values, 0, 65535)
        return Image.fromarray((values >> 8).astype(np.uint8), mode="L")
    if mode == "F":
        return img.convert("L")
    if mode in ("1", "L", "LA"):
        return _on_black(img.convert("LA"), "L") if has_alpha else img.convert("L")
    if has_alpha:
        return _on_black(img.convert("RGBA"), "RGB")
    return img.convert("RGB")


def load_canonical(data: bytes, *, mode: Literal["RGB", "L"] | None = None) -> Image.Image:
    """Decode an image that passed the gate into the canonical pixels (module docstring policy).

    Args: data, the file's bytes; mode, "RGB" or "L" to force the channel layout of the
    dataset (L -> RGB copies the channel; RGB -> L is Pillow's ITU-R 601-2 luma), or None
    for the image's own `stored_as`.
    Returns a loaded 8-bit L or RGB image, EXIF orientation applied (size = display_size).
    Raises GateError for a mode or EXIF the gate rejects; Pillow's errors for a broken file.
    Pillow's own bomb limit (Image.MAX_IMAGE_PIXELS, 2x = error) still applies here: a process
    loading images above ~179 M pixels (ingest.max_pixels raised) must raise that limit itself.
    """
    if mode not in (None, "RGB", "L"):
        raise ValueError(f"mode {mode!r}: allowed None, 'RGB', 'L'")
    Image.init()
    with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
        img.load()
        if img.mode not in ACCEPTED_MODES:
            raise GateError(f"unsupported-mode: {img.mode}; accepted: {', '.join(sorted(ACCEPTED_MODES))}")
        try:
            orientation = _orientation(img)
        except _BadExif as e:
            raise GateError(f"bad-exif: {e}") from None
        out = _apply_mode_policy(img)
    if orientation in _TRANSPOSE:
        out = out.transpose(_TRANSPOSE[orientation])
    if mode is not None and out.mode != mode:
        out = out.convert(mode)
    return out


def orient_box(
    box: tuple[float, float, float, float], *, width: int, height: int, orientation: int
) -> tuple[float, float, float, float]:
    """Map an xyxy box from the stored pixel grid to the displayed grid (what load_canonical returns).

    Args: box, absolute (x1, y1, x2, y2) in the stored image; width, height, the stored size
    (ImageFacts.width/height); orientation, ImageFacts.exif_orientation.
    Returns the box in the oriented image, x1 <= x2 and y1 <= y2.
    """
    x1, y1, x2, y2 = box
    w, h = width, height
    if orientation == 2:
        return w - x2, y1, w - x1, y2
    if orientation == 3:
        return w - x2, h - y2, w - x1, h - y1
    if orientation == 4:
        return x1, h - y2, x2, h - y1
    if orientation == 5:
        return y1, x1, y2, x2
    if orientation == 6:
        return h - y2, x1, h - y1, x2
    if orientation == 7:
        return h - y2, w - x2, h - y1, w - x1
    if orientation == 8:
        return y1, w - x2, y2, w - x1
    return x1, y1, x2, y2


# --------------------------------------------------------------------------- many images


def _item_name(index: int, payload: Path | str | bytes) -> str:
    return f"<bytes item {index}>" if isinstance(payload, (bytes, bytearray, memoryview)) else str(payload)


def _check_item(index: int, payload: Path | str | bytes, max_pixels: int) -> tuple[ImageFacts | Rejection, str]:
    """Read (when a path), hash and check one item; never raises for a bad image."""
    name = _item_name(index, payload)
    if isinstance(payload, (bytes, bytearray, memoryview)):
        data = bytes(payload)
    else:
        try:
            data = Path(payload).read_bytes()
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
            return Rejection("missing-file", f"{name}: {type(e).__name__}: {getattr(e, 'strerror', None) or e}"), ""
    digest = hashlib.sha256(data).hexdigest()
    try:
        outcome = check_image(data, name=name, max_pixels=max_pixels)
    except Exception as e:  # noqa: BLE001 -- the crash barrier: one image must not end the stage; the type is reported
        outcome = Rejection("decode-error", f"{name}: unexpected {type(e).__name__}: {e}")
    return outcome, digest


def _payload(index, payload) -> Path | bytes:
    """Validate one item's payload in the parent, so a caller's mistake fails loudly, not per image."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)  # a memoryview cannot be pickled to a worker
    if isinstance(payload, (str, os.PathLike)):
        return Path(payload)
    raise TypeError(f"check_many item {index!r}: expected a path or bytes, got {type(payload).__name__}")


def _worker_main(tasks, results, state, max_pixels: int) -> None:
    """Worker process: take chunks, check each image, send results once per chunk (or per _FLUSH_S).

    `state` is shared memory the parent reads for timeouts: state[1] = seq of the image being
    checked, state[0] = when it started (time.monotonic, one clock for all processes), 0.0 while
    idle. seq is written before the start time; both are set before any message that announces
    work (the ack), and cleared before the results that finish a chunk.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.init()
    try:
        results.send(("ready",))
        while True:
            try:
                raw = tasks.recv_bytes()
            except EOFError:
                return
            finished: list = []
            flushed = time.monotonic()
            # The parent pickled this chunk on our own pipe (paths and bytes, never data from a
            # file): the same trust as multiprocessing's own queues, which pickle too.
            for i, (seq, index, payload) in enumerate(pickle.loads(raw)):
                now = time.monotonic()
                state[1] = seq
                state[0] = now
                if i == 0:
                    results.send(("ack",))  # the chunk left the pipe; work is announced in `state`
                elif now - flushed >= _FLUSH_S:
                    results.send(("results", finished))
                    finished, flushed = [], now
                finished.append((seq, *_check_item(index, payload, max_pixels)))
            state[0] = 0.0
            results.send(("results", finished))
    except (BrokenPipeError, ConnectionResetError):
        return  # the parent is gone


class _Worker:
    """One worker process, its pipes, its shared state, and the chunks it holds, oldest first."""

    def __init__(self, ctx, max_pixels: int):
        task_r, self.task_w = ctx.Pipe(duplex=False)
        self.result_r, result_w = ctx.Pipe(duplex=False)
        self.state = ctx.RawArray("d", 2)  # [busy_since, seq]; see _worker_main
        self.proc = ctx.Process(target=_worker_main, args=(task_r, result_w, self.state, max_pixels),
                                name="pixelops-gate", daemon=True)
        self.proc.start()
        task_r.close()
        result_w.close()
        self.started_at = time.monotonic()
        self.ready = False
        self.unacked = 0       # chunks sent but not yet taken from the pipe (0 or 1)
        self.jobs: deque = deque()  # (seq, index, payload) sent and not answered, in order

    def deadline(self, timeout_s: float) -> float | None:
        if not self.ready:
            return self.started_at + _WORKER_START_TIMEOUT_S
        busy_since = self.state[0]  # one aligned 8-byte load: never torn
        return busy_since + timeout_s if self.jobs and busy_since > 0 else None

    def stop(self, *, kill: bool) -> None:
        for conn in (self.task_w, self.result_r):
            conn.close()
        if kill:
            self.proc.terminate()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.proc.close()


def _resolve_workers(workers: int) -> int:
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def check_many(
    items: Iterable[tuple[int, Path | str | bytes]],
    *,
    max_pixels: int,
    timeout_s: float,
    workers: int,
    chunk_size: int = CHUNK_SIZE,
) -> Iterator[tuple[int, ImageFacts | Rejection, str]]:
    """Check many images in worker processes; yield (index, facts or rejection, content_hash) in input order.

    Args: items, (index, path or encoded bytes); a path is read by the worker, so the parent
    never holds the bytes. max_pixels, the per-image pixel cap. timeout_s, the per-image time
    cap. workers, processes (0 = one per core this process may use, os.sched_getaffinity, else
    os.cpu_count()). chunk_size, images per message.
    content_hash is the sha256 of the file's bytes, "" when they were never fully read
    (missing-file, timeout). Items are consumed lazily, a bounded window ahead of the output.
    Raises TypeError for an item that is neither a path nor bytes, RuntimeError when worker
    processes cannot run at all; never for a bad image.

    Timeouts with workers > 1: images travel in chunks (about three messages per chunk: the
    chunk, its receipt, its results; ~3,300 for 70,000 tiny PNGs, not 140,000), but the
    deadline is per image. Before
    each image the worker writes, in shared memory, which image it is on and when it started;
    the parent reads that and, once an image has run timeout_s (reading + hashing + decoding),
    terminates the worker, rejects that image with `timeout`, queues the rest of the worker's
    chunk again (finished but unsent results included: they are checked again) and starts a
    new worker. So a slow image never eats its chunk-mates' time and they never eat its time.
    The parent judges only while it waits: while the consumer of this iterator is busy, an
    image may run longer before it is judged, never shorter. A worker that dies (a crashing
    decoder, the OOM killer) costs only the image it was on (`decode-error`).

    workers=1 (or 0 on a one-core machine) checks in this process: no process start-up, but
    a decode cannot be interrupted. The pixel cap bounds the work; an image that took longer
    than timeout_s is still rejected with `timeout` afterwards, so results match the pool's.
    """
    if max_pixels < 1 or timeout_s <= 0 or workers < 0 or chunk_size < 1:
        raise ValueError(
            f"check_many: max_pixels={max_pixels} (>= 1), timeout_s={timeout_s} (> 0), "
            f"workers={workers} (>= 0), chunk_size={chunk_size} (>= 1)"
        )
    n = _resolve_workers(workers)
    if n == 1:
        return _check_in_process(items, max_pixels=max_pixels, timeout_s=timeout_s)
    return _check_in_pool(items, max_pixels=max_pixels, timeout_s=timeout_s, n_workers=n, chunk_size=chunk_size)


def _check_in_process(items, *, max_pixels: int, timeout_s: float):
    for index, payload in items:
        payload = _payload(index, payload)
        start = time.monotonic()
        outcome, digest = _check_item(index, payload, max_pixels)
        took = time.monotonic() - start
        if took > timeout_s:
            outcome, digest = Rejection(
                "timeout",
                f"{_item_name(index, payload)}: took {took:.3g} s > {timeout_s} s "
                "(in-process check: not interrupted, rejected afterwards)",
            ), ""
        yield index, outcome, digest


def _check_in_pool(items, *, max_pixels: int, timeout_s: float, n_workers: int, chunk_size: int):
    ctx = mp.get_context("spawn")  # fork is unsafe in a parent with threads (Prefect, torch)
    source = iter(items)
    exhausted = False
    requeued: deque = deque()      # jobs (seq, index, payload) to send again, before new items
    done: dict[int, tuple] = {}    # seq -> (index, outcome, digest), waiting for earlier seqs
    next_out = 0                   # next seq to yield; seq = position in the input
    n_read = 0                     # items taken from the source
    window = max(8, 4 * n_workers) * chunk_size
    deaths_in_a_row = 0            # worker deaths with no result in between: a broken setup, not an image
    workers = [_Worker(ctx, max_pixels) for _ in range(n_workers)]

    def take_chunk() -> list:
        nonlocal exhausted, n_read
        chunk, inline = [], 0
        while len(chunk) < chunk_size:
            if requeued:
                job = requeued.popleft()
            elif exhausted or n_read - next_out >= window:
                break
            else:
                try:
                    index, payload = next(source)
                except StopIteration:
                    exhausted = True
                    break
                job = (n_read, index, _payload(index, payload))
                n_read += 1
            size = len(job[2]) if isinstance(job[2], (bytes, bytearray, memoryview)) else 0
            if chunk and inline + size > _CHUNK_INLINE_BYTES:
                requeued.appendleft(job)
                break
            inline += size
            chunk.append(job)
        return chunk

    def replace(w: _Worker, *, dead: bool, judged_since: float, reason: str) -> None:
        """Stop `w`; reject the image it was on with `reason` if it is still the one judged; requeue the rest."""
        if not dead:
            w.proc.terminate()
        w.proc.join(5)
        busy_since, seq = w.state[0], int(w.state[1])  # frozen now: the writer is gone
        culprit = seq if busy_since > 0 and busy_since == judged_since else None
        rest = []
        for job in w.jobs:
            if job[0] == culprit:
                code, what = reason.split(":", 1)
                done[job[0]] = (job[1], Rejection(code, f"{_item_name(job[1], job[2])}:{what}"), "")
            else:
                rest.append(job)
        requeued.extendleft(reversed(rest))
        w.stop(kill=True)
        workers[workers.index(w)] = _Worker(ctx, max_pixels)

    try:
        while True:
            # Dispatch. An idle worker takes any chunk (it is blocked reading, so the send completes);
            # a busy one takes one more only once its pipe is empty and the chunk fits the pipe, so
            # no send can block on a worker that is stuck.
            for w in workers:
                if not w.ready or w.unacked or (w.jobs and len(w.jobs) > chunk_size):
                    continue
                chunk = take_chunk()
                if not chunk:
                    break
                raw = pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL)
                if w.jobs and len(raw) > _PIPE_SAFE_BYTES:
                    requeued.extendleft(reversed(chunk))
                    continue
                try:
                    w.task_w.send_bytes(raw)
                except (BrokenPipeError, ConnectionResetError):
                    requeued.extendleft(reversed(chunk))
                    continue  # its death shows as EOF on its result pipe
                w.jobs.extend(chunk)
                w.unacked += 1

            if next_out in done:
                while next_out in done:
                    index, outcome, digest = done.pop(next_out)
                    next_out += 1
                    yield index, outcome, digest
                continue  # the window moved: dispatch more before waiting, or idle workers wait forever
            if exhausted and not requeued and next_out == n_read:
                return
            if not requeued and all(w.ready and not w.jobs for w in workers):
                raise RuntimeError(f"gate: stalled with no work in flight at item {next_out} (a bug in check_many)")

            now = time.monotonic()
            deadlines = [d for w in workers if (d := w.deadline(timeout_s)) is not None]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else None
            _wait_connections([w.result_r for w in workers], wait_s)

            # Drain everything that arrived before judging any deadline.
            for w in list(workers):
                try:
                    while w.result_r.poll():
                        msg = w.result_r.recv()
                        if msg[0] == "results":
                            for seq, outcome, digest in msg[1]:
                                job = w.jobs.popleft()
                                assert job[0] == seq, (job[0], seq)  # a worker answers in order
                                done[seq] = (job[1], outcome, digest)
                                deaths_in_a_row = 0
                        elif msg[0] == "ack":
                            w.unacked -= 1
                        else:
                            w.ready = True
                except (EOFError, ConnectionResetError, OSError):
                    if not w.ready:
                        w.proc.join(5)
                        raise RuntimeError(
                            f"gate worker process failed to start (exit code {w.proc.exitcode})") from None
                    deaths_in_a_row += 1
                    if deaths_in_a_row > _MAX_DEATHS_IN_A_ROW:
                        w.proc.join(5)
                        raise RuntimeError(
                            f"gate worker processes died {deaths_in_a_row} times in a row without a result "
                            f"(last exit code {w.proc.exitcode}): the environment, not an image, is broken"
                        ) from None
                    replace(w, dead=True, judged_since=w.state[0],
                            reason="decode-error: the worker process died on this image")

            now = time.monotonic()
            for w in list(workers):
                if not w.ready:
                    if now - w.started_at > _WORKER_START_TIMEOUT_S:
                        raise RuntimeError(f"gate worker process did not start within {_WORKER_START_TIMEOUT_S} s")
                    continue
                busy_since = w.state[0]
                if w.jobs and busy_since > 0 and now - busy_since >= timeout_s:
                    replace(w, dead=False, judged_since=busy_since,
                            reason=f"timeout: no result within {timeout_s} s; worker process replaced")
    finally:
        for w in workers:
            w.stop(kill=bool(w.jobs) or not w.ready)
