"""`axx-backend annotate`: every file of a folder -> masks, overlays, predictions.jsonl.

Files are images by their content, not their suffix: whatever the decoder opens is annotated, anything else
(and any file that fails) gets a line with an `error` field, and the run goes on: one line per file. Hidden
files and folders (names starting with ".") and the output folder are skipped. Outputs keep the input's whole
name, so no two inputs share one: `a/x.gif` -> `masks/a/x.gif.png`, `overlays/a/x.gif.png`.

Memory is bounded by the model, not by the image: a large image is decoded at a reduced scale
(`core.images.decode_image`), its mask is scaled back to the full size, and its overlay stays reduced.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from .core.annotation import Annotation
from .core.images import Decoded, decode_image, restore_full_size
from .core.render import overlay
from .core.settings import Settings
from .engine.annotator import load_annotator

log = logging.getLogger(__name__)


def annotate_folder(
    images_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    settings: Settings,
    version: str | None = None,
    explicit: set[str] | None = None,
) -> dict[str, Any]:
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir} is not a folder")
    annotator = load_annotator(model_dir, settings, version, explicit)
    paths = list_inputs(images_dir, exclude=out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _FolderRun(images_dir, out_dir, annotator, settings)
    batch = max(1, settings.batch_size)
    with (
        open(out_dir / "predictions.jsonl", "w") as lines,
        tqdm(total=len(paths), unit="img", desc="annotate", disable=None) as bar,
    ):
        for start in range(0, len(paths), batch):
            chunk = paths[start : start + batch]
            for record in run.annotate(chunk):
                lines.write(json.dumps(record) + "\n")
            lines.flush()
            bar.update(len(chunk))
    counts = {"images": len(paths), **run.counts}
    log.info(
        "annotated %d files (%d errors, %d flagged) into %s", counts["images"], counts["errors"], counts["flagged"],
        out_dir,
    )  # fmt: skip
    return {**counts, "out": str(out_dir), "version": annotator.version}


def list_inputs(root: Path, exclude: Path | None = None) -> list[Path]:
    """Every regular file under `root`, sorted; hidden files and folders and `exclude` (the output) skipped."""
    skip = exclude.resolve() if exclude is not None else None
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        found.append(path)
    return sorted(found)


def output_name(rel: Path) -> Path:
    """`a/x.gif` -> `a/x.gif.png`: the whole input name is kept, so two inputs never share an output."""
    return rel.with_name(rel.name + ".png")


class _FolderRun:
    """One `annotate` run: decoding, batched inference, outputs, and the counts."""

    def __init__(self, images_dir: Path, out_dir: Path, annotator: Any, settings: Settings) -> None:
        self.images_dir, self.out_dir, self.annotator, self.settings = images_dir, out_dir, annotator, settings
        self.counts = {"errors": 0, "flagged": 0, "masks": 0}

    def annotate(self, paths: list[Path]) -> Iterator[dict[str, Any]]:
        """One record per path, in order: the annotation, or an `error`."""
        decoded: list[tuple[str, Decoded | str]] = [(self._rel(p), self._decode(p)) for p in paths]
        images = [d.image for _, d in decoded if isinstance(d, Decoded)]
        annotations = iter(self._annotations(images))
        for rel, image in decoded:
            if isinstance(image, Decoded):
                yield self._record(rel, image, next(annotations))
            else:
                yield self._error(rel, image)

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.images_dir).as_posix()

    def _decode(self, path: Path) -> Decoded | str:
        """The decoded image, or why it cannot be used."""
        try:
            return decode_image(path, self._rel(path), self.settings.image_max_pixels)
        except Exception as exc:  # ImageError, and anything else a hostile file provokes: this file only
            return str(exc) if str(exc).startswith(self._rel(path)) else f"{self._rel(path)}: {exc}"

    def _annotations(self, images: list[Image.Image]) -> list[Annotation | Exception]:
        """The batch's annotations; when the batch fails, each image alone (one bad image costs only itself)."""
        if not images:
            return []
        try:
            return list(self.annotator.annotate(images, with_heat=True))
        except Exception as exc:
            if len(images) == 1:
                return [exc]
            log.warning("a batch of %d images failed (%s): retrying one by one", len(images), exc)
        out: list[Annotation | Exception] = []
        for image in images:
            try:
                out.extend(self.annotator.annotate([image], with_heat=True))
            except Exception as exc:
                out.append(exc)
        return out

    def _record(self, rel: str, decoded: Decoded, ann: Annotation | Exception) -> dict[str, Any]:
        if isinstance(ann, Exception):
            return self._error(rel, f"{rel}: prediction failed: {type(ann).__name__}: {ann}")
        target = output_name(Path(rel))
        try:
            self._write_overlay(target, decoded.image, ann)  # at the decoded size
            ann = restore_full_size(ann, decoded.full_size)
            self._write_mask(target, ann)
        except OSError as exc:
            return self._error(rel, f"{rel}: cannot write its outputs ({exc})")
        self.counts["flagged"] += int(ann.flagged)
        self.counts["masks"] += int(ann.mask is not None and ann.mask_area > 0)
        return {
            "path": rel, **ann.to_dict(), "version": self.annotator.version,
            "mask": f"masks/{target.as_posix()}", "overlay": f"overlays/{target.as_posix()}",
        }  # fmt: skip

    def _error(self, rel: str, reason: str) -> dict[str, Any]:
        self.counts["errors"] += 1
        log.warning("%s", reason)
        return {"path": rel, "error": reason}

    def _write_overlay(self, target: Path, image: Image.Image, ann: Annotation) -> None:
        path = self.out_dir / "overlays" / target
        path.parent.mkdir(parents=True, exist_ok=True)
        caption = f"{ann.label} {ann.score:.2f}" + (" REVIEW" if ann.flagged else "")
        overlay(image, ann.heat, ann.mask, caption).save(path)

    def _write_mask(self, target: Path, ann: Annotation) -> None:
        path = self.out_dir / "masks" / target
        path.parent.mkdir(parents=True, exist_ok=True)
        mask = ann.mask if ann.mask is not None else np.zeros((ann.height, ann.width), np.uint8)
        Image.fromarray((mask > 0).astype(np.uint8) * 255).save(path)
