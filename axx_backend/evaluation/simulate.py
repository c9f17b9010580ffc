"""`axx-backend simulate-al`: the active-learning protocol of Belharbi et al., offline.

Start from image labels only; each round the oracle reveals K ground-truth masks of pool images (chosen
by a strategy of `training/selection.py`: `random`, `entropy`, `bald` or `diverse`), a new version is trained
on the pool with those masks, and the test split is evaluated. The masks reach training as `Sample.mask_path`
(an oracle mask); what training does with them (the segment head of docs/METHOD.md "Learning" 3) is up to
`train_fn`.

The revealed masks are also used to choose the CAM thresholds when the version did not calibrate its
own (docs/METHOD.md "Mask": thresholds tuned for the fused rule on images with masks): the row
`iou_mean_calibrated` is what the oracle masks buy for the refined CAM without any pixel-supervised training.

Selection scores come from each candidate's review profile (`training/profiles.py`) for its known class:
`entropy` = mean binary entropy of the served score map (the segment head's probability when the version
serves it, else the mean of the members' normalised CAMs); `bald` = mean over pixels of
H(mean_m p_m) - mean_m H(p_m) over the members' CAMs (a deep-ensemble BALD); `diverse` = entropy-weighted
k-center greedy over the members' pooled features, the images with a revealed mask as the first centres.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.data import Sample, read_folder_dataset, stratified_split
from ..core.settings import Settings
from ..core.versions import ModelStore
from ..engine.annotator import Annotator
from ..training.profiles import profile_samples, scores_of
from ..training.selection import Scores, check_strategy, choose
from .evaluate import CAM_RULES, calibrate_thresholds, evaluate, version_thresholds

log = logging.getLogger(__name__)

TrainFn = Callable[[Sequence[Sample], Sequence[str], Path, Settings], str]
CSV_FIELDS = (
    "round",
    "n_oracle",
    "version",
    "accuracy",
    "flagged_rate",
    "n_test_masks",
    "iou_served",
    "iou_served_given_true_class",
    "dice_served",
    "iou_mean_calibrated",
    "iou_intersection_calibrated",
    "iou_best_member",
    "best_member",
    "iou_seg_head",
    "mask_source",
    "mask_sources",
    "thresholds",
    "threshold_source",
    "selected",
    "seconds",
)


def default_train_fn(samples: Sequence[Sample], classes: Sequence[str], model_dir: Path, settings: Settings) -> str:
    from ..training import train_on_samples

    return train_on_samples(samples, classes, model_dir, settings, source="simulate-al")


def load_pool_and_test(
    dataset_dir: str | os.PathLike[str], test_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample], list[str]]:
    """(pool, test, classes): `DATASET_DIR/{train,test}/` when both exist, else a stratified seeded split."""
    root = Path(dataset_dir)
    if (root / "train" / "images").is_dir() and (root / "test" / "images").is_dir():
        pool, classes = read_folder_dataset(root / "train")
        test, test_classes = read_folder_dataset(root / "test")
        if set(test_classes) - set(classes):
            raise ValueError(f"test classes {test_classes} are not all in the train classes {classes}")
        return pool, test, classes
    samples, classes = read_folder_dataset(root)
    pool_idx, test_idx = stratified_split([s.label for s in samples], test_fraction, seed)
    return [samples[i] for i in pool_idx], [samples[i] for i in test_idx], classes


def select(
    strategy: str,
    candidates: Sequence[Sample],
    k: int,
    rng: np.random.Generator,
    annotator: Annotator | None = None,
    anchors: Sequence[Sample] = (),
) -> list[Sample]:
    """The next `k` pool images whose masks the oracle reveals; `anchors`: the images already revealed (the
    first centres of `diverse`)."""
    check_strategy(strategy)
    if k >= len(candidates):
        return list(candidates)
    if strategy == "random":
        n = len(candidates)
        return [candidates[i] for i in choose("random", Scores(np.zeros(n), np.zeros(n), np.zeros((n, 0))), k, rng)]
    if annotator is None:
        raise ValueError(f"strategy {strategy} needs the current version")
    profiled = profile_samples(lambda: annotator, [*candidates, *anchors]).profiles
    by_key = {p.key: p for p in profiled}
    readable = [s for s in candidates if s.key in by_key]
    anchor_profiles = [by_key[s.key] for s in anchors if s.key in by_key]
    picks = choose(strategy, scores_of([by_key[s.key] for s in readable], anchor_profiles), k, rng)
    return [readable[i] for i in picks]


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def simulate_al(
    dataset_dir: str | os.PathLike[str],
    work_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    rounds: int,
    per_round: int,
    strategy: str = "random",
    settings: Settings | None = None,
    seed: int = 0,
    test_fraction: float = 0.3,
    train_fn: TrainFn | None = None,
    schedule: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Run rounds 0..`rounds` (round 0: no mask); write `al_<strategy>.csv` and `.png` to `out_dir`.

    Round r has `r * per_round` oracle masks, or `schedule[r - 1]` when a schedule of increasing
    cumulative counts is given (e.g. 5, 10, 20, 50 as in docs/METHOD.md "Evaluation").
    """
    check_strategy(strategy)
    targets = oracle_targets(rounds, per_round, schedule)
    settings = settings or Settings()
    train_fn = train_fn or default_train_fn
    pool, test, classes = load_pool_and_test(dataset_dir, test_fraction, seed)
    oracle = {s.key: s for s in pool if s.has_mask}
    if not oracle:
        raise ValueError(f"{dataset_dir}: no pool image has a mask (masks/<class>/<name>.png): nothing to reveal")
    if not any(s.has_mask for s in test):
        raise ValueError(f"{dataset_dir}: no test image has a mask: test IoU cannot be measured")
    # The learner starts from image labels only: every mask is hidden until the oracle reveals it.
    hidden = [dataclasses.replace(s, mask_path=None, mask=None) for s in pool]
    revealed: list[str] = []
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"al_{strategy}.csv"
    rows: list[dict[str, Any]] = []
    annotator: Annotator | None = None
    for rnd in range(len(targets) + 1):
        start = time.perf_counter()
        samples = [oracle[s.key] if s.key in set(revealed) else s for s in hidden]
        torch.manual_seed(seed)  # the heads' initial weights come from the global RNG: same start every round
        annotator, row = train_and_score(samples, classes, test, Path(work_dir), settings, train_fn, annotator, rnd)
        if rnd < len(targets):
            candidates = [s for s in hidden if s.key in oracle and s.key not in set(revealed)]
            if candidates:
                anchors = [oracle[key] for key in revealed]
                chosen = select(strategy, candidates, targets[rnd] - len(revealed), rng, annotator, anchors)
                revealed += [s.key for s in chosen]
                row["selected"] = ";".join(s.key for s in chosen)
        row["seconds"] = f"{time.perf_counter() - start:.1f}"
        rows.append(row)
        log.info(
            "round %d: %d oracle masks, served IoU %s end to end, %s given the true class (%ss)",
            rnd,
            row["n_oracle"],
            row["iou_served"],
            row["iou_served_given_true_class"],
            row["seconds"],
        )
        _write_csv(csv_path, rows)
        if rnd < len(targets) and not row["selected"]:
            log.warning("every pool mask is revealed after round %d: stopping", rnd)
            break
    from .plots import al_curve_plot

    al_curve_plot(rows, out / f"al_{strategy}.png", f"Active learning ({strategy} selection), test IoU")
    return rows


def oracle_targets(rounds: int, per_round: int, schedule: Sequence[int] | None) -> list[int]:
    """The cumulative oracle masks of rounds 1.. (round 0 has none): the schedule, or `per_round` more a round."""
    if schedule:
        if any(b <= a for a, b in zip([0, *schedule], schedule, strict=False)):
            raise ValueError(f"the schedule must increase from above 0: {list(schedule)}")
        return list(schedule)
    if rounds < 0 or per_round < 1:
        raise ValueError("--rounds must be >= 0 and --per-round >= 1")
    return [per_round * (r + 1) for r in range(rounds)]


def train_and_score(
    samples: list[Sample],
    classes: list[str],
    test: list[Sample],
    store_dir: Path,
    settings: Settings,
    train_fn: TrainFn,
    annotator: Annotator | None,
    rnd: int,
) -> tuple[Annotator, dict[str, Any]]:
    """One round: train a version on `samples` (the revealed masks included), evaluate it on `test` as served."""
    version = train_fn(samples, classes, store_dir, settings)
    store = ModelStore(store_dir)
    if annotator is None or annotator.version != version:  # loading a version costs seconds: reuse it
        annotator = Annotator.from_version(store.path(version), settings)
    meta = store.metadata(version)
    thresholds = version_thresholds(annotator, meta)
    oracle_samples = [s for s in samples if s.has_mask]
    if oracle_samples and not meta.cam_calibrated:
        try:
            thresholds = calibrate_thresholds(annotator, oracle_samples, f"{len(oracle_samples)} oracle masks")
        except ValueError as exc:
            log.warning("round %d: %s", rnd, exc)
    ev = evaluate(annotator, test, thresholds, n_examples=0)
    return annotator, round_row(rnd, len(oracle_samples), version, meta.mask_source, ev, thresholds)


def round_row(rnd: int, n_oracle: int, version: str, mask_source: str, ev: Any, thresholds: Any) -> dict[str, Any]:
    """One round's CSV row: served IoU end to end (the main number) and given the true class, the CAM rows
    given the true class at the version's thresholds, the segment head's."""
    rep, masks = ev.report, ev.report["masks"]

    def iou(row: str, how: str = "given_true_class") -> str:
        return _fmt(masks[row][how]["iou"]["mean"]) if row in masks else ""

    best_member = max(ev.member_names, key=lambda m: masks[f"member {m}"]["given_true_class"]["iou"]["mean"] or 0.0)
    return {
        "round": rnd,
        "n_oracle": n_oracle,
        "version": version,
        "accuracy": _fmt(rep["accuracy"]),
        "flagged_rate": _fmt(rep["flagged_rate"]),
        "n_test_masks": rep["n_mask_images"],
        "iou_served": iou("served", "end_to_end"),
        "iou_served_given_true_class": iou("served"),
        "dice_served": _fmt(masks["served"]["end_to_end"]["dice"]["mean"]),
        "iou_mean_calibrated": iou("mean"),
        "iou_intersection_calibrated": iou("intersection"),
        "iou_best_member": iou(f"member {best_member}"),
        "best_member": best_member,
        "iou_seg_head": iou("segment head"),
        "mask_source": mask_source,
        "mask_sources": ";".join(f"{k}={v}" for k, v in sorted(rep["mask_sources"].items())),
        "thresholds": ";".join(f"{r}={thresholds.rules[r]:.2f}" for r in CAM_RULES),
        "threshold_source": thresholds.source,
        "selected": "",
        "seconds": "",
    }


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
