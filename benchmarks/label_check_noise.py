"""How many wrong labels does the label check find? Flip a share of a training folder's labels, train a version on
the noisy folder, and count the flipped labels among the check's top 2 x (flipped) suspects.

    .venv/bin/python benchmarks/label_check_noise.py --data runs/photo/binary/train --work runs/label-check \
        --noise 0.1 --preset offline --input-size 320

Two checks are measured, both on the noisy labels the version was trained on:
- `training`: the check a training run makes (out-of-fold probabilities of the run's own calibration);
- `label-check`: `axx-backend label-check NOISY_DIR --model-dir DIR` (fresh out-of-fold heads on the cached
  features of every labelled image).
Prints one JSON object. Masks are dropped from the noisy copy (a flipped image's mask would name the wrong class).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from axx_backend.core.data import read_folder_dataset  # noqa: E402
from axx_backend.core.settings import Settings  # noqa: E402
from axx_backend.jobs.review import TrainingCheck  # noqa: E402
from axx_backend.training.label_check import LabelCheck  # noqa: E402
from axx_backend.training.review import VersionHandle, check_samples, folder_source, folder_stamps  # noqa: E402
from axx_backend.training.trainer import train_on_samples  # noqa: E402


def noisy_copy(data: Path, out: Path, noise: float, seed: int) -> tuple[list[str], list[str]]:
    """Copy `data/images` to `out/images` with round(noise x N) labels moved to another class (seeded);
    returns (classes, the flipped images' keys in the copy)."""
    samples, classes = read_folder_dataset(data)
    rng = np.random.default_rng(seed)
    n_flip = int(round(noise * len(samples)))
    flip = set(rng.choice(len(samples), size=n_flip, replace=False).tolist())
    if out.exists():
        shutil.rmtree(out)
    flipped = []
    for i, sample in enumerate(samples):
        label = str(sample.label)
        if i in flip:
            label = str(rng.choice([c for c in classes if c != sample.label]))
        assert sample.path is not None
        target = out / "images" / label / sample.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(sample.path, target)
        if i in flip:
            flipped.append(f"{label}/{sample.path.name}")
    return classes, flipped


def found(check: LabelCheck, flipped: list[str]) -> dict[str, object]:
    """Share of the flipped labels among the top 2 x (flipped) of the check's ranking (by score)."""
    ranking = [c.key for c in check.classes]  # sorted by score, highest first
    top = set(ranking[: 2 * len(flipped)])
    hits = sum(k in top for k in flipped)
    return {
        "checked": len(ranking),
        "found_in_top_2x": hits,
        "recall_top_2x": round(hits / max(1, len(flipped)), 3),
        "contradicted": sum(c.contradicted for c in check.classes),
        "flipped_contradicted": sum(c.contradicted for c in check.classes if c.key in set(flipped)),
        "seconds": round(check.seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a dataset folder (images/<class>/...)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--noise", type=float, default=0.1, help="share of labels flipped (default 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="offline")
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--finetune", default=None, help="head | last-stage | auto (default: the settings')")
    args = parser.parse_args()

    noisy = args.work / "noisy"
    classes, flipped = noisy_copy(args.data, noisy, args.noise, args.seed)
    settings = Settings.from_env(preset=args.preset, input_size=args.input_size, finetune=args.finetune)
    samples, _ = read_folder_dataset(noisy)
    models = args.work / "models"
    start = time.perf_counter()
    hook = TrainingCheck()
    version = train_on_samples(samples, classes, models, settings, source=str(noisy), after_fit=hook)
    train_seconds = time.perf_counter() - start
    handle = VersionHandle(models / version, settings)
    after_training = hook.store(handle.path, folder_source(noisy), samples)
    start = time.perf_counter()
    command = check_samples(handle, samples, folder_stamps(samples), folder_source(noisy))
    command_seconds = time.perf_counter() - start
    report = {
        "command": " ".join(sys.argv),
        "data": str(args.data),
        "images": len(samples),
        "flipped": len(flipped),
        "version": version,
        "training_seconds": round(train_seconds, 1),
        "training": found(after_training, flipped) if after_training is not None else None,
        "label_check": {**found(command, flipped), "wall_seconds": round(command_seconds, 1)},
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
