"""A copy of a benchmark dataset with its train split cut down to a few images a class, for the "Few labels"
runs of the README: what a project's first training sees.

    .venv/bin/python benchmarks/few_labels.py --data runs/photo --out runs/photo-40-d0 --per-class 20,10 --draw 0
    .venv/bin/python benchmarks/quality.py --data runs/photo-40-d0 --work runs/s40-d0 --settings labels --seed 0

Per variant (`binary`, `multiclass`, in that order for `--per-class`), a seeded random `--per-class` images
of each train class (`random.Random(draw)`, names sorted first) with their masks; the test split whole. Files
are hard links where the filesystem allows (copies elsewhere): `axx-backend train` does not follow symbolic
links. `manifest.json` is copied so that `quality.py` reads the same provenance.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
from pathlib import Path

VARIANTS = ("binary", "multiclass")


def link(src: str | Path, dst: str | Path) -> None:
    """Hard-link `src` to `dst` (also `shutil.copytree`'s copy function, which passes strings)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def cut_down(data: Path, out: Path, per_class: dict[str, int], draw: int) -> dict[str, dict[str, int]]:
    """Write the cut-down copy; returns the train images kept per variant and class."""
    if out.exists():
        raise SystemExit(f"{out} exists: choose a new --out")
    rng = random.Random(draw)
    kept: dict[str, dict[str, int]] = {}
    for variant in VARIANTS:
        train = data / variant / "train"
        kept[variant] = {}
        for class_dir in sorted((train / "images").iterdir()):
            names = sorted(p.name for p in class_dir.iterdir() if p.is_file())
            if len(names) < per_class[variant]:
                raise SystemExit(f"{class_dir} has {len(names)} images, fewer than {per_class[variant]}")
            for name in sorted(rng.sample(names, per_class[variant])):
                link(class_dir / name, out / variant / "train" / "images" / class_dir.name / name)
                mask = train / "masks" / class_dir.name / (Path(name).stem + ".png")
                if mask.is_file():
                    link(mask, out / variant / "train" / "masks" / class_dir.name / mask.name)
            kept[variant][class_dir.name] = per_class[variant]
        shutil.copytree(data / variant / "test", out / variant / "test", copy_function=link)
    shutil.copy2(data / "manifest.json", out / "manifest.json")
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a dataset of make_photo_dataset.py")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-class", default="20,10", help="train images a class: binary,multiclass")
    parser.add_argument("--draw", type=int, default=0, help="seed of the random choice")
    args = parser.parse_args()
    counts = [int(n) for n in args.per_class.split(",")]
    if len(counts) != len(VARIANTS) or min(counts) < 1:
        parser.error("--per-class takes two positive counts: binary,multiclass")
    kept = cut_down(args.data, args.out, dict(zip(VARIANTS, counts, strict=True)), args.draw)
    print({"out": str(args.out), "train_per_class": kept})


if __name__ == "__main__":
    main()
