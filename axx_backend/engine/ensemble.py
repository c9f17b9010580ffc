"""Ensemble members: a timm backbone + an owned Monte Carlo Dropout head.

Each member is `forward_features -> global average pool -> Dropout(p) -> Linear(C)`.
MC Dropout runs the backbone once (eval mode, BatchNorm frozen) and samples T dropout
masks on the pooled features in one batched tensor operation. We own the head because
timm applies its head dropout functionally, so `model.train()` on Dropout modules would
not switch it on (and would also unfreeze BatchNorm statistics).

The segment head (segments.py) also reads two earlier stages of every member (`level_names`: stride 8
and 16): forward hooks grab them during the same backbone pass, only when they are asked for.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .pooling import pool
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


def level_names_of(backbone: nn.Module, count: int = 2) -> tuple[str, ...]:
    """The `count` deepest stages at a finer stride than the last one, finest first (e.g. resnet
    `layer2`, `layer3`; efficientnet/mobilenet `blocks.2`, `blocks.4`), from timm's `feature_info`. Empty for a
    model without `feature_info` or whose stages share a stride (a ViT).

    Why these: the last map (stride 32: 10x10 cells at 320 px) says *what* is in the image; the stride-8 and
    -16 maps keep edges and textures, which is what tells an object's segments from the background's.
    """
    info = getattr(backbone, "feature_info", None)
    if not isinstance(info, list) or len(info) < 2:
        return ()
    last = info[-1].get("reduction")
    finer = [str(d["module"]) for d in info[:-1] if last is not None and d.get("reduction", last) < last]
    return tuple(finer[-count:])


class Member(nn.Module):
    """One backbone with its MC-dropout head; inputs are RGB tensors in [0, 1]."""

    def __init__(
        self,
        name: str,
        backbone: nn.Module,
        num_classes: int,
        dropout: float,
        weight_info: WeightInfo,
        pooling: str = "avg",
    ) -> None:
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.pooling = pooling  # how the last feature map becomes the head's input (pooling.py)
        # Identity tap on the tensor that feeds the pooling: the CAM target layer for grad-cam.
        self.feature_tap = nn.Identity()
        self.head = MCDropoutHead(backbone.num_features, num_classes, dropout)
        self.weight_info = weight_info
        self.register_buffer("mean", torch.tensor(weight_info.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(weight_info.std).view(1, 3, 1, 1))
        self.register_buffer("temperature", torch.ones(()))
        self.level_names = level_names_of(backbone)  # the earlier stages the segment head reads

    @property
    def device(self) -> torch.device:
        """Where the member computes (training's feature cache stays on the CPU and moves here batch by batch)."""
        return self.head.fc.weight.device

    @property
    def num_features(self) -> int:
        return self.head.fc.in_features

    def level_channels(self) -> tuple[int, ...]:
        """Channels of the `level_names` stages."""
        channels = {d.get("module"): int(d["num_chs"]) for d in getattr(self.backbone, "feature_info", []) or []}
        return tuple(channels[name] for name in self.level_names)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def mc_probs(self, pooled: torch.Tensor, samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Softmax probabilities [T, B, C] of T head-dropout samples of pooled features [B, K], after the
        member's temperature: what the MC statistics of a head-only forward read."""
        return (self.head.sample(pooled, samples, generator) / self.temperature.clamp_min(1e-3)).softmax(dim=-1)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """The head's input [B, K] from the last feature map [B, K, h, w]."""
        return pool(features, self.pooling)

    def features(self, normalized: torch.Tensor) -> torch.Tensor:
        """The feature map [B, K, h, w] that feeds the pooling."""
        return self.feature_tap(self.backbone.forward_features(normalized))

    def features_and_levels(self, normalized: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(last feature map, the `level_names` maps) from ONE backbone pass: forward hooks that live only
        for this call capture the earlier stages."""
        captured: dict[str, torch.Tensor] = {}
        handles = [
            self.backbone.get_submodule(name).register_forward_hook(
                lambda _m, _i, out, name=name: captured.__setitem__(name, out)
            )
            for name in self.level_names
        ]
        try:
            feats = self.features(normalized)
        finally:
            for handle in handles:
                handle.remove()
        levels = [captured.get(name) for name in self.level_names]
        if any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in levels):
            raise RuntimeError(f"{self.name}: stages {self.level_names} did not each give one [B, K, h, w] map")
        return feats, levels  # type: ignore[return-value]

    def forward(self, normalized: torch.Tensor) -> torch.Tensor:
        """Deterministic logits (dropout is off in eval mode); what grad-cam differentiates."""
        return self.head(self.pool(self.features(normalized)))


@dataclass
class MemberOutput:
    """One member's forward on a batch."""

    features: torch.Tensor  # [B, K, h, w], float32: the last feature map (the CAM's)
    pooled: torch.Tensor  # [B, K]: what the head read (the member's pooling of `features`)
    logits: torch.Tensor  # [B, C] deterministic, temperature-scaled
    mc_probs: torch.Tensor  # [T, B, C] softmax of temperature-scaled MC logits
    levels: list[torch.Tensor] | None = None  # the `level_names` maps [B, K_l, h_l, w_l]; only when asked for

    def select(self, index: torch.Tensor) -> MemberOutput:
        """The images `index` of this batch."""
        levels = None if self.levels is None else [t[index] for t in self.levels]
        return MemberOutput(
            self.features[index], self.pooled[index], self.logits[index], self.mc_probs[:, index], levels
        )

    @torch.inference_mode()
    def put(self, index: torch.Tensor, other: MemberOutput) -> None:
        """Overwrite the images `index` of this batch with `other`'s (the same images, computed again)."""
        self.features[index] = other.features
        self.pooled[index] = other.pooled
        self.logits[index] = other.logits
        self.mc_probs[:, index] = other.mc_probs
        for mine, theirs in zip(self.levels or [], other.levels or [], strict=True):
            mine[index] = theirs


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
        pooling: str = "avg",
    ) -> Ensemble:
        members = []
        for name in names:
            backbone, info = load_backbone(name, weights, weights_dir, **(create_kwargs or {}))
            log.info("member %s: weights from %s", name, info.source)
            members.append(Member(name, backbone, len(classes), dropout, info, pooling))
        return cls(members, classes).eval()

    def prepare(self, device: torch.device, channels_last: bool = True, bf16_weights: bool = False) -> Ensemble:
        """Move to `device` for serving. `bf16_weights` casts the backbones' convolution and linear weights to
        bf16 in place, once: the ensemble then serves only in bf16 (`forward_mc` refuses fp32)."""
        self.to(device)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if bf16_weights:
            for member in self.members:
                cast_autocast_weights(member.backbone, torch.bfloat16)
        return self.eval()

    @property
    def casts_weights(self) -> bool:
        """Were the backbones' weights cast for bf16 serving (`prepare(..., bf16_weights=True)`)?"""
        return any(p.dtype == torch.bfloat16 for p in self.members.parameters())

    @torch.inference_mode()
    def forward_mc(
        self,
        images: torch.Tensor,
        samples: int,
        generator: torch.Generator | None = None,
        precision: str = "fp32",
        full_mc: bool = False,
        levels: bool = False,
    ) -> list[MemberOutput]:
        """One backbone pass per member (or T passes with `full_mc`), T head samples each; with `levels`, the
        earlier stages the segment head reads, from the same pass."""
        if precision != "bf16" and self.casts_weights:
            raise ValueError(f"this ensemble was prepared for bf16 serving and cannot run in {precision}")
        outputs = []
        for member in self.members:
            x = member.normalize(images)
            if _is_channels_last(member):
                x = x.contiguous(memory_format=torch.channels_last)
            level_maps = None
            with autocast_for(x.device, precision):
                if levels:
                    feats, level_maps = member.features_and_levels(x)
                else:
                    feats = member.features(x)
            feats = feats.float()
            level_maps = None if level_maps is None else [t.float() for t in level_maps]
            pooled = member.pool(feats)
            temperature = member.temperature.clamp_min(1e-3)
            logits = member.head.fc(pooled) / temperature
            if full_mc:
                mc_probs = (_full_mc_logits(member, x, samples, precision) / temperature).softmax(dim=-1)
            else:
                mc_probs = member.mc_probs(pooled, samples, generator)
            outputs.append(MemberOutput(feats, pooled, logits, mc_probs, level_maps))
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
            with autocast_for(x.device, precision):
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


AUTOCAST_LAYERS = (nn.Conv2d, nn.Linear)  # exact types: a subclass may transform its weight before using it


def cast_autocast_weights(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast, once, the weights that autocast casts on every call (those of convolutions and linear layers).
    Autocast then uses them as they are, so the outputs are bit for bit those of autocast over fp32 weights,
    without re-casting ~40 M weights per forward: the paper members at 512² batch 1 took 0.49x their fp32 time
    under autocast and 0.445x with the weights cast once (README "Speed"). Memory formats are kept."""
    for layer in module.modules():
        if type(layer) in AUTOCAST_LAYERS:
            for param in (layer.weight, layer.bias):
                if param is not None:
                    param.data = param.data.to(dtype)


@contextlib.contextmanager
def autocast_for(device: torch.device, precision: str) -> Iterator[None]:
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def native_bf16(device: torch.device) -> bool:
    """Does `device` compute bf16 natively? (Elsewhere autocast emulates it, slower than fp32.)"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` -> `bf16` where `device` has native bf16, else `fp32`; `fp32` and `bf16` stay as asked."""
    if requested != "auto":
        return requested
    return "bf16" if native_bf16(device) else "fp32"


def select_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def build_members_for_preset(
    preset: str,
    classes: Sequence[str],
    dropout: float,
    weights_dir: str | None,
    explicit: Sequence[str] = (),
    pooling: str = "avg",
) -> tuple[Ensemble, str]:
    """Resolve `auto`: the paper's members when all their weights resolve, else `offline`."""
    from ..core.settings import PRESETS

    def build(names: Sequence[str]) -> Ensemble:
        return Ensemble.build(names, classes, dropout, "auto", weights_dir, pooling=pooling)

    if explicit:
        return build(explicit), "custom"
    if preset != "auto":
        return build(PRESETS[preset]), preset
    try:
        ensemble = build(PRESETS["paper"])
        log.info("preset auto -> paper (all weights resolved)")
        return ensemble, "paper"
    except WeightsNotFoundError as exc:
        log.warning("preset auto -> offline, because the paper preset's weights did not resolve: %s", exc)
        return build(PRESETS["offline"]), "offline"
