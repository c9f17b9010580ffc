"""WSGI entry point: `gunicorn axx_backend.server.wsgi:app` (what `axx-backend serve` runs in-process)."""

from __future__ import annotations

from ..core.logs import configure_logging
from .app import create_app
from .settings import ServerSettings

configure_logging(ServerSettings.from_env().log_level)
app = create_app()
