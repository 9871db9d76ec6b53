"""Process environment for everything PixelOps starts: telemetry off, project-local state.

Called first by every entry point (stage `main()`s, flows, the CLI, tests). Values already
set by the user win (`setdefault`), so a deployment can point at its own servers.
"""

from __future__ import annotations

import os
from pathlib import Path

TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "FIFTYONE_DO_NOT_TRACK": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
}


def configure_environment(root: Path | str | None = None) -> None:
    """Set telemetry-off and project-local state directories unless already set."""
    root = Path(root or os.getcwd()).resolve()
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    defaults = {
        "PREFECT_HOME": str(root / ".prefect"),
        # A loaded 2-core machine can exceed Prefect's 20 s default for the ephemeral server.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        # `prefect worker start --with-healthcheck` would otherwise listen on 0.0.0.0.
        "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
        "TORCH_HOME": str(root / ".torch"),
        "FIFTYONE_DATABASE_DIR": str(root / ".fiftyone" / "db"),
        "FIFTYONE_DATABASE_VALIDATION": "false",
        "FIFTYONE_DEFAULT_DATASET_DIR": str(root / ".fiftyone" / "datasets"),
        "FIFTYONE_SHOW_PROGRESS_BARS": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
