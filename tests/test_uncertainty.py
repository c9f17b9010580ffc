"""MC statistics against hand computations, and the decision rule of docs/METHOD.md step 4."""

import math

import numpy as np
import pytest
import torch

from axx_backend.engine.ensemble import MCDropoutHead
from axx_backend.engine.uncertainty import confidence, decide, mc_statistics


def test_mc_statistics_match_hand_computation():
    # Two images, T = 2 samples, C = 2 classes.
    samples = torch.tensor(
        [
            [[0.9, 0.1], [0.5, 0.5]],
            [[0.7, 0.3], [1.0, 0.0]],
        ]
    )
    stats = mc_statistics(samples)
    mean0, mean1 = np.array([0.8, 0.2]), np.array([0.75, 0.25])
    h = lambda p: -sum(x * math.log(x) for x in p if x > 0)  # noqa: E731
    assert torch.allclose(stats.mean_probs, torch.tensor(np.array([mean0, mean1]), dtype=torch.float32))
    assert stats.entropy[0].item() == pytest.approx(h(mean0) / math.log(2), abs=1e-6)
    expected_mi0 = h(mean0) - (h([0.9, 0.1]) + h([0.7, 0.3])) / 2
    expected_mi1 = h(mean1) - (h([0.5, 0.5]) + h([1.0, 0.0])) / 2
    assert stats.mutual_info[0].item() == pytest.approx(expected_mi0 / math.log(2), abs=1e-6)
    assert stats.mutual_info[1].item() == pytest.approx(expected_mi1 / math.log(2), abs=1e-6)
    assert stats.std_top[0].item() == pytest.approx(0.1, abs=1e-6)  # class 0 probs 0.9 and 0.7
    assert stats.std_top[1].item() == pytest.approx(0.25, abs=1e-6)  # class 0 probs 0.5 and 1.0


def test_identical_samples_have_no_mutual_information():
    p = torch.tensor([0.2, 0.3, 0.5])
    stats = mc_statistics(p.expand(30, 1, 3).clone())
    assert stats.mutual_info.item() == pytest.approx(0.0, abs=1e-6)
    assert stats.entropy.item() == pytest.approx(-(p * p.log()).sum().item() / math.log(3), abs=1e-6)
    assert stats.std_top.item() == pytest.approx(0.0, abs=1e-7)


def test_confidence_is_one_minus_normalised_entropy():
    assert confidence(np.array([1.0, 0.0])) == pytest.approx(1.0)
    assert confidence(np.array([0.5, 0.5])) == pytest.approx(0.0, abs=1e-9)
    assert confidence(np.array([0.25] * 4)) == pytest.approx(0.0, abs=1e-9)
    p = np.array([0.7, 0.2, 0.1])
    assert confidence(p) == pytest.approx(1 + (p * np.log(p)).sum() / math.log(3))


def test_mc_head_samples_are_unbiased_and_stochastic():
    torch.manual_seed(0)
    head = MCDropoutHead(16, 3, p=0.3).eval()
    pooled = torch.rand(4, 16)
    samples = head.sample(pooled, 20000, torch.Generator().manual_seed(1))
    assert samples.shape == (20000, 4, 3)
    assert samples.std(dim=0).min() > 0  # dropout is on
    # Inverted dropout keeps the expectation of a linear head equal to the deterministic logits.
    deterministic = head(pooled)
    assert torch.allclose(samples.mean(dim=0), deterministic, atol=0.02)
    # In eval mode the plain forward is deterministic: BatchNorm and dropout are off.
    assert torch.equal(head(pooled), deterministic)


def test_mc_head_without_dropout_repeats_the_deterministic_logits():
    head = MCDropoutHead(8, 2, p=0.0)
    pooled = torch.rand(3, 8)
    samples = head.sample(pooled, 5)
    assert torch.allclose(samples, head(pooled).expand(5, -1, -1))


def test_mc_head_result_of_an_image_does_not_depend_on_its_batch():
    head = MCDropoutHead(8, 2, p=0.5)
    pooled = torch.rand(3, 8)
    alone = head.sample(pooled[:1], 30, torch.Generator().manual_seed(3))
    batched = head.sample(pooled, 30, torch.Generator().manual_seed(3))
    assert torch.allclose(alone[:, 0], batched[:, 0])


P_A, P_B = np.array([0.9, 0.1]), np.array([0.1, 0.9])


def test_decide_majority_of_confident_members():
    d = decide([P_A, P_A, P_B], [0.1, 0.2, 0.1], uncertainty_threshold=0.5)
    assert not d.flagged and d.label == 0 and d.agreeing == [0, 1]
    assert d.class_score == pytest.approx(0.9)


def test_decide_flags_when_two_members_are_uncertain():
    d = decide([P_A, P_A, P_A], [0.6, 0.7, 0.1], uncertainty_threshold=0.5)
    assert d.flagged and d.agreeing == []


def test_decide_one_uncertain_member_is_left_out():
    d = decide([P_A, P_B, P_A], [0.1, 0.9, 0.2], uncertainty_threshold=0.5)
    assert not d.flagged and d.label == 0 and d.agreeing == [0, 2]


def test_decide_flags_when_confident_members_disagree_without_majority():
    d = decide([P_A, P_B, P_A], [0.1, 0.1, 0.9], uncertainty_threshold=0.5)
    assert d.flagged and "majority" in d.reason


def test_decide_min_uncertain_is_a_setting():
    d = decide([P_A, P_A, P_A], [0.6, 0.7, 0.1], uncertainty_threshold=0.5, min_uncertain_to_flag=3)
    # Only one confident member is left; it is the majority of the confident ones.
    assert not d.flagged and d.agreeing == [2]


def test_decide_threshold_is_strict():
    d = decide([P_A, P_A, P_A], [0.5, 0.5, 0.5], uncertainty_threshold=0.5)
    assert not d.flagged  # entropy equal to the threshold is not uncertain
