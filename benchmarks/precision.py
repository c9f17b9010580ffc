"""What serving in bf16 changes against fp32, on a trained version and real images (issue 14).

For each input size the same version is loaded three times (AXX_PRECISION fp32; bf16 as served, which runs
again in fp32 the images near a decision or whose mask it could move far, `AXX_PRECISION_RECHECK[_MASK]`; and bf16
without that recheck; the heads, MC statistics, temperatures and CAMs are fp32 in all) and annotates the same
images in batches; the three alternate batch by batch after one warm-up batch each, so load from other
processes hits them alike. Reported for each bf16 against fp32:

- ms/image of each (wall and CPU time of this process) and the ratio; the share of images rechecked in fp32 (and
  of them, for their mask);
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
from axx_backend.training.recheck_margin import evenly_spaced  # noqa: E402

# name -> (AXX_PRECISION, AXX_PRECISION_RECHECK and AXX_PRECISION_RECHECK_MASK, or None for the defaults)
PRECISIONS: dict[str, tuple[str, float | None]] = {
    "fp32": ("fp32", None),
    "bf16": ("bf16", None),
    "bf16-plain": ("bf16", 0.0),
}


@dataclass
class Run:
    """One precision's annotations and timings at one size."""

    annotations: list[Annotation] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    rechecked: int = 0  # images run again in fp32
    rechecked_masks: int = 0  # of those, for their mask

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


def load_annotator(version: Path, name: str, size: int | None) -> Annotator:
    precision, recheck = PRECISIONS[name]
    settings = Settings(precision=precision)
    explicit = {"precision"}  # as served: the version's own recheck margin (training/recheck_margin.py)
    if recheck is not None:
        settings = settings.replace(precision_recheck=recheck, precision_recheck_mask=recheck)
        explicit |= {"precision_recheck", "precision_recheck_mask"}
    annotator = Annotator.from_version(version, settings, explicit=explicit)
    if annotator.precision != precision:
        raise SystemExit(f"asked for {precision}, the annotator runs {annotator.precision}")
    if size is not None and size != annotator.input_size:
        annotator.input_size = size
        annotator.map_side = min(size, annotator.settings.map_side)
    return annotator


def read_images(data: str | Path, limit: int = 0) -> tuple[list[Sample], list]:
    """The readable samples of a folder dataset and their images; `limit` > 0: that many, evenly spaced over
    the dataset, so that every class folder is in."""
    samples, _ = read_folder_dataset(data)
    if 0 < limit < len(samples):
        samples = [samples[i] for i in evenly_spaced(len(samples), limit)]
    pairs = list(iter_readable(samples))
    return [s for s, _ in pairs], [img for _, img in pairs]


def compare_at(version: Path, images: Sequence, size: int | None, batch: int) -> dict[str, Run]:
    annotators = {p: load_annotator(version, p, size) for p in PRECISIONS}
    for annotator in annotators.values():  # warm-up: the first call of each precision pays one-off costs
        annotator.annotate(images[:batch])
    for annotator in annotators.values():
        annotator.rechecked = annotator.rechecked_masks = 0
    runs = {p: Run() for p in PRECISIONS}
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        for precision, annotator in annotators.items():
            cpu, wall = time.process_time(), time.perf_counter()
            runs[precision].annotations += annotator.annotate(chunk)
            runs[precision].walls.append(time.perf_counter() - wall)
            runs[precision].cpus.append(time.process_time() - cpu)
    for precision, annotator in annotators.items():
        runs[precision].rechecked = annotator.rechecked
        runs[precision].rechecked_masks = annotator.rechecked_masks
    return runs


def summarise(runs: dict[str, Run], samples: Sequence[Sample], truths: Sequence[np.ndarray | None]) -> dict[str, Any]:
    """Each bf16 run against fp32, and every run's accuracy and served IoU against the truth."""
    row: dict[str, Any] = {"images": len(runs["fp32"].annotations)}
    for name in PRECISIONS:
        if name != "fp32":
            row[name] = against_fp32(runs["fp32"], runs[name])
        row.setdefault("truth", {})[name] = truth_scores(runs[name].annotations, samples, truths)
    return row


def against_fp32(fp32: Run, bf16: Run) -> dict[str, Any]:
    full, half = fp32.annotations, bf16.annotations
    pairs = list(zip(full, half, strict=True))
    mask_ious = [iou(b.mask > 0, a.mask > 0) for a, b in pairs if a.mask is not None and b.mask is not None]
    return {
        "time_vs_fp32": bf16.ms_per_image() / fp32.ms_per_image(),
        "cpu_vs_fp32": bf16.ms_per_image("cpu") / fp32.ms_per_image("cpu"),
        "ms_per_image": bf16.ms_per_image(),
        "fp32_ms_per_image": fp32.ms_per_image(),
        "rechecked": bf16.rechecked / max(1, len(half)),
        "rechecked_masks": bf16.rechecked_masks / max(1, len(half)),
        "labels_changed": sum(a.label != b.label for a, b in pairs),
        "flags_changed": sum(a.flagged != b.flagged for a, b in pairs),
        "decisions_identical": 1
        - sum(a.label != b.label or a.flagged != b.flagged for a, b in pairs) / max(1, len(pairs)),
        "mask_presence_changed": sum((a.mask is None) != (b.mask is None) for a, b in pairs),
        "masks_compared": len(mask_ious),
        "mask_iou_vs_fp32": {
            "mean": statistics.fmean(mask_ious) if mask_ious else None,
            "min": min(mask_ious) if mask_ious else None,
        },
    }


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
        f"{'size':>5} {'bf16':>10} {'n':>4} | {'fp32 ms':>8} {'bf16 ms':>8} {'ratio':>6} {'cpu r':>6} "
        f"{'recheck':>7} {'masks':>6} | {'labels':>6} {'flags':>6} {'mask?':>6} | {'IoU mean':>8} {'IoU min':>8} | "
        f"{'acc fp32/bf16':>13} {'served IoU fp32/bf16':>20}"
    )
    print(header)
    print("-" * len(header))
    for size, r in rows.items():
        for name in PRECISIONS:
            if name == "fp32":
                continue
            c, truth = r[name], r["truth"]
            ious = c["mask_iou_vs_fp32"]
            served = "/".join(
                "-" if truth[p]["served_iou"] is None else f"{truth[p]['served_iou']:.3f}" for p in ("fp32", name)
            )
            print(
                f"{size:>5} {name:>10} {r['images']:>4} | {c['fp32_ms_per_image']:>8.1f} {c['ms_per_image']:>8.1f} "
                f"{c['time_vs_fp32']:>6.2f} {c['cpu_vs_fp32']:>6.2f} {c['rechecked']:>7.1%} "
                f"{c['rechecked_masks']:>6.1%} | {c['labels_changed']:>6} "
                f"{c['flags_changed']:>6} {c['mask_presence_changed']:>6} | "
                f"{_or_nan(ious['mean']):>8.3f} {_or_nan(ious['min']):>8.3f} | "
                f"{truth['fp32']['accuracy']:>6.3f}/{truth[name]['accuracy']:.3f} {served:>20}"
            )
    print(
        "bf16: as served (recheck near a decision or a mask's edge in fp32) and bf16-plain (no recheck); recheck: share"
        " of images run again in fp32, masks: of them for their mask; labels / flags: images whose label / review"
        " flag differs from fp32; mask?: images where only one of the two served a mask; IoU: bf16 mask vs fp32"
        " mask where both served one"
    )


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def version_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of the benchmarks that run a trained version on a folder dataset (this one, mask_margins.py,
    entropy_moves.py)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="a version folder, or a model dir with `current`")
    parser.add_argument("--data", required=True, help="a folder dataset: images/<class>/..., optional masks/")
    parser.add_argument("--batch", type=int, default=8, help="images per annotate call (default 8)")
    parser.add_argument(
        "--limit", type=int, default=0, help="use N images, evenly spaced over the dataset (default: all)"
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = version_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="input sizes (default: the version's own)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    version = version_dir_of(Path(args.model_dir))
    samples, images = read_images(args.data, args.limit)
    truths = [s.load_mask() for s in samples]
    print(f"version {version}, {len(images)} images from {args.data}, batch {args.batch}", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for size in args.sizes or [None]:
        runs = compare_at(version, images, size, args.batch)
        key = str(size or load_version(version).input_size)
        rows[key] = summarise(runs, samples, truths)
        print(f"  {key}^2: bf16/fp32 time {rows[key]['bf16']['time_vs_fp32']:.2f}", flush=True)
    print()
    print_table(rows)
    print(json.dumps({"version": version.name, "data": str(args.data), "sizes": rows}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
