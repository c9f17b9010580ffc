"""`axx-backend serve`: gunicorn (gthread workers) in-process with the Flask app.

WORKERS (default 1) processes, each with THREADS (default 8) threads. Each process loads a version
once, lazily, after the fork (no preload_app: torch state must not be shared across fork), so more
workers cost memory per version; on 2 cores one worker is the right choice (inference is serialised
per process anyway and uses both cores).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from ..core.env import environ, get_str
from ..core.logs import configure_logging
from .settings import ServerSettings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess mode (server/metrics.py)

log = logging.getLogger(__name__)


class _Gunicorn(BaseApplication):  # type: ignore[misc]  # gunicorn has no type hints
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings:  # options of newer gunicorn releases are skipped on older ones
                self.cfg.set(key, value)

    def load(self) -> Any:
        from .app import create_app  # in the worker: the master never imports torch

        return create_app()


def gunicorn_options(host: str, port: int, settings: ServerSettings) -> dict[str, Any]:
    return {
        "bind": f"{host}:{port}",
        "workers": max(1, settings.workers),
        "threads": max(1, settings.threads),
        "worker_class": "gthread",
        # gthread workers heartbeat while requests run; keep the timeout above Label Studio's 100 s anyway
        "timeout": int(max(120, settings.predict_time_budget + 60)),
        # SIGTERM: stop accepting, let a /predict in flight finish within its budget, then stop
        "graceful_timeout": int(settings.predict_time_budget + 15),
        "keepalive": 5,
        "loglevel": settings.log_level.lower(),
        "accesslog": "-",
        "errorlog": "-",
        "preload_app": False,
        "proc_name": "axx-backend",
        # gunicorn >= 25.1 opens a control socket at one fixed path per user: two servers would collide
        "control_socket_disable": True,
    }


def serve(host: str = "127.0.0.1", port: int = 9090) -> None:
    """Run the backend until interrupted (blocks)."""
    settings = ServerSettings.from_env()
    configure_logging(settings.log_level)
    made = prepare_metrics_dir(settings.workers)
    log.info(
        "axx-backend on http://%s:%d (model dir %s, %d worker(s) x %d threads, Label Studio %s)",
        host, port, settings.model_dir, settings.workers, settings.threads, settings.label_studio_url or "not set",
    )  # fmt: skip
    try:
        _Gunicorn(gunicorn_options(host, port, settings)).run()
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def prepare_metrics_dir(workers: int) -> Path | None:
    """prometheus-client's multiprocess directory, so `/metrics?format=prometheus` sums every worker's counters.

    `PROMETHEUS_MULTIPROC_DIR` when set (emptied of an earlier run's files, as prometheus-client requires),
    else with WORKERS > 1 a new temporary directory (returned, to be removed at exit). It is set here, in the
    master before the workers fork, and before anything imports prometheus_client (which reads it at import;
    the master never imports it). No gunicorn `child_exit` hook: it only matters for live gauges, and the
    shared metrics are counters and a histogram, whose files stay so that totals survive a worker restart.
    """
    given = get_str(environ(), MULTIPROC_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        return None
    if workers <= 1:
        return None
    made = Path(tempfile.mkdtemp(prefix="axx-prometheus-"))
    os.environ[MULTIPROC_ENV] = str(made)
    return made
