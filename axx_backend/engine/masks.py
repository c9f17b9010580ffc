"""Fusing the agreeing members' maps into one binary mask (docs/METHOD.md step 6)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..core.settings import parse_fusion


def fuse_maps(maps: Sequence[np.ndarray], rule: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Fuse normalised maps ([H, W] in [0, 1], one per agreeing member).

    Returns (mask uint8 {0, 1}, heat float32 [H, W]): `heat` is the mean map, shown in overlays.
    - `mean`: average the maps, then threshold once;
    - `intersection`: every member's map above the threshold (the paper's AND);
    - `votes:k`: at least k members above the threshold.
    """
    if not maps:
        raise ValueError("no maps to fuse")
    stack = np.stack([np.asarray(m, dtype=np.float32) for m in maps])
    heat = stack.mean(axis=0)
    kind, k = parse_fusion(rule)
    if kind == "mean":
        mask = heat > threshold
    else:
        needed = len(maps) if kind == "intersection" else min(k, len(maps))
        mask = (stack > threshold).sum(axis=0) >= needed
    return mask.astype(np.uint8), heat


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two binary masks; two empty masks score 1."""
    p, t = np.asarray(pred) > 0, np.asarray(truth) > 0
    union = np.logical_or(p, t).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, t).sum() / union)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = np.asarray(pred) > 0, np.asarray(truth) > 0
    total = p.sum() + t.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(p, t).sum() / total)


def worst_iou_within(score: np.ndarray, threshold: float, margin: float) -> float:
    """The lowest IoU with the mask `score > threshold` of any mask that differs from it only where the score
    is within `margin` of the threshold: how far a mask can move when the score moves by less than `margin`
    (bf16's rounding, say). The worst case flips every such pixel, leaving the sure part of the mask over the
    mask and the unsure pixels together."""
    score = np.asarray(score)
    mask = score > threshold
    unsure = np.abs(score - threshold) < margin
    union = np.logical_or(mask, unsure).sum()
    return 1.0 if union == 0 else float(np.logical_and(mask, ~unsure).sum() / union)
