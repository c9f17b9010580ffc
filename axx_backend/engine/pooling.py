"""How a member turns its last feature map into the vector its head reads (docs/METHOD.md "Pooling").

- `avg`: the global average (the paper's ResNet/EfficientNet/DenseNet heads; versions before 2026-12).
- `top10`: per channel, the mean of its highest 10 % of cells (at least one): a bag of cells whose label is
  the image's, pooled towards its most active cells as multiple-instance learning and WILDCAT (Durand et al.
  2017) do. An object of 3-30 % of the image fills a few of the 10x10 cells at 320 px; the global average dilutes
  it with the background, so a linear head on it learns the backgrounds of the training images, which new
  photographs do not share (frozen probes on the photograph benchmark: METHOD "Pooling").

XGrad-CAM of a linear head on either pooling needs no backward pass. Its channel weight is
`sum_ij A_kij / S_k * dY_c/dA_kij` with `S_k = sum_ij A_kij`. With `top10`, `dY_c/dA_kij = w_ck / n` on the
channel's n top cells and 0 elsewhere, so the weight is `w_ck * T_k / (n S_k)`, with `T_k` the sum of those top
cells. With `avg` it is `w_ck / (h w)`. `channel_scale` gives the factor that multiplies `w_ck`.

`S_k` is the channel's sum, which XGrad-CAM takes for its mass: right for ReLU maps (ResNet, DenseNet,
MobileNetV2, the EfficientNet-Lites), not for SiLU maps (EfficientNet-B0), whose cells go down to -0.28. A
channel that fires on a small object and is slightly negative elsewhere then sums to nearly zero, and its weight
grows without bound: on EfficientNet-B0 (random weights, BatchNorm statistics of the inputs, 320 px) the largest
channel weight was 77x the median, and bf16's rounding changed some weights' sign (the benchmark's bf16 mask: IoU
0.29 against fp32's). So the factor here divides by the channel's L1 mass
`sum_ij |A_kij|`: equal to `S_k` on ReLU maps (XGrad-CAM exactly; tests compare with grad-cam), and on SiLU maps
the factor stays within the top cells' own gradient, `1 / n`.
"""

from __future__ import annotations

import torch

from ..core.settings import POOLINGS

TOP_SHARE = 0.1
EPS = 1e-7  # grad-cam's guard in XGradCAM's `activations / (sum + eps)`


def top_count(cells: int) -> int:
    """How many cells of a map `top10` averages: 10 % of them, at least one."""
    return max(1, round(TOP_SHARE * cells))


def pool(features: torch.Tensor, kind: str) -> torch.Tensor:
    """[B, K, h, w] -> [B, K]."""
    if kind == "avg":
        return features.mean(dim=(2, 3))
    if kind == "top10":
        flat = features.flatten(2)
        return flat.topk(top_count(flat.shape[2]), dim=2).values.mean(dim=2)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {kind!r}")


def channel_scale(features: torch.Tensor, kind: str, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """[B, K]: XGrad-CAM's channel weight of a linear head on `pool(features, kind)`, per unit head weight;
    `pooled`: that pooling, where the caller has it already (the forward's), so that top10 sorts only once."""
    h, w = features.shape[-2:]
    if kind == "avg":
        return torch.full(features.shape[:2], 1.0 / (h * w), dtype=features.dtype, device=features.device)
    if kind == "top10":  # T_k / n is the pooled value itself; the L1 mass is S_k on ReLU maps (module docstring)
        pooled = pool(features, kind) if pooled is None else pooled.to(features.dtype)
        return pooled / (features.abs().sum(dim=(2, 3)) + EPS)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {kind!r}")
