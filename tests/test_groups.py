"""Folds by appearance: whole look-alike groups held out together (training/groups.py)."""

import numpy as np
import torch

from axx_backend.training.groups import appearance_folds, appearance_groups, grouped_folds


def blobs(centres: int, per: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Well-separated clusters of features: `per` noisy copies of each of `centres` random directions."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, dim, generator=g) * 10
    truth = np.repeat(np.arange(centres), per)
    x = means[truth] + torch.randn(len(truth), dim, generator=g)
    return x, truth


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Do two labelings cut the items into the same groups (whatever the group numbers)?"""
    return all(len(set(b[a == v].tolist())) == 1 for v in np.unique(a)) and len(np.unique(a)) == len(np.unique(b))


def test_appearance_groups_recover_separated_clusters():
    x, truth = blobs(centres=6, per=10, dim=32)
    rows = torch.arange(len(truth))
    # two members seeing the same images: their normalised features are concatenated
    groups = appearance_groups([x, x * 3 + 1], rows, k=6, seed=0)
    assert same_partition(groups, truth)


def test_grouped_folds_keep_each_group_in_one_fold_and_balance_sizes():
    groups = np.repeat(np.arange(10), [12, 11, 10, 9, 8, 7, 6, 5, 4, 3])
    labels = np.arange(len(groups)) % 2  # both classes in every group
    folds = grouped_folds(groups, labels, k=5)
    assert folds is not None
    for g in np.unique(groups):
        assert len(set(folds[groups == g].tolist())) == 1
    sizes = np.bincount(folds)
    assert len(sizes) == 5 and sizes.max() - sizes.min() <= 3


def test_grouped_folds_refuse_when_a_training_part_would_miss_a_class():
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1])  # class 0 lives in group 0 only
    assert grouped_folds(groups, labels, k=3) is None
    assert grouped_folds(np.zeros(6, dtype=int), np.array([0, 1] * 3), k=3) is None  # one group: one fold


def test_appearance_folds_hold_out_whole_clusters():
    x, truth = blobs(centres=10, per=8, dim=16, seed=1)
    labels = np.arange(len(truth)) % 2
    folds = appearance_folds([x], torch.arange(len(truth)), labels, k=5, seed=0)
    assert folds is not None and set(folds.tolist()) == set(range(5))
    for c in range(10):  # every generating cluster lands in exactly one fold
        assert len(set(folds[truth == c].tolist())) == 1
