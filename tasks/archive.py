"""Safe extraction of zip and tar (.tar, .tar.gz/.tgz, .tar.bz2/.tbz2, .tar.xz/.txz) sources.

Used by the ingest stage when `ingest.source.path` is an archive; caps come from
`ingest.archive` (ArchiveParams: max_members, max_total_bytes, max_ratio).

Inputs:  one archive file.
Outputs: a fresh staging folder holding its regular files and folders, nothing else.

The member list is checked BEFORE anything is written (`inspect_archive`); any rule broken
raises ArchiveError naming the archive, the member and the rule:

    rule                 rejected
    -------------------  ---------------------------------------------------------------------
    unsafe path          absolute names (/x, \\x, C:x), `..` components (with / or \\ as the
                         separator), empty names, NUL bytes
    link                 symlinks and hardlinks, whatever they point at (zip: unix mode S_IFLNK)
    special member       character/block devices, fifos, sockets, sparse or unknown tar types
    duplicate            two members with the same path, or a file that is also a folder
    too many members     more than max_members
    too large            declared uncompressed total over max_total_bytes
    ratio                uncompressed / compressed over max_ratio: per member from a zip's central
                         directory, and overall (declared total / archive file size) for every
                         archive; only sizes above RATIO_FLOOR_BYTES are judged, as a tiny file
                         of zeros is harmless at any ratio
    unsupported          encrypted zip members, compression methods zipfile cannot read

Extraction writes each member itself (no extractall): a new file opened with O_EXCL and
O_NOFOLLOW under the staging folder, filled from the member's stream with a byte budget that
stops as soon as a member yields more than it declared (and fails if it yields less). Tar
archives are read front to back (`r:*`; tarfile's `r|*` stream mode is quadratic on highly
compressible headers), once to inspect and once to extract, each member compared with what
was inspected. On any failure the staging folder is removed. Permissions, owners
and times from the archive are not applied. `__MACOSX/` resource-fork folders are skipped.
"""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from tasks.params import ArchiveParams

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
RATIO_FLOOR_BYTES = 1 << 20   # sizes at or below 1 MiB are not judged by ratio
SKIPPED_TOP_FOLDERS = ("__MACOSX",)
_COPY_BLOCK = 1 << 20
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
# What zipfile, tarfile and their decompressors raise on corrupt bytes, besides OSError: a truncated
# gzip stream (EOFError), a bad deflate or xz block, a member name flagged UTF-8 that is not, a
# "zip file version 12.7" in a forged header (NotImplementedError).
_CORRUPT = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, UnicodeDecodeError,
            NotImplementedError)


class ArchiveError(ValueError):
    """An archive breaks a safety rule or cannot be read; the message names archive, member and rule."""


@dataclass(frozen=True)
class Member:
    name: str                      # as stored in the archive
    path: str                      # normalized relative POSIX path it extracts to
    kind: Literal["file", "dir"]
    size: int                      # declared uncompressed bytes (0 for folders)
    compressed_size: int | None    # zip: from the central directory; tar: None (the stream is compressed)


def _error(archive: Path, member: str | None, rule: str) -> ArchiveError:
    where = f"member {member!r}: " if member is not None else ""
    return ArchiveError(f"{archive}: {where}{rule}")


def _kind(path: Path) -> Literal["zip", "tar"] | None:
    try:
        if zipfile.is_zipfile(path):
            return "zip"
        if tarfile.is_tarfile(path):
            return "tar"
    except (*_CORRUPT, OSError):
        return None
    return None


def is_archive(path: Path | str) -> bool:
    """True for a file with an archive suffix (.zip, .tar, .tar.gz ...) or with zip/tar content.

    A file named like an archive counts even when broken, so the caller's next step
    (inspect_archive) reports what is wrong with it instead of "not a folder".
    """
    path = Path(path)
    if not path.is_file():
        return False
    return path.name.lower().endswith(ARCHIVE_SUFFIXES) or _kind(path) is not None


def _safe_path(archive: Path, name: str) -> str:
    """The normalized relative path of a member name, or ArchiveError for an unsafe one."""
    if not name or "\x00" in name:
        raise _error(archive, name, "unsafe path: empty or contains NUL")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) >= 2 and unified[1] == ":"):
        raise _error(archive, name, "unsafe path: absolute")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _error(archive, name, "unsafe path: '..' component")
    return "/".join(parts)  # "" for the root itself ("./"), which only a folder may name


def _check_ratio(archive: Path, member: str, size: int, compressed: int, caps: ArchiveParams, *, scope: str) -> None:
    if size > RATIO_FLOOR_BYTES and size > caps.max_ratio * max(compressed, 1):
        raise _error(
            archive, member,
            f"ratio: {scope} compression ratio {size / max(compressed, 1):,.0f} > max_ratio {caps.max_ratio:g} "
            f"({size:,} bytes from {compressed:,}: a decompression bomb?)",
        )


class _Tally:
    """Running checks shared by zip and tar: count, total, duplicates, file/folder conflicts."""

    def __init__(self, archive: Path, caps: ArchiveParams):
        self.archive, self.caps = archive, caps
        self.archive_bytes = archive.stat().st_size
        self.members: list[Member] = []
        self.kinds: dict[str, str] = {}
        self.total = 0

    def add(self, member: Member) -> None:
        a, caps = self.archive, self.caps
        if len(self.members) + 1 > caps.max_members:
            raise _error(a, member.name, f"too many members: more than max_members {caps.max_members:,}")
        self.total += member.size
        if self.total > caps.max_total_bytes:
            raise _error(a, member.name, f"too large: uncompressed total passes max_total_bytes "
                                          f"{caps.max_total_bytes:,} at this member")
        # Judged as the total grows, so a tar stream is not decompressed far past the point of no return.
        _check_ratio(a, member.name, self.total, self.archive_bytes, caps, scope="overall (total / archive size)")
        if member.path == "":
            if member.kind != "dir":
                raise _error(a, member.name, "unsafe path: names no file")
            self.members.append(member)  # the root folder entry ("./"): nothing to create
            return
        previous = self.kinds.get(member.path)
        if previous == "file":
            raise _error(a, member.name, f"duplicate: {member.path} appears twice")
        if previous == "dir" and member.kind == "file":
            raise _error(a, member.name, f"duplicate: {member.path} is a folder and a file")
        for parent in list(PurePosixPath(member.path).parents)[:-1]:
            if self.kinds.get(str(parent)) == "file":
                raise _error(a, member.name, f"duplicate: {parent} is a file and a folder")
            self.kinds.setdefault(str(parent), "dir")
        self.kinds[member.path] = member.kind
        self.members.append(member)


def _zip_member(archive: Path, info: zipfile.ZipInfo, caps: ArchiveParams) -> Member:
    name = info.filename
    path = _safe_path(archive, name)
    mode = info.external_attr >> 16 if info.create_system == 3 else 0  # unix mode, when written on unix
    if stat.S_ISLNK(mode):
        raise _error(archive, name, "link: symlinks are not extracted")
    if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _error(archive, name, f"special member: unix type {stat.S_IFMT(mode):o} (device, fifo or socket)")
    if info.flag_bits & 0x1:
        raise _error(archive, name, "unsupported: encrypted member")
    if info.compress_type not in _ZIP_METHODS:
        raise _error(archive, name, f"unsupported: compression method {info.compress_type}")
    if info.is_dir() or stat.S_ISDIR(mode):
        return Member(name, path, "dir", 0, info.compress_size)
    _check_ratio(archive, name, info.file_size, info.compress_size, caps, scope="member")
    return Member(name, path, "file", info.file_size, info.compress_size)


def _tar_member(archive: Path, ti: tarfile.TarInfo) -> Member:
    name = ti.name
    path = _safe_path(archive, name)
    if ti.issym() or ti.islnk():
        raise _error(archive, name, f"link: {'symlink' if ti.issym() else 'hardlink'} to {ti.linkname!r}")
    if ti.isdir():
        return Member(name, path, "dir", 0, None)
    if not ti.isreg() or ti.issparse():
        kind = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
                tarfile.FIFOTYPE: "fifo"}.get(ti.type, f"tar type {ti.type!r}")
        raise _error(archive, name, f"special member: {kind}")
    return Member(name, path, "file", ti.size, None)


def _skipped(path: str) -> bool:
    """Members not extracted: the root entry itself and macOS resource-fork folders."""
    return path == "" or path.split("/", 1)[0] in SKIPPED_TOP_FOLDERS


def inspect_archive(path: Path | str, *, caps: ArchiveParams) -> list[Member]:
    """Check an archive's member list against the rules and caps; nothing is written.

    Args: path, a zip or tar file; caps, the `ingest.archive` limits.
    Returns the members in archive order. Raises ArchiveError naming member and rule.
    """
    archive = Path(path)
    kind = _kind(archive) if archive.is_file() else None
    if kind is None:
        raise _error(archive, None, f"not a readable zip or tar archive (suffixes: {', '.join(ARCHIVE_SUFFIXES)})")
    tally = _Tally(archive, caps)
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                if len(infos) > caps.max_members:
                    raise _error(archive, infos[caps.max_members].filename,
                                 f"too many members: {len(infos):,} > max_members {caps.max_members:,}")
                for info in infos:
                    tally.add(_zip_member(archive, info, caps))
        else:
            with tarfile.open(archive, "r:*") as tf:
                while (ti := tf.next()) is not None:
                    tf.members.clear()  # read in order, no index needed; a million TarInfos would cost ~1 GB
                    tally.add(_tar_member(archive, ti))
    except (*_CORRUPT, OSError) as e:
        last = tally.members[-1].name if tally.members else None  # the stream broke in or after it
        raise _error(archive, last, f"unreadable archive: {type(e).__name__}: {e}") from None
    return tally.members


def _copy_member(archive: Path, member: Member, src, dest: Path, budget: list[int]) -> None:
    """Write one member to a new file, stopping at more bytes than declared or than the total budget."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(dest, flags, 0o666)
    written = 0
    with os.fdopen(fd, "wb") as out:
        while True:
            block = src.read(min(_COPY_BLOCK, member.size - written + 1))
            if not block:
                break
            written += len(block)
            if written > member.size:
                raise _error(archive, member.name, f"yields more than its declared {member.size:,} bytes")
            budget[0] -= len(block)
            if budget[0] < 0:
                raise _error(archive, member.name, "too large: extracted bytes pass max_total_bytes")
            out.write(block)
    if written != member.size:
        raise _error(archive, member.name, f"yields {written:,} bytes, declared {member.size:,} (truncated)")


class _Staging:
    """Writes members under one fresh root: folders made once, every path checked without syscalls."""

    def __init__(self, archive: Path, root: Path, caps: ArchiveParams):
        self.archive, self.root = archive, root
        self.prefix = str(root) + os.sep
        self.made: set[str] = {str(root)}
        self.budget = [caps.max_total_bytes]

    def _folder(self, path: str) -> None:
        if path not in self.made:
            os.makedirs(path, exist_ok=True)
            self.made.add(path)

    def put(self, member: Member, open_stream) -> None:
        dest = os.path.normpath(os.path.join(self.root, member.path))
        # Belt and braces: _safe_path already refused escapes, and nothing created here is a link.
        if not dest.startswith(self.prefix):
            raise _error(self.archive, member.name, "unsafe path: resolves outside the staging folder")
        if member.kind == "dir":
            self._folder(dest)
            return
        self._folder(os.path.dirname(dest))
        with open_stream() as src:
            _copy_member(self.archive, member, src, Path(dest), self.budget)


def extract_to_staging(path: Path | str, staging_dir: Path | str, *, caps: ArchiveParams) -> Path:
    """Inspect an archive, then extract it into `staging_dir` (created here; must be new or empty).

    Args: path, the archive; staging_dir, a folder that does not exist or is empty; caps,
    the `ingest.archive` limits.
    Returns the root of the extracted tree: the single top-level folder when the archive has
    exactly one (ignoring __MACOSX/), else staging_dir.
    Raises ArchiveError (nothing left behind: staging_dir is removed) for any broken rule.
    """
    archive = Path(path)
    staging = Path(staging_dir)
    if staging.exists() and (not staging.is_dir() or any(staging.iterdir())):
        raise ArchiveError(f"{archive}: staging folder {staging} exists and is not empty; extraction needs a new one")
    members = inspect_archive(archive, caps=caps)
    staging.mkdir(parents=True, exist_ok=True)
    out = _Staging(archive, staging.resolve(), caps)
    current: str | None = None  # the member being written, for the error message
    try:
        if _kind(archive) == "zip":
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                if [i.filename for i in infos] != [m.name for m in members]:
                    raise _error(archive, None, "changed between inspection and extraction")
                for info, member in zip(infos, members):
                    current = member.name
                    if not _skipped(member.path):
                        out.put(member, lambda info=info: zf.open(info))
        else:
            with tarfile.open(archive, "r:*") as tf:
                expected = iter(members)
                while (ti := tf.next()) is not None:
                    tf.members.clear()
                    current = ti.name
                    member = next(expected, None)
                    if member is None or _tar_member(archive, ti) != member:
                        raise _error(archive, ti.name, "changed between inspection and extraction")
                    if not _skipped(member.path):
                        out.put(member, lambda ti=ti: tf.extractfile(ti))  # a regular member: never None
                if next(expected, None) is not None:
                    raise _error(archive, None, "changed between inspection and extraction (fewer members)")
    except _CORRUPT as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise _error(archive, current, f"unreadable archive: {type(e).__name__}: {e}") from None
    except OSError as e:  # a corrupt gzip stream, a full disk, a name clash on a case-insensitive disk
        shutil.rmtree(staging, ignore_errors=True)
        raise _error(archive, current, f"extraction failed: {type(e).__name__}: {e}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    tops = {m.path.split("/", 1)[0] for m in members if not _skipped(m.path)}
    if len(tops) == 1:
        top = staging / tops.pop()
        if top.is_dir():
            return top
    return staging
