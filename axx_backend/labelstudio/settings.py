"""How the backend talks to one Label Studio and reads its projects: one settings object for the server's
`/predict`, `axx-backend preannotate` and the training job, so all three read a labeling config with the
same options (docs/LABEL_STUDIO.md).

Names follow label-studio-ml 2.x where it has one (`LABEL_STUDIO_URL`, `LABEL_STUDIO_API_KEY`); the rest are
`AXX_*` (README "Settings").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..core.env import Environ, environ, first_str, get_bool, get_csv, get_float, get_int, get_str
from ..core.settings import SELECT_STRATEGIES, Settings
from .client import LabelStudioClient
from .config import ConfigOptions
from .images import FetchLimits, ImageFetcher
from .results import SCORES


@dataclass(frozen=True)
class LabelStudioSettings:
    url: str | None = None  # LABEL_STUDIO_URL (or its older name LABEL_STUDIO_HOST)
    api_key: str | None = None  # LABEL_STUDIO_API_KEY: a legacy token or a Personal Access Token
    allowed_hosts: tuple[str, ...] = ()  # AXX_ALLOWED_HOSTS; empty = the Label Studio host only
    limits: FetchLimits = field(default_factory=FetchLimits)  # AXX_IMAGE_MAX_BYTES, _MAX_PIXELS, _TIMEOUT
    fetch_workers: int = 4  # AXX_FETCH_WORKERS: parallel image downloads per request or chunk
    config: ConfigOptions = field(default_factory=ConfigOptions)  # AXX_CHOICES_CONTROL, ... + negative classes
    label_field: str | None = None  # AXX_LABEL_FIELD: task data field with image-level labels, used for training
    sync_model_version: bool = True  # AXX_SYNC_MODEL_VERSION: keep project.model_version on the served version
    score: str = "confidence"  # AXX_SCORE: what a prediction's score carries (results.task_score)
    review_views: bool = False  # AXX_REVIEW_VIEWS: update the review tabs after preannotate and each training run
    task_fields: bool = False  # AXX_TASK_FIELDS: write the review values into task data (views.TASK_FIELDS)
    select_k: int = 10  # AXX_SELECT_K: tasks in "AXX: draw masks next"
    select_strategy: str = "diverse"  # AXX_SELECT_STRATEGY: how they are chosen (SELECT_STRATEGIES)

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"AXX_SCORE must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.select_strategy not in SELECT_STRATEGIES:
            raise ValueError(
                f"AXX_SELECT_STRATEGY must be one of {', '.join(SELECT_STRATEGIES)}, got {self.select_strategy!r}"
            )

    @property
    def has_api(self) -> bool:
        return bool(self.url and self.api_key)

    def require_api(self, purpose: str) -> tuple[str, str]:
        """(url, api_key), or a ValueError that says what needs them."""
        if not (self.url and self.api_key):
            raise ValueError(f"set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: {purpose}")
        return self.url, self.api_key

    def client(self, purpose: str = "this command talks to the Label Studio API") -> LabelStudioClient:
        url, api_key = self.require_api(purpose)
        return LabelStudioClient(url, api_key)

    def fetcher(self, client: LabelStudioClient | None) -> ImageFetcher:
        """Task images: Label Studio's own with the client's key, other hosts from the allow-list."""
        return ImageFetcher(self.url, client.auth if client else None, self.allowed_hosts, self.limits)

    def replace(self, **changes: object) -> LabelStudioSettings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Environ | None = None, method: Settings | None = None) -> LabelStudioSettings:
        """The environment's Label Studio settings; `method` gives the negative-class rule (default: from env)."""
        env = environ(env)
        method = method or Settings.from_env(dict(env))
        return cls(
            url=first_str(env, "LABEL_STUDIO_URL", "LABEL_STUDIO_HOST"),
            api_key=get_str(env, "LABEL_STUDIO_API_KEY"),
            allowed_hosts=get_csv(env, "AXX_ALLOWED_HOSTS"),
            limits=fetch_limits_from_env(env, method),
            fetch_workers=get_int(env, "AXX_FETCH_WORKERS", 4, minimum=1),
            config=config_options_from_env(env, method),
            label_field=get_str(env, "AXX_LABEL_FIELD"),
            sync_model_version=get_bool(env, "AXX_SYNC_MODEL_VERSION", True),
            score=(get_str(env, "AXX_SCORE") or "confidence").strip().lower(),
            review_views=get_bool(env, "AXX_REVIEW_VIEWS", False),
            task_fields=get_bool(env, "AXX_TASK_FIELDS", False),
            select_k=get_int(env, "AXX_SELECT_K", 10, minimum=0),
            select_strategy=(get_str(env, "AXX_SELECT_STRATEGY") or "diverse").strip().lower(),
        )


def fetch_limits_from_env(env: Environ, method: Settings) -> FetchLimits:
    return FetchLimits(
        max_bytes=get_int(env, "AXX_IMAGE_MAX_BYTES", FetchLimits.max_bytes),
        max_pixels=method.image_max_pixels,  # AXX_IMAGE_MAX_PIXELS: one limit for the CLI, training and the server
        read_timeout=get_float(env, "AXX_IMAGE_TIMEOUT", FetchLimits.read_timeout),
    )


def config_options_from_env(env: Environ, method: Settings) -> ConfigOptions:
    """How to read a labeling config. `AXX_REVIEW_CHOICE` and `AXX_NOTES_TEXTAREA` keep an empty value (it
    means "none"), so they are read raw; the negative-class rule is the method's (`AXX_NEGATIVE_CLASSES`...)."""
    return ConfigOptions(
        choices_control=get_str(env, "AXX_CHOICES_CONTROL"),
        brush_control=get_str(env, "AXX_BRUSH_CONTROL"),
        brush_map=ConfigOptions.parse_brush_map(get_str(env, "AXX_BRUSH_LABELS")),
        review_choice=env.get("AXX_REVIEW_CHOICE"),
        notes_control=env.get("AXX_NOTES_TEXTAREA"),
        is_negative=method.is_negative,
    )
