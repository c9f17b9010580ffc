"""Selection strategies (training/selection.py) on hand-made scores: what each picks, and that `diverse` does not
pick near-duplicates."""

import time

import numpy as np
import pytest

from axx_backend.labelstudio.settings import SELECT_STRATEGIES, LabelStudioSettings
from axx_backend.training.selection import PICKERS, Scores, choose, unit_features, weighted_k_center


def _clusters(rng, centres, per_cluster, dim=16, spread=0.01):
    """Points around `centres` random unit directions: near-duplicates inside a cluster."""
    axes = rng.normal(size=(centres, dim))
    points = np.repeat(axes, per_cluster, axis=0) + spread * rng.normal(size=(centres * per_cluster, dim))
    return unit_features([points]), np.repeat(np.arange(centres), per_cluster)


def test_every_strategy_the_settings_accept_has_a_picker():
    assert set(SELECT_STRATEGIES) == set(PICKERS)


def test_entropy_and_bald_take_the_top_scores_and_random_is_seeded():
    entropy = np.array([0.1, 0.9, 0.5, 0.7])
    bald = np.array([0.8, 0.0, 0.3, 0.1])
    scores = Scores(entropy, bald, np.eye(4, dtype=np.float32))
    assert choose("entropy", scores, 2) == [1, 3]
    assert choose("bald", scores, 2) == [0, 2]
    first = choose("random", scores, 2, np.random.default_rng(3))
    assert first == choose("random", scores, 2, np.random.default_rng(3))
    assert len(set(first)) == 2
    assert sorted(choose("diverse", scores, 10)) == [0, 1, 2, 3]  # more asked than there are: every one
    with pytest.raises(ValueError, match="unknown strategy"):
        choose("greedy", scores, 1)


def test_diverse_picks_one_per_cluster_where_entropy_picks_duplicates():
    rng = np.random.default_rng(0)
    features, cluster = _clusters(rng, centres=4, per_cluster=5)
    entropy = np.full(len(features), 0.5)
    entropy[cluster == 0] = 0.9  # the most uncertain images are near-duplicates of each other
    scores = Scores(entropy, np.zeros(len(features)), features)
    by_entropy = choose("entropy", scores, 4)
    by_diverse = choose("diverse", scores, 4)
    assert set(cluster[by_entropy]) == {0}
    assert sorted(cluster[by_diverse]) == [0, 1, 2, 3]
    assert cluster[by_diverse[0]] == 0  # the most uncertain cluster first


def test_diverse_skips_images_like_those_that_already_have_a_mask():
    rng = np.random.default_rng(1)
    features, cluster = _clusters(rng, centres=3, per_cluster=4)
    entropy = np.where(cluster == 0, 0.9, 0.4)
    anchors = features[cluster == 0][:1]  # a mask of cluster 0 exists already
    picks = weighted_k_center(features, entropy, 2, anchors)
    assert 0 not in set(cluster[picks])


def test_diverse_on_a_thousand_candidates_takes_well_under_a_second():
    rng = np.random.default_rng(2)
    pooled = [rng.normal(size=(1000, width)).astype(np.float32) for width in (1280, 1280, 2048)]
    scores = Scores(rng.random(1000), rng.random(1000), unit_features(pooled), unit_features(
        [p[:20] for p in pooled]))  # fmt: skip
    start = time.perf_counter()
    picks = choose("diverse", scores, 50)
    assert time.perf_counter() - start < 1.0
    assert len(set(picks)) == 50


def test_unknown_score_and_strategy_settings_are_refused():
    with pytest.raises(ValueError, match="AXX_SCORE"):
        LabelStudioSettings.from_env({"AXX_SCORE": "loss"})
    with pytest.raises(ValueError, match="AXX_SELECT_STRATEGY"):
        LabelStudioSettings.from_env({"AXX_SELECT_STRATEGY": "greedy"})
    ls = LabelStudioSettings.from_env({"AXX_SCORE": "Margin", "AXX_TASK_FIELDS": "true", "AXX_SELECT_K": "7"})
    assert (ls.score, ls.task_fields, ls.select_k, ls.select_strategy) == ("margin", True, 7, "diverse")
