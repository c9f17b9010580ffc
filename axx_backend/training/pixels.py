"""The pixel phase of training: CAM threshold calibration, pseudo-masks, segmentation heads.

Everything runs on cached feature maps of the frozen backbones at a target resolution of
`input_size / 4`, so it costs seconds. Belharbi et al.: oracle masks with weight 1 plus
pseudo-masks (the fused CAM of confident, unflagged images without a mask) with weight lambda;
the pseudo-mask threshold is the one that maximises IoU on the images with oracle masks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..ensemble import Ensemble
from ..masks import fuse_maps, iou
from ..saliency import fast_xgradcam, normalize_maps, upsample
from ..segmentation import SegHead, seg_probabilities, train_seg_head
from ..settings import Settings
from ..uncertainty import decide

log = logging.getLogger(__name__)

FUSION_CANDIDATES = ("mean", "intersection", "votes:2")
THRESHOLD_GRID = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))


@dataclass
class PixelResult:
    cam_threshold: float
    mask_fusion: str
    seg_heads: dict[str, SegHead] = field(default_factory=dict)
    use_seg_head: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """A bool mask resized to size x size as float {0, 1} (area-weighted, then > 0.5)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
    return torch.from_numpy((np.asarray(img) > 127).astype(np.float32))


def member_cams(ensemble: Ensemble, maps: Sequence[torch.Tensor], label: int, size: int) -> list[np.ndarray]:
    """Each member's normalised XGrad-CAM of `label` at size x size, from cached maps [K, h, w]."""
    out = []
    for member, fmap in zip(ensemble.members, maps, strict=True):
        cam = normalize_maps(
            fast_xgradcam(fmap.float().unsqueeze(0), member.head.fc.weight.detach(), torch.tensor([label]))
        )
        out.append(normalize_maps(upsample(cam, (size, size)))[0].numpy())
    return out


def calibrate_fusion(
    cams_per_image: Sequence[Sequence[np.ndarray]],
    truths: Sequence[np.ndarray],
    rules: Sequence[str] = FUSION_CANDIDATES,
    thresholds: Sequence[float] = THRESHOLD_GRID,
) -> tuple[str, float, float]:
    """The (rule, threshold) with the best mean IoU over images; returns (rule, threshold, iou)."""
    best = ("mean", 0.5, -1.0)
    for rule in rules:
        for t in thresholds:
            scores = [
                iou(fuse_maps(cams, rule, t)[0], truth) for cams, truth in zip(cams_per_image, truths, strict=True)
            ]
            score = float(np.mean(scores))
            if score > best[2]:
                best = (rule, float(t), score)
    return best


def fit_pixels(
    ensemble: Ensemble,
    maps: dict[int, list[torch.Tensor]],
    member_probs: dict[int, list[np.ndarray]],
    member_entropy: dict[int, list[float]],
    labels: dict[int, int | None],
    oracle: dict[int, np.ndarray],
    train: set[int],
    val: set[int],
    negative: set[int],
    uncertainty_threshold: float,
    settings: Settings,
) -> PixelResult:
    """`maps[i]`: per-member cached feature maps of sample i; `oracle[i]`: its mask, if any.

    `labels[i]` is the class index of a labelled sample (None if unlabelled); `negative`
    holds the negative class indices; `train`/`val` split the labelled samples.
    """
    size = max(8, settings.input_size // 4)
    targets = {i: resize_mask(m, size) for i, m in oracle.items()}

    def cams(i: int, label: int, only: Sequence[int] | None = None) -> list[np.ndarray]:
        chosen = member_cams(ensemble, maps[i], label, size)
        return [chosen[m] for m in only] if only is not None else chosen

    def voters(i: int, label: int) -> list[int]:
        agree = [m for m, p in enumerate(member_probs[i]) if int(np.argmax(p)) == label]
        return agree or list(range(len(ensemble.members)))

    positive_oracle = [i for i in oracle if labels.get(i) is not None and labels[i] not in negative]
    fit_set = [i for i in positive_oracle if i in train]
    result = PixelResult(settings.cam_threshold, settings.mask_fusion)
    if fit_set:
        rule, threshold, fit_iou = calibrate_fusion(
            [cams(i, labels[i], voters(i, labels[i])) for i in fit_set], [targets[i].numpy() > 0 for i in fit_set]
        )
        result.mask_fusion, result.cam_threshold = rule, threshold
        result.metrics["cam_calibration"] = {
            "rule": rule,
            "threshold": threshold,
            "iou": fit_iou,
            "images": len(fit_set),
        }
        log.info("CAM masks: %s at %.2f gives IoU %.3f on %d oracle masks", rule, threshold, fit_iou, len(fit_set))

    # Pseudo-masks for images without an oracle mask: confident, unflagged, predicted positive,
    # and agreeing with the image label when there is one. Known negatives give empty masks.
    pseudo: dict[int, torch.Tensor] = {}
    for i in maps:
        if i in oracle or i in val:
            continue
        if labels.get(i) is not None and labels[i] in negative:
            pseudo[i] = torch.zeros(size, size)
            continue
        decision = decide(member_probs[i], member_entropy[i], uncertainty_threshold, settings.min_uncertain_to_flag)
        if decision.flagged or decision.label in negative:
            continue
        if labels.get(i) is not None and labels[i] != decision.label:
            continue
        mask, _ = fuse_maps(cams(i, decision.label, decision.agreeing), result.mask_fusion, result.cam_threshold)
        pseudo[i] = torch.from_numpy(mask.astype(np.float32))

    train_oracle = [i for i in oracle if i not in val]
    result.metrics.update({"oracle_masks": len(train_oracle), "pseudo_masks": len(pseudo), "target_size": size})
    if not train_oracle:
        return result

    order = train_oracle + list(pseudo)
    weights = torch.tensor([1.0] * len(train_oracle) + [settings.seg_lambda] * len(pseudo))
    target = torch.stack([targets[i] for i in train_oracle] + [pseudo[i] for i in order[len(train_oracle) :]])
    for m, member in enumerate(ensemble.members):
        head = SegHead(member.num_features)
        features = torch.stack([maps[i][m].float() for i in order])
        loss = train_seg_head(head, features, target, weights, settings.seg_epochs, seed=settings.seed)
        result.seg_heads[member.name] = head
        log.info(
            "seg head %s: loss %.4f on %d oracle + %d pseudo masks", member.name, loss, len(train_oracle), len(pseudo)
        )

    # Validation: does the head beat the CAM masks on held-out oracle masks?
    val_positive = [i for i in positive_oracle if i in val]
    if not val_positive:
        result.metrics["seg_head_decision"] = "no validation masks: CAM masks kept"
        return result
    cam_scores, seg_scores = [], []
    for i in val_positive:
        who = voters(i, labels[i])
        truth = targets[i].numpy() > 0
        cam_scores.append(iou(fuse_maps(cams(i, labels[i], who), result.mask_fusion, result.cam_threshold)[0], truth))
        seg_maps = [
            upsample(
                seg_probabilities(result.seg_heads[ensemble.members[m].name], maps[i][m].unsqueeze(0)), (size, size)
            )[0].numpy()
            for m in who
        ]
        seg_scores.append(iou(fuse_maps(seg_maps, "mean", settings.seg_threshold)[0], truth))
    cam_iou, seg_iou = float(np.mean(cam_scores)), float(np.mean(seg_scores))
    enough = len(train_oracle) >= settings.min_pixel_labels
    result.use_seg_head = enough and seg_iou > cam_iou
    result.metrics.update({"val_iou_cam": cam_iou, "val_iou_seg_head": seg_iou, "val_masks": len(val_positive)})
    result.metrics["seg_head_decision"] = (
        "seg head used"
        if result.use_seg_head
        else f"CAM masks kept ({len(train_oracle)} oracle masks, min {settings.min_pixel_labels}; "
        f"IoU seg {seg_iou:.3f} vs CAM {cam_iou:.3f})"
    )
    log.info("validation IoU: CAM %.3f, seg head %.3f -> %s", cam_iou, seg_iou, result.metrics["seg_head_decision"])
    return result
