"""Command line: `axx-backend train | annotate | evaluate | simulate-al | select | label-check | views | serve |
worker | preannotate | versions`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .core.env import environ, get_int, get_str
from .core.settings import model_dir_from

log = logging.getLogger("axx_backend")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .core.logs import configure_logging

    configure_logging()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"axx-backend {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line for the user; the traceback with LOG_LEVEL=DEBUG
        log.debug("failed", exc_info=True)
        print(f"axx-backend {args.command}: error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="axx-backend", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_folder_commands(sub)  # train, annotate
    add_service_commands(sub)  # serve, worker
    add_preannotate_command(sub)

    from .evaluation.commands import register as register_evaluation

    register_evaluation(sub)  # evaluate, simulate-al

    from .jobs.review_commands import register as register_review

    register_review(sub)  # select, label-check, views

    versions = sub.add_parser("versions", help="list the versions of a model directory")
    versions.add_argument("--model-dir", type=Path, default=None)
    versions.set_defaults(func=cmd_versions)
    return parser


def add_folder_commands(sub: Any) -> None:
    train = sub.add_parser("train", help="train a model version on DATASET_DIR/images/<class>/<name>.<ext>")
    train.add_argument("dataset_dir", type=Path)
    train.add_argument("--model-dir", type=Path, default=None, help="where versions are written (default: $MODEL_DIR)")
    train.add_argument("--preset", choices=["auto", "paper", "offline"], default=None, help="member set (default auto)")
    train.add_argument("--members", default=None, help="comma-separated timm names, overrides --preset")
    train.add_argument("--input-size", type=int, default=None)
    train.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (with --finetune last-stage|all)")
    train.add_argument(
        "--finetune",
        choices=["auto", "head", "last-stage", "all"],
        default=None,
        help="what to train: the heads on frozen features, or also the last stage / all of each backbone "
        "(default auto: the last stage on cached stage inputs, kept for a member where the held-out split says "
        "it pays; AXX_FINETUNE_SECONDS bounds its time)",
    )
    train.add_argument("--target-flag-rate", type=float, default=None)
    train.add_argument(
        "--unlabelled", type=Path, default=None, metavar="DIR",
        help="images without labels (the ones to annotate next): pseudo-mask candidates, and from 50 of them the "
        "review threshold spends the flag budget on them instead of on the labelled images",
    )  # fmt: skip
    train.set_defaults(func=cmd_train)

    annotate = sub.add_parser("annotate", help="predict class, review flag and mask for every image of a folder")
    annotate.add_argument("images_dir", type=Path)
    annotate.add_argument("--out", type=Path, required=True)
    annotate.add_argument("--model-dir", type=Path, default=None, help="default: $MODEL_DIR")
    annotate.add_argument("--version", default=None, help="a version name (default: current)")
    annotate.add_argument("--batch-size", type=int, default=None)
    annotate.add_argument("--mask-fusion", default=None, help="mean | intersection | votes:k")
    annotate.add_argument(
        "--cam-method", default=None, help="fast (default) or a grad-cam method: xgradcam, gradcam, ..."
    )
    annotate.set_defaults(func=cmd_annotate)


def add_service_commands(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the Label Studio ML backend (gunicorn)")
    serve.add_argument(
        "--host", default=get_str(environ(), "HOST", "127.0.0.1"), help="0.0.0.0 to listen on all interfaces"
    )
    serve.add_argument("--port", type=int, default=get_int(environ(), "PORT", 9090))
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run an RQ worker for training and pre-annotation jobs (needs REDIS_URL)")
    worker.add_argument("--burst", action="store_true", help="stop when the queues are empty")
    worker.add_argument(
        "--queues",
        default=None,
        help="comma-separated queues to serve, in priority order (default: axx-training,axx-preannotate)",
    )
    worker.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per job (default: $AXX_WORKER_THREADS, else the CPUs divided by this host's workers)",
    )
    worker.set_defaults(func=cmd_worker)


def add_preannotate_command(sub: Any) -> None:
    pre = sub.add_parser(
        "preannotate",
        help="predict every task of a Label Studio project in chunks (RQ workers with REDIS_URL, else here) "
        "and post the predictions through the API",
    )
    pre.add_argument("--project", required=True, help="the Label Studio project id")
    pre.add_argument(
        "--only-missing",
        action="store_true",
        help="skip tasks that have a prediction of any version (tasks with one of the current version are "
        "always skipped)",
    )
    pre.add_argument("--chunk", type=int, default=32, help="tasks per job (default 32)")
    pre.add_argument("--retries", type=int, default=2, help="new attempts for a failed or lost chunk (default 2)")
    pre.add_argument("--model-dir", type=Path, default=None, help="default: $MODEL_DIR")
    pre.add_argument("--in-process", action="store_true", help="ignore REDIS_URL: predict in this process")
    pre.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    pre.set_defaults(func=cmd_preannotate)


def _settings(**overrides: object):
    from .core.settings import Settings

    return Settings.from_env(**overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from .training import train_version

    members = tuple(m.strip() for m in args.members.split(",")) if args.members else None
    settings = _settings(
        preset=args.preset,
        members=members,
        input_size=args.input_size,
        finetune=args.finetune,
        finetune_epochs=args.epochs,
        target_flag_rate=args.target_flag_rate,
    )
    model_dir = model_dir_from(args.model_dir)
    version = train_version(args.dataset_dir, model_dir, settings, unlabelled_dir=args.unlabelled)
    print(json.dumps({"version": version, "path": str(model_dir / version)}))
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    from .annotate_folder import annotate_folder

    settings = _settings(batch_size=args.batch_size, mask_fusion=args.mask_fusion, cam_method=args.cam_method)
    explicit = settings.explicit_from_env() | {k for k in ("mask_fusion",) if getattr(args, k) is not None}
    summary = annotate_folder(
        args.images_dir, args.out, model_dir_from(args.model_dir), settings, args.version, explicit
    )
    print(json.dumps(summary))
    return 0 if summary["errors"] < summary["images"] or summary["images"] == 0 else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from .server.run import serve

    serve(args.host, args.port)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from .jobs import run_worker

    queues = [q.strip() for q in args.queues.split(",") if q.strip()] if args.queues else None
    run_worker(burst=args.burst, queues=queues, threads=args.threads)
    return 0


def cmd_preannotate(args: argparse.Namespace) -> int:
    from .jobs import HEARTBEAT_TTL
    from .labelstudio.settings import LabelStudioSettings
    from .preannotate import preannotate

    ls = LabelStudioSettings.from_env()
    ls.require_api("tasks and predictions go through the API")
    summary = preannotate(
        args.project, model_dir_from(args.model_dir), ls, chunk=args.chunk, only_missing=args.only_missing,
        redis_url=None if args.in_process else get_str(environ(), "REDIS_URL"), retries=args.retries,
        lease_seconds=HEARTBEAT_TTL,
    )  # fmt: skip
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    ok = not summary["failed_chunks"] and summary["without_prediction"] == 0
    return 0 if ok else 1


def print_summary(summary: dict[str, Any]) -> None:
    """`preannotate`'s summary in a few lines for a person."""
    print(
        f"project {summary['project']} ({summary['model_version']}, {summary['executor']}): "
        f"{summary['posted']} predictions posted for {summary['to_predict']} tasks in {summary['seconds']} s "
        f"({summary['tasks_per_second']} tasks/s); {summary['skipped_with_version']} already had one; "
        f"{summary['unusable_images']} images unusable; {summary['retried_chunks']} chunks retried; "
        f"{len(summary['failed_chunks'])} chunks failed; {summary['without_prediction']} tasks without a "
        f"prediction of the version"
    )
    for failed in summary["failed_chunks"]:
        ids = failed["task_ids"]
        print(f"  failed chunk {failed['chunk']} (tasks {ids[0]}..{ids[-1]}, {len(ids)}): {failed['error']}")


def cmd_versions(args: argparse.Namespace) -> int:
    from .core.versions import ModelStore

    store = ModelStore(model_dir_from(args.model_dir))
    current = store.current()
    for name in store.list_versions():
        meta = store.metadata(name)
        mark = "*" if name == current else " "
        review = meta.metrics.get("review_calibration") or {}
        budget = f"  flagged_unlabelled={review['flagged_rate']:.3f}" if review.get("on") == "unlabelled" else ""
        if "pseudo_labels" in meta.metrics:  # unlabelled images the served heads also learnt from
            budget += f"  pseudo_labelled={meta.metrics['pseudo_labels']['images']}"
        print(
            f"{mark} {name}  preset={meta.preset}  classes={','.join(meta.classes)}  masks={meta.mask_source}  "
            f"val_accuracy={meta.metrics.get('accuracy')}  flagged={meta.metrics.get('flagged_rate')}{budget}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
