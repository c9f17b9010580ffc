"""XGrad-CAM maps (docs/METHOD.md step 5).

For a `GAP -> (dropout) -> linear` head, XGrad-CAM's channel weight is
`sum_ij (A_kij / sum_ij A_kij) * dY_c/dA_kij = w_ck / (h*w)`, so the map is
`ReLU(sum_k w_ck A_k) / (h*w)`: computed from the forward's feature map, no backward. With the `top10`
pooling the weight is `w_ck` times a per-image channel factor (pooling.py `channel_scale`).
The general path goes through the `grad-cam` package (any of its CAM methods) for
heads that are not linear; a test checks that both agree.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .ensemble import Member
from .pooling import channel_scale

EPS = 1e-7  # the same guard grad-cam uses when it scales maps to [0, 1]


CAM_WEIGHTS = ("class", "contrastive")


def cam_weights(weight: torch.Tensor, mode: str = "class") -> torch.Tensor:
    """The [C, K] channel weights a CAM uses: `class` is the head's w_c (XGrad-CAM as in the paper);
    `contrastive` is w_c minus the mean of the other classes' weights. A softmax decision depends only on
    such differences: w_c alone keeps whatever all classes share, which lights up the whole scene
    (docs/METHOD.md "Class-contrastive CAM"). With two classes the two differ only by a factor."""
    if mode == "class" or weight.shape[0] < 2:
        return weight
    if mode != "contrastive":
        raise ValueError(f"cam_weights must be one of {CAM_WEIGHTS}, got {mode!r}")
    others = (weight.sum(dim=0, keepdim=True) - weight) / (weight.shape[0] - 1)
    return weight - others


def member_cam(
    features: torch.Tensor,
    weight: torch.Tensor,
    label: int,
    size: tuple[int, int],
    mode: str = "class",
    pooling: str = "avg",
    pooled: torch.Tensor | None = None,
) -> np.ndarray:
    """A member's normalised fast XGrad-CAM of class `label` at `size` = (H, W) from its last feature map
    [1, K, h, w] and head weight [C, K]: what serving fuses, and what training calibrates thresholds on.
    `pooled` [1, K]: the map's pooling, where the forward made it. Normalise, upsample, normalise again: the
    order of grad-cam's XGradCAM output."""
    with torch.no_grad():
        classes = torch.tensor([label], device=features.device)
        weights = cam_weights(weight.detach().to(features.device).float(), mode)  # a GPU head on cached maps
        cam = normalize_maps(fast_xgradcam(features.float(), weights, classes, pooling, pooled))
        return normalize_maps(upsample(cam.cpu(), size))[0].numpy()


def fast_xgradcam(
    features: torch.Tensor,
    weight: torch.Tensor,
    classes: torch.Tensor,
    pooling: str = "avg",
    pooled: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unnormalised XGrad-CAM [B, h, w] for class `classes[b]` of image b.

    `features`: [B, K, h, w] (the tensor that feeds the pooling); `weight`: [C, K]; `pooled`: [B, K], the
    pooling of `features` where the caller has it.
    """
    class_weights = weight[classes].to(features.dtype) * channel_scale(features, pooling, pooled)  # [B, K]
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


class ContrastiveTarget:
    """grad-cam target: the class logit minus the mean of the others (what `cam_weights="contrastive"` maps)."""

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        logits = model_output if model_output.dim() == 2 else model_output[None]  # grad-cam passes one image's
        c, n = self.category, logits.shape[1]
        margin = logits[:, c] - (logits.sum(dim=1) - logits[:, c]) / max(1, n - 1)
        return margin if model_output.dim() == 2 else margin[0]


def gradcam_maps(
    member: Member, normalized: torch.Tensor, classes: torch.Tensor, method: str = "xgradcam", mode: str = "class"
) -> np.ndarray:
    """The general autograd path through `pytorch_grad_cam`: normalised maps [B, H, W] at input size, of the
    class logit (`mode="class"`) or of its margin over the other classes' mean (`"contrastive"`)."""
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
    contrastive = mode == "contrastive" and member.head.fc.out_features > 1
    targets = [ContrastiveTarget(int(c)) if contrastive else ClassifierOutputTarget(int(c)) for c in classes]
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
