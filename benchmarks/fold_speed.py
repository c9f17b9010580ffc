"""Predict with BatchNorm folded (engine/fold.py, what serving does) against unfolded members, fp32 and bf16,
timed in interleaved rounds in one process so that the host's drift hits all four alike (README, "Speed"):

    .venv/bin/python benchmarks/fold_speed.py [--size 512] [--rounds 9] [--mask-source cam|segments]

Paper members with random weights and rigged heads, as in predict_speed.py. Prints the median ms per image of
each variant and the ratios.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import predict_speed as ps  # noqa: E402

MEMBERS = ps.PRESETS["paper"]  # predict_speed.py's members


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--mask-source", default="cam", choices=["cam", "segments"])
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    options = argparse.Namespace(samples=30, seed=0, mask_source=args.mask_source)
    folded = ps.build_ensemble(MEMBERS, "top10")
    plain = ps.build_ensemble(MEMBERS, "top10", fold=False)  # the same members, BatchNorm kept
    images = ps.make_images(1, args.size, 0)
    annotators = {
        # (bf16 serving casts its ensemble's weights in place: each bf16 annotator gets a copy)
        (kind, precision): ps.make_annotator(
            copy.deepcopy(ensemble) if precision == "bf16" else ensemble, args.size, 1, options, precision
        )
        for kind, ensemble in (("unfolded", plain), ("folded", folded))
        for precision in ("fp32", "bf16")
    }
    times: dict[tuple[str, str], list[float]] = {key: [] for key in annotators}
    for annotator in annotators.values():  # warm-up
        ps.predict(annotator, images)
    for _ in range(args.rounds):
        for key, annotator in annotators.items():
            start = time.perf_counter()
            ps.predict(annotator, images)
            times[key].append(time.perf_counter() - start)
    ms = {key: statistics.median(values) * 1000 for key, values in times.items()}
    for (kind, precision), value in ms.items():
        print(f"{kind:9s} {precision}: {value:7.1f} ms")
    for kind in ("unfolded", "folded"):
        print(f"{kind:9s} bf16 / fp32: {ms[(kind, 'bf16')] / ms[(kind, 'fp32')]:.3f}")
    for precision in ("fp32", "bf16"):
        print(f"folded / unfolded, {precision}: {ms[('folded', precision)] / ms[('unfolded', precision)]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
