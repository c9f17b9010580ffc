"""Folds by appearance: whole look-alike groups held out together (training/groups.py)."""

from types import SimpleNamespace

import numpy as np
import torch

from axx_backend.core.settings import Settings
from axx_backend.engine.ensemble import MCDropoutHead
from axx_backend.training.features import FeatureCache
from axx_backend.training.groups import appearance_groups, cache_groups, grouped_folds, silhouette_groups
from axx_backend.training.heads import Split, train_member_heads

from .head_only import HeadOnlyMember


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


def test_silhouette_groups_find_how_many_clusters_there_are():
    for centres in (3, 5):
        x, truth = blobs(centres=centres, per=12, dim=32, seed=centres)
        groups = silhouette_groups([x, x * 3 + 1], torch.arange(len(truth)), max_k=10, seed=0)
        assert same_partition(groups, truth), centres
    assert silhouette_groups([torch.randn(2, 4)], torch.arange(2), max_k=10, seed=0).tolist() == [0, 0]  # too few


def test_unlabelled_samples_join_the_labelled_clusters_without_moving_them():
    """Unlabelled images (however many a project holds) must not move the folds of the labelled ones: the
    labelled samples' groups are the same with or without them, and each unlabelled one joins its own blob's."""
    x, truth = blobs(centres=10, per=8, dim=16, seed=2)
    labelled = torch.from_numpy(np.arange(len(truth)) % 4 != 3)  # a quarter of every blob unlabelled
    alone = cache_groups([x[labelled]], seed=0)
    mixed = cache_groups([x], seed=0, labelled=labelled)
    assert np.array_equal(mixed[labelled.numpy()], alone)
    assert same_partition(mixed, truth)
    assert np.array_equal(cache_groups([x], seed=0, labelled=torch.ones(len(truth), dtype=torch.bool)),
                          cache_groups([x], seed=0))  # fmt: skip


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


def test_cache_groups_hold_out_whole_clusters():
    x, truth = blobs(centres=10, per=8, dim=16, seed=1)
    labels = np.arange(len(truth)) % 2
    folds = grouped_folds(cache_groups([x], seed=0), labels, k=5)
    assert folds is not None and set(folds.tolist()) == set(range(5))
    for c in range(10):  # every generating cluster lands in exactly one fold
        assert len(set(folds[truth == c].tolist())) == 1


def test_grouped_folds_keep_every_class_in_every_fold_when_groups_are_one_class_each():
    groups = np.repeat(np.arange(10), [12, 10, 8, 6, 4] * 2)
    labels = (groups >= 5).astype(int)  # groups 0-4 all class 0, groups 5-9 all class 1
    folds = grouped_folds(groups, labels, k=5)
    assert folds is not None
    for f in range(5):  # dealt largest first by size alone, four of the five folds held one class
        assert set(labels[folds == f].tolist()) == {0, 1}


def look_alike_world(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ten backgrounds with both classes on each. A weak member's features are mostly the background with a
    faint class direction; a fine-tuned member's separate the classes outright."""
    g = torch.Generator().manual_seed(seed)
    background = np.repeat(np.arange(10), 12)
    y = torch.tensor(np.arange(len(background)) % 2)
    centres = torch.randn(10, 64, generator=g) * 3
    direction = torch.randn(64, generator=g)
    noise = torch.randn(len(y), 64, generator=g)
    weak = centres[background] + 0.6 * direction * (2 * y[:, None] - 1) + noise
    tuned = torch.nn.functional.one_hot(y, 2).float() * 5 + 0.3 * torch.randn(len(y), 2, generator=g)
    return weak, tuned, y


def weak_member_oof_accuracy(seed: int, groups_from_tuned: bool) -> float:
    weak, tuned, y = look_alike_world(seed)
    members = [
        HeadOnlyMember(name=n, head=MCDropoutHead(d, 2, 0.3), temperature=torch.ones(()))
        for n, d in (("tuned", 2), ("weak", 64))
    ]
    ensemble = SimpleNamespace(members=members, classes=["a", "b"])
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    split = Split(y, train=order[:90].sort().values, val=order[90:].sort().values)
    groups = cache_groups([tuned, weak] if groups_from_tuned else [weak], seed=0)
    torch.manual_seed(0)
    cache = FeatureCache(samples=[], pooled=[tuned, weak], groups=groups)
    heads = train_member_heads(ensemble, cache, split, Settings(preset="offline", epochs=60), backbone_saw_train=True)
    return heads.metrics["weak"]["oof_accuracy"]


def test_groups_from_features_before_fine_tuning_keep_a_weak_member_above_chance():
    """Why the trainer clusters before fine-tuning (groups.py): groups from features that separate the classes
    hold out one class's images of a background while the other class's stay in training, and the weak
    member's out-of-fold heads score below chance; its temperature and weight then come from that."""
    before = np.mean([weak_member_oof_accuracy(seed, groups_from_tuned=False) for seed in range(3)])
    after = np.mean([weak_member_oof_accuracy(seed, groups_from_tuned=True) for seed in range(3)])
    assert before > 0.7
    assert after < 0.5
