"""How far bf16 moves a version's served masks, and what `AXX_PRECISION_RECHECK_MASK` would catch at each margin.

The version annotates the same images in fp32 and in bf16 with the decision recheck on and the mask recheck off
(`AXX_PRECISION_RECHECK_MASK=0`). For every image both serve a mask: the IoU of the two masks, the largest move of
the score map, and for each margin the worst IoU a move by less than it could cause (`engine.masks.worst_iou_within`
on bf16's map). Printed per margin: the share of all images the mask recheck would run again in fp32 (those under
the floor), and the mean and worst mask IoU against fp32 once their masks are fp32's. The recheck's time at the
default margin: `benchmarks/precision.py`.

    .venv/bin/python benchmarks/mask_margins.py --model-dir MODEL_DIR --data DATASET_DIR [--limit 200]

The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from precision import read_images, version_dir_of, version_parser  # noqa: E402

from axx_backend.core.settings import Settings  # noqa: E402
from axx_backend.engine.annotator import Annotator, Forward  # noqa: E402
from axx_backend.engine.masks import iou, worst_iou_within  # noqa: E402

MARGINS = (0.005, 0.01, 0.015, 0.02, 0.03, 0.05)


def served_score(annotator: Annotator, fwd: Forward, b: int) -> tuple[np.ndarray, float]:
    decision = annotator.decide(fwd, b)
    score, threshold, _ = annotator.mask_score(fwd, b, decision.label, decision.agreeing)
    return score, threshold


def compare(version: Path, images: Sequence, batch: int, margins: Sequence[float]) -> list[dict[str, Any]]:
    """One row per image: whether bf16's decision recheck ran it in fp32, and where both precisions served a
    mask, their IoU, the largest score move and the worst IoU within each margin."""
    explicit = {"precision", "precision_recheck_mask"}
    fp32 = Annotator.from_version(version, Settings(precision="fp32"), explicit=explicit)
    bf16 = Annotator.from_version(version, Settings(precision="bf16", precision_recheck_mask=0.0), explicit=explicit)
    if bf16.precision != "bf16":
        raise SystemExit("this machine does not serve bf16")
    rows = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        want, got = fp32.forward(chunk), bf16.forward(chunk)
        masks = fp32.conclude(want), bf16.conclude(got)
        for b in range(len(chunk)):
            row: dict[str, Any] = {"rechecked": b in got.rechecked, "both": False}
            a, h = masks[0][b].mask, masks[1][b].mask
            if a is not None and h is not None:
                (s32, _), (s16, threshold) = served_score(fp32, want, b), served_score(bf16, got, b)
                worst = {m: worst_iou_within(s16, threshold, m) for m in margins}
                row.update(both=True, iou=iou(a, h), moved=float(np.abs(s32 - s16).max()), worst=worst)
            rows.append(row)
        print(f"  {start + len(chunk)} of {len(images)}", flush=True)
    return rows


def by_margin(rows: list[dict[str, Any]], margins: Sequence[float], floor: float) -> dict[str, Any]:
    both = [r for r in rows if r["both"]]
    result: dict[str, Any] = {"images": len(rows), "both_masked": len(both)}
    if not both:
        return result
    ious = np.array([r["iou"] for r in both])
    moved = np.array([r["moved"] for r in both])
    result["no_mask_recheck"] = {"iou_mean": float(ious.mean()), "iou_min": float(ious.min())}
    result["score_moved"] = {q: float(np.quantile(moved, v)) for q, v in (("median", 0.5), ("p90", 0.9), ("max", 1))}
    for m in margins:
        caught = [not r["rechecked"] and r["worst"][m] < floor for r in both]
        served = np.where(caught, 1.0, ious)
        result[str(m)] = {"rechecked": sum(caught) / len(rows), "iou_mean": served.mean(), "iou_min": served.min()}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = version_parser(__doc__)
    parser.add_argument("--floor", type=float, default=Settings().precision_recheck_iou)
    args = parser.parse_args(argv)
    version = version_dir_of(Path(args.model_dir))
    _, images = read_images(args.data, args.limit)
    print(f"version {version}, {len(images)} images from {args.data}", flush=True)
    result = by_margin(compare(version, images, args.batch, MARGINS), MARGINS, args.floor)
    if "no_mask_recheck" in result:
        n, moved = result["no_mask_recheck"], result["score_moved"]
        print(
            f"\n{result['both_masked']} images masked in both; without the mask recheck IoU vs fp32 mean "
            f"{n['iou_mean']:.4f}, min {n['iou_min']:.3f}; the score map moved by at most (per image) "
            f"{moved['median']:.4f} at the median, {moved['p90']:.4f} at p90, {moved['max']:.4f} at most"
        )
        print(f"{'margin':>7} {'rechecked':>9} {'IoU mean':>8} {'IoU min':>8}   (floor {args.floor})")
        for m in MARGINS:
            r = result[str(m)]
            print(f"{m:>7} {r['rechecked']:>9.1%} {r['iou_mean']:>8.4f} {r['iou_min']:>8.3f}")
    print(json.dumps({"version": version.name, "data": str(args.data), "floor": args.floor, **result}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
