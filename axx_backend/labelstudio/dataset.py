"""A Label Studio project as training samples (docs/METHOD.md "Learning" 1).

All tasks come through the export API (START_TRAINING carries no annotations: docs/LABEL_STUDIO.md,
section 4). For each task the latest non-cancelled annotation wins: its Choices value is the class, its
BrushLabels regions (RLE, decoded with the SDK) are the oracle mask. Tasks without an annotation are
pseudo-mask candidates; a task data field can supply image-level labels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from label_studio_sdk.converter.brush import decode_rle

from ..core.data import Sample
from ..core.images import Decoded, ImageError
from ..core.settings import DEFAULT_IMAGE_MAX_PIXELS
from .config import ProjectConfig, parse_config
from .images import ImageFetcher, ImageFetchError
from .settings import LabelStudioSettings

log = logging.getLogger(__name__)


def project_samples(
    project: str, ls: LabelStudioSettings, progress: Callable[[str, float], None] | None = None
) -> tuple[list[Sample], list[str]]:
    """Samples and classes of a project. The labeling config is read with `ls.config`, the options serving
    uses (AXX_CHOICES_CONTROL, AXX_BRUSH_CONTROL, AXX_BRUSH_LABELS, AXX_REVIEW_CHOICE, the negative classes)."""
    client = ls.client("training reads the project's annotations through the API")
    cfg = parse_config(client.get_project(project)["label_config"], ls.config)
    if progress:
        progress("export", 0.0)
    tasks = client.export_tasks(project)
    samples = tasks_to_samples(tasks, cfg, ls.fetcher(client), label_field=ls.label_field)
    labelled = sum(s.label is not None for s in samples)
    if labelled < 2:
        raise ValueError(f"project {project} has {labelled} labelled tasks: label at least two images to train")
    return samples, list(cfg.classes)


def tasks_to_samples(
    tasks: list[dict[str, Any]], cfg: ProjectConfig, fetcher: ImageFetcher, label_field: str | None = None
) -> list[Sample]:
    samples = []
    counts = {"annotated": 0, "masks": 0, "from_field": 0, "unlabelled": 0, "skipped": 0}
    for task in tasks:
        ref = (task.get("data") or {}).get(cfg.image_key)
        if not ref:
            counts["skipped"] += 1
            continue
        try:
            label, mask = annotation_label_and_mask(task, cfg, fetcher.limits.max_pixels)
        except (AttributeError, TypeError, KeyError, ValueError) as exc:  # a result that is not Label Studio's form
            log.warning("task %s: annotation not read, task skipped (%s: %s)", task.get("id"), type(exc).__name__, exc)
            counts["skipped"] += 1
            continue
        if label is None and label_field and task["data"].get(label_field) in cfg.classes:
            label = task["data"][label_field]
            counts["from_field"] += 1
        if label is not None or mask is not None:
            counts["annotated"] += 1
        else:
            counts["unlabelled"] += 1
        counts["masks"] += mask is not None
        samples.append(Sample(key=str(task["id"]), label=label, loader=_loader(fetcher, ref), mask=mask))
    log.info("tasks: %s", counts)
    return samples


def annotation_label_and_mask(
    task: dict[str, Any], cfg: ProjectConfig, max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS
) -> tuple[str | None, np.ndarray | None]:
    """The class and the brush mask of the task's latest valid annotation. A brush region that cannot be decoded
    (`brush_layer`), or whose size differs from the mask's first region, is left out with a warning: it costs
    its own pixels, never the task's label or the training run."""
    annotations = [
        a
        for a in task.get("annotations") or []
        if not a.get("was_cancelled") and not a.get("skipped") and a.get("result")
    ]
    if not annotations:
        return None, None
    latest = max(annotations, key=lambda a: (a.get("updated_at") or a.get("created_at") or "", a.get("id", 0)))
    label = None
    mask = None
    for region in latest["result"]:
        value = region.get("value") or {}
        if region.get("from_name") == cfg.choices and region.get("type") == "choices":
            chosen = [c for c in value.get("choices", []) if c in cfg.classes]
            label = chosen[0] if chosen else label
        elif region.get("from_name") == cfg.brush and region.get("type") == "brushlabels" and value.get("rle"):
            try:
                layer = brush_layer(region, max_pixels)
                if mask is not None and layer.shape != mask.shape:
                    raise BrushError(
                        f"a {layer.shape[1]}x{layer.shape[0]} region beside {mask.shape[1]}x{mask.shape[0]}"
                    )
            except BrushError as exc:
                log.warning("task %s: brush region not used: %s", task.get("id"), exc)
                continue
            mask = layer if mask is None else (mask | layer)
    return label, mask


class BrushError(ValueError):
    """A BrushLabels region that cannot be decoded into a mask; the message says why."""


def brush_layer(region: dict[str, Any], max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS) -> np.ndarray:
    """One BrushLabels region as bool [H, W] (its RGBA RLE's alpha). Annotations come in with imported tasks, so
    the region is checked before anything is allocated: the size within `max_pixels` (AXX_IMAGE_MAX_PIXELS), and
    the value count the RLE declares equal to H x W x 4 (the SDK's decoder allocates whatever count the first 32
    bits say, up to 4 GiB)."""
    try:
        h, w = int(region["original_height"]), int(region["original_width"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BrushError("no integer original_width and original_height") from exc
    if h < 1 or w < 1 or h * w > max_pixels:
        raise BrushError(f"{w}x{h} is not a size within the {max_pixels} pixel limit (AXX_IMAGE_MAX_PIXELS)")
    rle = region["value"]["rle"]
    try:
        declared = int.from_bytes(bytes(rle[:4]), "big")  # the RLE's header: its value count, 32 bits, MSB first
    except (TypeError, ValueError) as exc:
        raise BrushError("the RLE is not a list of bytes") from exc
    if declared != h * w * 4:
        raise BrushError(f"the RLE holds {declared} values, a {w}x{h} RGBA mask {h * w * 4}")
    try:
        values = decode_rle(rle)
    except (TypeError, ValueError, IndexError) as exc:  # a truncated stream ends in int("", 2)
        raise BrushError(f"the RLE cannot be decoded ({type(exc).__name__})") from exc
    return values.reshape(h, w, 4)[:, :, 3] > 0


def _loader(fetcher: ImageFetcher, ref: str) -> Callable[[], Decoded]:
    """Download and decode a task's image. A fetch failure is raised as `ImageError`, the trainer's
    "unreadable image": the task is skipped (and listed in the version's `training.skipped`) instead of
    one broken or unreachable image aborting the whole run."""

    def load() -> Any:
        try:
            return fetcher.decode(ref)
        except ImageFetchError as exc:
            raise ImageError(f"task image {exc}") from exc

    return load
