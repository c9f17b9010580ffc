"""Folds by appearance, so that calibration sees images unlike the ones their heads trained on.

Images of one project come in look-alike groups (the same scanner, site, patient, background photograph).
Random folds put every group on both sides of a split, so out-of-fold predictions are as sure as on the
training images, and a review threshold calibrated on them flags far more than its budget on images from a
new group (measured on the photograph benchmark: 33-42 % flagged on new backgrounds against a 20 % budget).
Grouped cross-validation is the usual remedy; the groups here are clusters of the images' pooled features
(k-means on every member's L2-normalised features, scipy), dealt to folds whole by scikit-learn's
`StratifiedGroupKFold`, which keeps each fold's class mix near the whole set's. Where that would leave a
fold's training part without a class, the caller falls back to stratified random folds.

The groups are clustered once, on the features as extracted, before any fine-tuning (`FeatureCache.groups`):
features fine-tuned on the labels cluster by class, and folds of such groups held out one class at a time.
A head trained on the rest then learnt "looks like the held-out images' backgrounds: the other class" and
scored its fold below chance (photograph benchmark, binary: the ResNet-50 member's out-of-fold accuracy
0.28 with those folds, 0.78 with frozen-feature groups, 0.75 on the test images).

They cluster the global averages (`FeatureCache.averaged`), not the top-10 % pooled features the heads read:
those describe the object more than the scene, and cluster by class too. Tried on the multi-class photographs
(runs q79, q80): at seed 0 the out-of-fold accuracy fell to 0.685 (0.880 with the averages; 0.894 on the test
images), and the threshold calibrated on it flagged 5 % of the test images against the 20 % budget.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

CLUSTERS_PER_FOLD = 2  # groups per fold: whole groups held out, yet no fold is one odd cluster
MAX_FOLDS = 5


def appearance_groups(
    pooled: Sequence[torch.Tensor], rows: torch.Tensor, k: int, seed: int, others: torch.Tensor | None = None
) -> np.ndarray:
    """Cluster index (0..k-1) of each of `rows`, by k-means++ on the members' L2-normalised pooled features; with
    `others`, then the nearest cluster of each of them (after those of `rows`)."""
    from scipy.cluster.vq import vq

    centroids, labels = kmeans(normalised(pooled, rows), k, seed)
    if others is None or not len(others):
        return labels
    return np.concatenate([labels, vq(normalised(pooled, others), centroids)[0]])


def kmeans(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Centroids and cluster index (0..k-1) of each row of `x`, k-means++ (scipy)."""
    from scipy.cluster.vq import kmeans2

    return kmeans2(x, max(1, min(k, len(x))), seed=seed, minit="++")


def normalised(pooled: Sequence[torch.Tensor], index: torch.Tensor) -> np.ndarray:
    """The members' L2-normalised features of the rows `index`, side by side: what the clusters are of."""
    return torch.cat([F.normalize(p[index].float(), dim=1) for p in pooled], dim=1).double().numpy()


def silhouette_groups(pooled: Sequence[torch.Tensor], rows: torch.Tensor, max_k: int, seed: int) -> np.ndarray:
    """`appearance_groups` of `rows` with the number of clusters (2 to `max_k`) of the best silhouette: chosen
    without a label (all in one group when fewer than 3 rows)."""
    from sklearn.metrics import silhouette_score

    x = normalised(pooled, rows)
    best, best_score = np.zeros(len(rows), dtype=np.int64), -np.inf
    for k in range(2, min(max_k, len(rows) - 1) + 1):
        groups = kmeans(x, k, seed)[1]  # appearance_groups on the features normalised once
        if len(np.unique(groups)) < 2:
            continue
        score = float(silhouette_score(x, groups))
        if score > best_score:
            best, best_score = groups, score
    return best


def cache_groups(pooled: Sequence[torch.Tensor], seed: int, labelled: torch.Tensor | None = None) -> np.ndarray:
    """Appearance group of every cached sample: enough clusters for `MAX_FOLDS` folds of `CLUSTERS_PER_FOLD`.
    With `labelled` (a bool mask), the clusters are those of the labelled samples and every other sample joins
    its nearest: the folds of the labelled images do not depend on how many unlabelled ones come along."""
    n = len(pooled[0])
    labelled = torch.ones(n, dtype=torch.bool) if labelled is None else labelled
    rows, others = torch.nonzero(labelled).flatten(), torch.nonzero(~labelled).flatten()
    groups = appearance_groups(pooled, rows, CLUSTERS_PER_FOLD * MAX_FOLDS, seed, others)
    out = np.empty(n, dtype=groups.dtype)
    out[torch.cat([rows, others]).numpy()] = groups
    return out


def grouped_folds(groups: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray | None:
    """Fold index per item, every group in one fold and each fold's class mix near the whole set's
    (`StratifiedGroupKFold`); fewer folds when there are fewer groups. None when a fold's complement would
    miss a class or fewer than 2 folds are possible."""
    from sklearn.model_selection import StratifiedGroupKFold

    k = min(k, len(np.unique(groups)))
    if k < 2:
        return None
    folds = np.zeros(len(groups), dtype=int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has fewer than k members"
        try:
            splits = list(StratifiedGroupKFold(n_splits=k).split(np.zeros(len(labels)), labels, groups))
        except ValueError:  # every class smaller than k
            return None
    for fold, (_, held) in enumerate(splits):
        folds[held] = fold
    used = np.unique(folds)
    classes = set(labels.tolist())
    if len(used) < 2 or any(set(labels[folds != f].tolist()) != classes for f in used):
        return None
    return np.searchsorted(used, folds)  # renumber 0..len(used)-1
