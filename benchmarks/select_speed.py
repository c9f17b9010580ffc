"""How long `axx-backend select` takes on N candidates once their features are cached.

    .venv/bin/python benchmarks/select_speed.py --work runs/select-speed --n 1000

Writes N positive synthetic images (core/synthetic.py, all labelled `Lesion`, no mask: every one is a
candidate) and a few negatives, trains a small version on 12 + 12 other images unless `--model-dir` names one,
then runs `axx-backend select DIR --model-dir MODELS -k K --json` twice as a user would, in a subprocess: the
first run computes and caches every image's profile (one forward), the second reads them from the cache. Prints
one JSON object: the wall time of each command, and the time select itself reports (without the start of the
Python process and its imports).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from axx_backend.core.synthetic import NEGATIVE, POSITIVE, make_dataset, make_image  # noqa: E402

CLI = str(Path(sys.executable).parent / "axx-backend")


def write_candidates(root: Path, n: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for cls, count, positive in ((POSITIVE, n, True), (NEGATIVE, 10, False)):
        folder = root / "images" / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            if not (folder / f"{i:05d}.png").is_file():
                Image.fromarray(make_image(rng, size, positive)[0]).save(folder / f"{i:05d}.png")


def timed(cmd: list[str]) -> tuple[float, dict]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--n", type=int, default=1000, help="candidates (default 1000)")
    parser.add_argument("-k", type=int, default=20)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--strategy", default="diverse")
    parser.add_argument("--model-dir", type=Path, default=None)
    args = parser.parse_args()

    data = args.work / "candidates"
    write_candidates(data, args.n, args.size, seed=1)
    models = args.model_dir
    if models is None:
        models = args.work / "models"
        if not (models / "current").exists():
            make_dataset(args.work / "train", n_per_class=12, size=args.size, seed=0)
            subprocess.run([CLI, "train", str(args.work / "train"), "--model-dir", str(models), "--preset", "offline",
                            "--input-size", "224"], check=True, capture_output=True)  # fmt: skip
    cmd = [CLI, "select", str(data), "--model-dir", str(models), "-k", str(args.k), "--strategy", args.strategy,
           "--json"]  # fmt: skip
    first_wall, first = timed(cmd)
    second_wall, second = timed(cmd)
    print(json.dumps({
        "command": " ".join(cmd),
        "candidates": second["candidates"],
        "first": {"wall_seconds": round(first_wall, 2), "select_seconds": first["seconds"],
                  "computed": first["computed"]},
        "cached": {"wall_seconds": round(second_wall, 2), "select_seconds": second["seconds"],
                   "cached": second["cached"], "computed": second["computed"]},
        "same_picks": [p["key"] for p in first["selected"]] == [p["key"] for p in second["selected"]],
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
