"""Pixel supervision (METHOD.md "Learning" 3, after Belharbi et al.): a light segmentation
head per member, trained with BCE + Dice on oracle masks and, with weight lambda, on pseudo-masks
of confident unlabelled images.

The head reads the stride-16 stage of the backbone (`Member.seg_layer`, captured by a forward
hook in the same pass that feeds the classifier), not the stride-32 map the CAM uses: 14x14 cells
at 224 px instead of 7x7, whose resolution alone capped a perfect read-out at IoU 0.63 on the
benchmark, and mid-level features that transfer to unseen objects. Versions written before
that keep their heads on the last map (`seg_layer` absent from version.json).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegHead(nn.Module):
    """A 1x1 convolution: one foreground logit per feature cell.

    Deliberately tiny: it is trained from a handful of masks on frozen features, and a
    linear read-out cannot overfit much.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, K, h, w] -> [B, h, w] logits."""
        return self.forward_channels_last(features.permute(0, 2, 3, 1))

    def forward_channels_last(self, features: torch.Tensor) -> torch.Tensor:
        """[B, h, w, K] -> [B, h, w]: a matrix-vector product (a 1-output 1x1 convolution is
        ~40x slower through oneDNN on the CPU)."""
        return features @ self.conv.weight.view(-1) + self.conv.bias


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-image weighted BCE + soft Dice; `logits`/`target` [B, H, W], `weight` [B]."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(1, 2))
    probs = logits.sigmoid()
    intersection = (probs * target).sum(dim=(1, 2))
    dice = 1 - (2 * intersection + 1) / (probs.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + 1)
    return ((bce + dice) * weight).sum() / weight.sum().clamp_min(1e-8)


def train_seg_head(
    head: SegHead,
    features: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    epochs: int = 150,
    lr: float = 1e-2,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> float:
    """Full-batch AdamW on cached feature maps [N, K, h, w] and masks [N, H, W] in {0, 1}."""
    torch.manual_seed(seed)
    size = targets.shape[-2:]
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    features = features.float().permute(0, 2, 3, 1).contiguous()  # once, not every epoch
    loss = torch.tensor(0.0)
    head.train()
    for _ in range(epochs):
        optimizer.zero_grad()
        logits = head.forward_channels_last(features).unsqueeze(1)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).squeeze(1)
        loss = bce_dice_loss(logits, targets, weights)
        loss.backward()
        optimizer.step()
    head.eval()
    return float(loss.detach())


def seg_probabilities(head: SegHead, features: torch.Tensor) -> torch.Tensor:
    """Foreground probabilities at feature resolution [B, h, w]."""
    with torch.no_grad():
        return head(features.float()).sigmoid()
