"""The pixel phase's pieces on hand-made data (threshold calibration: test_evaluation.py, the one
implementation; the k-fold decision: test_segmentation_head.py)."""

import torch

from axx_backend.engine.segmentation import SegHead, bce_dice_loss, train_seg_head


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
