"""The members' MC-dropout heads: trained on standardised features, served on raw ones."""

import torch

from axx_backend.core.settings import Settings
from axx_backend.engine.ensemble import MCDropoutHead
from axx_backend.training.heads import fold_standardiser, standardiser, train_head


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 8, generator=g)
    x[:, 0] += 2.0 * (2 * y - 1)
    return x, y


def trained(x: torch.Tensor, y: torch.Tensor, epochs: int) -> MCDropoutHead:
    torch.manual_seed(0)  # the same initial head for both scales
    head = MCDropoutHead(x.shape[1], 2, 0.3)
    train_head(head, x, y, x[:0], y[:0], 2, Settings(preset="offline", epochs=epochs))
    return head


def test_a_head_learns_the_same_from_features_at_any_scale_and_offset():
    # Pooled features of real backbones differ in scale (the self-supervised ResNet-50's norm is ~40): on raw
    # features a few full-batch steps overshot and the head predicted one class.
    x, y = separable(200, 0)
    test_x, test_y = separable(200, 1)
    for epochs in (3, 6, 200):
        unit = trained(x, y, epochs)
        large = trained(40 * x + 20, y, epochs)
        with torch.no_grad():
            logits_unit, logits_large = unit.fc(test_x), large.fc(40 * test_x + 20)
        torch.testing.assert_close(logits_large, logits_unit, rtol=1e-3, atol=1e-3)
    assert float((logits_large.argmax(-1) == test_y).float().mean()) > 0.8  # after 200 epochs (Bayes: 0.98)


def test_folding_the_standardiser_keeps_the_logits():
    x, _ = separable(50, 2)
    x = 7 * x + 3
    fc = torch.nn.Linear(8, 3)
    mean, scale = standardiser(x)
    with torch.no_grad():
        expected = fc((x - mean) / scale)
        fold_standardiser(fc, mean, scale)
        torch.testing.assert_close(fc(x), expected, rtol=1e-4, atol=1e-4)


def test_a_feature_constant_on_the_training_images_gets_no_huge_weight():
    x, _ = separable(50, 3)
    x[:, 5] = 1.0
    _, scale = standardiser(x)
    assert float(scale[5]) > 0.01 * float(scale.mean())
