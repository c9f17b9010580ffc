"""The segment head: which image regions belong to the object (docs/METHOD.md "Learning" 3).

Belharbi et al. train a segmentation head on a few oracle masks plus lambda-weighted pseudo-masks. Here
the head labels the Felzenszwalb regions of `refine.py` rather than pixels: a region's features are the
means, inside it, of every member's stride-8 and stride-16 maps (edges, textures), of the fused CAM (the
class evidence) and its share of the image. A logistic regression on those features says how likely a
region is foreground; the mask follows the image's edges by construction, and a few masks give thousands
of labelled regions.

Measured on the photograph benchmark (binary, test objects never seen, given the true class): trained on
pseudo-masks alone (the refined CAM of the training positives, every region of the training negatives as
background) it scored IoU 0.680 against 0.648 for the refined CAM it learned from; with 5, 20 and 50
oracle masks (+ 0.1 x pseudo-masks) 0.696, 0.690 and 0.706; a per-pixel linear head on the same maps
scored 0.52 before and 0.56-0.59 after refinement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .refine import region_means

POOL_DIVISOR = 4  # level maps are averaged over regions on a grid of side input_size / 4 (80 at 320 px)


def region_level_means(
    levels: Sequence[torch.Tensor], side: int, segmentations: Sequence[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per segmentation [S, S]: (the level maps' region means [n_regions, D], each region's share of the image
    [n_regions]): the part of the segment head's features that does not depend on the class (training
    caches it). `levels`: every member's stride-8 and -16 maps ([K, h, w], in a fixed order).

    A region's mean is that of the cells of a grid of side `side / POOL_DIVISOR`, the maps resampled to it
    bilinearly, whose centres lie in the region (a region too small to own a cell takes the cell its first
    pixel lies in). Resampling and averaging are linear, so the means are each map [K, h*w] times a weight
    matrix [h*w, n_regions] made once per map size, without building the grid (3,200 channels at 80 x 80 for
    the paper's members): 135 ms fell to ~10 ms at 512 px (README, "Speed")."""
    grid = max(1, side // POOL_DIVISOR)
    cells = np.concatenate([_cell_weights(labels, grid) for labels in segmentations])  # [N, G*G], all scales
    counts = [int(labels.max()) + 1 for labels in segmentations]
    weights: dict[tuple[int, int], torch.Tensor] = {}
    columns = []
    for level in levels:
        k, h, w = level.shape
        if (h, w) not in weights:
            weights[h, w] = _map_weights(torch.from_numpy(cells), grid, h, w)
        # [K, h*w] is a view of a contiguous or a channels_last map alike; mm reads its transpose in place
        columns.append(torch.mm(weights[h, w], level.detach().float().cpu().reshape(k, h * w).T))
    means = torch.cat(columns, dim=1).numpy()
    split = np.cumsum(counts)[:-1]
    areas = [
        np.bincount(labels.ravel(), minlength=n) / labels.size for labels, n in zip(segmentations, counts, strict=True)
    ]
    return list(zip(np.split(means, split), areas, strict=True))


def _cell_weights(segmentation: np.ndarray, grid: int) -> np.ndarray:
    """[n_regions, G*G]: each region's average over the grid cells whose centre it holds (or its first pixel's)."""
    side = segmentation.shape[0]
    centres = ((np.arange(grid) + 0.5) * side / grid).astype(int)
    owner = segmentation[np.ix_(centres, centres)].ravel()  # the region of each cell's centre
    n = int(segmentation.max()) + 1
    count = np.bincount(owner, minlength=n)
    out = np.zeros((n, grid * grid), dtype=np.float32)
    out[owner, np.arange(grid * grid)] = 1.0 / count[owner]
    first = np.unique(segmentation.ravel(), return_index=True)[1]
    lonely = np.flatnonzero(count == 0)
    fallback = (first[lonely] // side * grid // side) * grid + (first[lonely] % side) * grid // side
    out[lonely, fallback] = 1.0
    return out


def _map_weights(cells: torch.Tensor, grid: int, h: int, w: int) -> torch.Tensor:
    """[N, h*w]: the cell weights [N, G*G] carried back through the bilinear resampling of an h x w map to the
    grid (PyTorch's, align_corners=False: separable, so one 1-D matrix per axis)."""
    along_y, along_x = _linear_resampling(h, grid), _linear_resampling(w, grid)  # [G, h], [G, w]
    per_cell = cells.view(-1, grid, grid)
    return torch.einsum("nij,ip,jq->npq", per_cell, along_y, along_x).reshape(len(cells), h * w).contiguous()


def _linear_resampling(size: int, grid: int) -> torch.Tensor:
    """The [G, size] matrix of F.interpolate(mode="linear", align_corners=False) from `size` to `grid` samples."""
    return F.interpolate(torch.eye(size)[None], size=grid, mode="linear", align_corners=False)[0].T


def region_features(
    levels: Sequence[torch.Tensor], side: int, cam: np.ndarray, segmentations: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """Features [n_regions, D + 2] of one image's regions, per segmentation: the region means of the level
    maps, of `cam` [S, S], and the region's share of the image."""
    parts = region_level_means(levels, side, segmentations)
    return [with_cam(means, area, cam, labels) for (means, area), labels in zip(parts, segmentations, strict=True)]


def with_cam(levels: np.ndarray, area: np.ndarray, cam: np.ndarray, segmentation: np.ndarray) -> np.ndarray:
    """The feature layout the segment head reads: level means [n, D], the region's CAM mean, its area."""
    cam_mean = region_means(cam, segmentation)
    return np.concatenate([levels.astype(np.float32), cam_mean[:, None], area[:, None]], axis=1).astype(np.float32)


@dataclass
class SegmentHead:
    """Standardised features -> logistic regression (one weight per feature)."""

    mean: torch.Tensor  # [D]
    std: torch.Tensor  # [D]
    weight: torch.Tensor  # [D]
    bias: torch.Tensor  # []

    @property
    def num_features(self) -> int:
        return int(self.weight.numel())

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        x = (torch.from_numpy(np.asarray(features, dtype=np.float32)) - self.mean) / self.std
        return torch.sigmoid(x @ self.weight + self.bias).numpy()

    def heat(self, features_per_scale: Sequence[np.ndarray], segmentations: Sequence[np.ndarray]) -> np.ndarray:
        """Foreground probability [S, S]: each scale's region probabilities, painted and averaged."""
        painted = [self.probabilities(f)[labels] for f, labels in zip(features_per_scale, segmentations, strict=True)]
        return np.mean(painted, axis=0).astype(np.float32)

    def tensors(self, prefix: str = "segments.") -> dict[str, torch.Tensor]:
        return {f"{prefix}{k}": getattr(self, k).contiguous() for k in ("mean", "std", "weight", "bias")}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "segments.") -> SegmentHead | None:
        if f"{prefix}weight" not in tensors:
            return None
        return cls(*(tensors[f"{prefix}{k}"].float() for k in ("mean", "std", "weight", "bias")))


def fit_segment_head(
    features: np.ndarray, foreground: np.ndarray, sample_weight: np.ndarray, c: float = 1e-3, max_iter: int = 100
) -> SegmentHead:
    """L2-regularised logistic regression, classes balanced: minimise `c * sum_i s_i * loss_i + |w|^2 / 2`
    (scikit-learn's convention for C) with L-BFGS on standardised features. `sample_weight`: a region's
    pixel count times its image's weight (1 for an oracle mask, lambda for a pseudo-mask)."""
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    y = torch.from_numpy(np.asarray(foreground, dtype=np.float32))
    s = torch.from_numpy(np.asarray(sample_weight, dtype=np.float32))
    s = s / s.mean()
    positive = float((s * y).sum())
    negative = float((s * (1 - y)).sum())
    if positive == 0 or negative == 0:
        raise ValueError("the segment head needs foreground and background regions")
    s = s * torch.where(y > 0, s.sum() / (2 * positive), s.sum() / (2 * negative))  # balanced classes
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = c * (s * F.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none")).sum() + 0.5 * w @ w
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return SegmentHead(mean.float(), std.float(), w.detach().float(), b.detach().float())
