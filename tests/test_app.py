"""tasks.fo_app: the FiftyOne App on loopback, serving only the dataset's own media.

One real server (`python -m tasks.fo_app` as a subprocess) on a small persistent dataset of
PNGs written here, against the session's test database (FIFTYONE_DATABASE_URI, conftest).
"""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from tasks import fo_app

ROOT = Path(__file__).resolve().parents[1]
URL_LINE = re.compile(r"^FiftyOne App for (\S+): (http://127\.0\.0\.1:(\d+))/datasets/(\S+)$")


def test_is_allowed_inside_outside_dotdot_and_symlinks(tmp_path):
    media = tmp_path / "media"
    (media / "sub").mkdir(parents=True)
    (media / "a.png").write_bytes(b"a")
    (media / "sub" / "b.png").write_bytes(b"b")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (media / "leak.png").symlink_to(secret)                  # inside by name, outside in fact
    (tmp_path / "alias").symlink_to(media)                   # outside by name, inside in fact
    roots = frozenset({os.path.realpath(media)})

    assert fo_app.is_allowed(str(media / "a.png"), roots) == os.path.realpath(media / "a.png")
    assert fo_app.is_allowed(str(media / "sub" / "b.png"), roots)   # below a root
    assert fo_app.is_allowed(str(tmp_path / "alias" / "a.png"), roots) == os.path.realpath(media / "a.png")
    assert fo_app.is_allowed(str(media / ".." / "secret.txt"), roots) is None
    assert fo_app.is_allowed(f"{media}/sub/../../../../../../etc/passwd", roots) is None
    assert fo_app.is_allowed(str(media / "leak.png"), roots) is None
    assert fo_app.is_allowed(str(secret), roots) is None
    assert fo_app.is_allowed("/etc/passwd", roots) is None
    assert fo_app.is_allowed(str(media), roots) is None                # the root itself is no file in it
    assert fo_app.is_allowed(str(tmp_path / "media-other" / "x.png"), roots) is None  # prefix, not parent
    assert fo_app.is_allowed("a\x00b", roots) is None


def test_serve_app_refuses_non_loopback_before_touching_the_database():
    from tasks.params import DatabaseParams

    with pytest.raises(fo_app.AppError, match="allow_remote"):
        fo_app.serve_app("any", database=DatabaseParams(port=1024), port=5151, address="0.0.0.0")


def test_unknown_dataset_names_it_and_the_existing_ones(small_dataset):
    done = subprocess.run([sys.executable, "-m", "tasks.fo_app", "--dataset", "no-such-dataset", "--port", "0"],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert "no FiftyOne dataset 'no-such-dataset'" in done.stderr and small_dataset[0] in done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("content-type", "")


def _status(request: urllib.request.Request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _media(base: str, path: str) -> str:
    return f"{base}/media?{urllib.parse.urlencode({'filepath': path})}"


@pytest.fixture
def small_dataset(tmp_path):
    """A persistent dataset of 4 PNGs under tmp_path/dataset/images, and a file outside it."""
    from PIL import Image

    from tasks.params import DatabaseParams

    fo = fo_app.fo_service.connect(DatabaseParams())  # the test DB: FIFTYONE_DATABASE_URI is set
    paths = []
    for i, label in enumerate(["shirt", "shirt", "bag", "bag"]):
        path = tmp_path / "dataset" / "images" / label / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (28, 28), color=40 * i).save(path)
        paths.append(path)
    name = f"pixelops-apptest-{uuid.uuid4().hex[:8]}"
    dataset = fo.Dataset(name, persistent=True)
    dataset.add_samples([fo.Sample(filepath=str(p), ground_truth=fo.Classification(label=p.parent.name))
                         for p in paths])
    outside = tmp_path / "outside.txt"
    outside.write_text("not dataset media")
    (paths[0].parent / "link.png").symlink_to(outside)      # a link planted in a media folder
    try:
        yield name, paths, outside
    finally:
        dataset.delete()


def first_line(proc: subprocess.Popen, lines: queue.Queue, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return lines.get(timeout=0.5).rstrip("\n")
        except queue.Empty:
            if proc.poll() is not None:
                break
    raise AssertionError(f"no line on stdout within {timeout_s} s (exit code {proc.poll()})")


@contextmanager
def _app_process(name: str, port: int, log: Path):
    """`python -m tasks.fo_app` for `name`, stopped with SIGTERM (hypercorn's graceful path) on exit."""
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "tasks.fo_app", "--dataset", name, "--port", str(port)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise


def test_app_serves_dataset_media_only_on_loopback(small_dataset, tmp_path):
    name, paths, outside = small_dataset
    port, log = _free_port(), tmp_path / "app.stderr"
    with _app_process(name, port, log) as proc:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
        try:
            line = first_line(proc, lines, timeout_s=90)
        except AssertionError as e:
            raise AssertionError(f"{e}; stderr: {log.read_text()[-2000:]}") from None
        found = URL_LINE.match(line)  # the URL is the first line: FiftyOne's own logs go to stderr
        assert found, line
        assert found.group(1) == name and found.group(4) == name and int(found.group(3)) == port
        base = found.group(2)

        status, body, ctype = _get(base + "/")
        assert status == 200 and "text/html" in ctype and b"<html" in body.lower()

        status, body, _ = _get(_media(base, str(paths[1])))
        assert status == 200 and body == paths[1].read_bytes()

        images = paths[0].parent.parent
        for path in ["/etc/passwd", f"{images}/../../../../../../../../etc/passwd", str(outside),
                     f"{images}/shirt/../../../outside.txt", str(paths[0].parent / "link.png")]:
            status, body, _ = _get(_media(base, path))
            assert status == 404, path
            assert b"root:" not in body and b"not dataset media" not in body
        # A repeated filepath cannot smuggle a second, unchecked path past the guard.
        status, body, _ = _get(f"{base}/media?filepath={paths[1]}&filepath=/etc/passwd")
        assert status == 404 and b"root:" not in body

        # Errors answer without a traceback (FiftyOne's app runs with debug=True by default).
        status, body, _ = _get(base + "/plugins/nothing/here.js")
        assert status >= 400 and b"Traceback" not in body and b"site-packages" not in body

        # Another site's page: a rebound Host name, or a cross-site POST to FiftyOne's operators.
        rebound = urllib.request.Request(_media(base, str(paths[1])), headers={"Host": f"evil.example:{port}"})
        assert _status(rebound) == 403
        operator = urllib.request.Request(base + "/operators/execute", data=b"{}", method="POST",
                                          headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
        assert _status(operator) == 403

        # Bound to 127.0.0.1 only: another loopback address on the same port is refused.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.2", port), timeout=2).close()
        import psutil

        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
    assert proc.returncode == 0, log.read_text()[-2000:]
