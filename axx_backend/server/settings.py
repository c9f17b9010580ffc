"""The server's own settings, from the environment (the method's numbers stay in axx_backend.core.settings).

Names follow label-studio-ml 2.x where it has one (MODEL_DIR, BASIC_AUTH_USER, BASIC_AUTH_PASS, LOG_LEVEL,
WORKERS, THREADS); the rest are AXX_*. Everything about Label Studio itself (URL, API key, image fetching,
how to read a labeling config) is one `LabelStudioSettings`, shared with `preannotate` and the training job.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.env import Environ, environ, get_bool, get_float, get_int, get_str
from ..core.settings import Settings
from ..labelstudio.config import ConfigOptions
from ..labelstudio.images import FetchLimits
from ..labelstudio.settings import LabelStudioSettings


@dataclass(frozen=True)
class ServerSettings:
    model_dir: str = "models"
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    log_level: str = "INFO"
    workers: int = 1
    threads: int = 8
    predict_time_budget: float = 80.0  # AXX_PREDICT_TIME_BUDGET: seconds; LS gives up after 100 s
    preload: bool = True  # AXX_PRELOAD: start loading the serving version in the background on /setup
    max_loaded_versions: int = 2  # AXX_MAX_LOADED_VERSIONS: versions kept in memory per process
    redis_url: str | None = None  # REDIS_URL: training jobs on RQ; unset = in-process thread
    train_every: int = 10  # AXX_TRAIN_EVERY: train after every N annotations created/updated (0: only on request)
    labelstudio: LabelStudioSettings = field(default_factory=LabelStudioSettings)

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        if self.basic_auth_user and self.basic_auth_pass:
            return self.basic_auth_user, self.basic_auth_pass
        return None

    # The Label Studio side, under the names the server's code has always used.
    @property
    def label_studio_url(self) -> str | None:
        return self.labelstudio.url

    @property
    def api_key(self) -> str | None:
        return self.labelstudio.api_key

    @property
    def allowed_hosts(self) -> tuple[str, ...]:
        return self.labelstudio.allowed_hosts

    @property
    def limits(self) -> FetchLimits:
        return self.labelstudio.limits

    @property
    def fetch_workers(self) -> int:
        return self.labelstudio.fetch_workers

    @property
    def config(self) -> ConfigOptions:
        return self.labelstudio.config

    @property
    def label_field(self) -> str | None:
        return self.labelstudio.label_field

    @property
    def sync_model_version(self) -> bool:
        return self.labelstudio.sync_model_version

    @classmethod
    def from_env(cls, env: Environ | None = None, method: Settings | None = None) -> ServerSettings:
        env = environ(env)
        method = method or Settings.from_env(dict(env))
        return cls(
            model_dir=get_str(env, "MODEL_DIR") or method.model_dir,
            basic_auth_user=get_str(env, "BASIC_AUTH_USER"),
            basic_auth_pass=get_str(env, "BASIC_AUTH_PASS"),
            log_level=(get_str(env, "LOG_LEVEL") or "INFO").upper(),
            workers=get_int(env, "WORKERS", 1),
            threads=get_int(env, "THREADS", 8),
            predict_time_budget=get_float(env, "AXX_PREDICT_TIME_BUDGET", 80.0),
            preload=get_bool(env, "AXX_PRELOAD", True),
            max_loaded_versions=get_int(env, "AXX_MAX_LOADED_VERSIONS", 2, minimum=1),
            redis_url=get_str(env, "REDIS_URL"),
            train_every=get_int(env, "AXX_TRAIN_EVERY", 10, minimum=0),
            labelstudio=LabelStudioSettings.from_env(env, method),
        )
