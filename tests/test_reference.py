"""benchmarks/reference.py: the plain reference's numerics on hand-made cases (no weights download)."""

import numpy as np
import pytest
import timm
import torch

from axx_backend.core.synthetic import make_dataset
from axx_backend.engine.saliency import fast_xgradcam, normalize_maps, upsample
from axx_backend.engine.weights import WeightInfo

from .scripts import load_benchmark

ref = load_benchmark("reference")


def _toy_classification(n_per_class=30, n_features=6, n_classes=3, seed=0):
    """Overlapping Gaussian classes with features on very different scales (so standardising matters)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (n_classes, n_features))
    x = np.concatenate([rng.normal(c, 1.0, (n_per_class, n_features)) for c in centres])
    x = x * np.logspace(-1, 2, n_features) + 5.0
    y = np.repeat(np.arange(n_classes), n_per_class)
    return torch.from_numpy(x), y


def test_centred_box_and_whole_image_iou_on_a_known_mask():
    box = ref.centred_box((320, 320))
    assert box.sum() == 160 * 160 and box[80:240, 80:240].all()  # 25 % of the area, centred
    mask = np.zeros((320, 320), bool)
    mask[:100, :100] = True  # overlaps the box in [80:100, 80:100]: 400 px
    assert ref.iou(box, mask) == pytest.approx(400 / (160 * 160 + 100 * 100 - 400))
    assert ref.iou(np.ones_like(mask), mask) == pytest.approx(100 * 100 / 320**2)
    assert ref.iou(box, box) == 1.0 and ref.iou(np.zeros_like(mask), mask) == 0.0


def test_the_cam_is_autograd_xgradcam_of_the_standardised_head():
    """XGrad-CAM by its definition (alpha_k = sum_ij A_kij / sum_ij A_k * dY_c/dA_kij, through the
    standardisation and the bias) equals `fast_xgradcam` with the head's raw-feature weight W / sigma."""
    torch.manual_seed(0)
    # Feature maps as a backbone's last ReLU leaves them (>= 0), varied enough that each class map has
    # pixels on both sides of 0: the ReLU and the normalisation are exercised.
    maps = torch.relu(torch.randn(3, 16, 5, 5))
    k = maps.shape[1]
    head = ref.LinearHead(
        mean=torch.rand(k, dtype=torch.float64),
        scale=torch.rand(k, dtype=torch.float64) + 0.1,
        weight=torch.randn(4, k, dtype=torch.float64),
        bias=torch.randn(4, dtype=torch.float64),
    )
    classes = torch.tensor([0, 3, 1])
    a = maps.double().requires_grad_(True)
    logits = head.logits(a.mean(dim=(2, 3)))
    grads = torch.autograd.grad(logits[torch.arange(3), classes].sum(), a)[0]
    alpha = (a.detach() / (a.detach().sum(dim=(2, 3), keepdim=True) + 1e-12) * grads).sum(dim=(2, 3))
    expected = torch.relu(torch.einsum("bk,bkhw->bhw", alpha, a.detach()))

    assert (expected == 0).any() and (expected > 0).flatten(1).any(dim=1).all()
    fast = fast_xgradcam(maps.double(), head.raw_weight, classes)
    assert torch.allclose(fast, expected, rtol=1e-6, atol=1e-9)
    cams = ref.class_cams(maps, head, classes.tolist(), [(48, 48)] * 3)
    for cam, exp in zip(cams, expected, strict=True):
        assert np.allclose(cam, normalize_maps(upsample(exp[None].float(), (48, 48)))[0].numpy(), atol=1e-5)
        assert cam.shape == (48, 48) and cam.min() == 0.0 and cam.max() == pytest.approx(1.0, abs=1e-5)


def test_logistic_regression_reaches_the_regularised_optimum():
    x, y = _toy_classification()
    c = 0.3
    head = ref.fit_logistic(x, y, 3, c)
    z = ((x - head.mean) / head.scale).requires_grad_(False)
    w = head.weight.clone().requires_grad_(True)
    b = head.bias.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(z @ w.T + b, torch.as_tensor(y)) + (w * w).sum() / (2 * c * len(y))
    gw, gb = torch.autograd.grad(loss, (w, b))
    assert gw.abs().max() < 1e-7 and gb.abs().max() < 1e-7
    # The raw-feature weight and a bias that absorbs the mean give the same logits.
    raw_bias = head.bias - head.raw_weight @ head.mean
    assert torch.allclose(head.logits(x), x @ head.raw_weight.T + raw_bias, atol=1e-9)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logistic_regression_matches_sklearn(n_classes):
    """scikit-learn (a test-only dependency) is the independent reference for the regularised softmax fit."""
    from sklearn import linear_model

    x, y = _toy_classification(n_classes=n_classes)
    c = 0.3
    head = ref.fit_logistic(x, y, n_classes, c)
    z = ((x - head.mean) / head.scale).numpy()
    # Two classes: scikit-learn fits one sigmoid weight w = w1 - w0, whose penalty 0.5|w|^2 is twice the
    # softmax head's 0.5(|w0|^2 + |w1|^2) at its symmetric optimum: the same model with C doubled.
    sk_c = 2 * c if n_classes == 2 else c
    sk = linear_model.LogisticRegression(C=sk_c, tol=1e-10, max_iter=10000).fit(z, y)
    ours = head.probabilities(x).numpy()
    assert np.abs(ours - sk.predict_proba(z)).max() < 1e-5


def test_stratified_folds_and_the_choice_of_c():
    x, y = _toy_classification(n_per_class=20)
    folds = ref.stratified_folds(y, 5, seed=0)
    for fold in range(5):
        assert np.bincount(y[folds == fold], minlength=3).tolist() == [4, 4, 4]
    assert np.array_equal(folds, ref.stratified_folds(y, 5, seed=0))
    c, losses = ref.choose_c(x, y, 3, seed=0)
    assert set(losses) == set(ref.C_GRID) and losses[c] == min(losses.values())


def test_the_threshold_is_chosen_on_the_maps_and_masks_given():
    ramp = np.tile(np.linspace(0, 1, 21), (4, 1))  # columns 0.00, 0.05, ..., 1.00
    truth = ramp >= 0.6
    threshold, score = ref.choose_threshold([ramp, ramp], [truth, truth])
    assert threshold == pytest.approx(0.6) and score == 1.0


def test_reference_rows_end_to_end_on_tiny_random_members(tmp_path, monkeypatch):
    """The whole pipeline on a generated folder pair with a random resnet18 standing in for each member."""

    def tiny_backbone(name):
        torch.manual_seed(len(name))
        model = timm.create_model("resnet18", pretrained=False, num_classes=0, global_pool="").eval()
        return model, WeightInfo("random", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "test")

    monkeypatch.setattr(ref, "load_backbone", tiny_backbone)
    monkeypatch.setattr(ref, "C_GRID", (0.01, 1.0, 100.0))  # the full grid is tested above; keep this fast
    train = make_dataset(tmp_path / "train", n_per_class=10, size=64, seed=0)
    test = make_dataset(tmp_path / "test", n_per_class=6, size=64, seed=1)
    result = ref.reference_rows(train, test, members=("a", "bb"), input_size=64, seed=0, cache=tmp_path / "cache")
    rows = result["rows"]
    assert result["n_test_positive"] == 6 and result["classes"] == ["Healthy", "Lesion"]
    assert rows["reference (end to end)"]["mean"] <= rows["reference (given the true class)"]["mean"] + 1e-9
    assert set(result["members"]) == {"a", "bb"} and all(m["C"] in ref.C_GRID for m in result["members"].values())
    assert result["reference_threshold"] in ref.THRESHOLDS
    masks = [np.asarray(m) > 0 for m in ref.read_split(test, result["classes"]).masks if m is not None]
    assert rows["whole image"]["mean"] == pytest.approx(np.mean([m.mean() for m in masks]), abs=1e-4)
    # A second run reads the cached features and gives the same numbers.
    again = ref.reference_rows(train, test, members=("a", "bb"), input_size=64, seed=0, cache=tmp_path / "cache")
    assert again["rows"] == rows
    assert "| reference (end to end) |" in ref.format_tables(result)
