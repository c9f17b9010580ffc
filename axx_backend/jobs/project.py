"""The training job: one code path for a dataset folder and for a Label Studio project.

`payload` (JSON, it travels through Redis):
    {"source": "labelstudio", "url": ..., "api_key": ..., "model_dir": "MODEL_DIR/<project>",
     "settings": {...}}                  -> all annotated tasks of the project, fetched through the API
    {"source": "folder", "dataset_dir": ..., "model_dir": ..., "settings": {...}}
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..core.data import read_folder_dataset
from ..core.settings import Settings
from ..training.trainer import train_on_samples

log = logging.getLogger(__name__)


def train_project(project: str, payload: dict[str, Any], progress: Callable[[str, float], None] | None = None) -> str:
    """Build the data set the payload names, train, and write a new current version."""
    settings = Settings.from_env(**payload.get("settings", {}))
    source = payload.get("source")
    if source == "folder":
        samples, classes = read_folder_dataset(payload["dataset_dir"])
        origin = payload["dataset_dir"]
    elif source == "labelstudio":
        from ..labelstudio.dataset import project_samples

        samples, classes = project_samples(project, payload, settings, progress)
        origin = f"{payload.get('url')} project {project}"
    else:
        raise ValueError(f"unknown training source {source!r}")
    log.info(
        "project %s: %d samples (%d labelled) from %s",
        project,
        len(samples),
        sum(s.label is not None for s in samples),
        origin,
    )
    return train_on_samples(samples, classes, payload["model_dir"], settings, progress, source=origin)
