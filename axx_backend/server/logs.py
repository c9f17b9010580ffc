"""Logging for the server process (gunicorn logs its own lines; ours go to stderr beside them)."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str) -> None:
    pkg = logging.getLogger("axx_backend")
    if not pkg.handlers and not logging.getLogger().handlers:  # the CLI may have configured the root already
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"))
        pkg.addHandler(handler)
    pkg.setLevel(level)
