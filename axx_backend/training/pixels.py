"""The pixel phase of training: CAM thresholds, pseudo-masks, segmentation heads, and whether the
heads or the CAM make the served masks.

Everything runs on cached maps of the frozen backbones (the last feature map for the CAM, the
stride-16 stage for the heads; see `Member.seg_layer`) at a target resolution of `input_size / 4`,
so it costs seconds. Belharbi et al.: oracle masks with weight 1 plus pseudo-masks (the fused CAM
of confident, unflagged images without a mask) with weight lambda.

- The CAM thresholds (one per fusion rule, one per member, and the served rule) are chosen on every
  positive oracle mask (evaluation/calibration.py, the one implementation).
- Head or CAM: k-fold cross-validation over the oracle-masked images. Per fold, the CAM thresholds
  are chosen and the heads trained on the other folds, and both are scored on the held-out fold;
  the head serves when its pooled held-out IoU is higher and at least `min_pixel_labels` oracle
  masks exist (a 1-3-mask validation split decided by chance). The same folds choose lambda
  between `seg_lambda` and 0 (no pseudo-masks).
- The final heads train on every oracle mask (+ pseudo-masks at the chosen lambda).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..core.settings import Settings
from ..core.thresholds import (
    FUSION_RULES,
    best_rule,
    best_thresholds,
    calibrate_members,
    choose_rule,
    fusion_scores,
)
from ..engine.annotator import member_cam, seg_map
from ..engine.ensemble import Ensemble, select_device
from ..engine.masks import fuse_maps, iou
from ..engine.segmentation import SegHead, train_seg_head
from ..engine.uncertainty import decide

log = logging.getLogger(__name__)

CV_FOLDS = 5  # at most; leave-one-out below that many positive oracle masks


@dataclass
class PixelResult:
    cam_threshold: float  # of the served rule `mask_fusion`
    mask_fusion: str
    fusion_thresholds: dict[str, float] = field(default_factory=dict)  # per rule; empty: not calibrated
    member_cam_thresholds: dict[str, float] = field(default_factory=dict)
    seg_heads: dict[str, SegHead] = field(default_factory=dict)
    use_seg_head: bool = False
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


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """A bool mask resized to size x size as float {0, 1} (area-weighted, then > 0.5)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
    return torch.from_numpy((np.asarray(img) > 127).astype(np.float32))


def kfold(items: Sequence[int], k: int, seed: int) -> list[list[int]]:
    """`items` shuffled (seeded) and dealt into min(k, len) folds of near-equal size."""
    order = [items[j] for j in np.random.default_rng(seed).permutation(len(items))]
    k = min(k, len(order))
    return [sorted(order[f::k]) for f in range(k)]


def train_heads(
    ensemble: Ensemble,
    seg_maps: dict[int, list[torch.Tensor]],
    targets: dict[int, torch.Tensor],
    weights: dict[int, float],
    settings: Settings,
) -> dict[str, SegHead]:
    """One head per member on the cached maps of the images in `targets` (mask [S, S] in {0, 1}),
    trained on the settings' device (full-batch epochs are memory-bound on a CPU), returned on the CPU."""
    device = select_device(settings.device)
    order = list(targets)
    target = torch.stack([targets[i] for i in order]).to(device)
    weight = torch.tensor([weights[i] for i in order], device=device)
    heads = {}
    for m, member in enumerate(ensemble.members):
        features = torch.stack([seg_maps[i][m] for i in order]).to(device)
        head = SegHead(features.shape[1]).to(device)
        with torch.enable_grad():
            train_seg_head(head, features, target, weight, settings.seg_epochs, seed=settings.seed)
        heads[member.name] = head.cpu()
    return heads


def fit_pixels(
    ensemble: Ensemble,
    maps: dict[int, list[torch.Tensor]],
    seg_maps: dict[int, list[torch.Tensor]],
    member_probs: dict[int, list[np.ndarray]],
    member_entropy: dict[int, list[float]],
    labels: dict[int, int | None],
    oracle: dict[int, np.ndarray],
    negative: set[int],
    uncertainty_threshold: float,
    settings: Settings,
) -> PixelResult:
    """`maps[i]` / `seg_maps[i]`: per-member cached last / seg-layer feature maps of sample i;
    `oracle[i]`: its mask, if any.

    `labels[i]` is the class index of a labelled sample (None if unlabelled); `negative` holds the
    negative class indices.
    """
    size = max(8, settings.input_size // 4)
    targets = {i: resize_mask(m, size) for i, m in oracle.items()}
    truths = {i: t.numpy() > 0 for i, t in targets.items()}
    names = [m.name for m in ensemble.members]
    cam_cache: dict[tuple[int, int], list[np.ndarray]] = {}

    def cams(i: int, label: int) -> list[np.ndarray]:
        if (i, label) not in cam_cache:
            cam_cache[(i, label)] = [
                member_cam(member, fmap.unsqueeze(0), label, (size, size))
                for member, fmap in zip(ensemble.members, maps[i], strict=True)
            ]
        return cam_cache[(i, label)]

    def voters(i: int, label: int) -> list[int]:
        agree = [m for m, p in enumerate(member_probs[i]) if int(np.argmax(p)) == label]
        return agree or list(range(len(ensemble.members)))

    # The oracle-masked images of a positive class: those a CAM or head mask is scored on.
    positive: dict[int, int] = {i: lab for i in oracle if (lab := labels.get(i)) is not None and lab not in negative}
    positives = list(positive)

    def fused_cams(i: int) -> list[np.ndarray]:
        return [cams(i, positive[i])[m] for m in voters(i, positive[i])]

    result = PixelResult(settings.cam_threshold, settings.mask_fusion)
    if positives:
        fused = [fused_cams(i) for i in positives]
        gts = [truths[i] for i in positives]
        scores = fusion_scores(fused, gts, FUSION_RULES)
        rule, threshold, fit_iou = best_rule(scores)
        result.mask_fusion, result.cam_threshold = rule, threshold
        result.fusion_thresholds = best_thresholds(scores)
        own = {name: [cams(i, positive[i])[m] for i in positives] for m, name in enumerate(names)}
        result.member_cam_thresholds = calibrate_members(own, gts)
        result.metrics["cam_calibration"] = {
            "rule": rule,
            "threshold": threshold,
            "iou": fit_iou,
            "images": len(positives),
            "fusion_thresholds": result.fusion_thresholds,
        }
        log.info("CAM masks: %s at %.2f gives IoU %.3f on %d oracle masks", rule, threshold, fit_iou, len(positives))

    # Pseudo-mask candidates among the images without an oracle mask: confident, unflagged, predicted
    # positive, and agreeing with the image label when there is one. Known negatives give empty masks.
    empty: list[int] = []
    candidates: dict[int, tuple[int, list[int]]] = {}  # i -> (class, agreeing members)
    for i in maps:
        if i in oracle:
            continue
        if labels.get(i) is not None and labels[i] in negative:
            empty.append(i)
            continue
        decision = decide(member_probs[i], member_entropy[i], uncertainty_threshold, settings.min_uncertain_to_flag)
        if decision.flagged or decision.label in negative:
            continue
        if labels.get(i) is not None and labels[i] != decision.label:
            continue
        candidates[i] = (decision.label, list(decision.agreeing))

    def pseudo_masks(rule: str, threshold: float) -> dict[int, torch.Tensor]:
        """The pseudo-masks at a CAM rule and threshold (those calibrated on the masks a head may see)."""
        out = {i: torch.zeros(size, size) for i in empty}
        for i, (label, agreeing) in candidates.items():
            mask, _ = fuse_maps([cams(i, label)[m] for m in agreeing], rule, threshold)
            out[i] = torch.from_numpy(mask.astype(np.float32))
        return out

    def training_set(
        masked: Sequence[int], pseudo: dict[int, torch.Tensor], lam: float
    ) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
        chosen = {i: targets[i] for i in masked} | (pseudo if lam > 0 else {})
        weights = {i: 1.0 if i in oracle else lam for i in chosen}
        return chosen, weights

    pseudo = pseudo_masks(result.mask_fusion, result.cam_threshold)
    result.metrics.update({"oracle_masks": len(oracle), "pseudo_masks": len(pseudo), "target_size": size})
    if not oracle:
        return result

    # Lambda is cross-validated against 0: hundreds of pseudo-masks at 0.1 each can outweigh a few
    # oracle masks, and then the head learns to copy the CAM it was meant to beat.
    lambdas = [settings.seg_lambda] + ([0.0] if settings.seg_lambda > 0 and pseudo else [])
    lam = settings.seg_lambda
    enough = len(oracle) >= settings.min_pixel_labels
    if not enough or len(positives) < 2:
        result.metrics["seg_head_decision"] = (
            f"CAM masks kept ({len(oracle)} oracle masks, {len(positives)} of a positive class; "
            f"min {settings.min_pixel_labels} and 2 to cross-validate)"
        )
    else:
        folds = kfold(positives, CV_FOLDS, settings.seed)
        cam_scores: list[float] = []
        seg_scores: dict[float, list[float]] = {v: [] for v in lambdas}
        for held in folds:
            rest = [i for i in positives if i not in held]
            rule, threshold, _ = choose_rule([fused_cams(i) for i in rest], [truths[i] for i in rest], FUSION_RULES)
            cam_scores += [iou(fuse_maps(fused_cams(i), rule, threshold)[0], truths[i]) for i in held]
            masked = [i for i in oracle if i not in held]
            fold_pseudo = pseudo_masks(rule, threshold) if any(v > 0 for v in lambdas) else {}
            for lam_c in lambdas:
                heads = train_heads(ensemble, seg_maps, *training_set(masked, fold_pseudo, lam_c), settings)
                for i in held:
                    who = voters(i, positive[i])
                    probs = [seg_map(heads[names[m]], seg_maps[i][m].unsqueeze(0), (size, size)) for m in who]
                    seg_scores[lam_c].append(iou(fuse_maps(probs, "mean", settings.seg_threshold)[0], truths[i]))
        by_lambda = {lam_c: float(np.mean(v)) for lam_c, v in seg_scores.items()}
        lam = max(lambdas, key=lambda v: by_lambda[v])  # a tie keeps the configured lambda (listed first)
        cam_iou, seg_iou = float(np.mean(cam_scores)), by_lambda[lam]
        result.use_seg_head = seg_iou > cam_iou
        # `val_*`: held-out IoU pooled over the folds (every positive oracle mask is held out once).
        result.metrics.update(
            {
                "val_iou_cam": cam_iou,
                "val_iou_seg_head": seg_iou,
                "val_iou_seg_head_by_lambda": {str(k): v for k, v in by_lambda.items()},
                "cv_folds": len(folds),
                "cv_masks": len(positives),
            }
        )
        verdict = "seg head used" if result.use_seg_head else "CAM masks kept"
        result.metrics["seg_head_decision"] = (
            f"{verdict} ({len(folds)}-fold IoU seg {seg_iou:.3f} (lambda {lam:g}) vs CAM {cam_iou:.3f})"
        )
        log.info("%d-fold IoU: CAM %.3f, seg head %s", len(folds), cam_iou, by_lambda)

    # The final heads: every oracle mask (+ pseudo-masks at the chosen lambda).
    result.seg_heads = train_heads(ensemble, seg_maps, *training_set(list(oracle), pseudo, lam), settings)
    result.metrics["seg_lambda"] = lam
    used = len(pseudo) if lam > 0 else 0
    log.info("seg heads trained on %d oracle + %d pseudo masks (lambda %g)", len(oracle), used, lam)
    return result
