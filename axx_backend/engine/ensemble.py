"""Ensemble members: a timm backbone + an owned Monte Carlo Dropout head.

Each member is `forward_features -> global average pool -> Dropout(p) -> Linear(C)`.
MC Dropout runs the backbone once (eval mode, BatchNorm frozen) and samples T dropout
masks on the pooled features in one batched tensor operation. We own the head because
timm applies its head dropout functionally, so `model.train()` on Dropout modules would
not switch it on (and would also unfreeze BatchNorm statistics).

A member may also carry a segmentation head (segmentation.py) that reads the output of an
earlier stage (`seg_layer`, stride 16): a forward hook grabs it during the same backbone pass.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .segmentation import SegHead
from .weights import WeightInfo, WeightsNotFoundError, load_backbone

log = logging.getLogger(__name__)


class MCDropoutHead(nn.Module):
    """Dropout + linear classifier on pooled features, with batched MC sampling."""

    def __init__(self, in_features: int, num_classes: int, p: float) -> None:
        super().__init__()
        self.p = p
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(F.dropout(pooled, self.p, self.training))

    def sample(self, pooled: torch.Tensor, samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Logits of `samples` dropout masks: [T, B, C].

        The T masks are shared across the batch, so an image's result does not depend on
        which other images share its batch (and is reproducible with a seeded generator).
        """
        if self.p == 0.0:
            return self.fc(pooled).unsqueeze(0).expand(samples, -1, -1)
        keep = 1.0 - self.p
        shape = (samples, 1, pooled.shape[1])
        mask = torch.bernoulli(torch.full(shape, keep, dtype=pooled.dtype), generator=generator)
        mask = mask.to(pooled.device) / keep
        return torch.einsum("tbk,ck->tbc", pooled.unsqueeze(0) * mask, self.fc.weight) + self.fc.bias


def seg_layer_of(backbone: nn.Module) -> str | None:
    """The module whose output the segmentation head reads: the deepest stage at a finer stride than
    the last one (stride 16 for the usual CNNs: resnet `layer3`, efficientnet/mobilenet `blocks.4`,
    densenet `features.denseblock3`), from timm's `feature_info`. None: the last feature map (a model
    without `feature_info`, or one whose stages share a stride, such as a ViT).

    Why not the last map: at stride 32 (7x7 at 224 px) even a perfect per-cell predictor caps the
    IoU near 0.63 on the benchmark, and a linear read-out of it did not transfer to unseen objects.
    """
    info = getattr(backbone, "feature_info", None)
    if not isinstance(info, list) or len(info) < 2:
        return None
    last = info[-1].get("reduction")
    finer = [d for d in info[:-1] if last is not None and d.get("reduction", last) < last]
    return str(finer[-1]["module"]) if finer else None


def layer_channels(backbone: nn.Module, layer: str) -> int:
    """Output channels of the `feature_info` stage `layer`."""
    for d in getattr(backbone, "feature_info", []) or []:
        if d.get("module") == layer:
            return int(d["num_chs"])
    raise ValueError(f"{type(backbone).__name__} has no feature stage {layer!r}")


class Member(nn.Module):
    """One backbone with its MC-dropout head; inputs are RGB tensors in [0, 1]."""

    seg_head: SegHead | None

    def __init__(
        self, name: str, backbone: nn.Module, num_classes: int, dropout: float, weight_info: WeightInfo
    ) -> None:
        super().__init__()
        self.name = name
        self.backbone = backbone
        # Identity tap on the tensor that feeds the global pool: the CAM target layer for grad-cam.
        self.feature_tap = nn.Identity()
        self.head = MCDropoutHead(backbone.num_features, num_classes, dropout)
        self.weight_info = weight_info
        self.register_buffer("mean", torch.tensor(weight_info.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(weight_info.std).view(1, 3, 1, 1))
        self.register_buffer("temperature", torch.ones(()))
        self.seg_head = None  # set by training or by loading a version with segmentation heads
        self.seg_layer = seg_layer_of(backbone)  # None: the head reads the last feature map

    @property
    def num_features(self) -> int:
        return self.head.fc.in_features

    @property
    def seg_channels(self) -> int:
        """Channels of the map the segmentation head reads."""
        return self.num_features if self.seg_layer is None else layer_channels(self.backbone, self.seg_layer)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def features(self, normalized: torch.Tensor) -> torch.Tensor:
        """The feature map [B, K, h, w] that feeds the global average pool."""
        return self.feature_tap(self.backbone.forward_features(normalized))

    def features_and_seg(self, normalized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last feature map, the map the segmentation head reads) from ONE backbone pass: the
        `seg_layer` output is captured by a forward hook that lives only for this call."""
        if self.seg_layer is None:
            feats = self.features(normalized)
            return feats, feats
        captured: list[torch.Tensor] = []
        module = self.backbone.get_submodule(self.seg_layer)
        handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            feats = self.features(normalized)
        finally:
            handle.remove()
        if len(captured) != 1 or not isinstance(captured[0], torch.Tensor) or captured[0].dim() != 4:
            raise RuntimeError(f"{self.name}: stage {self.seg_layer!r} did not give one [B, K, h, w] map")
        return feats, captured[0]

    def forward(self, normalized: torch.Tensor) -> torch.Tensor:
        """Deterministic logits (dropout is off in eval mode); what grad-cam differentiates."""
        return self.head(self.features(normalized).mean(dim=(2, 3)))


@dataclass
class MemberOutput:
    """One member's forward on a batch."""

    features: torch.Tensor  # [B, K, h, w], float32
    logits: torch.Tensor  # [B, C] deterministic, temperature-scaled
    mc_probs: torch.Tensor  # [T, B, C] softmax of temperature-scaled MC logits
    seg_features: torch.Tensor | None = None  # what the seg head reads [B, K', h', w']; only with a seg head


class Ensemble(nn.Module):
    """M members sharing the class list; one forward gives everything prediction needs."""

    def __init__(self, members: Sequence[Member], classes: Sequence[str]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.classes = list(classes)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @classmethod
    def build(
        cls,
        names: Sequence[str],
        classes: Sequence[str],
        dropout: float = 0.3,
        weights: str = "auto",
        weights_dir: str | None = None,
        create_kwargs: dict | None = None,
    ) -> Ensemble:
        members = []
        for name in names:
            backbone, info = load_backbone(name, weights, weights_dir, **(create_kwargs or {}))
            log.info("member %s: weights from %s", name, info.source)
            members.append(Member(name, backbone, len(classes), dropout, info))
        return cls(members, classes).eval()

    def prepare(self, device: torch.device, channels_last: bool = True) -> Ensemble:
        self.to(device)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        return self.eval()

    @torch.inference_mode()
    def forward_mc(
        self,
        images: torch.Tensor,
        samples: int,
        generator: torch.Generator | None = None,
        precision: str = "fp32",
        full_mc: bool = False,
    ) -> list[MemberOutput]:
        """One backbone pass per member (or T passes with `full_mc`), T head samples each."""
        outputs = []
        for member in self.members:
            x = member.normalize(images)
            if _is_channels_last(member):
                x = x.contiguous(memory_format=torch.channels_last)
            seg_feats = None
            with _autocast(x.device, precision):
                if member.seg_head is not None:  # the stride-16 map only when a head will read it
                    feats, seg_feats = member.features_and_seg(x)
                else:
                    feats = member.features(x)
            feats = feats.float()
            seg_feats = None if seg_feats is None else seg_feats.float()
            pooled = feats.mean(dim=(2, 3))
            temperature = member.temperature.clamp_min(1e-3)
            logits = member.head.fc(pooled) / temperature
            if full_mc:
                mc_logits = _full_mc_logits(member, x, samples, precision) / temperature
            else:
                mc_logits = member.head.sample(pooled, samples, generator) / temperature
            outputs.append(MemberOutput(feats, logits, mc_logits.softmax(dim=-1), seg_feats))
        return outputs


def _full_mc_logits(member: Member, x: torch.Tensor, samples: int, precision: str) -> torch.Tensor:
    """T stochastic passes of the whole network: dropout/drop-path layers on, BatchNorm frozen."""
    stochastic = [m for m in member.modules() if _is_stochastic(m)]
    try:
        for module in stochastic:
            module.train()
        member.head.train()
        logits = []
        for _ in range(samples):
            with _autocast(x.device, precision):
                logits.append(member(x).float())
        return torch.stack(logits)
    finally:
        member.eval()


def _is_stochastic(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.Dropout | nn.Dropout2d) or name in ("DropPath", "DropBlock2d")


def _is_channels_last(member: Member) -> bool:
    for p in member.backbone.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last)
    return False


@contextlib.contextmanager
def _autocast(device: torch.device, precision: str) -> Iterator[None]:
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def select_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def build_members_for_preset(
    preset: str, classes: Sequence[str], dropout: float, weights_dir: str | None, explicit: Sequence[str] = ()
) -> tuple[Ensemble, str]:
    """Resolve `auto`: the paper's members when all their weights resolve, else `offline`."""
    from ..core.settings import PRESETS

    if explicit:
        return Ensemble.build(explicit, classes, dropout, "auto", weights_dir), "custom"
    if preset != "auto":
        return Ensemble.build(PRESETS[preset], classes, dropout, "auto", weights_dir), preset
    try:
        ensemble = Ensemble.build(PRESETS["paper"], classes, dropout, "auto", weights_dir)
        log.info("preset auto -> paper (all weights resolved)")
        return ensemble, "paper"
    except WeightsNotFoundError as exc:
        log.warning("preset auto -> offline, because the paper preset's weights did not resolve: %s", exc)
        return Ensemble.build(PRESETS["offline"], classes, dropout, "auto", weights_dir), "offline"
