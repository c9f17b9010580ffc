"""Decoding images into RGB the same way everywhere (CLI, training, Label Studio).

A file is an image when the decoder can open it as one of `FORMATS` (by content, never by suffix); EXIF
orientation is applied; 16-bit, float, grayscale, palette, RGBA and CMYK images are converted to 8-bit RGB
(`to_rgb` says how); the pixel count is checked from the header before decoding, so a decompression bomb
fails its own image with a clear message instead of exhausting memory. Animated images give their first frame.

For inference, `decode_image(..., work_side=...)` keeps memory bounded by the model, not by the image: a large
JPEG is decoded at a reduced scale (`draft`), any other large image is reduced right after decoding, before
the colour conversion; the annotation's mask is scaled back to the full size (`restore_full_size`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .annotation import Annotation
from .settings import DEFAULT_IMAGE_MAX_PIXELS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".avif")
# What Pillow may try (JPEG includes MPO, the multi-picture JPEGs of cameras). Anything else (SVG, PDF, EPS,
# HTML, ...) is "not an image"; EPS in particular would run Ghostscript on untrusted input.
FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF", "AVIF")
MAX_PIXELS = DEFAULT_IMAGE_MAX_PIXELS  # Settings.image_max_pixels, AXX_IMAGE_MAX_PIXELS
MAX_BYTES = 200 * 1024 * 1024
# The model sees input_size (224-512 px) and masks come from 7x7-32x32 maps: inference never needs more than
# this many pixels a side. An image at least twice as large is reduced by an integer factor to >= WORK_SIDE.
WORK_SIDE = 1024

# Our pixel limit (checked from the header, before decoding) replaces Pillow's warning; Pillow still refuses
# images over twice its own limit (~179 MP), whatever AXX_IMAGE_MAX_PIXELS says.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_TRANSPOSE = {  # EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(ValueError):
    """An image could not be read; the message names it and says why."""


@dataclass(frozen=True)
class Decoded:
    """An upright 8-bit RGB image, and the upright size of the original (masks are made at that size)."""

    image: Image.Image
    full_size: tuple[int, int]  # (width, height)

    @property
    def reduced(self) -> bool:
        return self.image.size != self.full_size


def load_image(
    source: str | os.PathLike[str] | bytes, name: str | None = None, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Decode a path or raw bytes into an 8-bit RGB PIL image at full size, however large (within `max_pixels`)."""
    return decode_image(source, name, max_pixels, work_side=None).image


def decode_image(
    source: str | os.PathLike[str] | bytes,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
    work_side: int | None = WORK_SIDE,
) -> Decoded:
    """Decode a path or raw bytes; with `work_side`, an image of at least twice that many pixels a side comes
    back reduced by an integer factor (at least `work_side` a side), decoded at the smaller scale where it can."""
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    with _opened(source, label, max_pixels) as img:
        return _decode(img, label, work_side)


def load_mask(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A mask file as bool [H, W] (nonzero = foreground), read under the images' rules: the format by content,
    the pixel count from the header before decoding, a failure as `ImageError` with the reason. As stored (no
    EXIF rotation): a mask is compared with its upright image's size (`data.iter_readable`)."""
    with _opened(path, str(path), max_pixels) as img:
        return np.asarray(img.convert("L")) > 0


@contextlib.contextmanager
def _opened(source: str | os.PathLike[str] | bytes, label: str, max_pixels: int) -> Iterator[Image.Image]:
    """The opened, not yet decoded image (of an allowed format, at most `max_pixels`); anything that goes wrong
    while it is open, decoding included, comes out as `ImageError` naming `label`."""
    try:
        if isinstance(source, bytes):
            if len(source) > MAX_BYTES:
                raise ImageError(f"{label}: {len(source)} bytes is over the {MAX_BYTES} byte limit")
            handle: io.BytesIO | Path = io.BytesIO(source)
        else:
            handle = Path(source)
        with Image.open(handle, formats=FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{label}: {width}x{height} is over the {max_pixels} pixel limit (AXX_IMAGE_MAX_PIXELS)"
                )
            yield img
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(f"{label}: cannot read image: not a {', '.join(FORMATS)} file") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label}: over the pixel limit ({_first_line(exc)})") from exc
    except Exception as exc:  # a broken file makes Pillow's plugins raise all sorts: all are "cannot read"
        raise ImageError(f"{label}: cannot read image ({type(exc).__name__}: {_first_line(exc)})") from exc


def _decode(img: Image.Image, label: str, work_side: int | None) -> Decoded:
    width, height = img.size
    orientation = _orientation(img)
    factor = max(width, height) // work_side if work_side else 1
    if factor >= 2 and img.format in ("JPEG", "MPO"):
        img.draft(None, (math.ceil(width / factor), math.ceil(height / factor)))  # DCT scaling: 1/2 .. 1/8
    img.load()
    frame = img
    if factor >= 2:
        size = (max(1, round(width / factor)), max(1, round(height / factor)))
        if frame.size != size:
            frame = frame.resize(size, Image.Resampling.BOX)  # the average of each factor x factor block
    rgb = to_rgb(frame, label)
    del frame
    if orientation in _TRANSPOSE:
        rgb = rgb.transpose(_TRANSPOSE[orientation])
    return Decoded(rgb, (height, width) if orientation in (5, 6, 7, 8) else (width, height))


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block: show the image as stored
        return 1


def to_rgb(img: Image.Image, label: str = "<image>") -> Image.Image:
    """Any PIL mode to 8-bit RGB.

    - 16-bit and 32-bit integer images are scaled by their own range: min -> 0, max -> 255 (a 12-bit scan in a
      16-bit file uses the whole 8-bit range); 32-bit integers already within 0..255 are kept as they are;
    - float images with values in 0..1 are scaled by 255; other float images by their own range, like 16-bit;
      a float image with NaN or infinite values is refused;
    - transparency is composited on white; CMYK, palette and grayscale are converted by Pillow.
    """
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img), img.mode, label), mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "RGB":
        return img.copy()
    return img.convert("RGB")


def _to_uint8(arr: np.ndarray, mode: str, label: str) -> np.ndarray:
    data = arr.astype(np.float32)
    if mode == "F" and not np.isfinite(data).all():
        raise ImageError(f"{label}: float image with NaN or infinite values")
    lo, hi = float(data.min()), float(data.max())
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        data *= 255.0  # normalised float data
    elif mode.startswith("I;16") or hi > 255.0 or lo < 0.0 or mode == "F":
        data -= lo  # scaled by its own range
        data *= 255.0 / max(hi - lo, 1e-12 if mode == "F" else 1.0)
    return np.clip(np.rint(data), 0, 255).astype(np.uint8)


def restore_full_size(ann: Annotation, full_size: tuple[int, int]) -> Annotation:
    """The annotation of a reduced image, with its mask scaled to the original size (heat stays small)."""
    if (ann.width, ann.height) == full_size:
        return ann
    mask = None if ann.mask is None else scale_mask(ann.mask, full_size)
    return dataclasses.replace(ann, mask=mask, width=full_size[0], height=full_size[1])


def scale_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A {0, 1} mask resized to `size` = (width, height): bilinear, then thresholded (smooth edges, no blocks)."""
    grey = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
    return (np.asarray(grey.resize(size, Image.Resampling.BILINEAR)) >= 128).astype(np.uint8)


def list_images(root: str | os.PathLike[str]) -> list[Path]:
    """Every file with an image suffix under `root`, sorted (the training layout; `annotate` reads by content).
    Hidden files and folders (macOS's `._name.png` copies, `.ipynb_checkpoints`) are not images of the set."""
    root = Path(root)
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]
