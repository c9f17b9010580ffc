"""Fine-tuning the backbones on image-level labels (METHOD.md "Learning" 2).

Cross-entropy (class-balanced), AdamW, mild augmentation (flip, small random resized crop,
colour jitter), early stopping on the validation loss. BatchNorm statistics stay frozen:
batches are small and the ImageNet statistics are better than ones estimated from 8 images.
`last-stage` trains the last feature stage and everything after it; `all` the whole backbone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.ensemble import Ensemble, Member

log = logging.getLogger(__name__)

FINETUNE_MODES = ("head", "last-stage", "all")


def trainable_backbone_parameters(member: Member, mode: str) -> list[nn.Parameter]:
    """The backbone parameters `mode` unfreezes, in model order."""
    if mode == "head":
        return []
    named = list(member.backbone.named_parameters())
    if mode == "all":
        return [p for _, p in named]
    if mode != "last-stage":
        raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {mode!r}")
    last_stage = member.backbone.feature_info[-1]["module"]
    start = next(
        (i for i, (name, _) in enumerate(named) if name.startswith(last_stage + ".") or name == last_stage), None
    )
    if start is None:
        raise ValueError(f"{member.name}: cannot find its last stage {last_stage!r}")
    # Everything from the last stage on (e.g. resnet layer4; efficientnet blocks.6 + conv_head + bn2).
    return [p for _, p in named[start:]]


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image random flip, resized crop (scale 0.8-1) and brightness/contrast jitter (+-10 %)."""
    out = []
    size = images.shape[-2:]
    for img in images:
        if torch.rand((), generator=generator) < 0.5:
            img = img.flip(-1)
        scale = 0.8 + 0.2 * float(torch.rand((), generator=generator))
        h, w = int(size[0] * math.sqrt(scale)), int(size[1] * math.sqrt(scale))
        top = int(torch.randint(0, size[0] - h + 1, (), generator=generator))
        left = int(torch.randint(0, size[1] - w + 1, (), generator=generator))
        img = F.interpolate(
            img[None, :, top : top + h, left : left + w], size=size, mode="bilinear", align_corners=False
        )[0]
        brightness = 1 + 0.2 * (float(torch.rand((), generator=generator)) - 0.5)
        contrast = 1 + 0.2 * (float(torch.rand((), generator=generator)) - 0.5)
        mean = img.mean()
        out.append(((img - mean) * contrast + mean * brightness).clamp(0, 1))
    return torch.stack(out)


def finetune_ensemble(
    ensemble: Ensemble,
    images: torch.Tensor,
    labels: torch.Tensor,
    train_idx: Sequence[int],
    val_idx: Sequence[int],
    mode: str,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Fine-tune every member in place on resized uint8 images [N, 3, S, S] (kept on the CPU)."""
    metrics = {}
    num_classes = len(ensemble.classes)
    train_t = torch.tensor(list(train_idx), dtype=torch.long)
    val_t = torch.tensor(list(val_idx), dtype=torch.long)
    counts = torch.bincount(labels[train_t], minlength=num_classes).float()
    class_weights = counts.sum() / (num_classes * counts.clamp_min(1))
    device = next(ensemble.parameters()).device
    for m, member in enumerate(ensemble.members):
        backbone_params = trainable_backbone_parameters(member, mode)
        for p in member.backbone.parameters():
            p.requires_grad_(False)
        for p in backbone_params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(
            [{"params": backbone_params, "lr": 1e-4}, {"params": member.head.parameters(), "lr": 1e-3}],
            weight_decay=1e-4,
        )
        generator = torch.Generator().manual_seed(seed + m)
        best = (float("inf"), None, -1)
        for epoch in range(epochs):
            member.eval()  # BatchNorm frozen
            member.head.train()  # the head's dropout on
            order = train_t[torch.randperm(len(train_t), generator=generator)]
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                x = member.normalize(augment(_batch(images, batch, device), generator))
                loss = F.cross_entropy(member(x), labels[batch].to(device), weight=class_weights.to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            member.eval()
            val_loss = _loss(member, images, labels, val_t if len(val_t) else train_t, batch_size, device)
            log.info("finetune %s epoch %d/%d: validation loss %.4f", member.name, epoch + 1, epochs, val_loss)
            if val_loss < best[0]:
                best = (val_loss, {k: v.detach().clone() for k, v in member.state_dict().items()}, epoch)
            if progress:
                progress("finetune", (m * epochs + epoch + 1) / (len(ensemble.members) * epochs))
        if best[1] is not None:
            member.load_state_dict(best[1])
        for p in member.parameters():
            p.requires_grad_(True)
        member.eval()
        metrics[member.name] = {"finetune_val_loss": best[0], "finetune_best_epoch": best[2]}
    return metrics


def _batch(images: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images[idx].to(device).float().div_(255.0)


@torch.no_grad()
def _loss(
    member: Member, images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, batch_size: int, device: torch.device
) -> float:
    total = 0.0
    for start in range(0, len(idx), batch_size):
        batch = idx[start : start + batch_size]
        logits = member(member.normalize(_batch(images, batch, device)))
        total += float(F.cross_entropy(logits, labels[batch].to(device), reduction="sum"))
    return total / max(1, len(idx))
