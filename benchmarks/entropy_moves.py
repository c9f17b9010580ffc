"""How far bf16 moves each member's review entropy against fp32, by how large that entropy is.

`AXX_PRECISION_RECHECK` runs again in fp32 the images whose decision bf16 could change: a member's normalised
entropy within the margin of the review threshold, or its two likeliest classes within the margin in probability
(`engine.uncertainty.near_a_decision`). This measures what bf16 actually moves: the version annotates the same
images in fp32 and in bf16 without any recheck, and for every image and member the entropy of each is compared.
Printed per band of fp32 entropy: the count, and the largest and 99th-percentile move, absolute, relative to the
fp32 entropy, and as a factor (how many times larger or smaller bf16 made it); and the largest move of the top-two
probability gap.

    .venv/bin/python benchmarks/entropy_moves.py --model-dir MODEL_DIR --data DATASET_DIR [--limit 200]

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
from axx_backend.engine.annotator import Annotator  # noqa: E402

BANDS = (0.0, 1e-3, 1e-2, 0.1, 0.3, 1.0001)


def member_values(annotator: Annotator, images: Sequence, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Entropies [N, M] and top-two probability gaps [N, M] of every image and member."""
    entropies, gaps = [], []
    for start in range(0, len(images), batch):
        fwd = annotator.forward(images[start : start + batch])
        for b in range(len(fwd)):
            entropies.append(fwd.member_entropy(b))
            gaps.append([float(np.diff(np.sort(p)[-2:])[0]) for p in fwd.member_probs(b)])
    return np.asarray(entropies, dtype=np.float64), np.asarray(gaps, dtype=np.float64)


def by_band(h32: np.ndarray, h16: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    moved = np.abs(h16 - h32)
    relative = moved / np.maximum(h32, 1e-12)
    ratio = np.maximum(h16, 1e-12) / np.maximum(h32, 1e-12)
    factor = np.maximum(ratio, 1 / ratio)  # how many times larger or smaller bf16 made it
    for low, high in zip(BANDS[:-1], BANDS[1:], strict=True):
        inside = (h32 >= low) & (h32 < high)
        row: dict[str, Any] = {"band": [low, min(high, 1.0)], "n": int(inside.sum())}
        if inside.any():
            row.update(
                abs_max=float(moved[inside].max()),
                abs_p99=float(np.quantile(moved[inside], 0.99)),
                rel_max=float(relative[inside].max()),
                rel_p99=float(np.quantile(relative[inside], 0.99)),
                factor_max=float(factor[inside].max()),
                factor_p99=float(np.quantile(factor[inside], 0.99)),
            )
        rows.append(row)
    return rows


COLUMNS = (("abs_max", "abs max", ".2e"), ("abs_p99", "abs p99", ".2e"), ("rel_max", "rel max", ".3f"))
COLUMNS += (("rel_p99", "rel p99", ".3f"), ("factor_max", "x max", ".2f"), ("factor_p99", "x p99", ".2f"))


def print_bands(bands: list[dict[str, Any]]) -> None:
    print(f"{'band':>15} {'n':>5} " + " ".join(f"{title:>9}" for _, title, _ in COLUMNS))
    for r in bands:
        low, high = r["band"]
        cells = [f"{r[key]:>9{form}}" for key, _, form in COLUMNS] if r["n"] else []
        print(f"{low:>7.0e}-{high:<7.0e} {r['n']:>5} " + " ".join(cells))


def main(argv: Sequence[str] | None = None) -> int:
    parser = version_parser(__doc__)
    args = parser.parse_args(argv)
    version = version_dir_of(Path(args.model_dir))
    _, images = read_images(args.data, args.limit)
    explicit = {"precision", "precision_recheck", "precision_recheck_mask"}
    plain = {"precision_recheck": 0.0, "precision_recheck_mask": 0.0}
    fp32 = Annotator.from_version(version, Settings(precision="fp32", **plain), explicit=explicit)
    bf16 = Annotator.from_version(version, Settings(precision="bf16", **plain), explicit=explicit)
    if bf16.precision != "bf16":
        raise SystemExit("this machine does not serve bf16")
    print(f"version {version}, {len(images)} images from {args.data}", flush=True)
    (h32, g32), (h16, g16) = member_values(fp32, images, args.batch), member_values(bf16, images, args.batch)
    threshold = fp32.settings.uncertainty_threshold
    bands = by_band(h32, h16)
    print(f"review threshold {threshold:.4g}; entropy moves per fp32 entropy band (image x member):")
    print_bands(bands)
    gap_moved = float(np.abs(g16 - g32).max())
    print(f"top-two probability gap moved by at most {gap_moved:.2e}")
    result = {"version": version.name, "data": str(args.data), "threshold": threshold, "bands": bands}
    print(json.dumps({**result, "gap_moved_max": gap_moved}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
