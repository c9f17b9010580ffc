"""The heads' pooling (engine/pooling.py) against plain numpy."""

import numpy as np
import pytest
import torch

from axx_backend.engine.pooling import channel_scale, pool, top_count


def numpy_top_mean(features: np.ndarray, n: int) -> np.ndarray:
    flat = features.reshape(features.shape[0], features.shape[1], -1)
    return -np.sort(-flat, axis=2)[:, :, :n].mean(axis=2)


@pytest.mark.parametrize(("cells", "expected"), [(1, 1), (4, 1), (25, 2), (49, 5), (100, 10), (256, 26)])
def test_top_count_is_a_tenth_of_the_cells_and_at_least_one(cells, expected):
    assert top_count(cells) == expected


@pytest.mark.parametrize("side", [2, 7, 10, 16])
def test_pool_matches_numpy(side):
    rng = np.random.default_rng(side)
    features = np.maximum(rng.normal(size=(3, 5, side, side)), 0).astype(np.float32)
    x = torch.from_numpy(features)
    assert np.allclose(pool(x, "avg").numpy(), features.mean(axis=(2, 3)), atol=1e-6)
    top = numpy_top_mean(features, max(1, round(0.1 * side * side)))
    assert np.allclose(pool(x, "top10").numpy(), top, atol=1e-6)


def test_top10_sees_a_small_object_that_the_average_dilutes():
    """One channel fires on 4 of 100 cells: the average gives it a twenty-fifth of what the top cells give."""
    features = torch.zeros(1, 1, 10, 10)
    features[0, 0, 2:4, 5:7] = 1.0
    assert float(pool(features, "avg")) == pytest.approx(0.04)
    assert float(pool(features, "top10")) == pytest.approx(0.4)  # 4 of its 10 top cells are the object


def test_channel_scale_is_xgradcams_weight_per_unit_head_weight():
    """sum_ij A_kij / S_k * dY/dA_kij, with the gradient of the pooled value taken by autograd."""
    torch.manual_seed(0)
    features = torch.rand(2, 4, 5, 5).requires_grad_(True)
    for kind in ("avg", "top10"):
        (grad,) = torch.autograd.grad(pool(features, kind).sum(), features)
        expected = (features * grad).sum(dim=(2, 3)) / (features.sum(dim=(2, 3)) + 1e-7)
        assert torch.allclose(channel_scale(features.detach(), kind), expected.detach(), rtol=1e-5)


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling"):
        pool(torch.zeros(1, 1, 2, 2), "max")
