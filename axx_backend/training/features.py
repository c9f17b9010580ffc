"""One backbone pass per training image and member, through the annotator's own `forward` (the same
preprocessing as serving), kept in the form the later phases read:

- pooled features of every readable image (the MC-dropout heads train on them in milliseconds per epoch);
- for the "pixel set" (images with oracle masks, and a capped share of the others as pseudo-mask candidates
  and background examples): the last feature maps (CAMs are recomputed from them once the heads exist), the
  image's regions at every superpixel scale, and each region's mean of the members' level maps (the segment
  head's features, minus the CAM column, which needs the heads).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from ..core.data import Sample, iter_readable
from ..engine.annotator import Annotator, Forward
from ..engine.pooling import pool
from ..engine.segments import region_level_means

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]  # (stage, fraction done); jobs report through it


@dataclass
class PixelView:
    """What the pixel phase needs of one image of the pixel set."""

    last_maps: list[torch.Tensor]  # per member [K, h, w] float16
    segmentations: list[np.ndarray]  # region labels [S, S] per superpixel scale
    region_levels: list[np.ndarray]  # per scale [n_regions, D - 2] float16: level-map means (no CAM, no area)
    region_area: list[np.ndarray]  # per scale [n_regions]: share of the image


@dataclass
class FeatureCache:
    samples: list[Sample]  # the samples that could be read, in order
    pooled: list[torch.Tensor]  # per member [N, K]: what the member's head reads (its pooling)
    averaged: list[torch.Tensor] = field(default_factory=list)  # per member [N, K]: the global average, which
    # describes the whole image (its background too): what the appearance groups cluster (groups.py)
    pixels: dict[int, PixelView] = field(default_factory=dict)  # sample index -> its pixel view
    skipped: list[str] = field(default_factory=list)  # "key: reason" of unreadable images
    stage_inputs: list[torch.Tensor] | None = None  # per member [N, C, h, w] float16: the stride-16 maps
    # (what enters the last stage), kept for last-stage fine-tuning
    groups: np.ndarray | None = None  # appearance group per sample, from the features before any fine-tuning
    # (groups.py); None: folds are stratified random


@torch.inference_mode()
def extract_features(
    annotator: Annotator,
    samples: Sequence[Sample],
    pixel_keys: set[str] | None = None,
    progress: Progress | None = None,
    stage_inputs: bool = False,
) -> FeatureCache:
    """Pooled features of every readable sample; pixel views of those in `pixel_keys`; with `stage_inputs`,
    every sample's stride-16 maps (for last-stage fine-tuning)."""
    pixel_keys = pixel_keys or set()
    cache = FeatureCache([], [torch.empty(0) for _ in annotator.ensemble.members])
    pooled: list[list[torch.Tensor]] = [[] for _ in annotator.ensemble.members]
    averaged: list[list[torch.Tensor]] = [[] for _ in annotator.ensemble.members]
    stages: list[list[torch.Tensor]] = [[] for _ in annotator.ensemble.members]
    batch = max(1, annotator.settings.batch_size)
    with tqdm(total=len(samples), desc="features", unit="img", disable=None) as bar:
        for start in range(0, len(samples), batch):
            chunk = samples[start : start + batch]
            readable, images = _load(chunk, cache.skipped)
            if images:
                first = len(cache.samples)
                cache.samples.extend(readable)
                wanted = [b for b, s in enumerate(readable) if s.key in pixel_keys]
                fwd = annotator.forward(images, levels=bool(wanted) or stage_inputs)
                for m, out in enumerate(fwd.outputs):
                    pooled[m].append(out.pooled.cpu())
                    averaged[m].append(pool(out.features, "avg").cpu())
                    if stage_inputs and out.levels:
                        stages[m].append(out.levels[-1].half().cpu())
                for b in wanted:
                    cache.pixels[first + b] = pixel_view(annotator, fwd, b)
            bar.update(len(chunk))
            if progress:
                progress("features", min(1.0, (start + len(chunk)) / max(1, len(samples))))
    if not cache.samples:
        raise ValueError("no readable training image: " + "; ".join(cache.skipped[:5]))
    cache.pooled = [torch.cat(p) for p in pooled]
    cache.averaged = [torch.cat(a) for a in averaged]
    if stage_inputs and all(stages):
        cache.stage_inputs = [torch.cat(s) for s in stages]
    return cache


def pixel_view(annotator: Annotator, fwd: Forward, b: int) -> PixelView:
    segmentations = annotator.segmentations(fwd, b)
    side = annotator.map_side
    maps = [level[b] for out in fwd.outputs for level in out.levels or []]
    levels, areas = zip(*region_level_means(maps, side, segmentations), strict=True)
    return PixelView(  # the CAM column is added once the heads exist (pixels.py, `with_cam`)
        last_maps=[out.features[b].half().cpu().clone() for out in fwd.outputs],
        segmentations=[labels.astype(np.int32) for labels in segmentations],
        region_levels=[lv.astype(np.float16) for lv in levels],
        region_area=list(areas),
    )


def _load(chunk: Sequence[Sample], skipped: list[str]) -> tuple[list[Sample], list]:
    pairs = list(iter_readable(chunk, skipped))
    return [sample for sample, _ in pairs], [image for _, image in pairs]
