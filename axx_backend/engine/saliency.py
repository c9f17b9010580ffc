"""XGrad-CAM maps (METHOD.md step 5).

For a `GAP -> (dropout) -> linear` head, XGrad-CAM's channel weight is
`sum_ij (A_kij / sum_ij A_kij) * dY_c/dA_kij = w_ck / (h*w)`, so the map is
`ReLU(sum_k w_ck A_k) / (h*w)`: computed from the forward's feature map, no backward.
The general path goes through the `grad-cam` package (any of its CAM methods) for
heads that are not linear; a test checks that both agree.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .ensemble import Member

EPS = 1e-7  # the same guard grad-cam uses when it scales maps to [0, 1]


def fast_xgradcam(features: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Unnormalised XGrad-CAM [B, h, w] for class `classes[b]` of image b.

    `features`: [B, K, h, w] (the tensor that feeds the global pool); `weight`: [C, K].
    """
    h, w = features.shape[-2:]
    class_weights = weight[classes].to(features.dtype) / (h * w)  # [B, K]
    return torch.einsum("bk,bkhw->bhw", class_weights, features).clamp_min(0.0)


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each map of [B, h, w] to [0, 1] (grad-cam's `scale_cam_image` rule)."""
    flat = maps.flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    flat = flat / (EPS + flat.max(dim=1, keepdim=True).values)
    return flat.view_as(maps)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of [B, h, w] maps to `size` = (H, W) (half-pixel centres, like cv2)."""
    return F.interpolate(maps.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False).squeeze(1)


GRADCAM_METHODS = ("xgradcam", "gradcam", "gradcam++", "hirescam", "layercam", "eigencam", "scorecam", "ablationcam")


def gradcam_maps(
    member: Member, normalized: torch.Tensor, classes: torch.Tensor, method: str = "xgradcam"
) -> np.ndarray:
    """The general autograd path through `pytorch_grad_cam`: normalised maps [B, H, W] at input size."""
    from pytorch_grad_cam import (
        AblationCAM,
        EigenCAM,
        GradCAM,
        GradCAMPlusPlus,
        HiResCAM,
        LayerCAM,
        ScoreCAM,
        XGradCAM,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    methods = {
        "xgradcam": XGradCAM,
        "gradcam": GradCAM,
        "gradcam++": GradCAMPlusPlus,
        "hirescam": HiResCAM,
        "layercam": LayerCAM,
        "eigencam": EigenCAM,
        "scorecam": ScoreCAM,
        "ablationcam": AblationCAM,
    }
    if method not in methods:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(GRADCAM_METHODS)} or 'fast'")
    member.eval()
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    # Only the activations need gradients: frozen weights skip the weight half of the backward
    # and leave no .grad tensors behind.
    trainable = [p for p in member.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with methods[method](model=member, target_layers=[member.feature_tap]) as cam:
            with torch.enable_grad():
                x = normalized.float().contiguous().requires_grad_(True)
                return cam(input_tensor=x, targets=targets)
    finally:
        for p in trainable:
            p.requires_grad_(True)
