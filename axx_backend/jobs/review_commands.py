"""The review-loop subcommands `select`, `label-check` and `views`; `register(subparsers)` adds them to the CLI.

`select` and `label-check` take a dataset folder (`DATASET_DIR --model-dir DIR`, the current version of DIR)
or a Label Studio project (`--project ID`, the version serving it); `views` writes the project's Data Manager
tabs (jobs/review.py, labelstudio/views.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..core.settings import SELECT_STRATEGIES, model_dir_from


def register(subparsers: Any) -> None:
    """Add `select`, `label-check` and `views` to an argparse subparsers object."""
    sel = subparsers.add_parser(
        "select", help="which tasks get a pixel mask next (uncertain and diverse; from a folder or a project)"
    )
    _source_arguments(sel)
    sel.add_argument("-k", type=int, default=None, help="how many (default: $AXX_SELECT_K, else 10)")
    sel.add_argument(
        "--strategy",
        choices=SELECT_STRATEGIES,
        default=None,
        help="random | entropy | bald | diverse (default: $AXX_SELECT_STRATEGY, else diverse)",
    )
    sel.set_defaults(func=cmd_select)

    check = subparsers.add_parser(
        "label-check", help="rank the annotations a confident out-of-fold ensemble contradicts (probably wrong)"
    )
    _source_arguments(check)
    check.add_argument("--top", type=int, default=20, help="suspects listed (default 20)")
    check.set_defaults(func=cmd_label_check)

    views = subparsers.add_parser(
        "views",
        help="create or update the review tabs of a project's Data Manager: needs review, least confident first, "
        "draw masks next, check these labels",
    )
    views.add_argument("--project", required=True, help="the Label Studio project id")
    views.add_argument("--model-dir", type=Path, default=None, help="default: $MODEL_DIR")
    views.add_argument("-k", type=int, default=None, help="tasks in 'draw masks next' (default: $AXX_SELECT_K)")
    views.add_argument("--strategy", choices=SELECT_STRATEGIES, default=None)
    views.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    views.set_defaults(func=cmd_views)


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset_dir", type=Path, nargs="?", default=None, help="DATASET_DIR/images/<class>/...")
    parser.add_argument("--project", default=None, help="a Label Studio project id instead of a folder")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: $MODEL_DIR")
    parser.add_argument("--version", default=None, help="a version name (folder form; default: current)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _ls_settings() -> Any:
    from ..core.settings import Settings
    from ..labelstudio.settings import LabelStudioSettings

    return LabelStudioSettings.from_env(method=Settings.from_env())


def _version_dir(model_dir: Path, version: str | None) -> Path:
    from ..core.versions import ModelStore

    path = ModelStore(model_dir).version_path(version)
    if path is None:
        raise RuntimeError(f"no trained version in {model_dir}: run `axx-backend train` first")
    return path


def _folder(args: argparse.Namespace) -> tuple[Any, list[Any], list[str], str]:
    """(version, samples, stamps, source) of the folder form."""
    from ..core.data import read_folder_dataset
    from ..core.settings import Settings
    from ..training.review import VersionHandle, folder_source, folder_stamps

    samples, _ = read_folder_dataset(args.dataset_dir)
    version = VersionHandle(_version_dir(model_dir_from(args.model_dir), args.version), Settings.from_env())
    return version, samples, folder_stamps(samples), folder_source(args.dataset_dir)


def _project(args: argparse.Namespace, ls: Any) -> tuple[Any, Any]:
    """(version, project data) of the `--project` form: the version serving the project."""
    from ..core.settings import Settings
    from ..training.review import VersionHandle
    from .review import read_project, serving_version

    ls.require_api("the review loop reads the project's tasks through the API")
    data = read_project(str(args.project), ls)
    settings = Settings.from_env()
    return VersionHandle(serving_version(data.project, model_dir_from(args.model_dir), data.config, settings),
                         settings), data  # fmt: skip


def _check_source(args: argparse.Namespace) -> None:
    if (args.dataset_dir is None) == (args.project is None):
        raise ValueError("give either DATASET_DIR (with --model-dir) or --project ID")


def cmd_select(args: argparse.Namespace) -> int:
    from ..training.review import select_samples

    _check_source(args)
    ls = _ls_settings()
    k = ls.select_k if args.k is None else args.k
    strategy = args.strategy or ls.select_strategy
    if args.project is not None:
        version, data = _project(args, ls)
        samples, stamps, source = data.samples, data.stamps, data.source
    else:
        version, samples, stamps, source = _folder(args)
    selection = select_samples(version, samples, stamps, source, k, strategy, version.settings.seed)
    out = selection.to_dict()
    if args.json:
        print(json.dumps(out))
        return 0
    print(
        f"{selection.version}: {len(selection.picks)} of {selection.candidates} candidates ({strategy}; "
        f"{selection.anchors} already have a mask; {selection.cached} cached, {selection.computed} computed; "
        f"{selection.seconds:.2f} s)"
    )
    for pick in selection.picks:
        print(f"  {pick.rank:3d}. {pick.key}  {pick.label}  mask entropy {pick.entropy:.3f}  bald {pick.bald:.3f}")
    return 0


def cmd_label_check(args: argparse.Namespace) -> int:
    from ..training.review import check_samples

    _check_source(args)
    if args.project is not None:
        from .review import check_project

        version, data = _project(args, _ls_settings())
        check = check_project(data, version)
    else:
        version, samples, stamps, source = _folder(args)
        check = check_samples(version, samples, stamps, source)
    summary = check.summary(top=args.top)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"{summary['version']}: {summary['contradicted_classes']} of {summary['checked_classes']} classes and "
        f"{summary['contradicted_masks']} of {summary['checked_masks']} masks contradicted ({summary['seconds']} s)"
    )
    for item in summary["suspects"]:
        print(f"  {item['key']}  {item['score']:.3f}  {'; '.join(item['reasons'])}")
    return 0


def cmd_views(args: argparse.Namespace) -> int:
    from .review import refresh_views

    ls = _ls_settings()
    version, data = _project(args, ls)
    summary = refresh_views(data, version, ls, k=args.k, strategy=args.strategy)
    if args.json:
        print(json.dumps(summary))
        return 0
    for title, tab in summary["tabs"].items():
        print(f"{title}: tab {tab['id']} {tab['action']}")
    print(
        f"draw masks next: {summary['draw_masks_next']}; check these labels: {summary['check_these_labels']}; "
        f"{summary['flagged']} flagged; task fields {'written' if summary['task_fields'] else 'off'} "
        f"({summary['tasks_written']} tasks); mislabeling set on {summary['mislabeling_written']} predictions"
    )
    return 0
