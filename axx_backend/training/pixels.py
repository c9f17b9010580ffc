"""The pixel phase of training (docs/METHOD.md "Learning" 3, after Belharbi et al.): CAM thresholds, pseudo-masks,
the segment head, and whether the head or the refined CAM makes the served masks.

Everything runs on the pixel set's cached views (training/features.py) at the working resolution (the
input size), so it costs seconds:

- pseudo-masks: the refined, fused CAM of the class of each pixel-set image without an oracle mask (its
  label, or the ensemble's confident decision), thresholded; images of a negative class are all background;
- without oracle masks (`labels_only_masks`): the segment head trains on the pseudo-masks alone (what the
  photograph benchmark chose), or the refined CAM serves at the default threshold;
- with oracle masks: the CAM rule and threshold are chosen on them; with at least `min_pixel_labels`, k-fold
  cross-validation over the oracle-masked positives decides between the refined CAM and the segment head
  trained on the other folds' masks plus lambda-weighted pseudo-masks (lambda among `seg_lambda`, 0 and 1),
  every threshold and pseudo-mask chosen inside the training part of its fold.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..core.thresholds import FUSION_RULES, best_rule, best_thresholds, calibrate_members, choose_rule, fusion_scores
from ..engine.annotator import Annotator
from ..engine.masks import fuse_maps, iou
from ..engine.refine import pool, region_means
from ..engine.saliency import member_cam
from ..engine.segments import SegmentHead, fit_segment_head, with_cam
from ..engine.uncertainty import decide
from .features import FeatureCache
from .groups import grouped_folds
from .heads import Heads, Split

log = logging.getLogger(__name__)

CV_FOLDS = 5  # at most; leave-one-out below that many positive oracle masks


@dataclass
class PixelResult:
    mask_source: str  # "cam" or "segments"
    cam_threshold: float  # of the served CAM rule `mask_fusion`
    mask_fusion: str
    fusion_thresholds: dict[str, float] = field(default_factory=dict)  # per rule; empty: not calibrated
    member_cam_thresholds: dict[str, float] = field(default_factory=dict)
    segment_head: SegmentHead | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def thresholds(self) -> dict[str, Any]:
        """What the version's `thresholds` take from this phase (the calibrated values only)."""
        if not self.fusion_thresholds:
            return {}
        return {
            "cam_threshold": self.cam_threshold,
            "mask_fusion": self.mask_fusion,
            "fusion_thresholds": dict(self.fusion_thresholds),
            "member_cam_thresholds": dict(self.member_cam_thresholds),
        }


def kfold(items: Sequence[int], k: int, seed: int) -> list[list[int]]:
    """`items` shuffled (seeded) and dealt into min(k, len) folds of near-equal size."""
    order = [items[j] for j in np.random.default_rng(seed).permutation(len(items))]
    k = min(k, len(order))
    return [sorted(order[f::k]) for f in range(k)]


class PixelSet:
    """The pixel set's classes, maps, region features and masks at the working resolution."""

    def __init__(self, annotator: Annotator, cache: FeatureCache, split: Split, heads: Heads, threshold: float):
        self.annotator = annotator
        self.cache = cache
        self.settings = annotator.settings
        self.size = annotator.map_side
        self.negative = {annotator.classes.index(c) for c in annotator.negative}
        # Each mask resized as it is read: the pixel set's masks at full size at once would grow with the images.
        self.oracle = {i: resize_mask(m, self.size) for i, s in self._samples() if (m := s.load_mask()) is not None}
        self.classes: dict[int, int] = {}  # i -> the class whose mask it shows (positive classes only)
        self.empty: list[int] = []  # images of a negative class: background everywhere
        self.votes: dict[int, list[int]] = {}
        self._cams: dict[tuple[int, int], np.ndarray] = {}  # (image, member) -> refined CAM
        self._raw: dict[tuple[int, int], np.ndarray] = {}  # (image, member) -> CAM before refinement
        self._features: dict[int, list[np.ndarray]] = {}
        self._assign_classes(split, heads, threshold)

    def _samples(self) -> list[tuple[int, Any]]:
        return [(i, self.cache.samples[i]) for i in sorted(self.cache.pixels)]

    def _assign_classes(self, split: Split, heads: Heads, threshold: float) -> None:
        s = self.settings
        for i, _ in self._samples():
            probs, entropy = heads.pixels.of(i)
            label = split.label_of(i)
            if label is None:  # unlabelled: only a confident, unflagged decision names a class
                rule = (threshold, s.min_uncertain_to_flag, heads.weights, heads.pixels.nearest(i))
                decision = decide(probs, entropy, *rule)
                if decision.flagged or decision.label in self.negative or i in self.oracle:
                    continue
                label = decision.label
            if label in self.negative:
                self.empty.append(i)
                continue
            self.classes[i] = label
            agree = [m for m, p in enumerate(probs) if int(np.argmax(p)) == label]
            self.votes[i] = agree or list(range(len(probs)))

    @property
    def positives(self) -> list[int]:
        """Oracle-masked images of a positive class: those a mask is scored on."""
        return [i for i in self.classes if i in self.oracle]

    @property
    def candidates(self) -> list[int]:
        """Pseudo-mask candidates: images of a positive class without an oracle mask."""
        return [i for i in self.classes if i not in self.oracle]

    def member_map(self, i: int, m: int) -> np.ndarray:
        """Member m's CAM of image i's class [S, S], refined when the settings refine."""
        key = (i, m)
        if key not in self._cams:
            view = self.cache.pixels[i]
            member = self.annotator.ensemble.members[m]
            cam = member_cam(
                view.last_maps[m][None].float(),
                member.head.fc.weight,
                self.classes[i],
                (self.size, self.size),
                self.settings.cam_weights,
                member.pooling,
            )
            self._raw[key] = cam
            self._cams[key] = pool(cam, view.segmentations) if self.annotator.refines else cam
        return self._cams[key]

    def maps(self, i: int) -> list[np.ndarray]:
        """The voting members' (refined) CAMs of image i's class: what serving fuses."""
        return [self.member_map(i, m) for m in self.votes[i]]

    def raw_cam(self, i: int) -> np.ndarray:
        """The unrefined mean CAM of the voting members (the head's class evidence; zeros for a negative)."""
        if i not in self.classes:
            return np.zeros((self.size, self.size), np.float32)
        for m in self.votes[i]:
            self.member_map(i, m)
        return np.mean([self._raw[(i, m)] for m in self.votes[i]], axis=0)

    def region_features(self, i: int) -> list[np.ndarray]:
        """The segment head's input for image i, one [n_regions, D] array per scale (computed once)."""
        if i not in self._features:
            view, cam = self.cache.pixels[i], self.raw_cam(i)
            self._features[i] = [
                with_cam(levels, area, cam, labels)
                for labels, levels, area in zip(view.segmentations, view.region_levels, view.region_area, strict=True)
            ]
        return self._features[i]

    def region_targets(self, i: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features, foreground, pixel count) of image i's regions at every scale, for `mask` [S, S]."""
        segmentations = self.cache.pixels[i].segmentations
        ys = [region_means(mask.astype(np.float32), labels) > 0.5 for labels in segmentations]
        ws = [
            np.bincount(labels.ravel(), minlength=len(y)).astype(np.float64)
            for labels, y in zip(segmentations, ys, strict=True)
        ]
        return np.concatenate(self.region_features(i)), np.concatenate(ys), np.concatenate(ws)

    def head_heat(self, head: SegmentHead, i: int) -> np.ndarray:
        return head.heat(self.region_features(i), self.cache.pixels[i].segmentations)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A bool mask resized to size x size (area-weighted, then > 0.5)."""
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize((size, size), Image.BILINEAR)
    return np.asarray(img) > 127


def pseudo_masks(data: PixelSet, images: Sequence[int], rule: str, threshold: float) -> dict[int, np.ndarray]:
    """The refined CAM masks of `images` at a rule and threshold (those chosen on the masks a head may see)."""
    return {i: fuse_maps(data.maps(i), rule, threshold)[0] > 0 for i in images}


def fit_head(data: PixelSet, oracle: Sequence[int], pseudo: dict[int, np.ndarray], lam: float) -> SegmentHead | None:
    """The segment head on `oracle` masks (weight 1) and, with weight `lam`, pseudo-masks and negatives."""
    parts = [(i, data.oracle[i], 1.0) for i in oracle]
    if lam > 0:
        blank = np.zeros((data.size, data.size), bool)
        parts += [(i, m, lam) for i, m in pseudo.items()] + [(i, blank, lam) for i in data.empty]
    if not parts:
        return None
    xs, ys, ws = zip(*[_weighted(data.region_targets(i, mask), weight) for i, mask, weight in parts], strict=True)
    try:
        return fit_segment_head(np.concatenate(xs), np.concatenate(ys), np.concatenate(ws), data.settings.segment_c)
    except ValueError as exc:  # all foreground or all background: nothing to learn
        log.warning("segment head not trained: %s", exc)
        return None


def _weighted(targets: tuple[np.ndarray, np.ndarray, np.ndarray], weight: float):
    x, y, w = targets
    return x, y, w * weight


def calibrate_cam(data: PixelSet, images: Sequence[int]) -> tuple[str, float, dict[str, Any]]:
    """The CAM fusion rule and threshold with the best mean IoU on the oracle masks of `images`."""
    scores = fusion_scores([data.maps(i) for i in images], [data.oracle[i] for i in images], FUSION_RULES)
    rule, threshold, fit = best_rule(scores)
    return (
        rule,
        threshold,
        {
            "rule": rule,
            "threshold": threshold,
            "iou": fit,
            "images": len(images),
            "fusion_thresholds": best_thresholds(scores),
            "scores": scores,
        },
    )


def pixel_folds(data: PixelSet) -> tuple[list[list[int]], dict[int, int]]:
    """Folds of the oracle-masked positives, and each pixel-set image's appearance group (groups.py).

    With `calibration_groups=appearance` the folds hold out whole look-alike groups, and a fold's head learns
    from no image of its held-out groups (no pseudo-mask either): with random folds the head learnt from images
    of the same photographs as the held-out masks, which flattered it against the CAM (README, active learning).
    """
    positives = data.positives
    images = sorted(data.cache.pixels)
    groups = data.cache.groups
    if groups is not None and len(positives) >= 2:  # set by the trainer with calibration_groups=appearance
        group_of = {i: int(groups[i]) for i in images}
        folds = grouped_folds(np.array([group_of[i] for i in positives]), np.zeros(len(positives), int), CV_FOLDS)
        if folds is not None:
            return [
                [p for p, f in zip(positives, folds, strict=True) if f == k] for k in range(folds.max() + 1)
            ], group_of
    return kfold(positives, CV_FOLDS, data.settings.seed), {i: i for i in images}


def cross_validate(data: PixelSet, lambdas: Sequence[float]) -> dict[str, Any]:
    """k-fold IoU of the refined CAM and of the segment head per lambda, over the oracle-masked positives."""
    positives = data.positives
    folds, group_of = pixel_folds(data)
    cam_scores: list[float] = []
    head_scores: dict[float, list[float]] = {lam: [] for lam in lambdas}
    for held in folds:
        rest = [i for i in positives if i not in held]
        rule, threshold, _ = choose_rule([data.maps(i) for i in rest], [data.oracle[i] for i in rest], FUSION_RULES)
        cam_scores += [iou(fuse_maps(data.maps(i), rule, threshold)[0], data.oracle[i]) for i in held]
        held_groups = {group_of[i] for i in held}
        seen = [i for i in data.candidates if group_of[i] not in held_groups]
        pseudo = pseudo_masks(data, seen, rule, threshold)
        masked = [i for i in data.oracle if i not in held and group_of[i] not in held_groups]
        for lam in lambdas:
            head = fit_head(data, masked, pseudo, lam)
            for i in held:
                heat = data.head_heat(head, i) if head is not None else np.zeros_like(data.oracle[i], np.float32)
                head_scores[lam].append(iou(heat > data.settings.seg_threshold, data.oracle[i]))
    by_lambda = {lam: float(np.mean(v)) for lam, v in head_scores.items()}
    return {"cam": float(np.mean(cam_scores)), "head": by_lambda, "folds": len(folds), "masks": len(positives)}


def fit_pixels(annotator: Annotator, cache: FeatureCache, split: Split, heads: Heads, threshold: float) -> PixelResult:
    """The pixel phase (see the module docstring); `threshold`: the calibrated uncertainty threshold."""
    s = annotator.settings
    data = PixelSet(annotator, cache, split, heads, threshold)
    result = PixelResult("cam", s.cam_threshold, s.mask_fusion)
    result.metrics.update(
        oracle_masks=len(data.oracle),
        pseudo_candidates=len(data.candidates),
        negatives=len(data.empty),
        working_size=data.size,
    )
    if data.positives:
        _calibrate_on_oracle(data, result)
    pseudo = pseudo_masks(data, data.candidates, result.mask_fusion, result.cam_threshold)
    if len(data.positives) >= max(2, s.min_pixel_labels):
        lam = _choose_by_folds(data, result)
    elif s.labels_only_masks == "segments":
        lam = 1.0  # the photograph benchmark's choice without (enough) oracle masks: the head on pseudo-masks
        result.mask_source = "segments"
        result.metrics["decision"] = f"segment head on {len(pseudo)} pseudo-masks ({len(data.oracle)} oracle masks)"
    else:
        result.metrics["decision"] = f"refined CAM ({len(data.oracle)} oracle masks)"
        return result
    result.segment_head = fit_head(data, list(data.oracle), pseudo, lam)
    if result.segment_head is None:
        result.mask_source = "cam"
    result.metrics.update(seg_lambda=lam, pseudo_masks=len(pseudo) if lam > 0 else 0)
    log.info("masks from %s (%s)", result.mask_source, result.metrics.get("decision"))
    return result


def _calibrate_on_oracle(data: PixelSet, result: PixelResult) -> None:
    rule, threshold, info = calibrate_cam(data, data.positives)
    result.mask_fusion, result.cam_threshold = rule, threshold
    result.fusion_thresholds = info["fusion_thresholds"]
    names = [m.name for m in data.annotator.ensemble.members]
    gts = [data.oracle[i] for i in data.positives]
    own = {name: [data.member_map(i, m) for i in data.positives] for m, name in enumerate(names)}
    result.member_cam_thresholds = calibrate_members(own, gts)
    info.pop("scores")
    result.metrics["cam_calibration"] = info
    log.info("CAM masks: %s at %.2f gives IoU %.3f on %d oracle masks", rule, threshold, info["iou"], info["images"])


def _choose_by_folds(data: PixelSet, result: PixelResult) -> float:
    s = data.settings
    lambdas = sorted({s.seg_lambda, 0.0, 1.0}) if data.candidates or data.empty else [0.0]
    cv = cross_validate(data, lambdas)
    lam = max(lambdas, key=lambda v: (cv["head"][v], v == s.seg_lambda))  # a tie keeps the configured lambda
    use_head = cv["head"][lam] > cv["cam"]
    result.mask_source = "segments" if use_head else "cam"
    verdict = "segment head" if use_head else "refined CAM"
    result.metrics.update(
        val_iou_cam=cv["cam"],
        val_iou_segments=cv["head"][lam],
        cv_folds=cv["folds"],
        cv_masks=cv["masks"],
        val_iou_segments_by_lambda={str(k): v for k, v in cv["head"].items()},
        decision=f"{verdict} ({cv['folds']}-fold IoU: head {cv['head'][lam]:.3f} at lambda "
        f"{lam:g}, CAM {cv['cam']:.3f})",
    )
    return lam
