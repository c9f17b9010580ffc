"""The bf16 recheck margin a version serves with, measured on its own images (docs/METHOD.md step 1).

Serving in bf16 runs again in fp32 the images whose decision bf16's rounding could change: those where moving a
member's entropy, or its two likeliest classes, by less than the margin changes the label or the flag
(`engine.uncertainty.near_a_decision`). How far bf16 moves them depends on the members, their fine-tuning and the
CPU: on an Intel host with AMX it moved a fine-tuned EfficientNet-Lite0's entropy from 0.674 to 0.769 and from
0.619 to 0.805 across a review threshold of 0.690, where the default margin is 0.05, and those flags changed. So
training runs the images the review threshold was calibrated on in fp32 and in bf16 and widens the margin to the
narrowest one tried that covers the largest entropy move bf16 made there near the threshold (a changed decision
is rare, one image in 50 to 100, so a few dozen images seldom show one; the moves that cause them show on every
image), and that would have run again in fp32 every image whose decision bf16 changed there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..engine.uncertainty import MCStats, decide, near_a_decision

# The margins tried, narrowest first; wider ones would run most images again (at 0.1 about 8 % of binary and 16 %
# of multi-class photographs were near a decision, README "The recheck").
MARGINS = (0.05, 0.075, 0.1, 0.15, 0.2)
MAX_IMAGES = 64  # a bf16 and an fp32 pass each: about 10 s for the offline members at 320 px on 2 cores


@dataclass(frozen=True)
class Rule:
    """The served decision rule: the version's review threshold, flag count and member weights."""

    threshold: float
    min_uncertain: int
    weights: Sequence[float] | None


@dataclass(frozen=True)
class MemberView:
    """One image as the members see it in one precision: each member's probabilities and normalised entropy."""

    probs: list[np.ndarray]
    entropy: list[float]


def views(stats: Sequence[MCStats]) -> list[MemberView]:
    """Per image, every member's mean probabilities and entropy of a pass."""
    probs = [s.mean_probs.float().cpu().numpy() for s in stats]
    entropy = [s.entropy.float().cpu().numpy() for s in stats]
    return [MemberView([p[b] for p in probs], [float(h[b]) for h in entropy]) for b in range(len(probs[0]))]


def changed_by_bf16(fp32: Sequence[MemberView], bf16: Sequence[MemberView], rule: Rule) -> list[MemberView]:
    """The bf16 views of the images whose label or flag differs from fp32's under `rule`."""

    def decision(view: MemberView) -> tuple[int, bool]:
        d = decide(view.probs, view.entropy, rule.threshold, rule.min_uncertain, rule.weights)
        return d.label, d.flagged

    return [b for a, b in zip(fp32, bf16, strict=True) if decision(a) != decision(b)]


def margin_for(changed: Sequence[MemberView], rule: Rule, floor: float) -> tuple[float, int]:
    """The narrowest margin of `MARGINS` (never under `floor`) at which every changed image is near a decision, and
    how many changed images no margin tried reaches (they do not widen it: no margin would catch them)."""
    candidates = sorted({floor, *(m for m in MARGINS if m > floor)})
    chosen, missed = floor, 0
    for view in changed:
        reach = (m for m in candidates if _near(view, rule, m))
        hit = next(reach, None)
        if hit is None:
            missed += 1
        else:
            chosen = max(chosen, hit)
    return chosen, missed


def largest_move_near(fp32: Sequence[MemberView], bf16: Sequence[MemberView], threshold: float) -> float:
    """The largest move of a member's entropy from fp32 to bf16 among those within the widest margin tried of
    `threshold` in either precision (the moves that can carry a member across it)."""
    widest = MARGINS[-1]
    moves = [
        abs(b - a)
        for view_a, view_b in zip(fp32, bf16, strict=True)
        for a, b in zip(view_a.entropy, view_b.entropy, strict=True)
        if min(abs(a - threshold), abs(b - threshold)) < widest
    ]
    return max(moves, default=0.0)


def covering(move: float, floor: float) -> float:
    """The narrowest margin tried (never under `floor`) that a move of `move` does not exceed; the widest beyond."""
    return max(floor, next((m for m in MARGINS if m >= move), MARGINS[-1]))


def _near(view: MemberView, rule: Rule, margin: float) -> bool:
    return near_a_decision(view.probs, view.entropy, rule.threshold, rule.min_uncertain, rule.weights, margin)


def measure_margin(
    passes: Sequence[tuple[Sequence[MCStats], Sequence[MCStats]]], rule: Rule, floor: float
) -> tuple[float, dict[str, float | int]]:
    """The margin for batches of (fp32, bf16) member statistics of the same images, and what was seen."""
    fp32 = [v for a, _ in passes for v in views(a)]
    bf16 = [v for _, b in passes for v in views(b)]
    changed = changed_by_bf16(fp32, bf16, rule)
    for_changes, missed = margin_for(changed, rule, floor)
    move = largest_move_near(fp32, bf16, rule.threshold)
    margin = max(for_changes, covering(move, floor))
    seen = {"images": len(fp32), "changed": len(changed), "missed": missed, "largest_move": move, "margin": margin}
    return margin, seen


def evenly_spaced(count: int, limit: int = MAX_IMAGES) -> list[int]:
    """`limit` indices spread over `count` items (all of them when there are no more)."""
    if count <= limit:
        return list(range(count))
    return [int(i * count / limit) for i in range(limit)]


def as_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> what `Annotator.preprocess` gives: float in [0, 1] on `device`."""
    return images.to(device).float().div_(255.0)
