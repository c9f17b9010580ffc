"""Decoding images into RGB the same way everywhere (CLI, training, Label Studio).

EXIF orientation is applied; 16-bit, grayscale, palette, RGBA and CMYK images are
converted to 8-bit RGB; size and pixel count are bounded so a decompression bomb fails
its own task with a clear message instead of exhausting memory.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
MAX_PIXELS = 100_000_000  # 10k x 10k
MAX_BYTES = 200 * 1024 * 1024


class ImageError(ValueError):
    """An image could not be read; the message names it and says why."""


def load_image(
    source: str | os.PathLike[str] | bytes, name: str | None = None, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Decode a path or raw bytes into an 8-bit RGB PIL image."""
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        if isinstance(source, bytes):
            if len(source) > MAX_BYTES:
                raise ImageError(f"{label}: {len(source)} bytes is over the {MAX_BYTES} byte limit")
            handle: io.BytesIO | Path = io.BytesIO(source)
        else:
            handle = Path(source)
        with Image.open(handle) as img:
            if img.width * img.height > max_pixels:
                raise ImageError(f"{label}: {img.width}x{img.height} is over the {max_pixels} pixel limit")
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{label}: cannot read image ({type(exc).__name__}: {exc})") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, scaling 16-bit and float data to 8 bits by their range."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16") or (img.mode == "I" and hi > 255):
            # Full-range scale for 16-bit data (medical images use the whole range).
            arr = (arr - lo) / max(hi - lo, 1.0) * 255.0
        arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "RGB":
        return img.copy()
    return img.convert("RGB")


def list_images(root: str | os.PathLike[str]) -> list[Path]:
    """Every file with an image suffix under `root`, sorted, relative order stable."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
