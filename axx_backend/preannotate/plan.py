"""Planning one pre-annotation run: the version it pins, what every chunk needs, which tasks to predict."""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..core.env import environ, get_int
from ..core.settings import Settings
from ..engine.registry import ModelRegistry
from ..labelstudio.client import LabelStudioClient, prediction_versions
from ..labelstudio.config import ConfigCache
from ..labelstudio.settings import LabelStudioSettings


@dataclass(frozen=True)
class RunSpec:
    """What every chunk of one run needs (JSON-able: it travels in the RQ job, without the API key)."""

    project: str
    run: str
    version: str
    version_path: str
    model_dir: str
    url: str
    api_key: str
    label_config: str
    lease_seconds: int = 60


@dataclass
class ChunkState:
    """One chunk of task ids, as the command sees it."""

    index: int
    task_ids: list[int]
    attempt: int = 0
    job_id: str | None = None
    enqueued: float = 0.0
    state: str = "queued"  # queued | done | failed
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)


def run_keys(project: str, run: str | None = None, index: int | None = None) -> dict[str, str]:
    """The Redis keys of a project's runs: the active run, the chunks' leases and results."""
    base = f"axx:preannotate:{project}"
    keys = {"active": f"{base}:active", "leases": f"{base}:lease:*"}
    if run is not None:
        keys["results"] = f"{base}:{run}:results"
        if index is not None:
            keys["lease"] = f"{base}:lease:{run}:{index}"
    return keys


_registries: dict[str, ModelRegistry] = {}  # model dir -> registry: a process loads a version once
_registries_lock = threading.Lock()


def registry_for(model_dir: str) -> ModelRegistry:
    """The per-process cache of loaded versions (the server's `ModelRegistry`), one per model directory: keyed
    by version directory, at most `AXX_MAX_LOADED_VERSIONS` (2) of them, the least recently used dropped first.
    A worker fills it before forking a chunk (`chunk.preload_version`), so every chunk finds its version."""
    with _registries_lock:
        if model_dir not in _registries:
            keep = get_int(environ(), "AXX_MAX_LOADED_VERSIONS", 2, minimum=1)
            _registries[model_dir] = ModelRegistry(model_dir, Settings.from_env(), max_loaded=keep)
        return _registries[model_dir]


def plan_run(
    project: str, model_dir: str | os.PathLike[str], ls: LabelStudioSettings, lease_seconds: int = 60
) -> tuple[RunSpec, LabelStudioClient]:
    """Pin the version serving the project (as `/predict` would choose it); errors say why there is none."""
    client = ls.client("tasks and predictions go through the API")
    label_config = client.get_project(project)["label_config"]
    cfg = ConfigCache(ls.config).get(label_config)
    resolved = registry_for(str(model_dir)).resolve(str(project), cfg.class_mismatch)
    if not resolved.ready:
        raise RuntimeError(f"project {project}: no model version to pre-annotate with: {resolved.reason}")
    assert resolved.path is not None and resolved.version is not None
    spec = RunSpec(
        project=str(project), run=uuid.uuid4().hex[:12], version=resolved.version, version_path=str(resolved.path),
        model_dir=str(model_dir), url=str(ls.url), api_key=str(ls.api_key), label_config=label_config,
        lease_seconds=int(lease_seconds),
    )  # fmt: skip
    return spec, client


def select_tasks(
    tasks: list[dict[str, Any]], version: str, only_missing: bool = False
) -> tuple[list[int], dict[str, int]]:
    """Ids to predict, and how many were skipped: having a prediction of `version` (always), or of any
    version (`only_missing`)."""
    todo, skipped = [], {"has_version": 0, "has_other_version": 0}
    for task in tasks:
        versions = prediction_versions(task)
        if version in versions:
            skipped["has_version"] += 1
        elif only_missing and versions:
            skipped["has_other_version"] += 1
        else:
            todo.append(int(task["id"]))
    return todo, skipped


def split_chunks(task_ids: list[int], size: int) -> list[ChunkState]:
    return [ChunkState(i, task_ids[s : s + size]) for i, s in enumerate(range(0, len(task_ids), size))]
