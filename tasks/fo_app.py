"""The FiftyOne App for one dataset, served in-process on loopback, with its media route fenced.

FiftyOne's server answers `/media?filepath=<any path>` with any regular file the process can
read (/etc/passwd, ~/.ssh/...). Here the same Starlette app that `fiftyone/server/main.py`
serves runs under hypercorn behind `MediaGuard`, which answers 404 unless the requested
file's real path lies inside a folder holding the dataset's own media.

Inputs: a persistent FiftyOne dataset (stage curate) and params `curate.app_port`,
`curate.database`. Output: one stdout line with the URL once listening; runs until SIGINT/SIGTERM.

    python -m tasks.fo_app --dataset NAME [--port 5151]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import socket
import sys
from urllib.parse import quote, urlencode

from tasks import fo_service
from tasks.params import DatabaseParams

LOOPBACK = "127.0.0.1"
MEDIA_ROUTE = "/media"


class AppError(RuntimeError):
    """The App cannot be served as asked (unknown dataset, address, busy port)."""


def is_allowed(filepath: str, roots: frozenset[str]) -> str | None:
    """The real path of `filepath` if it lies inside (at any depth) one of `roots`, else None.

    `roots` are real directory paths. realpath removes `..` and follows every symlink, so a
    link inside a root that points outside it is judged by where it points.
    """
    try:
        real = os.path.realpath(filepath)
    except (ValueError, OSError):  # embedded NUL byte, symlink loop
        return None
    parent, child = os.path.dirname(real), real
    while parent != child:  # walk up to "/": one set lookup per level
        if parent in roots:
            return real
        parent, child = os.path.dirname(parent), parent
    return None


def media_roots(dataset) -> frozenset[str]:
    """Real directories holding every media file the App requests for `dataset`.

    Why parent folders, not their common root or the exact files: a common root of folders
    far apart collapses to / or $HOME and reopens the hole; exact files would refuse
    sidecars the App also loads (a .fo3d scene's assets beside it). "/" itself is never a
    root. The fields are those the App server builds /media URLs from
    (fiftyone.server.metadata): app_config.media_fields (filepath, thumbnails) plus label
    masks, heatmaps and projections (a private helper, used so that the guard and the URLs
    it checks agree; fiftyone is pinned). Computed once at start, so editing a sample's
    filepath in the App cannot widen it; restart the App after adding media in new folders.
    """
    from fiftyone.server.metadata import _get_additional_media_fields

    opm_field, detections_fields, extra = _get_additional_media_fields(dataset)
    fields = [*dataset.app_config.media_fields, *extra,
              *(f"{f}.detections.mask_path" for f in detections_fields or []),
              *([f"{opm_field}.filepath"] if opm_field else [])]
    roots: set[str] = set()
    for field in dict.fromkeys(fields):
        paths = [p for p in dataset.distinct(field) if isinstance(p, str) and "://" not in p]
        roots.update(os.path.realpath(d) for d in {os.path.dirname(p) for p in paths})
        # A sample file that is itself a link (a DVC cache link) is served from its target.
        roots.update(os.path.dirname(os.path.realpath(p)) for p in paths if os.path.islink(p))
    roots.discard(os.path.sep)
    return frozenset(roots)


class MediaGuard:
    """ASGI middleware: `/media` only for files inside `roots`; everything else passes through."""

    def __init__(self, app, roots: frozenset[str], hosts: frozenset[str] | None = None):
        self.app, self.roots, self.hosts = app, roots, hosts

    def _foreign(self, scope) -> bool:
        """A request another site's page made: the wrong Host (DNS rebinding) or, for a
        non-GET, a cross-site Origin (FiftyOne runs operators, e.g. list_files, on POST)."""
        if self.hosts is None or scope["type"] not in ("http", "websocket"):
            return False
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if headers.get("host", "") not in self.hosts:
            return True
        origin = headers.get("origin")
        unsafe = scope["type"] == "websocket" or scope.get("method", "GET") not in ("GET", "HEAD", "OPTIONS")
        return bool(origin) and unsafe and origin.split("://", 1)[-1] not in self.hosts

    async def __call__(self, scope, receive, send):
        if self._foreign(scope):
            from starlette.responses import PlainTextResponse

            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await PlainTextResponse("Forbidden", status_code=403)(scope, receive, send)
            return
        # Starlette routes only an exact "/media" to the Media endpoint; the suffix test
        # also covers a root_path prefix and a trailing slash.
        if scope["type"] == "http" and scope["path"].rstrip("/").endswith(MEDIA_ROUTE):
            from starlette.datastructures import QueryParams
            from starlette.responses import PlainTextResponse

            # Parsed as the endpoint parses it; every repeated `filepath` is checked (an empty one
            # passes: the endpoint answers 400).
            items = QueryParams(scope.get("query_string", b"")).multi_items()
            checked = [(k, is_allowed(v, self.roots) if k == "filepath" and v else v) for k, v in items]
            if any(v is None for _, v in checked):
                await PlainTextResponse("Not found", status_code=404)(scope, receive, send)
                return
            # Hand the endpoint the resolved path, so it opens the very file that was checked.
            scope = dict(scope, query_string=urlencode(checked).encode())
        await self.app(scope, receive, send)


def _announce(app, line: str):
    """Print `line` once the app has started (hypercorn runs startup before accepting)."""
    async def wrapped(scope, receive, send):
        async def send_and_announce(message):
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                print(line, flush=True)
        await app(scope, receive, send_and_announce if scope["type"] == "lifespan" else send)
    return wrapped


def _check_address(address: str, allow_remote: bool) -> str:
    address = LOOPBACK if address == "localhost" else address
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise AppError(f"address {address!r} is not an IP address (use {LOOPBACK})") from None
    if not ip.is_loopback and not allow_remote:
        raise AppError(f"address {address} is not loopback; the App exposes your datasets and can "
                       f"edit them, so serve it on {LOOPBACK} or pass allow_remote=True (--allow-remote)")
    return address


def _listen(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
    except OSError as e:
        sock.close()
        raise AppError(f"cannot listen on {address}:{port}: {e.strerror}; pick another --port") from e
    sock.listen(128)
    return sock


def serve_app(dataset_name: str, *, database: DatabaseParams, port: int, address: str = LOOPBACK,
              allow_remote: bool = False) -> None:
    """Serve the FiftyOne App for `dataset_name` on address:port until SIGINT/SIGTERM.

    Raises fo_service.DatabaseUnavailable when the database is down, AppError when the
    dataset does not exist, the address is not loopback (without allow_remote) or the port is busy.
    """
    address = _check_address(address, allow_remote)
    # As fiftyone/server/main.py does, before fiftyone is imported: the server then keeps no
    # dataset singleton cache (it sees a curate re-sync from another process) and does not
    # bump last_loaded_at on every request.
    os.environ["FIFTYONE_SERVER"] = "1"
    fo = fo_service.connect(database)
    fo.config.singleton_cache = False  # in case fiftyone was imported earlier in this process
    for logger in (logging.getLogger("fiftyone"), logging.getLogger("eta")):
        for handler in logger.handlers:  # FiftyOne logs to stdout; keep it for the URL line
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                handler.setStream(sys.stderr)
    if dataset_name not in fo.list_datasets():
        raise AppError(f"no FiftyOne dataset {dataset_name!r}; existing: {fo.list_datasets()} "
                       "(stage curate creates pixelops-<version>)")
    roots = media_roots(fo.load_dataset(dataset_name))

    from fiftyone.server.app import app
    from fiftyone.server.events import set_port

    # FiftyOne builds its Starlette app with debug=True: any unhandled error (e.g. /plugins/x
    # when the plugins folder is missing) answers 500 with the full traceback and local paths.
    app.debug = False
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    # Bound here, not by hypercorn, so a busy port fails with a clear error and port 0 works.
    sock = _listen(address, port)
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) the socket from here
    set_port(port)
    host = f"[{address}]" if ":" in address else address
    line = f"FiftyOne App for {dataset_name}: http://{host}:{port}/datasets/{quote(dataset_name, safe='')}"
    # With no shutdown_trigger, hypercorn stops gracefully on SIGINT/SIGTERM.
    # With --allow-remote the Host check is off: the user chose to be reachable by other names.
    hosts = None if allow_remote else frozenset({f"{host}:{port}", f"localhost:{port}"})
    asyncio.run(serve(_announce(MediaGuard(app, roots, hosts), line), config))


def main(argv: list[str] | None = None) -> int:
    from tasks.env import configure_environment
    from tasks.params import ParamsError, load_params

    configure_environment()
    parser = argparse.ArgumentParser(prog="python -m tasks.fo_app",
                                     description="Serve the FiftyOne App for one dataset on loopback.")
    parser.add_argument("--dataset", required=True, help="FiftyOne dataset name, e.g. pixelops-<version>")
    parser.add_argument("--port", type=int, default=None, help="default: params curate.app_port")
    parser.add_argument("--address", default=LOOPBACK)
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --address")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        params = load_params()
        serve_app(args.dataset, database=params.curate.database,
                  port=params.curate.app_port if args.port is None else args.port,
                  address=args.address, allow_remote=args.allow_remote)
    except (AppError, fo_service.DatabaseUnavailable, ParamsError) as e:
        print(f"app: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
