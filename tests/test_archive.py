"""Safe archive extraction: every unsafe archive is refused before anything lands outside staging."""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest

from tasks.archive import ArchiveError, Member, _copy_member, extract_to_staging, inspect_archive, is_archive
from tasks.params import ArchiveParams

CAPS = ArchiveParams()
ZEROS = b"\x00" * (4 << 20)  # 4 MiB of zeros: deflates to ~4 KB, a ratio near 1000


def _zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on duplicate names, which one test wants
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def _zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


BAD = {
    "dotdot.zip": (lambda p: _zip(p, [("ok.png", b"x"), ("../evil", b"x")]), "../evil", "'..'"),
    "backslash.zip": (lambda p: _zip(p, [("..\\evil", b"x")]), "..\\evil", "'..'"),
    "absolute.zip": (lambda p: _zip(p, [(zipfile.ZipInfo("/abs/evil"), b"x")]), "/abs/evil", "absolute"),
    "zip_symlink.zip": (lambda p: _zip(p, [_zip_symlink("link", "/etc/passwd")]), "link", "link"),
    "symlink.tar.gz": (
        lambda p: _tar(p, [("a.png", b"x"), _special("escape", tarfile.SYMTYPE, "../../etc/passwd")]),
        "escape", "symlink"),
    "hardlink.tar": (
        lambda p: _tar(p, [("a.png", b"x"), _special("hard", tarfile.LNKTYPE, "a.png")], mode="w"),
        "hard", "hardlink"),
    "fifo.tar": (lambda p: _tar(p, [_special("pipe", tarfile.FIFOTYPE)], mode="w"), "pipe", "fifo"),
    "device.tar.bz2": (lambda p: _tar(p, [_special("dev/sda", tarfile.BLKTYPE)], mode="w:bz2"),
                       "dev/sda", "block device"),
    "chardev.tar.xz": (lambda p: _tar(p, [_special("tty", tarfile.CHRTYPE)], mode="w:xz"), "tty", "character"),
    "bomb.zip": (lambda p: _zip(p, [("a.png", b"x"), ("zeros.bin", ZEROS)]), "zeros.bin", "ratio"),
    "bomb.tar.gz": (lambda p: _tar(p, [("a.png", b"x"), ("zeros.bin", ZEROS)]), "zeros.bin", "overall"),
    "duplicate.zip": (lambda p: _zip(p, [("a.png", b"1"), ("a.png", b"2")]), "a.png", "duplicate"),
    "file_and_folder.tar": (lambda p: _tar(p, [("a", b"1"), ("a/b.png", b"2")], mode="w"), "a/b.png", "duplicate"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_unsafe_archive_is_refused_naming_member_and_rule(tmp_path, name):
    make, member, rule = BAD[name]
    archive = make(tmp_path / name)
    before = _tree(tmp_path)
    with pytest.raises(ArchiveError, match=rule) as err:
        inspect_archive(archive, caps=CAPS)
    assert str(archive) in str(err.value) and f"member {member!r}" in str(err.value)

    with pytest.raises(ArchiveError, match=rule):
        extract_to_staging(archive, tmp_path / "staging", caps=CAPS)
    assert _tree(tmp_path) == before  # no staging left, nothing written beside it or above it
    assert not (tmp_path.parent / "evil").exists() and not Path("/abs/evil").exists()


def test_caps_on_members_and_total_bytes(tmp_path):
    many = _zip(tmp_path / "many.zip", [(f"img{i}.png", b"x") for i in range(6)])
    with pytest.raises(ArchiveError, match="too many members.*max_members 5"):
        inspect_archive(many, caps=ArchiveParams(max_members=5))
    inspect_archive(many, caps=ArchiveParams(max_members=6))

    big = _tar(tmp_path / "big.tar", [("a.bin", b"1" * 3000), ("b.bin", b"2" * 3000)], mode="w")
    with pytest.raises(ArchiveError, match="'b.bin'.*too large"):
        inspect_archive(big, caps=ArchiveParams(max_total_bytes=5000))


def test_tiny_members_are_not_judged_by_ratio(tmp_path):
    # 100 KB of zeros compresses ~1000x, but a small file cannot be a bomb.
    ok = _zip(tmp_path / "small.zip", [("labels.csv", b"\x00" * 100_000)])
    assert [m.size for m in inspect_archive(ok, caps=CAPS)] == [100_000]


def test_good_zip_extracts_and_returns_its_single_top_folder(tmp_path):
    files = {"data/train/cat/1.png": b"png-bytes-1", "data/train/dog/2.png": b"png-bytes-2", "data/labels.csv": b"a,b\n"}
    archive = _zip(tmp_path / "good.zip", [("data/", b""), *files.items(), ("__MACOSX/data/._1.png", b"junk")])
    root = extract_to_staging(archive, tmp_path / "staging", caps=CAPS)
    assert root == tmp_path / "staging" / "data"
    for name, data in files.items():
        assert (tmp_path / "staging" / name).read_bytes() == data
    assert not (tmp_path / "staging" / "__MACOSX").exists()
    assert _tree(tmp_path / "staging") == {"data", "data/train", "data/train/cat", "data/train/dog",
                                           "data/train/cat/1.png", "data/train/dog/2.png", "data/labels.csv"}


def test_good_tar_gz_extracts_with_root_entry_and_several_top_folders(tmp_path):
    archive = _tar(tmp_path / "good.tar.gz", [
        _special("./", tarfile.DIRTYPE),
        ("./train/a.png", b"A" * 5000),
        ("./test/b.png", b"B"),
    ])
    members = inspect_archive(archive, caps=CAPS)
    assert [(m.path, m.kind, m.size) for m in members] == [("", "dir", 0), ("train/a.png", "file", 5000),
                                                           ("test/b.png", "file", 1)]
    root = extract_to_staging(archive, tmp_path / "staging", caps=CAPS)
    assert root == tmp_path / "staging"
    assert (root / "train" / "a.png").read_bytes() == b"A" * 5000
    assert (root / "test" / "b.png").read_bytes() == b"B"
    assert stat.S_IMODE(os.stat(root / "test" / "b.png").st_mode) == 0o666 & ~_umask()  # archive modes ignored


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_truncated_archive_fails_and_leaves_no_staging(tmp_path):
    whole = _tar(tmp_path / "whole.tar", [("a.bin", os.urandom(200_000)), ("b.bin", os.urandom(200_000))], mode="w")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:300_000])
    with pytest.raises(ArchiveError, match="cut.tar: member 'b.bin': unreadable archive"):
        extract_to_staging(cut, tmp_path / "staging", caps=CAPS)
    assert not (tmp_path / "staging").exists()


def test_member_with_lying_size_fails_and_leaves_no_staging(tmp_path):
    # The central directory says 50 bytes, the data holds 100: zipfile stops at 50, the CRC then fails.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a.bin", b"A" * 100)
    data = bytearray(buf.getvalue())
    struct.pack_into("<I", data, data.rfind(b"PK\x01\x02") + 24, 50)  # uncompressed size, central directory
    (tmp_path / "lie.zip").write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="member 'a.bin': unreadable archive: BadZipFile"):
        extract_to_staging(tmp_path / "lie.zip", tmp_path / "staging", caps=CAPS)
    assert not (tmp_path / "staging").exists()


def test_copy_stops_at_more_bytes_than_declared(tmp_path):
    member = Member(name="a.bin", path="a.bin", kind="file", size=3, compressed_size=None)
    with pytest.raises(ArchiveError, match="more than its declared 3 bytes"):
        _copy_member(tmp_path / "x.zip", member, io.BytesIO(b"12345"), tmp_path / "a.bin", [100])
    with pytest.raises(ArchiveError, match="too large: extracted bytes pass max_total_bytes"):
        _copy_member(tmp_path / "x.zip", member, io.BytesIO(b"123"), tmp_path / "b.bin", [2])


def test_staging_must_be_new_or_empty(tmp_path):
    archive = _zip(tmp_path / "good.zip", [("a.png", b"x")])
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "keep.txt").write_text("mine")
    with pytest.raises(ArchiveError, match="not empty"):
        extract_to_staging(archive, staging, caps=CAPS)
    assert (staging / "keep.txt").read_text() == "mine"  # someone else's folder is never removed

    empty = tmp_path / "empty"
    empty.mkdir()
    assert extract_to_staging(archive, empty, caps=CAPS) == empty
    assert (empty / "a.png").read_bytes() == b"x"


def test_is_archive(tmp_path):
    assert is_archive(_zip(tmp_path / "a.zip", [("a.png", b"x")]))
    assert is_archive(_tar(tmp_path / "a.tgz", [("a.png", b"x")]))
    assert is_archive(_tar(tmp_path / "data.bin", [("a.png", b"x")], mode="w"))  # content, any name
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    assert is_archive(tmp_path / "broken.zip")  # named like one: inspection says what is wrong
    with pytest.raises(ArchiveError, match="not a readable zip or tar"):
        inspect_archive(tmp_path / "broken.zip", caps=CAPS)
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 600)
    assert not is_archive(tmp_path / "img.png")
    assert not is_archive(tmp_path)
