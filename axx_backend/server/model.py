"""The model class Label Studio talks to, in the style of label-studio-ml 2.x's LabelStudioMLBase
(the protocol: docs/LABEL_STUDIO.md).

`AxxModel(project, label_config)` is cheap and made per request, like LabelStudioMLBase; everything
that must live longer (loaded versions, parsed configs, the API client, the model_version sync) is in
one `Runtime` per process. `predict` keeps Label Studio's contract: exactly one entry per task, in order.
An entry is a prediction dict, or `[]` when there is nothing to store yet (no model, image temporarily
unreachable, time budget spent): Label Studio stores nothing for `[]` and asks again next time.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.settings import Settings
from ..engine.registry import ModelRegistry, Resolved
from ..jobs import make_jobs
from ..labelstudio.client import LabelStudioClient, ModelVersionSync
from ..labelstudio.config import ConfigCache, ProjectConfig
from ..labelstudio.images import ImageFetcher
from ..labelstudio.predict import predict_tasks
from .metrics import Metrics
from .settings import ServerSettings

log = logging.getLogger(__name__)

UNTRAINED = "untrained"  # the model_version answered before any version serves the project


def project_id_of(project: Any) -> str | None:
    """Label Studio sends "<id>.<created timestamp>" ("1.1795318780"); the id is the part before the dot."""
    if project is None or project == "":
        return None
    return str(project).split(".", 1)[0].strip() or None


@dataclass
class Runtime:
    """What one server process shares between requests."""

    settings: ServerSettings
    method: Settings
    configs: ConfigCache
    registry: ModelRegistry
    fetcher: ImageFetcher
    client: LabelStudioClient | None
    sync: ModelVersionSync
    jobs: Any = None  # axx_backend.jobs.InProcessJobs | RQJobs
    metrics: Metrics = field(default_factory=Metrics)
    projects: dict[str, dict[str, Any]] = field(default_factory=dict)  # last resolution per project, for /health

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Runtime:
        method = Settings.from_env(environ)
        settings = ServerSettings.from_env(environ, method)
        ls = settings.labelstudio
        client = ls.client() if ls.has_api else None
        return cls(
            settings=settings,
            method=method,
            configs=ConfigCache(ls.config),
            registry=ModelRegistry(settings.model_dir, method, settings.max_loaded_versions),
            fetcher=ls.fetcher(client),
            client=client,
            sync=ModelVersionSync(client if ls.sync_model_version else None),
            jobs=make_jobs(settings.redis_url),
        )

    def note_project(self, project_id: str | None, resolved: Resolved) -> None:
        if project_id:
            self.projects[project_id] = {
                "model_version": resolved.version or UNTRAINED,
                "ready": resolved.ready,
                "reason": resolved.reason,
                "classes": list(resolved.classes),
            }

    def health(self) -> dict[str, Any]:
        """Cheap: reads only version.json files, never loads a model."""
        shared = self.registry.resolve(None, None)
        projects = dict(self.projects)  # copies: request threads may add entries meanwhile
        ready = shared.ready or any(p["ready"] for p in projects.values())
        message = "ready" if ready else shared.reason
        if projects and not any(p["ready"] for p in projects.values()):
            message = "; ".join(f"project {k}: {v['reason']}" for k, v in projects.items())
        problems = []
        if not self.settings.label_studio_url:
            problems.append("LABEL_STUDIO_URL is not set: uploaded and local-file images cannot be read")
        elif not self.settings.api_key:
            problems.append("LABEL_STUDIO_API_KEY is not set: Label Studio images cannot be read")
        return {
            "status": "UP",
            "model_class": AxxModel.__name__,
            "ready": ready,
            "message": message,
            "model_dir": str(self.registry.root),
            "current_version": shared.version,
            "projects": projects,
            "loaded_versions": self.registry.loaded(),
            "load_errors": dict(self.registry.load_errors),
            "label_studio": {
                "url": self.settings.label_studio_url,
                "api_key": self.client.auth.kind if self.client else None,
                "allowed_hosts": self.fetcher.allow.describe(),
            },
            "model_version_sync": {f"{p}:{v}": outcome for (p, v), outcome in dict(self.sync.results).items()},
            "problems": problems,
            "training": {"backend": self.jobs.kind if self.jobs else None, "projects": self.jobs_status()},
        }

    def model_versions(self) -> dict[str, str]:
        """The version serving each project seen by this process, and the shared one ("*")."""
        versions = {p: str(info["model_version"]) for p, info in dict(self.projects).items()}
        shared = self.registry.resolve(None, None)
        if shared.version:
            versions["*"] = shared.version
        return versions

    def jobs_overview(self) -> dict[str, Any]:
        """Training runs by project and, on RQ, the queues' job counts."""
        overview: dict[str, Any] = {"backend": self.jobs.kind if self.jobs else None, "training": self.jobs_status()}
        queues = getattr(self.jobs, "queues", None)
        if queues is not None:
            try:
                overview["queues"] = queues()
            except Exception as exc:  # Redis down: /metrics must still answer
                overview["queues_error"] = f"{type(exc).__name__}: {exc}"
        return overview

    def jobs_status(self) -> dict[str, Any]:
        if self.jobs is None:
            return {}
        try:
            return dict(self.jobs.status())
        except Exception as exc:  # Redis down: /health must still answer
            return {"error": f"{type(exc).__name__}: {exc}"}


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The process's Runtime, made on first use (after gunicorn forks, so workers share nothing)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime.from_env()
        return _runtime


class AxxModel:
    """LabelStudioMLBase-style: `setup`, `predict(tasks, context=None, **kwargs)`, `fit(event, data, **kwargs)`."""

    def __init__(self, runtime: Runtime, project: Any = None, label_config: str | None = None) -> None:
        self.runtime = runtime
        self.project = project
        self.project_id = project_id_of(project)
        self.label_config = label_config or ""
        self._config: ProjectConfig | None = None
        self._resolved: Resolved | None = None

    # --- config and version --------------------------------------------------------------------------------------
    @property
    def config(self) -> ProjectConfig:
        """The parsed labeling config; raises ConfigError naming what is missing."""
        if self._config is None:
            self._config = self.runtime.configs.get(self.label_config)
        return self._config

    @property
    def resolved(self) -> Resolved:
        if self._resolved is None:
            self._resolved = self.runtime.registry.resolve(self.project_id, self.config.class_mismatch)
            self.runtime.note_project(self.project_id, self._resolved)
        return self._resolved

    @property
    def model_version(self) -> str:
        return self.resolved.version or UNTRAINED

    def setup(self) -> dict[str, Any]:
        """Check the config and answer the serving version; never loads a model (LS calls this very often)."""
        resolved = self.resolved  # parses the config first: a ConfigError goes back to Label Studio
        if resolved.ready:
            if self.runtime.settings.preload:
                self.runtime.registry.warm(resolved.path)  # background: the first /predict need not wait
            # After a reconnect LS resets project.model_version; if predictions of this version exist, this fixes it.
            self.runtime.sync.schedule(self.project_id, resolved.version, attempts=3)
        else:
            log.info("project %s: no serving version: %s", self.project_id, resolved.reason)
        return {"model_version": self.model_version}

    # --- prediction ------------------------------------------------------------------------------------------------
    def predict(
        self, tasks: list[dict[str, Any]], context: dict[str, Any] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        rt = self.runtime
        start = time.monotonic()
        cfg = self.config
        resolved = self.resolved
        n = len(tasks)
        summary: dict[str, Any] = {"project": self.project_id, "tasks": n, "model_version": self.model_version}
        if not resolved.ready:
            log.warning("project %s: %d tasks left without prediction: %s", self.project_id, n, resolved.reason)
            summary.update(no_model=n, seconds=time.monotonic() - start, reason=resolved.reason)
            rt.metrics.predict(summary)
            return {"results": [[] for _ in tasks], "model_version": UNTRAINED}

        assert resolved.path is not None and resolved.version is not None
        model = rt.registry.get(resolved.path)
        version = resolved.version
        budget = rt.settings.predict_time_budget - (time.monotonic() - start)  # loading the model counts too
        out = predict_tasks(
            tasks, cfg, model.annotator, version, rt.fetcher, lock=model.lock,
            fetch_workers=rt.settings.fetch_workers, time_budget=budget, project=self.project_id,
            score_by=rt.settings.labelstudio.score,
        )  # fmt: skip
        counts = out.counts
        if out.stopped:
            log.warning(
                "project %s: time budget of %.0f s reached: %d of %d tasks left for a later request "
                "(AXX_PREDICT_TIME_BUDGET)", self.project_id, rt.settings.predict_time_budget,
                counts["skipped_budget"], n,
            )  # fmt: skip
        seconds = time.monotonic() - start
        summary.update(counts, seconds=round(seconds, 3), inference_seconds=round(out.inference_seconds, 3))
        summary["tasks_per_second"] = round(counts["predicted"] / seconds, 3) if seconds > 0 else None
        rt.metrics.predict(summary)
        log.info(
            "project %s: %d tasks -> %d predicted, %d failed, %d later (budget), %d later (unreachable) in %.1f s",
            self.project_id, n, counts["predicted"], counts["failed"], counts["skipped_budget"],
            counts["skipped_transient"], seconds, extra={"project": self.project_id, "model_version": version},
        )  # fmt: skip
        if counts["predicted"] or counts["failed"]:
            rt.sync.schedule(self.project_id, version)  # after this answer LS stores them; then the PATCH works
        return {"results": out.results, "model_version": version}

    # --- learning -------------------------------------------------------------------------------------------------
    def fit(self, event: str, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Webhook events. Must return at once (LS waits 1 s): training runs as a background job.

        START_TRAINING always queues a run; ANNOTATION_CREATED/UPDATED queue one every
        `AXX_TRAIN_EVERY` annotations. A run already queued or going for the project absorbs the request.
        """
        rt = self.runtime
        project = data.get("project")
        project_id = str(project.get("id")) if isinstance(project, dict) else project_id_of(project)
        if not project_id:
            return {"status": "ignored", "event": event, "reason": "no project in the event"}
        if event in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            every = rt.settings.train_every
            count = rt.jobs.count_annotation(project_id)
            if every == 0 or count % every:
                return {"status": "counted", "event": event, "project": project_id, "annotations": count,
                        "train_every": every}  # fmt: skip
        elif event != "START_TRAINING":
            return {"status": "ignored", "event": event, "project": project_id}
        if not (rt.settings.label_studio_url and rt.settings.api_key):
            reason = "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: training reads the annotations through the API"
            log.error("webhook %s for project %s: cannot train: %s", event, project_id, reason)
            return {"status": "error", "event": event, "project": project_id, "reason": reason}
        payload = {
            "source": "labelstudio",
            "url": rt.settings.label_studio_url,
            "api_key": rt.settings.api_key,
            "allowed_hosts": list(rt.settings.allowed_hosts),
            "label_field": rt.settings.label_field,
            "model_dir": str(Path(rt.settings.model_dir) / project_id),
        }
        outcome = rt.jobs.submit(project_id, payload, reason=event)
        log.info("webhook %s for project %s: training %s", event, project_id, outcome["status"])
        return {**outcome, "event": event}
