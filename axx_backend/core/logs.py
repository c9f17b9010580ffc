"""Logging for every command: text lines by default, one JSON object per line with `LOG_FORMAT=json`.

JSON lines carry the fields a log pipeline filters on: time, level, logger, process, message, and when the
record has them, `task_id`, `project`, `model_version`, `job` and `chunk` (passed as `extra=`). Gunicorn's
access log stays its own.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from .env import environ, get_str

FIELDS = ("task_id", "project", "model_version", "job", "chunk")
TEXT_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str | None = None, fmt: str | None = None) -> None:
    """One handler on stderr for the root logger (`LOG_LEVEL`, `LOG_FORMAT` = text | json)."""
    level = (level or get_str(environ(), "LOG_LEVEL", "INFO") or "INFO").upper()
    fmt = (fmt or get_str(environ(), "LOG_FORMAT", "text") or "text").lower()
    if fmt not in ("text", "json"):
        raise ValueError(f"LOG_FORMAT={fmt!r}: use text or json")
    root = logging.getLogger()
    if not getattr(root, "_axx_configured", False):
        handler = logging.StreamHandler(sys.stderr)
        root.addHandler(handler)
        root._axx_configured = True  # type: ignore[attr-defined]  # once per process
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.setLevel(level)
    logging.getLogger("axx_backend").setLevel(level)
