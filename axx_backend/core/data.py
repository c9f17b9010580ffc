"""Training data: a folder in the dataset layout, or the annotated tasks of a Label Studio project.

Folder layout: `DATASET_DIR/images/<class>/<name>.<ext>` (folder names are the classes)
and optionally `DATASET_DIR/masks/<class>/<name>.png` (nonzero = foreground).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .images import Decoded, ImageError, decode_image, list_images, load_mask

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One training image: where it is, its class, and its oracle mask if a person drew one."""

    key: str  # stable identifier: the relative path, or the Label Studio task id
    label: str | None  # None: unlabeled (a pseudo-mask candidate)
    path: Path | None = None
    mask_path: Path | None = None
    loader: Callable[[], Decoded] | None = None  # e.g. a download from Label Studio
    # an oracle mask (nonzero = foreground): decoded, or what decodes it when it is read (a Label Studio brush)
    mask: np.ndarray | Callable[[], np.ndarray] | None = None

    @property
    def has_mask(self) -> bool:
        return self.mask is not None or self.mask_path is not None

    def load(self) -> Decoded:
        """The upright RGB image as inference decodes it: one of at least twice `WORK_SIDE` a side comes reduced
        (`Decoded.full_size` keeps its size, which a mask must have). Training holds a batch of images at once,
        so this bounds its memory by the work side, not by the images (ten 8000 x 8000 JPEGs took training's
        peak to 3.7 GB at full size)."""
        if self.loader is not None:
            return self.loader()
        if self.path is None:
            raise ValueError(f"sample {self.key} has no image")
        return decode_image(self.path)

    def load_mask(self) -> np.ndarray | None:
        """The oracle mask as bool [H, W], or None."""
        if self.mask is not None:
            return np.asarray(self.mask() if callable(self.mask) else self.mask) > 0
        if self.mask_path is not None:
            return load_mask(self.mask_path)
        return None


class DatasetError(ValueError):
    """The dataset folder does not have the expected layout."""


def read_folder_dataset(root: str | os.PathLike[str]) -> tuple[list[Sample], list[str]]:
    """Samples and sorted class names of a dataset folder."""
    root = Path(root)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DatasetError(f"{root} has no images/ folder (expected images/<class>/<name>.<ext>)")
    classes = sorted(p.name for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DatasetError(f"{images_dir} needs at least two class folders, found {classes}")
    samples = []
    for cls in classes:
        for path in list_images(images_dir / cls):
            rel = path.relative_to(images_dir)
            mask = root / "masks" / rel.with_suffix(".png")
            samples.append(Sample(str(rel), cls, path, mask if mask.is_file() else None))
    empty = [c for c in classes if not any(s.label == c for s in samples)]
    if empty:
        raise DatasetError(f"class folders without images: {empty}")
    return samples, classes


def read_unlabelled_folder(root: str | os.PathLike[str]) -> list[Sample]:
    """Unlabelled samples: every image under `root` (any subfolders; their names are not read as classes).
    Training uses them as a project's unlabelled tasks: pseudo-mask candidates and what the review threshold's
    flag budget is calibrated on."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder of unlabelled images")
    samples = [Sample(f"unlabelled/{p.relative_to(root).as_posix()}", None, p) for p in list_images(root)]
    if not samples:
        raise DatasetError(f"{root} holds no image")
    return samples


def stratified_split(labels: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of train and validation, stratified by class with a fixed seed.

    Each class keeps at least one training image, and gets at least one validation image
    when it has two or more.
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in sorted(set(labels)):
        idx = np.array([i for i, lab in enumerate(labels) if lab == cls])
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        n_val = min(max(n_val, 1 if len(idx) >= 2 else 0), len(idx) - 1)
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return sorted(train), sorted(val)


def iter_readable(samples: Iterable[Sample], skipped: list[str] | None = None) -> Iterator[tuple[Sample, Image.Image]]:
    """Each sample whose image loads, with the image; a failure is logged, noted in `skipped` as
    "key: reason", and skipped. A mask that cannot be read or is not its image's size goes the same way, alone:
    the sample comes without it and still counts by its label (`with_usable_mask`)."""
    for sample in samples:
        try:
            decoded = sample.load()
        except (ImageError, OSError) as exc:
            log.warning("skipping %s", exc)
            if skipped is not None:
                skipped.append(f"{sample.key}: {exc}")
            continue
        yield with_usable_mask(sample, decoded.full_size, skipped), decoded.image


def with_usable_mask(sample: Sample, size: tuple[int, int], skipped: list[str] | None = None) -> Sample:
    """`sample`, or a copy without its mask when the mask cannot be read or its size is not `size` = (W, H) of
    the upright image: a mask drawn for another image, or for the stored orientation of an EXIF-rotated one,
    would teach the wrong pixels (resized to fit, silently)."""
    if not sample.has_mask:
        return sample
    try:
        mask = sample.load_mask()
        if mask is not None and mask.shape != (size[1], size[0]):
            raise ImageError(f"mask is {mask.shape[1]}x{mask.shape[0]}, its image {size[0]}x{size[1]}")
    except (ImageError, OSError) as exc:
        log.warning("%s: mask not used: %s", sample.key, exc)
        if skipped is not None:
            skipped.append(f"{sample.key}: mask not used: {exc}")
        return dataclasses.replace(sample, mask=None, mask_path=None)
    return sample
