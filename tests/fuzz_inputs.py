"""Shared pieces of the fuzz tests (tests/test_fuzz_parsers.py, tests/test_fuzz_gate.py).

Hypothesis strategies for the text a sloppy annotator types and the bytes an attacker sends,
byte-level mutations that keep their falsifying examples readable, and a fresh folder per
example. Outcomes are recorded with hypothesis.event: `--hypothesis-show-statistics` shows
how many examples each property ran and how many mutated inputs were accepted or refused.
"""

from __future__ import annotations

import os
import posixpath
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Reproducible in CI: the same examples every run, no example database on disk.
# too_slow: each example writes a small source tree or decodes an image, by design.
FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(FAST, max_examples=100)
PER_RULE = settings(FAST, max_examples=8)  # properties parametrized by the rule they break: every rule, every run
SLOW = settings(FAST, max_examples=1500)

# Characters a label may hold: anything printable, no line breaks (Cc, Zl, Zp: they end a line of a
# txt file), no surrogates or unassigned code points, no BOM (U+FEFF opens a file, not a name).
_LABEL_CHARS = st.characters(exclude_categories=("Cs", "Cc", "Cn", "Zl", "Zp"), exclude_characters="\ufeff")
# File and folder names: letters a file system and a shell both accept, plus non-ASCII letters.
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-+ éßüЖ中"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".PNG", ".JPG")


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh, resolved folder for one example (tmp_path is per test, not per example)."""
    with tempfile.TemporaryDirectory(prefix="pixelops-fuzz-") as d:
        yield Path(os.path.realpath(d))


def labels() -> st.SearchStrategy[str]:
    """A label or class name as a reader returns it: stripped, non-empty; often all digits."""
    text = st.text(_LABEL_CHARS, min_size=1, max_size=10).map(str.strip).filter(bool)
    return st.one_of(text, st.integers(0, 120).map(str), st.sampled_from(["cat", "dog", "T-shirt/top", "a,b"]))


def names() -> st.SearchStrategy[str]:
    """One file or folder name: not hidden, no surrounding spaces."""
    return st.text(_NAME_CHARS, min_size=1, max_size=8).map(str.strip).filter(
        lambda s: s and not s.startswith(".") and s not in ("train", "val", "test"))


@st.composite
def rel_paths(draw, *, noisy: bool = True) -> str:
    """A relative image path, sometimes written untidily (./a, a//b, a/x/../b) but inside the root.

    Its normalized form (`posixpath.normpath`) is what a reader reports as source_key.
    """
    parts = draw(st.lists(names(), min_size=0, max_size=2)) + [draw(names()) + draw(st.sampled_from(IMAGE_SUFFIXES))]
    if not noisy or not draw(st.booleans()):
        return "/".join(parts)
    noise = draw(st.sampled_from(["./", "dot", "double", "updown"]))
    if noise == "./":
        return "./" + "/".join(parts)
    if noise == "dot":
        return "/".join([*parts[:-1], ".", parts[-1]])
    if noise == "double":
        return "//".join(parts)
    return "/".join([*parts[:-1], draw(names()), "..", parts[-1]])


def key_of(rel: str) -> str:
    """The source_key a reader must report for a relative path inside the root."""
    return posixpath.normpath(rel)


def finite(lo: float = -1e6, hi: float = 1e6) -> st.SearchStrategy[float]:
    """A finite coordinate: floats and integers, negative and inverted boxes included."""
    return st.one_of(st.floats(lo, hi, allow_nan=False, allow_infinity=False), st.integers(int(lo), int(hi)))


def unique_by(items: list, key) -> list:
    seen, out = set(), []
    for item in items:
        if key(item) not in seen:
            seen.add(key(item))
            out.append(item)
    return out


# --------------------------------------------------------------------------- byte mutations

# 32-bit values that break size fields: zero, one, sign bits, all ones, "just past" a small buffer.
_INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
                0xFFFFFFFF, 0xFFFFFFFE, 46341, 65500]
_POSITION = st.one_of(st.integers(0, 63), st.integers(0, 1 << 20))  # half the edits land in the header


def byte_edits(markers: tuple[bytes, ...] = (), max_ops: int = 4):
    """A list of edits for `apply_edits`: flips, truncation, deletion, insertion, repeats, size fields.

    `markers` are signatures (b"IHDR", b"Exif" ...) an edit may be anchored to, so a mutation
    reaches the structure after a marker rather than a random spot in the pixel data.
    """
    where = st.one_of(st.tuples(st.just(None), _POSITION),
                      st.tuples(st.sampled_from(markers), st.integers(0, 48))) if markers else \
        st.tuples(st.just(None), _POSITION)
    edit = st.one_of(
        st.tuples(st.just("flip"), where, st.integers(1, 255)),
        st.tuples(st.just("truncate"), where),
        st.tuples(st.just("delete"), where, st.integers(1, 64)),
        st.tuples(st.just("insert"), where, st.binary(min_size=1, max_size=48)),
        st.tuples(st.just("repeat"), where, st.integers(1, 64), st.integers(2, 6)),
        st.tuples(st.just("u32"), where, st.sampled_from(_INTERESTING), st.sampled_from([">I", "<I"])),
        st.tuples(st.just("u16"), where, st.sampled_from(_INTERESTING), st.sampled_from([">H", "<H"])),
    )
    return st.lists(edit, min_size=1, max_size=max_ops)


def _offset(data: bytes, where) -> int:
    marker, pos = where
    if marker is not None:
        at = data.find(marker)
        base = at + len(marker) if at >= 0 else 0
        return min(base + pos, len(data))
    return pos % (len(data) + 1)


def apply_edits(data: bytes, edits) -> bytes:
    """Apply `byte_edits` in order; every edit is defined for any length, including 0."""
    out = bytearray(data)
    for op, where, *args in edits:
        at = _offset(bytes(out), where)
        if op == "flip" and at < len(out):
            out[at] ^= args[0]
        elif op == "truncate":
            del out[at:]
        elif op == "delete":
            del out[at : at + args[0]]
        elif op == "insert":
            out[at:at] = args[0]
        elif op == "repeat":
            out[at:at] = bytes(out[at : at + args[0]]) * (args[1] - 1)
        elif op in ("u32", "u16"):
            value, fmt = args
            packed = struct.pack(fmt, value & (0xFFFFFFFF if op == "u32" else 0xFFFF))
            out[at : at + len(packed)] = packed
    return bytes(out)
