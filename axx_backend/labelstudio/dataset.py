"""A Label Studio project as training samples (docs/METHOD.md "Learning" 1).

All tasks come through the export API (START_TRAINING carries no annotations: docs/LABEL_STUDIO.md,
section 4). For each task the latest non-cancelled annotation wins: its Choices value is the class, its
BrushLabels regions (RLE, decoded with the SDK) are the oracle mask. Tasks without an annotation are
pseudo-mask candidates; a task data field can supply image-level labels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
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
            label, brush = annotation_label_and_brush(task, cfg, fetcher.limits.max_pixels)
        except (AttributeError, TypeError, KeyError, ValueError) as exc:  # a result that is not Label Studio's form
            log.warning("task %s: annotation not read, task skipped (%s: %s)", task.get("id"), type(exc).__name__, exc)
            counts["skipped"] += 1
            continue
        if label is None and label_field and task["data"].get(label_field) in cfg.classes:
            label = task["data"][label_field]
            counts["from_field"] += 1
        if label is not None or brush is not None:
            counts["annotated"] += 1
        else:
            counts["unlabelled"] += 1
        counts["masks"] += brush is not None
        samples.append(Sample(key=str(task["id"]), label=label, loader=_loader(fetcher, ref), mask=brush))
    log.info("tasks: %s", counts)
    return samples


def annotation_label_and_mask(
    task: dict[str, Any], cfg: ProjectConfig, max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS
) -> tuple[str | None, np.ndarray | None]:
    """The class and the decoded brush mask of the task's latest valid annotation (`annotation_label_and_brush`);
    no mask when no region decodes."""
    label, brush = annotation_label_and_brush(task, cfg, max_pixels)
    try:
        return label, brush() if brush is not None else None
    except BrushError as exc:
        log.warning("task %s: %s", task.get("id"), exc)
        return label, None


def annotation_label_and_brush(
    task: dict[str, Any], cfg: ProjectConfig, max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS
) -> tuple[str | None, BrushMask | None]:
    """The class and the brush regions of the task's latest valid annotation. A region whose size or RLE header
    is wrong (`check_brush`), or whose size differs from the first kept region's, is left out with a warning: it
    costs its own pixels, never the task's label or the training run."""
    annotations = [
        a
        for a in task.get("annotations") or []
        if not a.get("was_cancelled") and not a.get("skipped") and a.get("result")
    ]
    if not annotations:
        return None, None
    latest = max(annotations, key=lambda a: (a.get("updated_at") or a.get("created_at") or "", a.get("id", 0)))
    label = None
    regions: list[dict[str, Any]] = []
    size = None
    for region in latest["result"]:
        value = region.get("value") or {}
        if region.get("from_name") == cfg.choices and region.get("type") == "choices":
            chosen = [c for c in value.get("choices", []) if c in cfg.classes]
            label = chosen[0] if chosen else label
        elif region.get("from_name") == cfg.brush and region.get("type") == "brushlabels" and value.get("rle"):
            try:
                shape = check_brush(region, max_pixels)
                if size is not None and shape != size:
                    raise BrushError(f"a {shape[1]}x{shape[0]} region beside {size[1]}x{size[0]}")
            except BrushError as exc:
                log.warning("task %s: brush region not used: %s", task.get("id"), exc)
                continue
            size = shape
            regions.append(region)
    return label, BrushMask(task.get("id"), tuple(regions)) if regions else None


class BrushError(ImageError):
    """A BrushLabels region that cannot be decoded into a mask; the message says why. An `ImageError`: training
    leaves the mask out and keeps the task's label (`core.data.with_usable_mask`)."""


@dataclass(frozen=True)
class BrushMask:
    """A task's checked brush regions, decoded when the mask is read (`Sample.load_mask`): the RLE is a small
    fraction of the mask, and a project's masks decoded at once would take memory in proportion to its images."""

    task: object  # the task's id, for the warnings
    regions: tuple[dict[str, Any], ...]

    def __call__(self) -> np.ndarray:
        """The union of the regions, bool [H, W]; a region whose RLE stream is broken is left out with a warning,
        and `BrushError` when none is left."""
        mask = None
        for region in self.regions:
            try:
                layer = brush_layer(region)
            except BrushError as exc:
                log.warning("task %s: brush region not used: %s", self.task, exc)
                continue
            mask = layer if mask is None else (mask | layer)
        if mask is None:
            raise BrushError("no brush region could be decoded")
        return mask


def check_brush(region: dict[str, Any], max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS) -> tuple[int, int]:
    """The size (H, W) of a BrushLabels region, checked before anything is decoded, as annotations come in with
    imported tasks: within `max_pixels` (AXX_IMAGE_MAX_PIXELS), and the value count the RLE declares equal to
    H x W x 4 (the SDK's decoder allocates whatever count the first 32 bits say, up to 4 GiB)."""
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
    return h, w


def brush_layer(region: dict[str, Any]) -> np.ndarray:
    """One region checked by `check_brush`, decoded: bool [H, W] (its RGBA RLE's alpha)."""
    h, w = int(region["original_height"]), int(region["original_width"])
    try:
        values = decode_rle(region["value"]["rle"])
    # A truncated stream ends in int("", 2); a value wider than a byte overflows the SDK's uint8 output.
    except (TypeError, ValueError, IndexError, OverflowError) as exc:
        raise BrushError(f"a brush RLE cannot be decoded ({type(exc).__name__})") from exc
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
