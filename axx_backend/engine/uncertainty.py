"""Monte Carlo statistics per member and the review/flag decision (docs/METHOD.md, steps 3-4)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

EPS = 1e-12
# How far bf16's rounding can move a member's normalised entropy, as a factor: near zero it moves entropies by a
# share of themselves, so the margin alone would call every sure image near a tiny review threshold (a version sure
# of its training images calibrated 0.0027, and all its images ran again in fp32: bf16 served at 1.24x fp32's
# time). `benchmarks/entropy_moves.py` on seven versions and two CPUs: bf16 made an entropy at most 3.09 times
# larger or smaller (2.77 on the first five, hence 3 at first). From thresholds of 0.017 the margin (0.05) is
# the narrower bound.
ENTROPY_REACH = 4.0
# How the reason of a flag by the nearest-image check begins (`decide`; evaluate counts them).
NEAREST_IMAGE_FLAG = "the nearest labelled image"


@dataclass
class MCStats:
    """Statistics of T softmax samples for a batch; entropies are divided by log C (0..1)."""

    mean_probs: torch.Tensor  # [B, C]
    entropy: torch.Tensor  # [B] normalised predictive entropy H(mean) / log C
    mutual_info: torch.Tensor  # [B] BALD: H(mean) - mean_t H(p_t), also / log C
    std_top: torch.Tensor  # [B] std over samples of the winning class's probability


@torch.inference_mode()
def put_rows(stats: MCStats, index: torch.Tensor, other: MCStats) -> None:
    """Overwrite the images `index` of `stats` with `other`'s (the same images, computed again)."""
    for f in fields(MCStats):
        getattr(stats, f.name)[index] = getattr(other, f.name)


def near_a_decision(
    member_probs: Sequence[np.ndarray],
    member_entropy: Sequence[float],
    uncertainty_threshold: float,
    min_uncertain_to_flag: int = 2,
    weights: Sequence[float] | None = None,
    margin: float = 0.0,
    neighbours: Sequence[int] | None = None,
) -> bool:
    """Could moving some members' entropies by less than `margin` across the review threshold (only entropies
    within a factor `ENTROPY_REACH` of it can cross), or swapping the two likeliest classes of members whose two
    are within `margin` in probability, change `decide`'s label or flag? Every combination is tried (at most 4 per
    member). This is where bf16's rounding can change a decision; a member near the threshold changes nothing
    while the others decide the flag and the vote anyway. `neighbours` (as `decide`'s) are held as given: a
    nearest labelled image that bf16's rounding swaps for one of another class is not looked for."""
    if margin <= 0:
        return False
    options = []
    for p, h in zip(member_probs, member_entropy, strict=True):
        p = np.asarray(p, dtype=np.float64)
        t = uncertainty_threshold
        movable = abs(h - t) < margin and t / ENTROPY_REACH < h < t * ENTROPY_REACH
        entropies = [t, t + margin] if movable else [h]
        probs = [p]
        if len(p) > 1:
            first, second = np.argsort(-p, kind="stable")[:2]
            if p[first] - p[second] < margin:
                swapped = p.copy()
                swapped[[first, second]] = p[[second, first]]
                probs.append(swapped)
        options.append([(q, e) for q in probs for e in entropies])
    if all(len(o) == 1 for o in options):  # nothing can move: most images, and no decision to compute
        return False
    rule = (uncertainty_threshold, min_uncertain_to_flag, weights)
    base = decide(member_probs, member_entropy, *rule, neighbours)
    for world in itertools.product(*options):
        other = decide([q for q, _ in world], [e for _, e in world], *rule, neighbours)
        if (other.label, other.flagged) != (base.label, base.flagged):
            return True
    return False


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats; 0 * log 0 = 0."""
    return -(probs * probs.clamp_min(EPS).log()).sum(dim=dim)


def mc_statistics(samples: torch.Tensor) -> MCStats:
    """`samples`: softmax probabilities [T, B, C] of T stochastic passes."""
    num_classes = samples.shape[-1]
    norm = math.log(num_classes) if num_classes > 1 else 1.0
    mean = samples.mean(dim=0)
    predictive = entropy(mean)
    expected = entropy(samples).mean(dim=0)
    top = mean.argmax(dim=-1)
    top_samples = samples.gather(-1, top.view(1, -1, 1).expand(samples.shape[0], -1, 1)).squeeze(-1)
    several = samples.shape[0] > 1 and top_samples.numel() > 0  # (an empty batch has no spread to measure)
    std_top = top_samples.std(dim=0, unbiased=False) if several else torch.zeros_like(predictive)
    return MCStats(mean, predictive / norm, (predictive - expected).clamp_min(0.0) / norm, std_top)


def confidence(mean_probs: np.ndarray) -> float:
    """Ensemble confidence = 1 - normalised entropy of the ensemble mean (the task score)."""
    p = np.asarray(mean_probs, dtype=np.float64)
    if p.size < 2:
        return 1.0
    h = -np.sum(p * np.log(np.clip(p, EPS, None)))
    return float(np.clip(1.0 - h / math.log(p.size), 0.0, 1.0))


@dataclass
class Decision:
    """What the ensemble concludes for one image."""

    label: int  # the majority class of the confident members (or the ensemble argmax when flagged)
    flagged: bool
    agreeing: list[int]  # indices of confident members that voted for `label`
    class_score: float  # mean p_m[label] over the agreeing members (ensemble mean when flagged)
    reason: str


def decide(
    member_probs: Sequence[np.ndarray],
    member_entropy: Sequence[float],
    uncertainty_threshold: float,
    min_uncertain_to_flag: int = 2,
    weights: Sequence[float] | None = None,
    neighbours: Sequence[int] | None = None,
) -> Decision:
    """docs/METHOD.md "Prediction" 4: flag when >= k members are uncertain (every member counts, whatever its
    vote: letting only weighted members flag raised flagged positives from 15 to 26 of 100 on the photograph
    benchmark, at the same flag rate) or no class has a weighted majority of the confident members' votes, or
    (`neighbours`: each member's nearest labelled image's class, engine/neighbours.py) when the nearest labelled
    image of >= k members shows another class than that majority; else that class. `weights`: each member's vote
    (default 1 each, the paper's plain majority; training sets them from held-out predictions only with
    `member_weights=learned`)."""
    probs = [np.asarray(p, dtype=np.float64) for p in member_probs]
    w = np.ones(len(probs)) if weights is None else np.asarray(weights, dtype=np.float64)
    ensemble_mean = np.average(probs, axis=0, weights=w) if w.sum() > 0 else np.mean(probs, axis=0)
    uncertain = [i for i, h in enumerate(member_entropy) if h > uncertainty_threshold]
    confident = [i for i in range(len(probs)) if i not in uncertain]
    fallback = _vote(probs, w, range(len(probs)), ensemble_mean)[0]

    if len(uncertain) >= min_uncertain_to_flag:
        names = ", ".join(str(i) for i in uncertain)
        return Decision(
            fallback, True, [], float(ensemble_mean[fallback]), f"{len(uncertain)} uncertain members ({names})"
        )
    if not confident:
        return Decision(fallback, True, [], float(ensemble_mean[fallback]), "no confident member")

    label, count = _vote(probs, w, confident, ensemble_mean)
    if count * 2 <= sum(float(w[i]) for i in confident) + 1e-12:
        return Decision(fallback, True, [], float(ensemble_mean[fallback]), "no majority among confident members")
    if neighbours is not None:
        against = [i for i, c in enumerate(neighbours) if int(c) != label]
        if len(against) >= min_uncertain_to_flag:
            names = ", ".join(str(i) for i in against)
            reason = f"{NEAREST_IMAGE_FLAG} of {len(against)} members ({names}) shows another class"
            return Decision(fallback, True, [], float(ensemble_mean[fallback]), reason)
    agreeing = [i for i in confident if int(probs[i].argmax()) == label]
    score = float(np.mean([probs[i][label] for i in agreeing]))
    return Decision(label, False, agreeing, score, f"{len(agreeing)} of {len(probs)} members agree")


def _vote(
    probs: Sequence[np.ndarray], weights: np.ndarray, voters: Iterable[int], ensemble_mean: np.ndarray
) -> tuple[int, float]:
    """The class with the most weight of `voters`' votes (each member votes its argmax), ties to the ensemble
    mean, and that weight. A flagged image's most likely class is the vote of every member, sure or not: not
    the mean's argmax, which follows its surest member (on the photograph benchmark the flagged images' class
    was right on 0.80 of them by vote, on 0.36 by the mean, a fine-tuned member being sure of everything)."""
    votes: dict[int, float] = {}
    for i in voters:
        votes[int(probs[i].argmax())] = votes.get(int(probs[i].argmax()), 0.0) + float(weights[i])
    return max(votes.items(), key=lambda kv: (kv[1], ensemble_mean[kv[0]]))
