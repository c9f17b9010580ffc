"""The `evaluate` and `simulate-al` subcommands; `register(subparsers)` adds them to the CLI."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..core.settings import SELECT_STRATEGIES, model_dir_from


def register(subparsers: Any) -> None:
    """Add `evaluate` and `simulate-al` to an argparse subparsers object."""
    ev = subparsers.add_parser(
        "evaluate", help="accuracy, review flag and mask IoU of a version on DATASET_DIR (images/ and masks/)"
    )
    ev.add_argument("dataset_dir", type=Path, help="DATASET_DIR/images/<class>/..., DATASET_DIR/masks/<class>/...")
    ev.add_argument("--model-dir", type=Path, default=None, help="default: $MODEL_DIR")
    ev.add_argument("--version", default=None, help="a version name (default: current)")
    ev.add_argument("--out", type=Path, default=None, help="write report.json and PNG plots here")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ev.add_argument(
        "--calibrate-on",
        type=Path,
        default=None,
        help="choose the mask thresholds on this dataset folder (its validation split when it is the version's "
        "training folder) instead of the version's stored ones; never the evaluated folder",
    )
    ev.add_argument("--examples", type=int, default=6, help="rows of the example grid (with --out)")
    ev.add_argument("--batch-size", type=int, default=None)
    ev.set_defaults(func=cmd_evaluate)

    al = subparsers.add_parser(
        "simulate-al",
        help="active learning offline: reveal K ground-truth masks per round, retrain, record test IoU",
    )
    al.add_argument("dataset_dir", type=Path, help="a dataset folder, or one with train/ and test/ dataset folders")
    al.add_argument("--model-dir", type=Path, required=True, help="where the versions of each round are written")
    al.add_argument("--rounds", type=int, default=4, help="rounds after round 0, which has no mask (default 4)")
    al.add_argument("--per-round", type=int, default=5, help="masks the oracle reveals per round (default 5)")
    al.add_argument(
        "--strategy",
        choices=SELECT_STRATEGIES,
        default="random",
        help="which masks the oracle reveals (training/selection.py; default random, the baseline)",
    )
    al.add_argument(
        "--schedule", default=None, help="cumulative oracle masks per round, e.g. 5,10,20,50 (overrides the two above)"
    )
    al.add_argument("--out", type=Path, default=None, help="CSV and PNG go here (default: MODEL_DIR)")
    al.add_argument("--seed", type=int, default=0)
    al.add_argument("--test-fraction", type=float, default=0.3, help="when DATASET_DIR has no train/ and test/")
    al.add_argument("--preset", choices=["auto", "paper", "offline"], default=None)
    al.add_argument("--members", default=None, help="comma-separated timm names, overrides --preset")
    al.add_argument("--input-size", type=int, default=None)
    al.add_argument("--epochs", type=int, default=None)
    al.set_defaults(func=cmd_simulate_al)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..core.settings import Settings
    from ..core.versions import ModelStore
    from ..engine.annotator import load_annotator
    from .evaluate import evaluate_folder, format_table

    start = time.perf_counter()
    settings = Settings.from_env(batch_size=args.batch_size)
    model_dir = model_dir_from(args.model_dir)
    annotator = load_annotator(model_dir, settings, args.version)
    store = ModelStore(model_dir)
    meta = store.metadata(args.version or store.current() or "")
    ev = evaluate_folder(args.dataset_dir, annotator, meta, args.calibrate_on, args.examples if args.out else 0)
    report = {"dataset": str(args.dataset_dir), **ev.report, "seconds": round(time.perf_counter() - start, 1)}
    table = format_table(report, f"axx-backend evaluate {args.dataset_dir}")
    if args.out:
        from .plots import write_plots

        report["plots"] = write_plots(ev, args.out)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=1))
        (args.out / "table.md").write_text(table + "\n")
    print(json.dumps(report) if args.json else table)
    return 0


def cmd_simulate_al(args: argparse.Namespace) -> int:
    from ..core.settings import Settings
    from .simulate import simulate_al

    members = tuple(m.strip() for m in args.members.split(",")) if args.members else None
    settings = Settings.from_env(preset=args.preset, members=members, input_size=args.input_size, epochs=args.epochs)
    out = args.out or args.model_dir
    rows = simulate_al(
        args.dataset_dir,
        args.model_dir,
        out,
        args.rounds,
        args.per_round,
        args.strategy,
        settings,
        seed=args.seed,
        test_fraction=args.test_fraction,
        schedule=[int(v) for v in args.schedule.split(",")] if args.schedule else None,
    )
    header = ("round", "n_oracle", "accuracy", "iou_served", "iou_served_given_true_class", "mask_source", "seconds")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[h]) for h in header))
    print(
        json.dumps(
            {
                "csv": str(Path(out) / f"al_{args.strategy}.csv"),
                "png": str(Path(out) / f"al_{args.strategy}.png"),
                "rounds": len(rows),
            }
        )
    )
    return 0
