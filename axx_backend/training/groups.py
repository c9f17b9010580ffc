"""Folds by appearance, so that calibration sees images unlike the ones their heads trained on.

Images of one project come in look-alike groups (the same scanner, site, patient, background photograph).
Random folds put every group on both sides of a split, so out-of-fold predictions are as sure as on the
training images, and a review threshold calibrated on them flags far more than its budget on images from a
new group (measured on the photograph benchmark: 33-42 % flagged on new backgrounds against a 20 % budget).
Grouped cross-validation is the usual remedy; the groups here are clusters of the images' pooled features
(k-means on every member's L2-normalised features, scipy), dealt to folds whole, largest first. Where that
would leave a fold's training part without a class, the caller falls back to stratified random folds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

CLUSTERS_PER_FOLD = 2  # groups per fold: whole groups held out, yet no fold is one odd cluster


def appearance_groups(pooled: Sequence[torch.Tensor], rows: torch.Tensor, k: int, seed: int) -> np.ndarray:
    """Cluster index (0..k-1) of each of `rows`, by k-means++ on the members' L2-normalised pooled features."""
    from scipy.cluster.vq import kmeans2

    x = torch.cat([F.normalize(p[rows].float(), dim=1) for p in pooled], dim=1).double().numpy()
    k = max(1, min(k, len(x)))
    _, labels = kmeans2(x, k, seed=seed, minit="++")
    return labels


def grouped_folds(groups: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray | None:
    """Fold index per item with every group in one fold (largest group to the smallest fold), or None when a
    fold's complement would miss a class or fewer than 2 folds are non-empty."""
    folds = np.zeros(len(groups), dtype=int)
    sizes = np.zeros(k, dtype=int)
    ids, counts = np.unique(groups, return_counts=True)
    for group in ids[np.argsort(-counts, kind="stable")]:
        fold = int(np.argmin(sizes))
        folds[groups == group] = fold
        sizes[fold] += int((groups == group).sum())
    used = np.flatnonzero(sizes)
    classes = set(labels.tolist())
    if len(used) < 2 or any(set(labels[folds != f].tolist()) != classes for f in used):
        return None
    return np.searchsorted(used, folds)  # renumber 0..len(used)-1


def appearance_folds(
    pooled: Sequence[torch.Tensor], rows: torch.Tensor, labels: np.ndarray, k: int, seed: int
) -> np.ndarray | None:
    """`grouped_folds` of `CLUSTERS_PER_FOLD * k` appearance clusters of `rows`, or None (see there)."""
    groups = appearance_groups(pooled, rows, CLUSTERS_PER_FOLD * k, seed)
    return grouped_folds(groups, labels, k)
