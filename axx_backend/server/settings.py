"""The server's own settings, from the environment (the method's numbers stay in axx_backend.core.settings).

Names follow label-studio-ml 2.x where it has one (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, MODEL_DIR,
BASIC_AUTH_USER, BASIC_AUTH_PASS, LOG_LEVEL, WORKERS, THREADS); the rest are AXX_*.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..core.settings import Settings
from ..labelstudio.config import ConfigOptions
from ..labelstudio.images import FetchLimits

TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ServerSettings:
    model_dir: str = "models"
    label_studio_url: str | None = None
    api_key: str | None = None
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    log_level: str = "INFO"
    workers: int = 1
    threads: int = 8
    allowed_hosts: tuple[str, ...] = ()  # AXX_ALLOWED_HOSTS; empty = the Label Studio host only
    limits: FetchLimits = field(default_factory=FetchLimits)
    fetch_workers: int = 4  # AXX_FETCH_WORKERS: parallel image downloads per /predict
    predict_time_budget: float = 80.0  # AXX_PREDICT_TIME_BUDGET: seconds; LS gives up after 100 s
    sync_model_version: bool = True  # AXX_SYNC_MODEL_VERSION: PATCH project.model_version after /predict
    preload: bool = True  # AXX_PRELOAD: start loading the serving version in the background on /setup
    max_loaded_versions: int = 2  # AXX_MAX_LOADED_VERSIONS: versions kept in memory per process
    config: ConfigOptions = field(default_factory=ConfigOptions)
    redis_url: str | None = None  # REDIS_URL: training jobs on RQ; unset = in-process thread
    train_every: int = 10  # AXX_TRAIN_EVERY: train after every N annotations created/updated (0: only on request)
    label_field: str | None = None  # AXX_LABEL_FIELD: task data field with image-level labels, used for training

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        if self.basic_auth_user and self.basic_auth_pass:
            return self.basic_auth_user, self.basic_auth_pass
        return None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, method: Settings | None = None) -> ServerSettings:
        env = os.environ if environ is None else environ
        method = method or Settings.from_env(dict(env))

        def get(name: str) -> str | None:
            value = env.get(name)
            return value if value not in (None, "") else None

        def number(name: str, default: float, kind: type = float) -> float:
            raw = get(name)
            if raw is None:
                return default
            try:
                return kind(raw)
            except ValueError as exc:
                raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from exc

        def flag(name: str, default: bool) -> bool:
            raw = get(name)
            return default if raw is None else raw.strip().lower() in TRUE

        limits = FetchLimits(
            max_bytes=int(number("AXX_IMAGE_MAX_BYTES", FetchLimits.max_bytes, int)),
            max_pixels=method.image_max_pixels,  # AXX_IMAGE_MAX_PIXELS, shared with the CLI
            read_timeout=number("AXX_IMAGE_TIMEOUT", FetchLimits.read_timeout),
        )
        config = ConfigOptions(
            choices_control=get("AXX_CHOICES_CONTROL"),
            brush_control=get("AXX_BRUSH_CONTROL"),
            brush_map=ConfigOptions.parse_brush_map(get("AXX_BRUSH_LABELS")),
            review_choice=env.get("AXX_REVIEW_CHOICE"),
            notes_control=env.get("AXX_NOTES_TEXTAREA"),
            is_negative=method.is_negative,
        )
        hosts = tuple(h.strip() for h in (get("AXX_ALLOWED_HOSTS") or "").split(",") if h.strip())
        return cls(
            model_dir=get("MODEL_DIR") or method.model_dir,
            label_studio_url=get("LABEL_STUDIO_URL") or get("LABEL_STUDIO_HOST"),
            api_key=get("LABEL_STUDIO_API_KEY"),
            basic_auth_user=get("BASIC_AUTH_USER"),
            basic_auth_pass=get("BASIC_AUTH_PASS"),
            log_level=(get("LOG_LEVEL") or "INFO").upper(),
            workers=int(number("WORKERS", 1, int)),
            threads=int(number("THREADS", 8, int)),
            allowed_hosts=hosts,
            limits=limits,
            fetch_workers=max(1, int(number("AXX_FETCH_WORKERS", 4, int))),
            predict_time_budget=number("AXX_PREDICT_TIME_BUDGET", 80.0),
            sync_model_version=flag("AXX_SYNC_MODEL_VERSION", True),
            preload=flag("AXX_PRELOAD", True),
            max_loaded_versions=max(1, int(number("AXX_MAX_LOADED_VERSIONS", 2, int))),
            config=config,
            redis_url=get("REDIS_URL"),
            train_every=max(0, int(number("AXX_TRAIN_EVERY", 10, int))),
            label_field=get("AXX_LABEL_FIELD"),
        )
