"""Self-training on the images still to annotate: the served heads learn from the labelled images and from
unlabelled ones that the ensemble decides without a flag and with every member's vote (pseudo-labels, Lee 2013),
balanced to the labelled images' classes within each scene group of the unlabelled images.

The unlabelled images a project still has to annotate show the objects and scenes the backend will be asked
about; the labelled ones often do not (on the photograph benchmark no test object appears in training). Heads
that also learn from the backlog's sure images move towards them. Learning every sure image failed on the binary
paste photographs (accuracy 0.980 -> 0.880, seed 0) although all 121 had the right class: the sure images of one
background photograph were all Object, so the heads learnt "this scene means Object". Hence the groups
(`scene_groups`): a scene gives pseudo-labels only in the labelled class proportions, and one sure of a single
class gives none. With them accuracy rose at the four photograph variants (seed 0: 0.980 -> 0.990 binary paste,
0.960 -> 0.985 binary natural, 0.912 -> 0.938 and 0.838 -> 0.863 multi-class), but the budget's flags moved to
positives, which get no mask (end to end 0.675 -> 0.609 at binary paste, 0.564 -> 0.511 at natural
multi-class). At seed 1 accuracy rose at all four again (+1.0 to +3.1) and end to end moved -0.038 to +0.014; over
the eight runs -0.018 on average. At seed 2 multi-class natural accuracy fell 0.6 points and end to end went from
1.31x to 1.235x the plain reference's. So it is off by default (`AXX_PSEUDO_LABELS`; README, "The flag budget on
the images still to annotate").

Only the served heads change: temperatures, member weights and the out-of-fold calibration stay those of heads
that never saw an unlabelled image, and the review threshold is spent on the unlabelled images again with the
final heads (the trainer). Images the ensemble flags or splits on never become pseudo-labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..core.settings import Settings
from ..engine.ensemble import Ensemble
from ..engine.uncertainty import decide
from .features import FeatureCache
from .groups import CLUSTERS_PER_FOLD, MAX_FOLDS, silhouette_groups
from .heads import Heads, MemberStats, Split, retrain


@dataclass(frozen=True)
class PseudoLabels:
    """Cache rows of unlabelled images and the class the ensemble gives each."""

    rows: torch.Tensor  # [n] long
    labels: torch.Tensor  # [n] long
    candidates: int = 0  # the rows decided without a flag and unanimously, before the balancing

    def __len__(self) -> int:
        return len(self.rows)


def choose_pseudo_labels(
    pool: MemberStats,
    threshold: float,
    min_uncertain: int,
    weights: Sequence[float],
    prior: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> PseudoLabels:
    """The rows of `pool` that the decision rule does not flag at `threshold` and every member votes for;
    with `prior` (class frequencies), only the surest of them in those proportions (`balance_to_prior`),
    within each of `groups` (one per row of `pool`: its appearance group) when given."""
    positions, labels, scores = [], [], []
    for k in range(len(pool.index)):
        probs = [p[k] for p in pool.probs]
        entropy = [float(h[k]) for h in pool.entropy]
        decision = decide(probs, entropy, threshold, min_uncertain, weights, pool.nearest(pool.index[k]))
        if not decision.flagged and len(decision.agreeing) == len(probs):
            positions.append(k)
            labels.append(decision.label)
            scores.append(decision.class_score)
    chosen, classes, sureness = np.array(positions, dtype=np.int64), np.array(labels, dtype=np.int64), np.array(scores)
    candidates = len(chosen)
    if prior is not None:
        group = np.zeros(len(chosen), dtype=np.int64) if groups is None else np.asarray(groups)[chosen]
        keep = [
            in_group[balance_to_prior(classes[in_group], sureness[in_group], prior)]
            for in_group in (np.flatnonzero(group == g) for g in np.unique(group))
        ]
        keep_all = np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
        chosen, classes = chosen[keep_all], classes[keep_all]
    index = np.asarray(pool.index, dtype=np.int64)
    return PseudoLabels(torch.from_numpy(index[chosen]), torch.from_numpy(classes), candidates)


def balance_to_prior(labels: np.ndarray, scores: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Indices of the highest-`scores` entries of each class, as many as keep the classes in `prior`'s
    proportions with none left short: the largest total n with floor(n * prior[c]) <= the entries of class c
    (none when a class of `prior` has none)."""
    prior = np.asarray(prior, dtype=np.float64) / np.sum(prior)
    counts = np.bincount(labels.astype(np.int64), minlength=len(prior))[: len(prior)]
    present = prior > 0
    total = int(np.floor(np.min(counts[present] / prior[present]) + 1e-9))
    keep: list[int] = []
    for c in np.flatnonzero(present):
        members = np.flatnonzero(labels == c)
        quota = min(int(np.floor(total * prior[c] + 1e-9)), len(members))
        keep.extend(members[np.argsort(-scores[members], kind="stable")[:quota]].tolist())
    return np.sort(np.array(keep, dtype=np.int64))


def scene_groups(averaged: Sequence[torch.Tensor], pool: MemberStats, seed: int) -> np.ndarray:
    """Appearance group of each row of `pool`: k-means on the members' global-average features of the pool
    alone (groups.py), which describe the scene more than the object, with 2 to 10 clusters (the calibration
    folds' number), as many as give the best silhouette. On the four photograph variants that was 5 or 6: the
    pool's 5 background photographs (adjusted Rand index 0.78-0.97)."""
    rows = torch.tensor(pool.index, dtype=torch.long)
    return silhouette_groups(averaged, rows, CLUSTERS_PER_FOLD * MAX_FOLDS, seed)


def retrain_with_pseudo_labels(
    ensemble: Ensemble, cache: FeatureCache, split: Split, heads: Heads, pseudo: PseudoLabels, settings: Settings
) -> None:
    """Each member's served head trained again, on every labelled image plus `pseudo`, for the epochs its
    early stopping chose (`heads.metrics[name]["epochs"]`)."""
    labelled = split.labelled
    rows = torch.cat([labelled, pseudo.rows])
    targets = torch.cat([split.labels[labelled], pseudo.labels])
    for member, pooled in zip(ensemble.members, cache.pooled, strict=True):
        retrain(member, pooled[rows], targets, int(heads.metrics[member.name]["epochs"]), settings)


def class_counts(pseudo: PseudoLabels, classes: Sequence[str]) -> dict[str, int]:
    counts = np.bincount(pseudo.labels.numpy(), minlength=len(classes))
    return {c: int(n) for c, n in zip(classes, counts, strict=True)}
