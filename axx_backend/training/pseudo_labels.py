"""Self-training on the images still to annotate: the served heads learn from the labelled images and from the
unlabelled ones that the ensemble decides without a flag and with every member's vote (pseudo-labels, Lee 2013).

The unlabelled images a project still has to annotate show the objects and scenes the backend will be asked
about; the labelled ones often do not (on the photograph benchmark no test object appears in training). Heads
that also learn from the backlog's sure images move towards those objects: on the natural photographs (seed 0,
with the pool) accuracy went from 0.960 to 0.980 (binary) and from 0.838 to 0.863 (multi-class). But on the
binary paste photographs it fell from 0.980 to 0.880: the sure pool images were mostly objects (83 against 38
backgrounds), and heads taught that called new backgrounds Object. So it is off by default (`AXX_PSEUDO_LABELS`;
README, "The flag budget on the images still to annotate").

Only the served heads change: temperatures, member weights and the out-of-fold calibration stay those of heads
that never saw an unlabelled image, and the review threshold is spent on the unlabelled images again with the
final heads (the trainer). Images the ensemble flags or splits on never become pseudo-labels: no image the
labelled images' heads are unsure of is learnt as a label.
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
from .heads import Heads, MemberStats, Split, retrain


@dataclass(frozen=True)
class PseudoLabels:
    """Cache rows of unlabelled images and the class the ensemble gives each."""

    rows: torch.Tensor  # [n] long
    labels: torch.Tensor  # [n] long

    def __len__(self) -> int:
        return len(self.rows)


def choose_pseudo_labels(
    pool: MemberStats, threshold: float, min_uncertain: int, weights: Sequence[float]
) -> PseudoLabels:
    """The rows of `pool` that the decision rule does not flag at `threshold` and every member votes for."""
    rows, labels = [], []
    for k, row in enumerate(pool.index):
        probs = [p[k] for p in pool.probs]
        entropy = [float(h[k]) for h in pool.entropy]
        decision = decide(probs, entropy, threshold, min_uncertain, weights)
        if not decision.flagged and len(decision.agreeing) == len(probs):
            rows.append(row)
            labels.append(decision.label)
    return PseudoLabels(torch.tensor(rows, dtype=torch.long), torch.tensor(labels, dtype=torch.long))


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
