"""The pixel phase's pieces on hand-made data."""

import numpy as np
import torch

from axx_backend.segmentation import SegHead, bce_dice_loss, train_seg_head
from axx_backend.training.pixels import calibrate_fusion


def test_calibrate_fusion_picks_the_rule_and_threshold_with_the_best_iou():
    truth = np.zeros((4, 4), bool)
    truth[:2, :2] = True
    # Member B also marks part of a third column, with 0.7.
    a = np.where(truth, 0.9, 0.1)
    b = np.where(truth, 0.9, 0.1)
    b[:2, 2] = 0.7
    rule, threshold, score = calibrate_fusion([[a, b]], [truth], thresholds=(0.5, 0.75))
    # mean at 0.5 is exact: the extra pixels average (0.1 + 0.7) / 2 = 0.4; ties keep the first.
    assert (rule, threshold, score) == ("mean", 0.5, 1.0)
    # The union (votes:1) takes B's extra pixels at 0.5 (IoU 4/6) and is exact only at 0.75.
    rule, threshold, score = calibrate_fusion([[a, b]], [truth], rules=("votes:1",), thresholds=(0.5, 0.75))
    assert (threshold, score) == (0.75, 1.0)


def test_seg_head_learns_a_mask_that_is_linear_in_the_features():
    torch.manual_seed(0)
    features = torch.randn(12, 8, 6, 6)
    target = (features[:, 3] > 0.3).float()  # foreground where channel 3 is high
    head = SegHead(8)
    before = bce_dice_loss(head(features), target, torch.ones(12))
    after = train_seg_head(head, features, target, torch.ones(12), epochs=300, lr=0.05)
    predicted = head(features).sigmoid() > 0.5
    accuracy = (predicted == target.bool()).float().mean()
    assert after < before.item() / 2
    assert accuracy > 0.95


def test_pseudo_masks_weigh_less_than_oracle_masks():
    logits = torch.zeros(2, 4, 4)
    target = torch.stack([torch.ones(4, 4), torch.zeros(4, 4)])
    full = bce_dice_loss(logits, target, torch.tensor([1.0, 1.0]))
    oracle_only = bce_dice_loss(logits, target, torch.tensor([1.0, 0.0]))
    lambda_weighted = bce_dice_loss(logits, target, torch.tensor([1.0, 0.1]))
    assert lambda_weighted.item() != full.item()
    assert min(oracle_only, full) <= lambda_weighted <= max(oracle_only, full)
