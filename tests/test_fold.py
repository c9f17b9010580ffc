"""BatchNorm folded into the convolution before it (engine/fold.py), against the unfolded backbone."""

import copy

import pytest
import torch
from torch import nn

from axx_backend.core.settings import Settings
from axx_backend.core.versions import ModelStore
from axx_backend.engine.annotator import Annotator
from axx_backend.engine.fold import fold_batchnorm, foldable_pairs
from axx_backend.engine.weights import create_backbone


def _with_running_statistics(backbone: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (a fresh model's are 0 / 1: folding them is trivial)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_((torch.rand(n, generator=generator) - 0.5) * 0.4)
    return backbone.eval()


def _batchnorms(backbone: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())


@pytest.mark.parametrize(
    ("name", "left"),
    [("resnet18", 0), ("tf_efficientnet_lite0", 0), ("densenet121", 62)],  # DenseNet: 58 norm1, 3 transitions, norm5
)
def test_folded_backbones_compute_what_the_unfolded_ones_do(name, left):
    backbone = _with_running_statistics(create_backbone(name))
    reference = copy.deepcopy(backbone)
    before = _batchnorms(backbone)
    assert fold_batchnorm(backbone) == before - left and _batchnorms(backbone) == left
    assert not foldable_pairs(backbone)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference.forward_features(x), backbone.forward_features(x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


class BatchNormFirst(nn.Module):
    """Registers a convolution and then a BatchNorm, but runs the BatchNorm first: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


def test_a_batchnorm_that_does_not_follow_its_convolution_is_left_as_it_was():
    model = _with_running_statistics(BatchNormFirst())
    reference = copy.deepcopy(model)
    assert len(foldable_pairs(model)) == 1  # registration order alone would fold it
    assert fold_batchnorm(model) == 0
    assert isinstance(model.bn, nn.BatchNorm2d) and model.conv.bias is not None
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(v, expected[k]) for k, v in state.items())


def test_a_model_in_training_mode_is_not_folded():
    backbone = _with_running_statistics(create_backbone("resnet18")).train()
    assert fold_batchnorm(backbone) == 0 and _batchnorms(backbone) > 0


def test_a_served_version_runs_folded_backbones(trained_model_dir):
    store = ModelStore(trained_model_dir)
    annotator = Annotator.from_version(store.path(store.current()), Settings(), explicit=set())
    for member in annotator.ensemble.members:
        assert _batchnorms(member.backbone) == 0, member.name  # the offline members: conv -> BN everywhere
