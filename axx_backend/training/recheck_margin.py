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

Masks have a margin of their own (`Settings.precision_recheck_mask`): an image whose mask could fall under
`precision_recheck_iou` against fp32's if every pixel within the margin of the mask's threshold flipped runs again
in fp32. That test is exact for an image whose score map bf16 moves by no more than the margin near the threshold;
bf16 moved a version's maps there by 0.009-0.014 on the median image, 0.023-0.029 at the 90th percentile and by up
to 0.18 (a fixed 0.01 left one mask at IoU 0.889 on an Intel host with AMX). So the same images, where both
precisions serve a mask, give the version's mask margin: the narrowest of `MASK_MARGINS` that covers the largest
move near the threshold of nine images in ten there (for them the test is then exact; covering every image would
run most masked images again), widened to send to fp32 every mask bf16 left under the IoU floor there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from ..engine.annotator import Annotator, Forward
from ..engine.masks import iou, worst_iou_within
from ..engine.uncertainty import MCStats, decide, near_a_decision

# The margins tried, narrowest first; wider ones would run most images again (at 0.1 about 8 % of binary and 16 %
# of multi-class photographs were near a decision, README "The recheck").
MARGINS = (0.05, 0.075, 0.1, 0.15, 0.2)
MAX_IMAGES = 64  # a bf16 and an fp32 pass each: about 10 s for the offline members at 320 px on 2 cores
# The mask margins tried, narrowest first (README "Masks on the edge": 0.02 ran 5-9 % of photographs again)
MASK_MARGINS = (0.01, 0.015, 0.02, 0.03, 0.05)
# bf16 as served (rechecks included) must take at most this share of fp32's time, else the version serves fp32
# (the offline members' versions took 0.93-0.99x with their margins; the paper's members 0.52x)
BF16_PAYS = 0.85
MASK_MOVES_COVERED = 0.9  # the share of images whose largest score move near the threshold the mask margin covers
T = TypeVar("T")


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


def tried(margins: Sequence[float], floor: float) -> list[float]:
    """The margins tried with `floor` the narrowest: `floor` and those of `margins` wider than it, narrowest first."""
    return sorted({floor, *(m for m in margins if m > floor)})


def reaching(cases: Sequence[T], margins: Sequence[float], reaches: Callable[[T, float], bool]) -> tuple[float, int]:
    """The narrowest of `margins` (narrowest first) that reaches every case some margin reaches
    (`reaches(case, margin)`; `margins[0]` where there is none), and how many cases no margin reaches (they do not
    widen it: no margin would catch them)."""
    chosen, missed = margins[0], 0
    for case in cases:
        hit = next((m for m in margins if reaches(case, m)), None)
        if hit is None:
            missed += 1
        else:
            chosen = max(chosen, hit)
    return chosen, missed


def margin_for(changed: Sequence[MemberView], rule: Rule, floor: float) -> tuple[float, int]:
    """The narrowest margin of `MARGINS` (never under `floor`) at which every changed image is near a decision, and
    how many changed images no margin tried reaches."""
    return reaching(changed, tried(MARGINS, floor), lambda view, margin: _near(view, rule, margin))


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


@dataclass(frozen=True)
class MaskPair:
    """One image's served score map [S, S] in fp32 and in bf16, and the mask's threshold (mask: score > it)."""

    fp32: np.ndarray
    bf16: np.ndarray
    threshold: float


def largest_score_move(pair: MaskPair) -> float | None:
    """The largest move of a pixel's score from fp32 to bf16 among the pixels within the widest mask margin tried
    of the threshold in either precision (those a move can carry across it); None where no pixel is that near."""
    t = pair.threshold
    near = np.minimum(np.abs(pair.fp32 - t), np.abs(pair.bf16 - t)) < MASK_MARGINS[-1]
    return float(np.abs(pair.bf16 - pair.fp32)[near].max()) if near.any() else None


def mask_margin(pairs: Sequence[MaskPair], floor: float, iou_floor: float) -> tuple[float, dict[str, float | int]]:
    """The mask recheck margin (never under `floor`) for images served a mask in both precisions, and what was
    seen: the narrowest margin tried that covers the largest score move near the threshold of a share
    `MASK_MOVES_COVERED` of the images, widened to reach every mask bf16 left under `iou_floor` against fp32's (one
    no margin tried reaches is counted in `missed`)."""
    moves = np.array([m for m in map(largest_score_move, pairs) if m is not None])
    candidates = tried(MASK_MARGINS, floor)
    covers = (m for m in candidates if not moves.size or np.mean(moves <= m) >= MASK_MOVES_COVERED)
    moved = [p for p in pairs if iou(p.fp32 > p.threshold, p.bf16 > p.threshold) < iou_floor]
    for_moved, missed = reaching(
        moved, candidates, lambda pair, margin: worst_iou_within(pair.bf16, pair.threshold, margin) < iou_floor
    )
    margin = max(next(covers, candidates[-1]), for_moved)
    seen = {
        "masked": len(pairs),
        "near": int(moves.size),
        "p90_move": float(np.quantile(moves, 0.9)) if moves.size else 0.0,
        "largest_move": float(moves.max(initial=0.0)),
        "under_floor": len(moved),
        "missed": missed,
        "margin": margin,
    }
    return margin, seen


@dataclass
class Compared:
    """The same images through the fp32 and the bf16 annotator: the members' statistics per batch, and the
    served score maps of the images both serve a mask of the same class."""

    passes: list[tuple[list[MCStats], list[MCStats]]]
    masks: list[MaskPair]


def compare_precisions(fp32: Annotator, bf16: Annotator, images: torch.Tensor, batch_size: int) -> Compared:
    """uint8 `images` [N, 3, S, S] through both annotators (built as serving builds them, rechecks off)."""
    compared = Compared([], [])
    for start in range(0, len(images), batch_size):
        x = as_input(images[start : start + batch_size], fp32.device)
        want = fp32.forward_input(x)
        got = bf16.forward_input(x)
        got.segmentations = want.segmentations  # the regions come from the image, not the pass: cut them once
        compared.passes.append((want.stats, got.stats))
        compared.masks.extend(p for b in range(len(want)) if (p := served_pair(fp32, bf16, want, got, b)))
    return compared


def served_pair(fp32: Annotator, bf16: Annotator, want: Forward, got: Forward, b: int) -> MaskPair | None:
    """Image b's served score maps in both precisions, where both serve it a mask of the same class."""
    a, h = fp32.decide(want, b), bf16.decide(got, b)
    if a.flagged or h.flagged or a.label != h.label or fp32.classes[a.label] in fp32.negative:
        return None
    score, threshold, _ = fp32.mask_score(want, b, a.label, a.agreeing)
    return MaskPair(score, bf16.mask_score(got, b, h.label, h.agreeing)[0], threshold)


def served_time_ratio(candidate: Annotator, reference: Annotator, images: torch.Tensor) -> float:
    """`candidate`'s serving time (`annotate`: forward, rechecks, conclude) over `reference`'s on uint8 `images`
    [N, 3, S, S], after an untimed batch each that warms the kernels up. The two take turns batch by batch, the
    first of a pair alternating, so that load which comes and goes on the machine (another job starting) weighs on
    both alike rather than on whichever ran when it came: timed one after the other, a version trained beside a
    suite of tests measured 0.78x where the quiet machine measured 0.89x, and kept bf16 (README "A mask margin
    per version")."""
    pil = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    batch = max(1, candidate.settings.batch_size)
    spent = {id(candidate): 0.0, id(reference): 0.0}
    for annotator in (candidate, reference):
        annotator.annotate(pil[:batch])
    for turn, start in enumerate(range(0, len(pil), batch)):
        pair = (candidate, reference) if turn % 2 == 0 else (reference, candidate)
        for annotator in pair:
            began = time.perf_counter()
            annotator.annotate(pil[start : start + batch])
            spent[id(annotator)] += time.perf_counter() - began
    return spent[id(candidate)] / spent[id(reference)]
