"""Small generated data sets for tests, demos and the quick start (no download needed).

"Lesion" images carry one or two coloured blobs on a random smooth texture; "Healthy"
images are texture only. The blobs' exact masks are written beside the images in the
dataset layout of `axx-backend train` (`images/<class>/...`, `masks/<class>/...`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

POSITIVE = "Lesion"
NEGATIVE = "Healthy"
# A Label Studio labeling config for these classes (the benchmarks' generated projects)
LABEL_CONFIG = f"""<View>
  <Image name="image" value="$image"/>
  <Choices name="diagnosis" toName="image">
    <Choice value="{POSITIVE}"/><Choice value="{NEGATIVE}"/><Choice value="Needs review"/>
  </Choices>
  <BrushLabels name="lesion" toName="image"><Label value="{POSITIVE}"/></BrushLabels>
</View>"""


def smooth_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-frequency random texture, [size, size, 3] float in 0..1."""
    coarse = rng.random((6, 6, 3))
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    base = np.asarray(img, dtype=np.float32) / 255.0
    tint = rng.uniform(0.3, 0.7, size=3)
    noise = rng.normal(0, 0.04, (size, size, 1))
    return np.clip(0.5 * base + 0.5 * tint + noise, 0, 1)


def blob_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """One or two random ellipses covering roughly 3-20 % of the image, bool [size, size]."""
    yy, xx = np.mgrid[0:size, 0:size]
    mask = np.zeros((size, size), bool)
    for _ in range(rng.integers(1, 3)):
        ry, rx = rng.uniform(0.08, 0.2, size=2) * size
        cy, cx = rng.uniform(0.25, 0.75, size=2) * size
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        mask |= (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    return mask


def make_image(rng: np.random.Generator, size: int, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image, bool mask) of one generated sample."""
    img = smooth_texture(rng, size)
    mask = blob_mask(rng, size) if positive else np.zeros((size, size), bool)
    if positive:
        colour = np.array([0.85, 0.15, 0.1]) + rng.normal(0, 0.05, 3)
        spots = rng.normal(0, 0.06, (size, size, 3))
        img[mask] = np.clip(colour + spots[mask], 0, 1)
    return (img * 255).astype(np.uint8), mask


def make_dataset(
    root: str | os.PathLike[str], n_per_class: int = 12, size: int = 128, seed: int = 0, masks: bool = True
) -> Path:
    """Write a two-class dataset folder; returns `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for cls, positive in ((POSITIVE, True), (NEGATIVE, False)):
        (root / "images" / cls).mkdir(parents=True, exist_ok=True)
        if masks and positive:
            (root / "masks" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img, mask = make_image(rng, size, positive)
            Image.fromarray(img).save(root / "images" / cls / f"{cls.lower()}_{i:03d}.png")
            if masks and positive:
                Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / cls / f"{cls.lower()}_{i:03d}.png")
    return root
