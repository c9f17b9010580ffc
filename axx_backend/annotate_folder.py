"""`axx-backend annotate`: every image of a folder -> masks, overlays, predictions.jsonl.

An unreadable file gets a line with an `error` field and never stops the run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from .core.images import ImageError, list_images, load_image
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
    paths = list_images(images_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"images": len(paths), "errors": 0, "flagged": 0, "masks": 0}
    batch = max(1, settings.batch_size)
    with (
        open(out_dir / "predictions.jsonl", "w") as lines,
        tqdm(total=len(paths), unit="img", desc="annotate", disable=None) as bar,
    ):
        for start in range(0, len(paths), batch):
            chunk = paths[start : start + batch]
            loaded: list[tuple[Path, Image.Image]] = []
            for path in chunk:
                rel = path.relative_to(images_dir).as_posix()
                try:
                    loaded.append((path, load_image(path, name=rel)))
                except ImageError as exc:
                    counts["errors"] += 1
                    log.warning("%s", exc)
                    lines.write(json.dumps({"path": rel, "error": str(exc)}) + "\n")
            if loaded:
                annotations = annotator.annotate([img for _, img in loaded], with_heat=True)
                for (path, img), ann in zip(loaded, annotations, strict=True):
                    rel_path = path.relative_to(images_dir)
                    _write_outputs(out_dir, rel_path, img, ann)
                    counts["flagged"] += int(ann.flagged)
                    counts["masks"] += int(ann.mask is not None and ann.mask_area > 0)
                    record = {"path": rel_path.as_posix(), **ann.to_dict(), "version": annotator.version}
                    lines.write(json.dumps(record) + "\n")
            lines.flush()
            bar.update(len(chunk))
    log.info(
        "annotated %d images (%d errors, %d flagged) into %s",
        counts["images"],
        counts["errors"],
        counts["flagged"],
        out_dir,
    )
    return {**counts, "out": str(out_dir), "version": annotator.version}


def _write_outputs(out_dir: Path, rel_path: Path, image: Image.Image, ann: Any) -> None:
    target = rel_path.with_suffix(".png")
    mask = ann.mask if ann.mask is not None else np.zeros((ann.height, ann.width), np.uint8)
    mask_path = out_dir / "masks" / target
    overlay_path = out_dir / "overlays" / target
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    overlay_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((mask > 0).astype(np.uint8) * 255).save(mask_path)
    caption = f"{ann.label} {ann.score:.2f}" + (" REVIEW" if ann.flagged else "")
    overlay(image, ann.heat, ann.mask, caption).save(overlay_path)
