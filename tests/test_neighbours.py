"""The nearest-labelled-image check (engine/neighbours.py): the bank, the rule, its calibration, its version file."""

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from axx_backend.engine.neighbours import NEIGHBOURS_FILE, NeighbourBank, build_bank
from axx_backend.engine.uncertainty import decide
from axx_backend.training.calibration import calibrate_uncertainty_threshold, flag_rate

SURE = np.array([0.9, 0.05, 0.05])


def random_bank(seed=0, n=60, dims=(32, 48, 16), classes=3):
    g = torch.Generator().manual_seed(seed)
    pooled = [torch.randn(n, k, generator=g) for k in dims]
    labels = torch.arange(n) % classes
    bank = build_bank(pooled, labels, max_images=1000)
    assert bank is not None
    return bank, pooled, labels


def sklearn_nearest(bank_features, queries, k=1):
    """Indices [B, k] of the k cosine-nearest bank rows of each query (an independent reference)."""
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(bank_features.double().numpy())
    return nn.kneighbors(queries.double().numpy(), return_distance=False)


def test_each_members_nearest_class_is_that_of_its_cosine_nearest_labelled_image():
    bank, _, labels = random_bank()
    g = torch.Generator().manual_seed(1)
    queries = [torch.randn(40, f.shape[1], generator=g) * 5 for f in bank.features]  # scale must not matter
    got = bank.nearest_classes(queries)
    assert got.shape == (3, 40)
    for m, q in enumerate(queries):
        expected = labels.numpy()[sklearn_nearest(bank.features[m], q)[:, 0]]
        np.testing.assert_array_equal(got[m], expected)


def test_an_image_of_the_bank_may_be_kept_from_matching_itself():
    """Calibration scores labelled images that are in the bank: each must get its nearest *other* image."""
    bank, pooled, labels = random_bank()
    rows = list(range(10, 30))
    queries = [p[rows] for p in pooled]
    own = bank.nearest_classes(queries)
    np.testing.assert_array_equal(own, np.tile(labels[rows].numpy(), (3, 1)))  # without exclusion: itself
    left_out = bank.nearest_classes(queries, exclude_rows=rows)
    for m, q in enumerate(queries):
        second = sklearn_nearest(bank.features[m], q, k=2)[:, 1]
        np.testing.assert_array_equal(left_out[m], labels.numpy()[second])


def test_the_bank_keeps_labelled_rows_only_and_at_most_its_size_evenly_per_class():
    labels = torch.tensor([0] * 30 + [1] * 5 + [-1] * 20)
    pooled = [torch.randn(len(labels), 8)]
    bank = build_bank(pooled, labels, max_images=20, seed=3)
    assert bank is not None
    assert sorted(bank.labels.tolist()) == [0] * 10 + [1] * 5  # 10 per class; class 1 has only 5
    assert bool((labels[bank.rows] == bank.labels).all())
    assert torch.allclose(bank.features[0], torch.nn.functional.normalize(pooled[0][bank.rows], dim=1))
    again = build_bank(pooled, labels, max_images=20, seed=3)
    assert again is not None and again.rows.tolist() == bank.rows.tolist()  # seeded
    whole = build_bank(pooled, labels, max_images=100)
    assert whole is not None and whole.rows.tolist() == list(range(35))
    assert build_bank(pooled, labels, max_images=0) is None
    assert build_bank(pooled, torch.tensor([0] + [-1] * 54), max_images=100) is None


def test_the_stored_bank_gives_the_same_nearest_classes_and_a_broken_one_is_refused():
    bank, _, _ = random_bank(dims=(64, 64, 64))
    stored = NeighbourBank.from_tensors(bank.tensors(), members=3)
    g = torch.Generator().manual_seed(2)
    queries = [torch.randn(40, 64, generator=g) for _ in range(3)]
    np.testing.assert_array_equal(stored.nearest_classes(queries), bank.nearest_classes(queries))
    tensors = bank.tensors()
    tensors["labels"] = tensors["labels"][:-1]
    with pytest.raises(ValueError, match="differ in length"):
        NeighbourBank.from_tensors(tensors, members=3)
    with pytest.raises(ValueError, match="lacks member3"):
        NeighbourBank.from_tensors(bank.tensors(), members=4)


def test_sure_members_that_agree_are_flagged_where_the_nearest_labelled_images_of_two_show_another_class():
    probs, entropy = [SURE] * 3, [0.1] * 3
    assert not decide(probs, entropy, 0.5, 2).flagged
    assert not decide(probs, entropy, 0.5, 2, neighbours=[0, 0, 0]).flagged
    assert not decide(probs, entropy, 0.5, 2, neighbours=[0, 2, 0]).flagged  # one member's: not enough
    flagged = decide(probs, entropy, 0.5, 2, neighbours=[2, 0, 1])  # members 0 and 2 show other classes
    assert flagged.flagged and flagged.label == 0 and flagged.agreeing == []
    assert "nearest labelled image of 2 members (0, 2)" in flagged.reason
    # an image already flagged for its entropies keeps that reason
    assert "uncertain" in decide(probs, [0.9, 0.9, 0.1], 0.5, 2, neighbours=[1, 1, 1]).reason


def test_the_review_threshold_counts_the_images_the_check_flags_against_the_budget():
    """Reference, written out: every member votes class 0, so an image is flagged by its entropies exactly when
    its second most uncertain member is above the threshold, and by the check where `neighbours` says so (5 of
    50 images here). A budget of 20 % then allows 10 flagged images in all: 5 more, not 10 more."""
    rng = np.random.default_rng(0)
    entropies = rng.uniform(0.0, 1.0, size=(50, 3))
    probs = [np.tile(SURE, (50, 1)) for _ in range(3)]
    entropy = [entropies[:, m] for m in range(3)]
    neighbours = np.zeros((3, 50), dtype=np.int64)
    by_check = rng.choice(50, size=5, replace=False)
    neighbours[:2, by_check] = 1
    alone = calibrate_uncertainty_threshold(probs, entropy, None, 0.2, 2, default=0.5)
    with_check = calibrate_uncertainty_threshold(probs, entropy, None, 0.2, 2, default=0.5, neighbours=neighbours)
    second = np.sort(entropies, axis=1)[:, -2]
    assert int((second > alone).sum()) == 10
    flags = (second > with_check) | np.isin(np.arange(50), by_check)
    assert int(flags.sum()) == 10
    rate, served = flag_rate(probs, entropy, with_check, 2, neighbours=neighbours)
    np.testing.assert_array_equal(served, flags)
    assert rate == 0.2


def test_a_labelled_image_calibrated_out_of_fold_gets_its_nearest_other_labelled_image():
    from axx_backend.training.features import FeatureCache
    from axx_backend.training.heads import MemberStats
    from axx_backend.training.trainer import attach_neighbours

    # rows 0 and 1 are near each other, rows 2 and 3 too; each pair holds both classes
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.8, 0.3]])
    cache = FeatureCache(samples=[], pooled=[features, features.clone()])
    bank = build_bank(cache.pooled, torch.tensor([0, 1, 1, 0, -1]), max_images=10)
    labelled, unlabelled = MemberStats([0, 1, 2, 3]), MemberStats([4])
    attach_neighbours(bank, cache, labelled, unlabelled, None)
    assert labelled.neighbours is not None and unlabelled.neighbours is not None
    np.testing.assert_array_equal(labelled.neighbours, [[1, 0, 0, 1]] * 2)
    np.testing.assert_array_equal(unlabelled.neighbours, [[1], [1]])  # row 4 is nearest row 1 (class 1)
    assert labelled.nearest(2) == [0, 0]
    attach_neighbours(None, cache, unlabelled)  # no bank (the check off): nothing changes
    assert unlabelled.nearest(4) == [1, 1]


def test_a_trained_version_serves_the_check_from_its_own_bank_unless_it_is_turned_off(trained_model_dir, dataset_dir):
    from PIL import Image

    from axx_backend.core.settings import Settings
    from axx_backend.core.version_meta import load_version
    from axx_backend.core.versions import ModelStore
    from axx_backend.engine.annotator import Annotator

    path = ModelStore(trained_model_dir).version_path(None)
    assert path is not None and (path / NEIGHBOURS_FILE).is_file()
    meta = load_version(path)
    annotator = Annotator.from_version(path, Settings(), explicit=set())
    bank = annotator.neighbours
    assert bank is not None
    counts = np.bincount(bank.labels.numpy(), minlength=len(meta.classes))
    assert dict(zip(meta.classes, counts.tolist(), strict=True)) == meta.training.per_class
    assert meta.metrics["neighbour_check"] == {"bank_images": len(bank)}
    images = [Image.open(p).convert("RGB") for p in sorted((dataset_dir / "images").rglob("*.png"))[::7][:4]]
    fwd = annotator.forward(images)
    for b in range(len(images)):
        expected = [
            int(bank.labels[sklearn_nearest(bank.features[m], out.pooled[b : b + 1].cpu())[0, 0]])
            for m, out in enumerate(fwd.outputs)
        ]
        assert annotator.nearest_classes(fwd, b) == expected
    off = Annotator.from_version(path, Settings(neighbour_check="off"), explicit=set())
    assert off.neighbours is None and off.nearest_classes(off.forward(images[:1]), 0) is None
