"""The heads' pooling (engine/pooling.py) against plain numpy."""

import numpy as np
import pytest
import torch

from axx_backend.engine.ensemble import Ensemble
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


def xgradcam_factor(features: torch.Tensor, kind: str, mass: str) -> torch.Tensor:
    """sum_ij A_kij / M_k * dY/dA_kij, the gradient of the pooled value taken by autograd; M_k the channel's sum
    (XGrad-CAM) or its L1 mass."""
    features = features.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(pool(features, kind).sum(), features)
    total = features.abs().sum(dim=(2, 3)) if mass == "l1" else features.sum(dim=(2, 3))
    return ((features * grad).sum(dim=(2, 3)) / (total + 1e-7)).detach()


def test_channel_scale_is_xgradcams_weight_per_unit_head_weight_on_relu_maps():
    torch.manual_seed(0)
    features = torch.rand(2, 4, 5, 5)
    for kind in ("avg", "top10"):
        assert torch.allclose(channel_scale(features, kind), xgradcam_factor(features, kind, "sum"), rtol=1e-5)


def test_top10_factor_divides_by_the_l1_mass_where_cells_go_negative():
    """SiLU maps: the factor of autograd's gradient over the L1 mass, never above the top cells' 1 / n."""
    torch.manual_seed(0)
    features = torch.randn(2, 6, 10, 10)
    scale = channel_scale(features, "top10")
    assert torch.allclose(scale, xgradcam_factor(features, "top10", "l1"), rtol=1e-5)
    assert (scale.abs() <= 1.0 / top_count(100) + 1e-6).all()


def test_top10_factor_stays_bounded_where_a_channel_sums_to_nearly_zero():
    """A channel that fires on an object's 10 cells (1.0) and is slightly negative (SiLU, -0.11) on the other 90
    sums to 0.1: XGrad-CAM's factor is 10, a hundred times the top cells' gradient 1 / n, and a 1 % change of
    the background multiplies it a hundredfold. Divided by the L1 mass (19.9) it is 0.05 and moves by under 1 %."""
    features = torch.full((1, 1, 10, 10), -0.11)
    features[0, 0, :1, :] = 1.0
    plain = xgradcam_factor(features, "top10", "sum")
    assert float(plain) == pytest.approx(10.0, rel=1e-3)  # 1.0 (the pooled value) / 0.1 (the sum)
    assert float(channel_scale(features, "top10")) == pytest.approx(1.0 / 19.9, rel=1e-4)
    shifted = features.clone()
    shifted[0, 0, 1:, :] *= 1.01
    assert float(xgradcam_factor(shifted, "top10", "sum")) > 50 * float(plain)
    assert float(channel_scale(shifted, "top10")) == pytest.approx(float(channel_scale(features, "top10")), rel=0.01)


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling"):
        pool(torch.zeros(1, 1, 2, 2), "max")


def test_the_forward_keeps_the_pooling_its_head_read():
    """`MemberOutput.pooled` is what the CAM's channel factor, the feature cache and the review profiles reuse
    instead of sorting the map again."""
    torch.manual_seed(0)
    ensemble = Ensemble.build(["mobilenetv2_100"], ["a", "b"], weights="random", pooling="top10")
    out = ensemble.forward_mc(torch.rand(2, 3, 96, 96), 4)[0]
    assert torch.equal(out.pooled, ensemble.members[0].pool(out.features))
    assert torch.equal(out.select(torch.tensor([1])).pooled, out.pooled[1:])
    assert torch.equal(channel_scale(out.features, "top10", out.pooled), channel_scale(out.features, "top10"))
