"""What serving in bf16 changes against fp32, on a trained version and real images (issue 14).

For each input size the same version is loaded twice (AXX_PRECISION fp32 and bf16; the heads, MC statistics,
temperatures and CAMs are fp32 in both) and annotates the same images in batches; the two precisions alternate
batch by batch after one warm-up batch each, so load from other processes hits both alike. Reported:

- ms/image of each precision (wall and CPU time of this process) and their ratio;
- decisions: images whose label or review flag differs between the two;
- masks: IoU of the bf16 mask against the fp32 mask where both served one (mean and min), and images where only
  one of them served a mask;
- with a dataset that has masks: accuracy and served (end-to-end) mask IoU of each precision against the truth.

Sizes other than the version's own input size resize the input (the calibrated thresholds were made at the
version's size, so decisions there are the version's at an unusual size; the comparison is still like for like).

    .venv/bin/python benchmarks/precision.py --model-dir MODEL_DIR --data DATASET_DIR [--sizes 224 320 512]

MODEL_DIR is a version folder or a model dir with `current`; DATASET_DIR a folder dataset (images/<class>/...,
optional masks/<class>/<name>.png), e.g. the test split of `benchmarks/make_photo_dataset.py`. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from axx_backend.core.annotation import Annotation  # noqa: E402
from axx_backend.core.data import Sample, iter_readable, read_folder_dataset  # noqa: E402
from axx_backend.core.settings import Settings  # noqa: E402
from axx_backend.core.version_meta import VERSION_FILE, load_version  # noqa: E402
from axx_backend.core.versions import ModelStore  # noqa: E402
from axx_backend.engine.annotator import Annotator  # noqa: E402
from axx_backend.engine.masks import iou  # noqa: E402

PRECISIONS = ("fp32", "bf16")


@dataclass
class Run:
    """One precision's annotations and timings at one size."""

    annotations: list[Annotation] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)

    def ms_per_image(self, which: str = "wall") -> float:
        seconds = self.walls if which == "wall" else self.cpus
        return 1000 * sum(seconds) / max(1, len(self.annotations))


def version_dir_of(model_dir: Path) -> Path:
    """`model_dir` itself when it is a version, else its `current` version."""
    if (model_dir / VERSION_FILE).is_file():
        return model_dir
    path = ModelStore(model_dir).version_path()
    if path is None:
        raise SystemExit(f"{model_dir} is neither a version nor a model dir with a current version")
    return path


def load_annotator(version: Path, precision: str, size: int | None) -> Annotator:
    annotator = Annotator.from_version(version, Settings(precision=precision), explicit={"precision"})
    if annotator.precision != precision:
        raise SystemExit(f"asked for {precision}, the annotator runs {annotator.precision}")
    if size is not None and size != annotator.input_size:
        annotator.input_size = size
        annotator.map_side = min(size, annotator.settings.map_side)
    return annotator


def compare_at(version: Path, images: Sequence, size: int | None, batch: int) -> dict[str, Run]:
    annotators = {p: load_annotator(version, p, size) for p in PRECISIONS}
    for annotator in annotators.values():  # warm-up: the first call of each precision pays one-off costs
        annotator.annotate(images[:batch])
    runs = {p: Run() for p in PRECISIONS}
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        for precision, annotator in annotators.items():
            cpu, wall = time.process_time(), time.perf_counter()
            runs[precision].annotations += annotator.annotate(chunk)
            runs[precision].walls.append(time.perf_counter() - wall)
            runs[precision].cpus.append(time.process_time() - cpu)
    return runs


def summarise(runs: dict[str, Run], samples: Sequence[Sample], truths: Sequence[np.ndarray | None]) -> dict[str, Any]:
    full, half = runs["fp32"].annotations, runs["bf16"].annotations
    both = [(a.mask, b.mask) for a, b in zip(full, half, strict=True) if a.mask is not None and b.mask is not None]
    mask_ious = [iou(b > 0, a > 0) for a, b in both]
    row: dict[str, Any] = {
        "images": len(full),
        "ms_per_image": {p: runs[p].ms_per_image() for p in PRECISIONS},
        "cpu_ms_per_image": {p: runs[p].ms_per_image("cpu") for p in PRECISIONS},
        "labels_changed": sum(a.label != b.label for a, b in zip(full, half, strict=True)),
        "flags_changed": sum(a.flagged != b.flagged for a, b in zip(full, half, strict=True)),
        "mask_presence_changed": sum((a.mask is None) != (b.mask is None) for a, b in zip(full, half, strict=True)),
        "masks_compared": len(mask_ious),
        "mask_iou_bf16_vs_fp32": {
            "mean": statistics.fmean(mask_ious) if mask_ious else None,
            "min": min(mask_ious) if mask_ious else None,
        },
    }
    row["bf16_vs_fp32_time"] = row["ms_per_image"]["bf16"] / row["ms_per_image"]["fp32"]
    row["bf16_vs_fp32_cpu"] = row["cpu_ms_per_image"]["bf16"] / row["cpu_ms_per_image"]["fp32"]
    row["decisions_identical"] = 1 - sum(
        a.label != b.label or a.flagged != b.flagged for a, b in zip(full, half, strict=True)
    ) / max(1, len(full))
    for p in PRECISIONS:
        row[p] = truth_scores(runs[p].annotations, samples, truths)
    return row


def truth_scores(annotations: Sequence[Annotation], samples: Sequence[Sample], truths: Sequence) -> dict[str, Any]:
    """Accuracy, and the served mask's IoU on images whose true mask has foreground (no mask = an empty one)."""
    correct = [a.label == s.label for a, s in zip(annotations, samples, strict=True)]
    ious = []
    for ann, truth in zip(annotations, truths, strict=True):
        if truth is None or not truth.any():
            continue
        ious.append(0.0 if ann.mask is None else iou(ann.mask > 0, truth))
    return {
        "accuracy": statistics.fmean(correct),
        "flagged": statistics.fmean(a.flagged for a in annotations),
        "served_iou": statistics.fmean(ious) if ious else None,
    }


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    header = (
        f"{'size':>5} {'n':>4} | {'fp32 ms':>8} {'bf16 ms':>8} {'ratio':>6} {'cpu r':>6} | {'labels':>6} "
        f"{'flags':>6} {'mask?':>6} | {'IoU mean':>8} {'IoU min':>8} | {'acc fp32/bf16':>13} "
        f"{'served IoU fp32/bf16':>20}"
    )
    print(header)
    print("-" * len(header))
    for size, r in rows.items():
        ious = r["mask_iou_bf16_vs_fp32"]
        served = "/".join("-" if r[p]["served_iou"] is None else f"{r[p]['served_iou']:.3f}" for p in PRECISIONS)
        print(
            f"{size:>5} {r['images']:>4} | {r['ms_per_image']['fp32']:>8.1f} {r['ms_per_image']['bf16']:>8.1f} "
            f"{r['bf16_vs_fp32_time']:>6.2f} {r['bf16_vs_fp32_cpu']:>6.2f} | {r['labels_changed']:>6} "
            f"{r['flags_changed']:>6} {r['mask_presence_changed']:>6} | "
            f"{ious['mean'] if ious['mean'] is not None else float('nan'):>8.3f} "
            f"{ious['min'] if ious['min'] is not None else float('nan'):>8.3f} | "
            f"{r['fp32']['accuracy']:>6.3f}/{r['bf16']['accuracy']:.3f} {served:>20}"
        )
    print(
        "labels / flags: images whose label / review flag differs; mask?: images where only one precision served a"
        " mask; IoU: bf16 mask vs fp32 mask where both served one"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="a version folder, or a model dir with `current`")
    parser.add_argument("--data", required=True, help="a folder dataset: images/<class>/..., optional masks/")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="input sizes (default: the version's own)")
    parser.add_argument("--batch", type=int, default=8, help="images per annotate call (default 8)")
    parser.add_argument(
        "--limit", type=int, default=0, help="use N images, evenly spaced over the dataset (default: all)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    version = version_dir_of(Path(args.model_dir))
    samples, _ = read_folder_dataset(args.data)
    if 0 < args.limit < len(samples):  # evenly spaced, so that every class folder is in
        samples = [samples[int(i * len(samples) / args.limit)] for i in range(args.limit)]
    pairs = list(iter_readable(samples))
    samples = [s for s, _ in pairs]
    images = [img for _, img in pairs]
    truths = [s.load_mask() for s in samples]
    print(f"version {version}, {len(images)} images from {args.data}, batch {args.batch}", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for size in args.sizes or [None]:
        runs = compare_at(version, images, size, args.batch)
        key = str(size or load_version(version).input_size)
        rows[key] = summarise(runs, samples, truths)
        print(f"  {key}^2: bf16/fp32 time {rows[key]['bf16_vs_fp32_time']:.2f}", flush=True)
    print()
    print_table(rows)
    print(json.dumps({"version": version.name, "data": str(args.data), "sizes": rows}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
