"""Fusion rules of docs/METHOD.md step 6 on hand-made maps."""

import numpy as np
import pytest

from axx_backend.core.settings import parse_fusion
from axx_backend.engine.masks import dice, fuse_maps, iou

A = np.array([[0.9, 0.6, 0.1], [0.2, 0.8, 0.0]])
B = np.array([[0.7, 0.2, 0.1], [0.9, 0.9, 0.0]])
C = np.array([[0.8, 0.7, 0.6], [0.1, 0.3, 0.0]])


def test_intersection_is_the_and_of_binary_masks():
    mask, _ = fuse_maps([A, B, C], "intersection", 0.5)
    assert mask.tolist() == [[1, 0, 0], [0, 0, 0]]
    assert mask.dtype == np.uint8


def test_votes_k_passes_pixels_with_k_members():
    mask, _ = fuse_maps([A, B, C], "votes:2", 0.5)
    assert mask.tolist() == [[1, 1, 0], [0, 1, 0]]


def test_mean_thresholds_the_average_map_once():
    mask, heat = fuse_maps([A, B, C], "mean", 0.5)
    assert np.allclose(heat, (A + B + C) / 3)
    assert mask.tolist() == (((A + B + C) / 3) > 0.5).astype(int).tolist()


def test_single_member_rules_agree():
    for rule in ("mean", "intersection", "votes:1", "votes:3"):
        mask, _ = fuse_maps([A], rule, 0.5)
        assert mask.tolist() == (A > 0.5).astype(int).tolist()


def test_bad_rule_is_a_clear_error():
    with pytest.raises(ValueError, match="mask_fusion"):
        parse_fusion("union")
    with pytest.raises(ValueError):
        fuse_maps([], "mean", 0.5)


def test_iou_and_dice_by_hand():
    p = np.array([[1, 1, 0, 0]])
    t = np.array([[0, 1, 1, 0]])
    assert iou(p, t) == pytest.approx(1 / 3)
    assert dice(p, t) == pytest.approx(0.5)
    assert iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
