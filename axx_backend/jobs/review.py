"""The review loop on a Label Studio project: its tasks as samples, the selection of the next masks, the label
check, and the Data Manager tabs, task fields and `mislabeling` values that show them (labelstudio/views.py).

`refresh_views` is what `axx-backend views --project` runs, and, with `AXX_REVIEW_VIEWS=true`, what runs after
`preannotate` and after each training run. The version is the one serving the project (as `/predict` resolves
it). Profiles and the label check are cached under that version's `review/` directory (training/review.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.data import Sample
from ..core.settings import Settings
from ..engine.registry import ModelRegistry
from ..labelstudio.client import LabelStudioClient
from ..labelstudio.config import ProjectConfig, parse_config
from ..labelstudio.dataset import tasks_to_samples
from ..labelstudio.settings import LabelStudioSettings
from ..labelstudio.views import (
    TASK_INCLUDE,
    ReviewState,
    prediction_states,
    sync_tabs,
    tab_definitions,
    write_mislabeling,
    write_task_fields,
)
from ..training.label_check import LabelCheck, annotations_fingerprint, check_training_run
from ..training.review import (
    Selection,
    VersionHandle,
    check_samples,
    label_check_path,
    project_source,
    select_samples,
    stored_check,
)

log = logging.getLogger(__name__)


@dataclass
class ProjectData:
    """A project's tasks as samples (key: the task id) with their stamps, read once per command."""

    project: str
    client: LabelStudioClient
    config: ProjectConfig
    samples: list[Sample]
    stamps: list[str]
    source: str


def read_project(project: str, ls: LabelStudioSettings) -> ProjectData:
    """Every task (the export carries the annotations) as a sample: the annotated class and brush mask, the
    image loaded through the URL policy when needed. A stamp holds what a profile depends on: class and image."""
    client = ls.client("the review loop reads the project's tasks through the API")
    cfg = parse_config(client.get_project(project)["label_config"], ls.config)
    tasks = client.export_tasks(project)
    samples = tasks_to_samples(tasks, cfg, ls.fetcher(client), label_field=ls.label_field)
    refs = {str(t["id"]): str((t.get("data") or {}).get(cfg.image_key)) for t in tasks}
    stamps = [f"{s.label}|{refs.get(s.key, '')}" for s in samples]
    return ProjectData(str(project), client, cfg, samples, stamps, project_source(ls.url, str(project)))


def serving_version(project: str, model_dir: str | os.PathLike[str], cfg: ProjectConfig, settings: Settings) -> Path:
    """The version directory serving the project (`MODEL_DIR/<project>/current`, else a matching shared one)."""
    resolved = ModelRegistry(model_dir, settings).resolve(str(project), cfg.class_mismatch)
    if resolved.path is None:
        raise RuntimeError(f"project {project}: no model version serves it: {resolved.reason}")
    return resolved.path


def select_project(data: ProjectData, version: VersionHandle, k: int, strategy: str) -> Selection:
    return select_samples(version, data.samples, data.stamps, data.source, k, strategy, version.settings.seed)


def check_project(data: ProjectData, version: VersionHandle) -> LabelCheck:
    """A fresh label check of the project's annotations (stored with the version)."""
    check = check_samples(version, data.samples, data.stamps, data.source)
    check.fingerprint = annotations_fingerprint(data.samples)
    check.save(label_check_path(version.path, data.source))
    return check


def current_check(data: ProjectData, version: VersionHandle) -> LabelCheck:
    """The stored check of this version when the annotations have not changed since, else a fresh one."""
    stored = stored_check(version.path, data.source)
    if stored is not None and stored.fingerprint == annotations_fingerprint(data.samples):
        return stored
    return check_project(data, version)


def review_state(tasks: list[dict[str, Any]], selection: Selection, check: LabelCheck) -> ReviewState:
    """What the tabs show: task ids from sample keys (a project's keys are task ids)."""
    return ReviewState(
        predictions=prediction_states(tasks),
        mask_rank={int(p.key): p.rank for p in selection.picks},
        label_check={int(key): score for key, score, _ in check.suspects()},
        mislabeling={int(key): score for key, score in check.scores().items()},
    )


def refresh_views(
    data: ProjectData,
    version: VersionHandle,
    ls: LabelStudioSettings,
    k: int | None = None,
    strategy: str | None = None,
    check: LabelCheck | None = None,
) -> dict[str, Any]:
    """Select the next masks, take the label check (`check`, or the stored one, or a fresh one), and write the
    tabs, the task fields (with `ls.task_fields`) and the predictions' `mislabeling`. Returns a summary."""
    start = time.perf_counter()
    selection = select_project(data, version, ls.select_k if k is None else k, strategy or ls.select_strategy)
    check = check or current_check(data, version)
    tasks = data.client.list_tasks(data.project, include=TASK_INCLUDE, raw_data=ls.task_fields)
    state = review_state(tasks, selection, check)
    tabs = sync_tabs(data.client, data.project, tab_definitions(state, ls.task_fields))
    written = write_task_fields(data.client, tasks, state) if ls.task_fields else 0
    return {
        "project": data.project,
        "version": version.name,
        "tabs": tabs["tabs"],
        "removed_duplicate_tabs": tabs["removed_duplicates"],
        "task_fields": ls.task_fields,
        "tasks_written": written,
        "mislabeling_written": write_mislabeling(data.client, state),
        "flagged": len(state.flagged()),
        "draw_masks_next": [int(p.key) for p in selection.picks],
        "check_these_labels": sorted(state.label_check, key=lambda t: -state.label_check[t]),
        "selection": selection.to_dict(),
        "label_check": check.summary(),
        "seconds": round(time.perf_counter() - start, 2),
    }


def refresh_after(project: str, version_dir: str | os.PathLike[str], ls: LabelStudioSettings, when: str) -> dict:
    """`refresh_views` after `preannotate` or a training run; never raises (the run itself went well)."""
    try:
        data = read_project(project, ls)
        return refresh_views(data, VersionHandle(version_dir, Settings.from_env()), ls)
    except Exception as exc:
        log.exception("project %s: the review tabs were not updated after %s", project, when)
        return {"error": f"{type(exc).__name__}: {exc}"}


# --- the label check of a training run ---------------------------------------------------------------
class TrainingCheck:
    """The `after_fit` hook of `train_on_samples`: the label check on what training cached; a failure only logs."""

    def __init__(self) -> None:
        self.result: LabelCheck | None = None

    def __call__(self, annotator: Any, cache: Any, split: Any, heads: Any, threshold: float) -> None:
        try:
            self.result = check_training_run(annotator, cache, split, heads, threshold)
        except Exception:
            log.exception("the label check after training failed: the version is written without it")

    def store(self, version_dir: Path, source: str, samples: list[Sample]) -> LabelCheck | None:
        if self.result is None:
            return None
        self.result.version = version_dir.name
        self.result.fingerprint = annotations_fingerprint(samples)
        self.result.save(label_check_path(version_dir, source))
        return self.result


AfterTraining = Callable[[Path, LabelCheck | None], dict[str, Any]]
