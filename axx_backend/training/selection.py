"""Which images get a pixel annotation next: the oracle step of Belharbi et al., one small function per strategy.

Every strategy takes the candidates' `Scores` (per image: the mask uncertainty, the members' disagreement, a
feature vector) and returns the indices of the k picks, in the order they were picked:

- `random`: k candidates drawn with the seeded generator (Belharbi et al. found it a strong baseline);
- `entropy`: the k highest mask entropies (mean binary entropy of the served score map);
- `bald`: the k largest disagreements between the members' maps (mean over pixels of H(mean) - mean H);
- `diverse`: uncertainty-weighted k-center greedy over the ensemble's pooled features: each pick maximises
  entropy x distance to the nearest image that has a mask or was already picked, so k picks are not k
  near-duplicates of the most uncertain image (core-set selection, Sener & Savarese 2018, weighted by
  uncertainty as in BADGE's k-means++ seeding).

Pure numpy: `axx-backend select`, `simulate-al` and the Label Studio views share it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..core.settings import SELECT_STRATEGIES

MAX_DISTANCE = 2.0  # between unit vectors: the distance of an image to an empty set of anchors
MIN_WEIGHT = 1e-3  # an image with no uncertainty still competes on distance (ties broken by distance)


@dataclass
class Scores:
    """What selection reads of each candidate (row i of every array is candidate i)."""

    entropy: np.ndarray  # [N] mask uncertainty, 0..1
    bald: np.ndarray  # [N] disagreement between the members' maps, 0..1
    features: np.ndarray  # [N, D] unit vectors (see `unit_features`)
    anchors: np.ndarray | None = None  # [A, D] unit vectors of images that already have a mask

    def __len__(self) -> int:
        return len(self.entropy)


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """H(p) of a Bernoulli(p) in bits (0..1 for p in [0, 1])."""
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return -(q * np.log2(q) + (1 - q) * np.log2(1 - q))


def map_entropy(score_map: np.ndarray) -> float:
    """Mean binary entropy of a foreground-probability map: how unsure the mask is, 0..1."""
    return float(binary_entropy(score_map).mean())


def map_disagreement(maps: Sequence[np.ndarray]) -> float:
    """Mean over pixels of H(mean_m p_m) - mean_m H(p_m): the members standing in for posterior samples
    (a deep-ensemble BALD); 0 for a single map."""
    stack = np.stack([np.asarray(m, dtype=np.float64) for m in maps])
    return float((binary_entropy(stack.mean(axis=0)) - binary_entropy(stack).mean(axis=0)).mean())


def unit_features(pooled: Sequence[np.ndarray]) -> np.ndarray:
    """Each member's pooled features [N, K_m] scaled to unit length, concatenated and divided by sqrt(M): one
    unit vector per image in which every member counts the same whatever its width."""
    parts = [np.asarray(p, dtype=np.float32) for p in pooled]
    parts = [p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12) for p in parts]
    return np.concatenate(parts, axis=1) / np.sqrt(len(parts))


def pick_random(scores: Scores, k: int, rng: np.random.Generator) -> list[int]:
    return sorted(int(i) for i in rng.choice(len(scores), size=k, replace=False))


def pick_entropy(scores: Scores, k: int, rng: np.random.Generator) -> list[int]:
    return _top(scores.entropy, k)


def pick_bald(scores: Scores, k: int, rng: np.random.Generator) -> list[int]:
    return _top(scores.bald, k)


def pick_diverse(scores: Scores, k: int, rng: np.random.Generator) -> list[int]:
    return weighted_k_center(scores.features, scores.entropy, k, scores.anchors)


def _top(values: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest values; ties go to the lower index (a stable, reproducible order)."""
    order = np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")
    return [int(i) for i in order[:k]]


def weighted_k_center(
    features: np.ndarray, weights: np.ndarray, k: int, anchors: np.ndarray | None = None
) -> list[int]:
    """Greedy k-center on unit vectors, each pick maximising weight x distance to the nearest anchor or pick.

    O(N x D) per pick: 1,000 candidates of 4,608 features take milliseconds per pick.
    """
    x = np.asarray(features, dtype=np.float32)
    w = np.maximum(np.asarray(weights, dtype=np.float64), MIN_WEIGHT)
    nearest = np.full(len(x), MAX_DISTANCE)
    if anchors is not None and len(anchors):
        for start in range(0, len(anchors), 256):  # bounded memory: [N, 256] at a time
            nearest = np.minimum(nearest, _distances(x, np.asarray(anchors, dtype=np.float32)[start : start + 256]))
    picks: list[int] = []
    for _ in range(min(k, len(x))):
        gain = w * nearest
        gain[picks] = -1.0
        best = int(np.argmax(gain))  # the first of equal gains: reproducible
        picks.append(best)
        nearest = np.minimum(nearest, _distances(x, x[best : best + 1]))
    return picks


def _distances(x: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Euclidean distance of each row of `x` to its nearest row of `others` (all unit vectors)."""
    cosine = x @ others.T  # [N, A]
    return np.sqrt(np.clip(2.0 - 2.0 * cosine.max(axis=1), 0.0, None)).astype(np.float64)


PICKERS: dict[str, Callable[[Scores, int, np.random.Generator], list[int]]] = {
    "random": pick_random,
    "entropy": pick_entropy,
    "bald": pick_bald,
    "diverse": pick_diverse,
}


def check_strategy(strategy: str) -> str:
    if strategy not in PICKERS:
        raise ValueError(f"unknown strategy {strategy!r}; choose {', '.join(SELECT_STRATEGIES)}")
    return strategy


def choose(strategy: str, scores: Scores, k: int, rng: np.random.Generator | None = None) -> list[int]:
    """The indices of the k candidates `strategy` picks, in pick order (every candidate, still in the strategy's
    order, when there are k or fewer)."""
    check_strategy(strategy)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return PICKERS[strategy](scores, min(k, len(scores)), rng if rng is not None else np.random.default_rng(0))
