"""The training job: one code path for a dataset folder and for a Label Studio project.

`payload` (JSON, it travels through Redis):
    {"source": "labelstudio", "url": ..., "api_key": ..., "allowed_hosts": [...], "label_field": ...,
     "model_dir": "MODEL_DIR/<project>", "settings": {...}}
                                         -> all tasks of the project, fetched through the API, read with the
                                            Label Studio settings serving uses (`labelstudio_settings`)
    {"source": "folder", "dataset_dir": ..., "model_dir": ..., "settings": {...}}
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.data import read_folder_dataset
from ..core.settings import Settings
from ..labelstudio.settings import LabelStudioSettings
from ..training.review import folder_source, project_source, stored_check
from ..training.trainer import train_on_samples
from .review import TrainingCheck, refresh_after

log = logging.getLogger(__name__)


def train_project(project: str, payload: dict[str, Any], progress: Callable[[str, float], None] | None = None) -> str:
    """Build the data set the payload names, train, and write a new current version."""
    settings = Settings.from_env(**payload.get("settings", {}))
    source = payload.get("source")
    ls: LabelStudioSettings | None = None
    if source == "folder":
        samples, classes = read_folder_dataset(payload["dataset_dir"])
        origin = payload["dataset_dir"]
    elif source == "labelstudio":
        from ..labelstudio.dataset import project_samples

        ls = labelstudio_settings(payload, settings)
        samples, classes = project_samples(project, ls, progress)
        origin = f"{ls.url} project {project}"
    else:
        raise ValueError(f"unknown training source {source!r}")
    log.info(
        "project %s: %d samples (%d labelled) from %s",
        project,
        len(samples),
        sum(s.label is not None for s in samples),
        origin,
    )
    check = TrainingCheck()
    version = train_on_samples(
        samples, classes, payload["model_dir"], settings, progress, source=origin, after_fit=check
    )
    version_dir = Path(payload["model_dir"]) / version
    check.store(version_dir, review_source(payload, project), samples)
    if ls is not None and ls.review_views:  # AXX_REVIEW_VIEWS: the tabs follow the new version
        refresh_after(project, version_dir, ls, "training")
    return version


def review_source(payload: dict[str, Any], project: str) -> str:
    """The data-source name the review cache of a run's version is kept under (training/review.py)."""
    if payload.get("source") == "labelstudio":
        return project_source(payload.get("url"), project)
    return folder_source(payload.get("dataset_dir") or "")


def training_report(payload: dict[str, Any], project: str, version: str) -> dict[str, Any] | None:
    """The label check of a finished run, for the `/jobs` status (None when there is none)."""
    try:
        stored = stored_check(Path(payload["model_dir"]) / version, review_source(payload, project))
    except (KeyError, TypeError, OSError) as exc:
        log.warning("project %s: no label check report: %s", project, exc)
        return None
    return None if stored is None else stored.summary(top=10)


def labelstudio_settings(payload: dict[str, Any], method: Settings) -> LabelStudioSettings:
    """The Label Studio settings of the process that runs the job: the environment the server reads too (a
    worker gets the server's), so the labeling config is read with the options serving uses. The payload's
    URL, API key, allowed hosts and label field, which the server set from its own settings, win."""
    given = {
        "url": payload.get("url"),
        "api_key": payload.get("api_key"),
        "allowed_hosts": tuple(payload.get("allowed_hosts") or ()),
        "label_field": payload.get("label_field"),
    }
    return LabelStudioSettings.from_env(method=method).replace(**{k: v for k, v in given.items() if v})
