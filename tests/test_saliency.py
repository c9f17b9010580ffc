"""The fast XGrad-CAM (from the forward pass) against grad-cam's XGradCAM on the same model."""

import numpy as np
import pytest
import torch

from axx_backend.engine.ensemble import Ensemble
from axx_backend.engine.saliency import cam_weights, fast_xgradcam, gradcam_maps, normalize_maps, upsample


def warm_up_batchnorm(member, images):
    """Give a randomly initialised net the BatchNorm statistics of real data.

    At init (running mean 0, var 1) the activations of efficientnet_b0's SiLU head are
    ~1e-7 in size, and grad-cam's XGradCAM divides by `sum(A) + 1e-7`: a degenerate state no
    trained network is in. Estimating the statistics makes activations O(1), as after training.
    """
    for module in member.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    member.train()
    with torch.no_grad():
        member.features(member.normalize(images))
    member.eval()


@pytest.mark.parametrize(("name", "mode", "pooling"),
                         [(n, m, "avg") for n in ("resnet50", "efficientnet_b0", "densenet121")
                          for m in ("class", "contrastive")]
                         + [(n, "contrastive", "top10") for n in ("resnet50", "tf_efficientnet_lite0")])  # fmt: skip
def test_fast_xgradcam_matches_gradcam_package(name, mode, pooling):
    """grad-cam differentiates the member's own forward (its pooling included); the fast map uses the pooling's
    closed-form channel factor. With top10, on ReLU maps only: on SiLU maps (efficientnet_b0) the factor divides by
    the L1 mass instead of the sum (pooling.py; test_pooling checks it there)."""
    torch.manual_seed(0)
    ensemble = Ensemble.build([name], ["a", "b", "c"], weights="random", pooling=pooling)
    member = ensemble.members[0]
    warm_up_batchnorm(member, torch.rand(8, 3, 224, 224))
    torch.nn.init.normal_(member.head.fc.weight, std=0.05)
    x = member.normalize(torch.rand(2, 3, 224, 224))
    with torch.no_grad():
        target = member(x).argmax(dim=1)
        features = member.features(x)
        fast = fast_xgradcam(features, cam_weights(member.head.fc.weight, mode), target, pooling)
        ours = normalize_maps(upsample(normalize_maps(fast), (224, 224))).numpy()
    reference = gradcam_maps(member, x, target, "xgradcam", mode)
    # The autograd path differentiates the activations only and leaves the model as it was.
    assert all(p.grad is None and p.requires_grad for p in member.parameters())
    assert reference.shape == ours.shape == (2, 224, 224)
    # A degenerate (flat) map would agree trivially: make sure there is structure to compare.
    assert (reference.max(axis=(1, 2)) - reference.min(axis=(1, 2)) > 0.5).all()
    assert np.abs(ours - reference).max() < 1e-4


def test_fast_xgradcam_is_relu_of_class_weighted_features():
    features = torch.tensor([[[[1.0, 0.0], [2.0, 4.0]], [[0.0, 3.0], [1.0, 1.0]]]])  # [1, 2, 2, 2]
    weight = torch.tensor([[1.0, -1.0], [0.5, 0.5]])
    cam = fast_xgradcam(features, weight, torch.tensor([0]))
    expected = torch.tensor([[[1.0, 0.0], [1.0, 3.0]]]) / 4  # ReLU(A0 - A1) / (h*w)
    assert torch.allclose(cam, expected)
    cam1 = fast_xgradcam(features, weight, torch.tensor([1]))
    assert torch.allclose(cam1, (0.5 * features[0, 0] + 0.5 * features[0, 1]).unsqueeze(0) / 4)


def test_normalize_maps_scales_each_map_to_unit_range():
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[0.0, 0.0], [0.0, 0.0]]])
    out = normalize_maps(maps)
    assert torch.allclose(out[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]), atol=1e-6)
    assert torch.equal(out[1], torch.zeros(2, 2))  # a flat map stays 0, no division by zero


def test_contrastive_weights_subtract_the_mean_of_the_other_classes():
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    expected = torch.tensor([[1 - 1.5, 0 - 1.5], [0 - 2.0, 2 - 0.5], [3 - 0.5, 1 - 1.0]])
    assert torch.allclose(cam_weights(weight, "contrastive"), expected)
    assert cam_weights(weight, "class") is weight
    binary = torch.tensor([[0.5, -1.0], [-0.2, 2.0]])
    assert torch.allclose(cam_weights(binary, "contrastive")[1], binary[1] - binary[0])
