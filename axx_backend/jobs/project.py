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
from typing import Any

from ..core.data import read_folder_dataset
from ..core.settings import Settings
from ..labelstudio.settings import LabelStudioSettings
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
    return train_on_samples(samples, classes, payload["model_dir"], settings, progress, source=origin)


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
