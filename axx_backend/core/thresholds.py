"""Choosing mask thresholds on validation images with ground-truth masks (docs/METHOD.md "Mask").

The probe of docs/METHOD.md showed that a threshold tuned per member and then AND-ed shrinks the mask
(IoU 0.237 vs 0.350 with one threshold tuned for the AND): each fusion rule gets its own threshold,
chosen where that rule's mean IoU is highest. Use validation data only, never the test split.

The one implementation for both training (training/pixels.py, on the oracle masks) and `evaluate`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .settings import parse_fusion

# Candidate thresholds: 0.05, 0.10, ..., 0.95 (the maps are min-max normalised to [0, 1]).
DEFAULT_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
# The fusion rules a version calibrates (training) and evaluate reports, each at its own threshold.
FUSION_RULES: tuple[str, ...] = ("mean", "intersection")


def rule_map(maps: Sequence[np.ndarray], rule: str) -> np.ndarray:
    """One map whose threshold at t equals `fuse_maps(maps, rule, t)`'s mask (for t in [0, 1)).

    mean -> the average map; intersection -> the pixel-wise minimum (every member above t);
    votes:k -> the k-th largest value (at least k members above t).
    """
    stack = np.stack([np.asarray(m, dtype=np.float32) for m in maps])
    kind, k = parse_fusion(rule)
    if kind == "mean":
        return stack.mean(axis=0)
    if kind == "intersection":
        return stack.min(axis=0)
    k = min(k, len(maps))
    return np.sort(stack, axis=0)[len(maps) - k]


def threshold_ious(
    score_maps: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray], grid: Sequence[float] = DEFAULT_GRID
) -> np.ndarray:
    """Mean over images of IoU(score_map > t, gt) for each t of `grid`: shape [len(grid)]."""
    if len(score_maps) != len(gt_masks):
        raise ValueError(f"{len(score_maps)} maps but {len(gt_masks)} ground-truth masks")
    if not score_maps:
        raise ValueError("no validation image with a mask to calibrate on")
    thresholds = np.asarray(grid, dtype=np.float32)
    totals = np.zeros(len(thresholds))
    for score, gt in zip(score_maps, gt_masks, strict=True):
        t = np.asarray(gt) > 0
        s = np.asarray(score, dtype=np.float32)
        if s.shape != t.shape:
            raise ValueError(f"map shape {s.shape} differs from the mask's {t.shape}")
        pred = s[None] > thresholds[:, None, None]  # [G, H, W]
        inter = np.logical_and(pred, t).sum(axis=(1, 2))
        union = np.logical_or(pred, t).sum(axis=(1, 2))
        totals += np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return totals / len(score_maps)


def calibrate_fusion(
    maps_per_image: Sequence[Sequence[np.ndarray]],
    gt_masks: Sequence[np.ndarray],
    rules: Sequence[str] = FUSION_RULES,
    grid: Sequence[float] = DEFAULT_GRID,
) -> dict[str, float]:
    """{rule: the threshold of `grid` with the highest mean validation IoU for that rule}.

    `maps_per_image[i]`: the normalised maps ([H, W] in [0, 1]) that would be fused for image i (the
    agreeing members'), at the size of `gt_masks[i]`. Ties go to the lowest threshold.
    """
    return best_thresholds(fusion_scores(maps_per_image, gt_masks, rules, grid), grid)


def best_thresholds(scores: Mapping[str, np.ndarray], grid: Sequence[float] = DEFAULT_GRID) -> dict[str, float]:
    """{rule: its best threshold} from `fusion_scores` (computed once, read several ways)."""
    return {rule: float(grid[int(np.argmax(s))]) for rule, s in scores.items()}


def fusion_scores(
    maps_per_image: Sequence[Sequence[np.ndarray]],
    gt_masks: Sequence[np.ndarray],
    rules: Sequence[str] = FUSION_RULES,
    grid: Sequence[float] = DEFAULT_GRID,
) -> dict[str, np.ndarray]:
    """{rule: mean validation IoU at each threshold of `grid`}."""
    return {rule: threshold_ious([rule_map(maps, rule) for maps in maps_per_image], gt_masks, grid) for rule in rules}


def calibrate_members(
    member_maps: Mapping[str, Sequence[np.ndarray]],
    gt_masks: Sequence[np.ndarray],
    grid: Sequence[float] = DEFAULT_GRID,
) -> dict[str, float]:
    """{member: its own best threshold}, for a member's mask on its own."""
    return {
        name: float(grid[int(np.argmax(threshold_ious(maps, gt_masks, grid)))]) for name, maps in member_maps.items()
    }


def choose_rule(
    maps_per_image: Sequence[Sequence[np.ndarray]],
    gt_masks: Sequence[np.ndarray],
    rules: Sequence[str] = FUSION_RULES,
    grid: Sequence[float] = DEFAULT_GRID,
) -> tuple[str, float, float]:
    """(rule, threshold, validation IoU) of the best rule: what a version should serve."""
    return best_rule(fusion_scores(maps_per_image, gt_masks, rules, grid), grid)


def best_rule(scores: Mapping[str, np.ndarray], grid: Sequence[float] = DEFAULT_GRID) -> tuple[str, float, float]:
    """`choose_rule` from `fusion_scores` already computed."""
    best = max(scores, key=lambda r: (float(scores[r].max()), r == "mean"))  # a tie goes to mean
    i = int(np.argmax(scores[best]))
    return best, float(grid[i]), float(scores[best][i])
