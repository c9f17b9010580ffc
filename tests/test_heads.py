"""The members' MC-dropout heads: trained on scaled features from zero, served on raw ones."""

from types import SimpleNamespace

import numpy as np
import torch

from axx_backend.core.settings import Settings
from axx_backend.engine.ensemble import MCDropoutHead
from axx_backend.training.heads import cv_epochs, feature_scale, held_out_too_small, train_head


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative features (as pooled post-ReLU activations are); feature 0 tells the class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.rand(n, 8, generator=g)
    x[:, 0] += 1.5 * y
    return x, y


def trained(x: torch.Tensor, y: torch.Tensor, epochs: int) -> MCDropoutHead:
    head = MCDropoutHead(x.shape[1], 2, 0.3)
    train_head(head, x, y, x[:0], y[:0], 2, Settings(preset="offline", epochs=epochs))
    return head


def test_a_head_learns_the_same_from_features_at_any_scale():
    # Pooled features of real backbones differ in scale (the self-supervised ResNet-50's norm is ~40): on raw
    # features a few full-batch steps overshot and the head predicted one class.
    x, y = separable(200, 0)
    test_x, test_y = separable(200, 1)
    for epochs in (3, 6, 200):
        unit = trained(x, y, epochs)
        large = trained(40 * x, y, epochs)
        with torch.no_grad():
            logits_unit, logits_large = unit.fc(test_x), large.fc(40 * test_x)
        torch.testing.assert_close(logits_large, logits_unit, rtol=1e-3, atol=1e-3)
    assert float((logits_large.argmax(-1) == test_y).float().mean()) > 0.8  # after 200 epochs (Bayes: 1.0)


def test_a_featureless_image_gets_the_prior_not_a_confident_class():
    # All activations near zero (a blank or grey image): no evidence for any class. Features centred on the
    # training mean would put zero far on one side of it (here 2 to 3.25, with a spread of 0.15 to 0.4).
    x, y = separable(200, 2)
    x = 2.0 + 0.5 * x
    head = trained(x, y, 200)
    with torch.no_grad():
        probs = head.fc(torch.zeros(1, x.shape[1])).softmax(-1)
    assert float(probs.max()) < 0.6


def test_a_feature_zero_on_the_training_images_gets_no_huge_weight():
    x, _ = separable(50, 3)
    x[:, 5] = 0.0
    scale = feature_scale(x)
    assert float(scale[5]) > 0.01 * float(scale.mean())


def test_cross_validation_stops_a_head_early_on_noise_and_late_on_signal():
    """`cv_epochs` (the epoch count when the held-out split is too small): summed over folds, the loss of heads
    trained on the other folds falls for as long as the features tell the class, and not when they do not."""
    member = SimpleNamespace(head=MCDropoutHead(8, 2, 0.3))
    folds = np.arange(40) % 5
    settings = Settings(preset="offline", epochs=200)
    x, y = separable(40, 4)
    signal = cv_epochs(member, x, y, folds, settings)
    noise = cv_epochs(member, x, y[torch.randperm(40, generator=torch.Generator().manual_seed(0))], folds, settings)
    assert signal["epochs_by"] == "cross-validation"
    # heads start from zero (loss ln 2 = 0.693) and learn slowly (lr 1e-3): signal keeps lowering the loss to the
    # last epoch, while on shuffled labels no epoch beats the uniform start by more than noise
    assert signal["best_epoch"] > 150 and signal["val_loss"] < 0.65
    assert noise["best_epoch"] < 20 and noise["val_loss"] > 0.69


def test_a_held_out_split_with_one_image_of_a_class_is_too_small_to_early_stop_on():
    assert held_out_too_small(torch.tensor([0, 1, 1]), 2)
    assert held_out_too_small(torch.tensor([0, 0, 1, 1]), 3)  # no image of class 2
    assert not held_out_too_small(torch.tensor([0, 0, 1, 1, 2, 2]), 3)
