"""Metrics of docs/METHOD.md "Evaluation", in plain numpy (no scikit-learn dependency).

Classification: accuracy, macro-F1, AUROC (rank-based; one-vs-rest macro for more than two classes),
expected calibration error and reliability bins, the risk-coverage curve. Masks: IoU and Dice per
image and summed over pixels of a whole data set. Uncertainty of any of them: a bootstrap over clusters of
images (images showing the same object err together, so resampling images alone would be too sure).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

import numpy as np

from ..engine.masks import dice, iou  # one definition for the pipeline and its measurement


def accuracy(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float((t == p).mean()) if t.size else math.nan


def flagged_by_class(
    y_true: Sequence[int] | np.ndarray, flagged: Sequence[bool] | np.ndarray, classes: Sequence[str]
) -> dict[str, dict[str, int]]:
    """Per true class: its images (`n`) and how many of them were flagged for review (`flagged`)."""
    t, f = np.asarray(y_true, dtype=int), np.asarray(flagged, dtype=bool)
    return {c: {"n": int((t == i).sum()), "flagged": int(f[t == i].sum())} for i, c in enumerate(classes)}


def macro_f1(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """Unweighted mean of per-class F1 = 2TP / (2TP + FP + FN) over the classes that occur in
    either the truth or the predictions (scikit-learn's default label set)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if not t.size:
        return math.nan
    scores = []
    for c in np.union1d(t, p):
        tp = np.sum((t == c) & (p == c))
        fp = np.sum((t != c) & (p == c))
        fn = np.sum((t == c) & (p != c))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks (what Mann-Whitney needs)."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_vals[end + 1] == sorted_vals[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def binary_auroc(scores: Sequence[float] | np.ndarray, positive: Sequence[bool] | np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2.

    Mann-Whitney: AUC = (sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg).
    NaN when one of the two groups is empty (the AUROC is undefined).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc(probs: np.ndarray, y_true: Sequence[int] | np.ndarray) -> float:
    """AUROC of class probabilities [N, C]: for C = 2 the binary AUROC of class 1; otherwise the
    macro mean of one-vs-rest AUROCs over the classes that have both positives and negatives."""
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(y_true)
    if p.ndim != 2 or len(p) != len(t):
        raise ValueError(f"probs must be [N, C] with N = {len(t)}, got {p.shape}")
    if p.shape[1] == 2:
        return binary_auroc(p[:, 1], t == 1)
    values = [binary_auroc(p[:, c], t == c) for c in range(p.shape[1])]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins (lo, hi] over [0, 1]; a confidence of exactly 0 goes to the first bin."""
    return np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> list[dict[str, float]]:
    """Per equal-width bin: its edges, the image count, mean confidence and accuracy (NaN when empty)."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    index = _bin_index(conf, n_bins)
    bins = []
    for b in range(n_bins):
        sel = index == b
        n = int(sel.sum())
        bins.append(
            {
                "lo": b / n_bins,
                "hi": (b + 1) / n_bins,
                "count": n,
                "confidence": float(conf[sel].mean()) if n else math.nan,
                "accuracy": float(ok[sel].mean()) if n else math.nan,
            }
        )
    return bins


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """ECE = sum over bins of (n_b / N) * |accuracy_b - mean confidence_b| (Guo et al. 2017)."""
    conf = np.asarray(confidence, dtype=np.float64)
    if not conf.size:
        return math.nan
    total = 0.0
    for b in reliability_bins(conf, correct, n_bins):
        if b["count"]:
            total += b["count"] / conf.size * abs(b["accuracy"] - b["confidence"])
    return float(total)


def risk_coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray | float]:
    """Keep the k most confident images, k = 1..N: coverage k/N and accuracy of those k.

    Ties in confidence are broken by input order (stable sort), so the curve is deterministic.
    `aurc` is the area under the risk (1 - accuracy) curve, the mean over k (lower is better).
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if not conf.size:
        return {"coverage": np.zeros(0), "accuracy": np.zeros(0), "aurc": math.nan}
    order = np.argsort(-conf, kind="mergesort")
    k = np.arange(1, conf.size + 1)
    selective = np.cumsum(ok[order]) / k
    return {"coverage": k / conf.size, "accuracy": selective, "aurc": float(np.mean(1.0 - selective))}


def cluster_bootstrap(
    statistic: Callable[[np.ndarray], float], clusters: Sequence[Hashable], n_resamples: int = 2000, seed: int = 0
) -> np.ndarray:
    """[n_resamples] values of `statistic(rows)` where each `rows` is the images of G clusters drawn with
    replacement from the G clusters of `clusters` (one id per image; an image drawn twice appears twice in
    `rows`). `statistic` maps such an index array into the per-image arrays to a number (NaN allowed)."""
    members: dict[Hashable, list[int]] = {}
    for i, c in enumerate(clusters):
        members.setdefault(c, []).append(i)
    groups = [np.array(rows) for rows in members.values()]
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples)
    for r in range(n_resamples):
        drawn = rng.integers(0, len(groups), size=len(groups))
        out[r] = statistic(np.concatenate([groups[g] for g in drawn]) if groups else np.zeros(0, dtype=int))
    return out


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` interval of the finite `values` (NaN, NaN when none is finite)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return math.nan, math.nan
    low, high = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


class MaskScore:
    """Accumulates one mask rule over images: the mean of per-image IoU / Dice, and the
    pixel-summed IoU (sum of intersections / sum of unions over the data set)."""

    def __init__(self) -> None:
        self.ious: list[float] = []
        self.dices: list[float] = []
        self.intersection = 0
        self.union = 0
        self.pred_pixels = 0
        self.true_pixels = 0

    def add(self, pred: np.ndarray | None, truth: np.ndarray) -> None:
        t = np.asarray(truth) > 0
        p = np.zeros_like(t) if pred is None else np.asarray(pred) > 0
        if p.shape != t.shape:
            raise ValueError(f"mask shape {p.shape} differs from the ground truth's {t.shape}")
        self.ious.append(iou(p, t))
        self.dices.append(dice(p, t))
        self.intersection += int(np.logical_and(p, t).sum())
        self.union += int(np.logical_or(p, t).sum())
        self.pred_pixels += int(p.sum())
        self.true_pixels += int(t.sum())

    @property
    def n(self) -> int:
        return len(self.ious)

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        """{"iou": {mean, pixel, n}, "dice": {mean, pixel, n}}; None where there is no image."""
        if not self.n:
            empty: dict[str, float | int | None] = {"mean": None, "pixel": None, "n": 0}
            return {"iou": dict(empty), "dice": dict(empty)}
        pixel_iou = self.intersection / self.union if self.union else 1.0
        total = self.pred_pixels + self.true_pixels
        pixel_dice = 2 * self.intersection / total if total else 1.0
        return {
            "iou": {"mean": float(np.mean(self.ious)), "pixel": float(pixel_iou), "n": self.n},
            "dice": {"mean": float(np.mean(self.dices)), "pixel": float(pixel_dice), "n": self.n},
        }
