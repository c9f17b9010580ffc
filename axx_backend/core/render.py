"""Pictures for people: the image with the fused CAM heat and the mask outline."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """A blue -> green -> yellow -> red ramp for values in [0, 1]; [H, W, 3] uint8."""
    h = np.clip(np.asarray(heat, dtype=np.float32), 0, 1)
    r = np.clip(2.0 * h - 0.5, 0, 1)
    g = np.clip(1.5 - np.abs(2.0 * h - 1.0) * 1.5, 0, 1)
    b = np.clip(1.0 - 2.0 * h, 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary mask (4-neighbourhood), bool [H, W]."""
    m = np.asarray(mask) > 0
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def overlay(image: Image.Image, heat: np.ndarray | None, mask: np.ndarray | None, caption: str = "") -> Image.Image:
    """The image, tinted by `heat` where there is one, with the mask outlined in white."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    if heat is not None:
        base = 0.55 * base + 0.45 * heat_colours(heat).astype(np.float32)
    out = base.astype(np.uint8)
    if mask is not None and mask.any():
        edge = mask_outline(mask)
        # Thicken the outline so it stays visible on large images.
        for _ in range(max(0, min(image.size) // 256)):
            grown = edge.copy()
            grown[1:, :] |= edge[:-1, :]
            grown[:, 1:] |= edge[:, :-1]
            edge = grown
        out[edge] = (255, 255, 255)
    picture = Image.fromarray(out)
    if caption:
        draw = ImageDraw.Draw(picture)
        draw.rectangle((0, 0, min(picture.width, 8 + 7 * len(caption)), 14), fill=(0, 0, 0))
        draw.text((4, 2), caption, fill=(255, 255, 255))
    return picture
