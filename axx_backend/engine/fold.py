"""BatchNorm folded into the convolution before it, for serving (README, "Speed").

In eval mode a BatchNorm is an affine map per channel, so after a convolution it can become part of that
convolution's weight and bias: one pass over the feature map instead of two. At 512² the separate BatchNorms
took 41 ms of a 295 ms bf16 predict with the paper's members (61 ms in fp32).

A BatchNorm is folded when its parent registers it right after a Conv2d. timm's ResNet, EfficientNet and
DenseNet blocks register their layers in the order they run; DenseNet's first norm of each layer, which
normalises the concatenated inputs, has no convolution before it and stays. The backbone's output on a probe
image must then match the unfolded one, else nothing is folded.

For serving only: last-stage fine-tuning trains the BatchNorm parameters, and training saves them.
"""

from __future__ import annotations

import logging

import torch
from timm.layers import BatchNormAct2d
from torch import nn

log = logging.getLogger(__name__)


def foldable_pairs(backbone: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, convolution's name, BatchNorm's name) for each BatchNorm registered right after a Conv2d."""
    pairs = []
    for parent in backbone.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if isinstance(conv, nn.Conv2d) and _is_plain_batchnorm(bn) and bn.num_features == conv.out_channels:
                pairs.append((parent, conv_name, bn_name))
    return pairs


def _is_plain_batchnorm(module: nn.Module) -> bool:
    """nn.BatchNorm2d, or timm's BatchNormAct2d (BatchNorm, then dropout and activation), with running stats."""
    plain = type(module) in (nn.BatchNorm2d, BatchNormAct2d)  # exact types: a subclass may run otherwise
    return plain and module.track_running_stats and module.running_var is not None  # type: ignore[union-attr]


@torch.no_grad()
def fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Module:
    """Scale `conv`'s weight and set its bias in place so that it computes bn(conv(x)); returns what must replace
    `bn`: nothing (Identity) for a BatchNorm2d, the dropout and activation of a BatchNormAct2d."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
    conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
    conv.bias = nn.Parameter((bias * scale + shift).to(conv.weight.dtype), requires_grad=False)
    after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    return nn.Sequential(*after) if after else nn.Identity()


@torch.no_grad()
def fold_batchnorm(backbone: nn.Module, probe_side: int = 64, tolerance: float = 1e-3) -> int:
    """Fold every foldable BatchNorm of an eval-mode backbone in place (see the module docstring); returns how
    many. The output of `forward_features` on a random probe image must stay within `tolerance` of the largest
    activation, else the backbone is left as it was and 0 is returned."""
    pairs = foldable_pairs(backbone)
    if not pairs or backbone.training:
        return 0
    run = getattr(backbone, "forward_features", backbone)
    param = next(backbone.parameters())
    probe = torch.randn(1, 3, probe_side, probe_side, generator=torch.Generator().manual_seed(0))
    probe = probe.to(param.device, param.dtype)
    before = run(probe)
    undo = []
    for parent, conv_name, bn_name in pairs:
        conv, bn = parent.get_submodule(conv_name), parent.get_submodule(bn_name)
        undo.append((parent, bn_name, bn, conv, conv.weight.detach().clone(), conv.bias))
        setattr(parent, bn_name, fold_into(conv, bn))
    after = run(probe)
    if after.shape == before.shape and (after - before).abs().max() <= tolerance * before.abs().max().clamp_min(1e-6):
        return len(pairs)
    log.warning("%s: folding BatchNorm changed its output; served unfolded", type(backbone).__name__)
    for parent, bn_name, bn, conv, weight, bias in undo:
        setattr(parent, bn_name, bn)
        conv.weight.copy_(weight)
        conv.bias = bias
    return 0
