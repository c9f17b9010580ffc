"""Calibration on out-of-fold predictions: temperatures and the uncertainty threshold (docs/METHOD.md "Learning" 4)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.uncertainty import decide


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature T minimising the NLL of softmax(logits / T) (Guo et al. 2017).

    With a standard-normal prior on log T (a MAP estimate): on a small, perfectly separated
    validation split the plain NLL keeps falling as T -> 0 and would make every member
    certain; the prior's weight fades as 1/N with more validation images.
    A 1-D grid search over log T, then refined.
    """
    if len(labels) == 0:
        return 1.0
    logits, labels = logits.double(), labels.long()
    n = len(labels)

    def nll(t: float) -> float:
        return float(F.cross_entropy(logits / t, labels)) + float(np.log(t)) ** 2 / (2.0 * n)

    grid = np.exp(np.linspace(np.log(bounds[0]), np.log(bounds[1]), 81))
    best = min(grid, key=nll)
    fine = best * np.exp(np.linspace(-0.06, 0.06, 25))
    return float(min(fine, key=nll))


def flag_rate(
    member_probs: Sequence[np.ndarray],
    member_entropy: Sequence[np.ndarray],
    threshold: float,
    min_uncertain: int,
    weights: Sequence[float] | None = None,
    neighbours: np.ndarray | None = None,
) -> tuple[float, np.ndarray]:
    """Share of images the decision rule flags at `threshold`; also the per-image flags. `neighbours`: [M, n]
    each member's nearest labelled image's class (the nearest-image check on), or None."""
    n = len(member_entropy[0])
    views = (image_view(member_probs, member_entropy, neighbours, i) for i in range(n))
    flags = np.array([decide(p, h, threshold, min_uncertain, weights, nn).flagged for p, h, nn in views], dtype=bool)
    return (float(flags.mean()) if n else 0.0), flags


def calibrate_uncertainty_threshold(
    member_probs: Sequence[np.ndarray],
    member_entropy: Sequence[np.ndarray],
    labels: np.ndarray | None,
    target_flag_rate: float,
    min_uncertain: int,
    default: float = 0.5,
    max_candidates: int = 200,
    weights: Sequence[float] | None = None,
    neighbours: np.ndarray | None = None,
) -> float:
    """The entropy threshold that flags as much of `target_flag_rate` as the calibration images allow, without
    exceeding it; among thresholds that flag as many, the one with the best selective accuracy (accuracy on
    the unflagged images), then the one nearest the uncalibrated default.

    Training calls it on out-of-fold predictions (each image scored by a head that never saw it), so the share
    flagged here is the share flagged on new images of the same kind: spending the budget is what holds the
    flag rate near it. Selective accuracy ranked thresholds first until the calibration set shrank to the
    held-out split of a fine-tuned ensemble, 42-50 images from a few look-alike groups: where the members'
    errors there were sure ones, flagging only removed right images, the threshold went to 1.0, and 3.5 % of
    new binary photographs were flagged against a 20 % budget (a 50-image split kept at the default flagged
    41 % of new multi-class images and 4.5 % of binary ones).

    `labels` None: unlabelled calibration images (the tasks still to annotate, `trainer.calibrate_review`); the
    budget alone decides, ties go to the threshold nearest the default. `neighbours` as `flag_rate`'s: the images
    the nearest-image check flags count against the budget whatever the threshold.
    """
    n = len(member_entropy[0]) if len(member_entropy) else 0
    values = np.unique(np.concatenate([np.asarray(h) for h in member_entropy]))
    if len(values) > max_candidates:
        values = np.quantile(values, np.linspace(0, 1, max_candidates))
    candidates = np.unique(np.concatenate([values, [default, 1.0]]))
    best: tuple[float, float, float] | None = None  # (flag rate, selective accuracy, -distance to default)
    chosen = 1.0
    for t in candidates:
        views = (image_view(member_probs, member_entropy, neighbours, i) for i in range(n))
        decisions = [decide(p, h, float(t), min_uncertain, weights, nn) for p, h, nn in views]
        flags = np.array([d.flagged for d in decisions], dtype=bool)
        if n == 0 or flags.mean() > target_flag_rate or flags.all():
            continue
        selective = 0.0
        if labels is not None:
            correct = np.array([d.label for d in decisions]) == np.asarray(labels)
            selective = round(float(correct[~flags].mean()), 9)
        key = (round(float(flags.mean()), 9), selective, -abs(float(t) - default))
        if best is None or key > best:
            best, chosen = key, float(t)
    return chosen


def image_view(
    member_probs: Sequence[np.ndarray], member_entropy: Sequence[np.ndarray], neighbours: np.ndarray | None, i: int
) -> tuple[list[np.ndarray], list[float], list[int] | None]:
    """Image i's (member probabilities, member entropies, members' nearest labelled classes or None)."""
    nearest = None if neighbours is None else [int(c) for c in np.asarray(neighbours)[:, i]]
    return [p[i] for p in member_probs], [float(h[i]) for h in member_entropy], nearest


def risk_coverage(correct: np.ndarray, confidence: np.ndarray) -> list[dict[str, float]]:
    """Accuracy of the most confident share of images, for coverage 10 %, 20 %, ..., 100 %."""
    order = np.argsort(-np.asarray(confidence))
    correct = np.asarray(correct, dtype=float)[order]
    points = []
    for coverage in np.linspace(0.1, 1.0, 10):
        k = max(1, int(round(coverage * len(correct))))
        points.append(
            {"coverage": round(float(coverage), 2), "accuracy": float(correct[:k].mean()) if len(correct) else 0.0}
        )
    return points
