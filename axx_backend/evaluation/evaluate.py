"""`axx-backend evaluate`: a version on a data set folder with image labels and (optionally) masks.

What is measured (docs/METHOD.md "Evaluation"):
- classification over all images: accuracy of the served class (and of each member alone, and of the member
  training validated best: `validated_member`), macro-F1, AUROC and ECE of the ensemble mean probabilities,
  and the review flag (share flagged, accuracy on the unflagged and on the flagged);
- masks over the images whose ground truth has a mask (the positives), every row two ways:
  - **end to end, as served**: a positive that is flagged or given another class gets an empty mask (the
    annotator gets nothing to correct); the maps are those of the served class from the agreeing members;
  - **given the true class**: the maps of the true class from every member (localisation alone);
  rows: each member's own CAM mask, the `mean` and `intersection` fusions (each at its threshold; refined to
  image regions when the version refines), the segment head (when the version has one), the mask exactly as
  served, and two trivial masks: a centred box covering 25 % of the image and the whole image.

The served result and the rows come from the annotator's own `forward` and maps, so the backbones run once
per image.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..core.annotation import Annotation
from ..core.data import Sample, iter_readable, read_folder_dataset, stratified_split
from ..core.thresholds import FUSION_RULES, best_rule, best_thresholds, calibrate_members, fusion_scores, rule_map
from ..core.version_meta import VersionMeta
from ..engine.annotator import Annotator, Forward, to_size
from ..engine.uncertainty import NEAREST_IMAGE_FLAG
from . import metrics

log = logging.getLogger(__name__)

CAM_RULES = FUSION_RULES
TRIVIAL = ("centred box 25 %", "whole image")


@dataclass
class MaskThresholds:
    """Thresholds of each member's own mask and of each fusion rule, and where they come from."""

    members: dict[str, float]
    rules: dict[str, float]
    source: str
    val_iou: dict[str, float] = field(default_factory=dict)
    n_images: int = 0
    served: tuple[str, float] | None = None  # (rule, threshold) to serve, when calibrated here

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"members": self.members, "rules": self.rules, "source": self.source}
        if self.n_images:
            out.update(n_images=self.n_images, val_iou=self.val_iou)
        if self.served:
            out["served"] = {"rule": self.served[0], "threshold": self.served[1]}
        return out


@dataclass
class ImageResult:
    """One evaluated image: the served annotation, the truth, and (for a positive) every row's two masks."""

    key: str
    true: int  # index in the version's classes
    annotation: Annotation
    pred: int  # index of the served class
    gt: np.ndarray | None = None  # bool [H, W] when the data set has a mask for the image
    image: Image.Image | None = None  # kept only for example pictures
    given_true: dict[str, np.ndarray] = field(default_factory=dict)  # row -> mask given the true class
    end_to_end: dict[str, np.ndarray | None] = field(default_factory=dict)  # row -> mask as served (None: empty)
    heat: np.ndarray | None = None  # the mean map of the true class [H, W], for example pictures
    member_maps: list[np.ndarray] = field(default_factory=list)  # each member's map of the true class, [H, W]

    @property
    def flagged(self) -> bool:
        return self.annotation.flagged

    @property
    def agreeing(self) -> list[int]:
        return [i for i, m in enumerate(self.annotation.members) if m.agrees]


def gt_mask(sample: Sample, size: tuple[int, int]) -> np.ndarray | None:
    """The sample's ground-truth mask (nonzero = foreground) as bool [H, W] at `size` = (W, H) of its image."""
    mask = sample.load_mask()
    if mask is None:
        return None
    if mask.shape != (size[1], size[0]):
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
    return mask


def trivial_masks(shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """A centred box covering 25 % of the image (half of each side) and the whole image."""
    h, w = shape
    box = np.zeros(shape, bool)
    box[h // 4 : h // 4 + (h + 1) // 2, w // 4 : w // 4 + (w + 1) // 2] = True
    return {TRIVIAL[0]: box, TRIVIAL[1]: np.ones(shape, bool)}


def row_scores(
    annotator: Annotator, fwd: Forward, b: int, label: int, members: Sequence[int], thresholds: MaskThresholds
) -> dict[str, tuple[np.ndarray, float]]:
    """(score map [S, S], threshold) of every mask row for class `label`: each member's own map, the fusions
    of `members`' maps, the segment head, and the mask as served; a mask is score > threshold."""
    names = [m.name for m in annotator.ensemble.members]
    maps = annotator.refined_maps(fwd, b, label)
    rows = {f"member {name}": (m, thresholds.members[name]) for name, m in zip(names, maps, strict=True)}
    chosen = [maps[i] for i in members]
    rows.update({rule: (rule_map(chosen, rule), thresholds.rules[rule]) for rule in CAM_RULES})
    if annotator.segment_head is not None:
        if fwd.outputs[0].levels is not None:
            rows["segment head"] = (annotator.segment_score(fwd, b, label, members), annotator.settings.seg_threshold)
    if annotator.mask_source == "segments" and "segment head" in rows:
        rows["served"] = rows["segment head"]  # the same map (mask_score would compute the region features again)
    else:
        score, threshold, _ = annotator.mask_score(fwd, b, label, members)
        rows["served"] = (score, threshold)
    return rows


def _masks(rows: dict[str, tuple[np.ndarray, float]], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    return {name: to_size(score, shape) > threshold for name, (score, threshold) in rows.items()}


def _attach_masks(annotator: Annotator, fwd: Forward, b: int, r: ImageResult, thresholds: MaskThresholds) -> None:
    """Every row's two masks of a positive image (see the module docstring)."""
    assert r.gt is not None
    shape = r.gt.shape
    every = list(range(len(annotator.ensemble.members)))
    given = row_scores(annotator, fwd, b, r.true, every, thresholds)
    r.given_true = {**_masks(given, shape), **trivial_masks(shape)}
    if not r.flagged and r.pred == r.true:
        as_served = _masks(row_scores(annotator, fwd, b, r.pred, r.agreeing, thresholds), shape)
        as_served["served"] = r.annotation.mask  # exactly what was served
    else:
        # flagged, or given another class: no mask under the true class, every row included (a mask served
        # under another positive class counts as none, as in the plain reference's end to end)
        as_served = dict.fromkeys(given)
    r.end_to_end = {**as_served, **trivial_masks(shape)}
    if r.image is not None:
        r.heat = to_size(given["mean"][0], shape)
        r.member_maps = [to_size(given[f"member {m.name}"][0], shape) for m in annotator.ensemble.members]


def iter_results(
    annotator: Annotator,
    samples: Sequence[Sample],
    thresholds: MaskThresholds | None = None,
    keep_images: set[str] | None = None,
    skipped: list[str] | None = None,
) -> Iterator[ImageResult]:
    """Annotate `samples` batch by batch (one forward each) and attach the truth and, with `thresholds`,
    every mask row of the positives."""
    index = {c: i for i, c in enumerate(annotator.classes)}
    missing = sorted({s.label for s in samples if s.label not in index})
    if missing:
        raise ValueError(f"classes {missing} of the data set are not classes of the version {annotator.classes}")
    with_levels = annotator.segment_head is not None
    for chunk in _chunks(annotator, samples, skipped):
        fwd = annotator.forward([img for _, img in chunk], levels=with_levels)
        for b, ((sample, img), ann) in enumerate(zip(chunk, annotator.conclude(fwd), strict=True)):
            keep = keep_images is not None and sample.key in keep_images
            r = ImageResult(sample.key, index[sample.label], ann, index[ann.label], gt_mask(sample, img.size))
            r.image = img if keep else None
            if thresholds is not None and r.gt is not None and annotator.classes[r.true] not in annotator.negative:
                _attach_masks(annotator, fwd, b, r, thresholds)
            yield r


def _chunks(
    annotator: Annotator, samples: Sequence[Sample], skipped: list[str] | None
) -> Iterator[list[tuple[Sample, Image.Image]]]:
    batch = max(1, annotator.settings.batch_size)
    for start in range(0, len(samples), batch):
        chunk = list(iter_readable(samples[start : start + batch], skipped))
        if chunk:
            yield chunk


def serving_with(annotator: Annotator, thresholds: MaskThresholds) -> Annotator:
    """A copy of `annotator` whose CAM masks use the calibrated rule (the best on the calibration images)
    at its calibrated threshold: what the version would serve had it stored these thresholds. Unchanged
    when `thresholds` were not calibrated here or the version serves the segment head's masks."""
    if thresholds.served is None or annotator.mask_source != "cam":
        return annotator
    rule, threshold = thresholds.served
    served = copy.copy(annotator)
    served.settings = annotator.settings.replace(mask_fusion=rule, cam_threshold=threshold)
    return served


def version_thresholds(annotator: Annotator, meta: VersionMeta) -> MaskThresholds:
    """The mask thresholds a version stores: `fusion_thresholds` / `member_cam_thresholds` when it has
    them; else its `cam_threshold` for its own `mask_fusion` rule, and the default for the rest."""
    stored = meta.thresholds
    rules = {k: float(v) for k, v in stored.fusion_thresholds.items()}
    members = {k: float(v) for k, v in stored.member_cam_thresholds.items()}
    default = float(annotator.settings.cam_threshold)
    notes = ["version"] if rules else []
    missing = [r for r in CAM_RULES if r not in rules] + (["members"] if not members else [])
    if missing:
        notes.append(f"default {default:g} for {', '.join(missing)}")
    return MaskThresholds(
        {m.name: members.get(m.name, default) for m in annotator.ensemble.members},
        {rule: rules.get(rule, default) for rule in CAM_RULES},
        "; ".join(notes),
    )


def calibrate_thresholds(annotator: Annotator, samples: Sequence[Sample], source: str) -> MaskThresholds:
    """Thresholds chosen on `samples` (validation images with masks) that the version serves correctly:
    per member, and per fusion rule of the agreeing members' maps (what serving would fuse)."""
    names = [m.name for m in annotator.ensemble.members]
    fused: list[list[np.ndarray]] = []
    own: dict[str, list[np.ndarray]] = {name: [] for name in names}
    gts: list[np.ndarray] = []
    with_masks = [s for s in samples if s.has_mask]
    for chunk in _chunks(annotator, with_masks, None):
        fwd = annotator.forward([img for _, img in chunk])
        for b, ((sample, _img), ann) in enumerate(zip(chunk, annotator.conclude(fwd), strict=True)):
            if ann.flagged or ann.label != sample.label or ann.label in annotator.negative:
                continue
            maps = annotator.refined_maps(fwd, b, annotator.classes.index(ann.label))
            gt = gt_mask(sample, (annotator.map_side, annotator.map_side))
            fused.append([maps[i] for i, m in enumerate(ann.members) if m.agrees])
            gts.append(gt)
            for name, m in zip(names, maps, strict=True):
                own[name].append(m)
    if not gts:
        raise ValueError(f"no correctly served image with a mask in {source} to calibrate the mask thresholds on")
    scores = fusion_scores(fused, gts, CAM_RULES)
    rule, threshold, _ = best_rule(scores)
    val_iou = {r: round(float(s.max()), 4) for r, s in scores.items()}
    return MaskThresholds(
        calibrate_members(own, gts), best_thresholds(scores), source, val_iou, len(gts), (rule, threshold)
    )


def validation_split_of(
    dataset_dir: Path, val_fraction: float, seed: int, meta: VersionMeta | None = None
) -> list[Sample]:
    """The validation samples `train` held out of `dataset_dir`: the version's recorded `val_keys` when it
    has them; otherwise the split recomputed the way the trainer makes it (by class and "has a mask")."""
    samples, _ = read_folder_dataset(dataset_dir)
    keys = meta.training.val_keys if meta is not None else ()
    if keys:
        wanted = set(keys)
        return [s for s in samples if s.key in wanted]
    _, val_idx = stratified_split([f"{s.label}|{s.has_mask}" for s in samples], val_fraction, seed)
    return [samples[i] for i in val_idx]


@dataclass
class Evaluation:
    report: dict[str, Any]
    confidence: np.ndarray  # ensemble confidence (the task score) per image
    correct: np.ndarray  # served class == true class, per image
    flagged: np.ndarray
    top_probability: np.ndarray  # max ensemble mean probability (for the reliability diagram)
    top_correct: np.ndarray  # argmax of the ensemble mean == true class
    examples: list[ImageResult]
    member_names: list[str]
    thresholds: MaskThresholds
    # one row per image: key, true and served class, flagged, each member's class, served IoU end to end (None
    # without a mask), for what the report cannot say per image (e.g. intervals over objects, benchmarks/quality.py)
    per_image: list[dict[str, Any]] = field(default_factory=list)


def _nan_to_none(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


class _Tally:
    """What `evaluate` accumulates over the images."""

    def __init__(self, classes: list[str], names: list[str]) -> None:
        self.classes, self.names = classes, names
        self.keys: list[str] = []
        self.served_iou: list[float | None] = []  # the served mask's IoU end to end; None: no mask to score
        self.y_true: list[int] = []
        self.y_pred: list[int] = []
        self.flagged: list[bool] = []
        self.flagged_by_neighbours = 0  # flags of the nearest-image check (engine/neighbours.py)
        self.conf: list[float] = []
        self.probs: list[list[float]] = []
        self.member_pred: list[list[int]] = []
        self.mask_sources: dict[str, int] = {}
        self.given: dict[str, metrics.MaskScore] = {}
        self.served: dict[str, metrics.MaskScore] = {}
        self.n_masks = self.n_masks_flagged = 0

    def add(self, r: ImageResult) -> None:
        ann = r.annotation
        self.keys.append(r.key)
        self.served_iou.append(None)
        self.y_true.append(r.true)
        self.y_pred.append(r.pred)
        self.flagged.append(ann.flagged)
        self.flagged_by_neighbours += int(ann.flagged and ann.reason.startswith(NEAREST_IMAGE_FLAG))
        self.conf.append(ann.score)
        self.probs.append([ann.probs[c] for c in self.classes])
        self.member_pred.append([self.classes.index(m.label) for m in ann.members])
        if ann.mask_source:
            self.mask_sources[ann.mask_source] = self.mask_sources.get(ann.mask_source, 0) + 1
        if r.gt is None or not r.given_true:
            return
        self.n_masks += 1
        self.n_masks_flagged += int(ann.flagged)
        for row, mask in r.given_true.items():
            self.given.setdefault(row, metrics.MaskScore()).add(mask, r.gt)
        for row, mask in r.end_to_end.items():
            self.served.setdefault(row, metrics.MaskScore()).add(mask, r.gt)
        if "served" in r.end_to_end:
            self.served_iou[-1] = self.served["served"].ious[-1]

    def per_image(self) -> list[dict[str, Any]]:
        rows = zip(self.keys, self.y_true, self.y_pred, self.flagged, self.member_pred, self.served_iou, strict=True)
        return [
            {"key": k, "true": t, "pred": p, "flagged": f, "member_pred": m, "served_iou": v}
            for k, t, p, f, m, v in rows
        ]


def evaluate(
    annotator: Annotator, samples: Sequence[Sample], thresholds: MaskThresholds, n_examples: int = 6, n_bins: int = 15
) -> Evaluation:
    """Run the served pipeline on `samples` and measure it (see the module docstring)."""
    names = [m.name for m in annotator.ensemble.members]
    keep = _example_keys(samples, n_examples)
    tally = _Tally(annotator.classes, names)
    examples: list[ImageResult] = []
    skipped: list[str] = []
    for r in iter_results(annotator, samples, thresholds, keep, skipped):
        tally.add(r)
        if r.image is not None and r.given_true and len(examples) < n_examples:
            examples.append(r)
    return _evaluation(annotator, tally, thresholds, examples, skipped, n_bins)


def _example_keys(samples: Sequence[Sample], n_examples: int) -> set[str]:
    """Example candidates spread evenly over the images with masks (and so over the classes)."""
    with_masks = [s for s in samples if s.has_mask]
    if not with_masks or not n_examples:
        return set()
    picks = np.unique(np.linspace(0, len(with_masks) - 1, min(len(with_masks), 3 * n_examples)).round().astype(int))
    return {with_masks[i].key for i in picks}


def _evaluation(
    annotator: Annotator,
    tally: _Tally,
    thresholds: MaskThresholds,
    examples: list[ImageResult],
    skipped: list[str],
    n_bins: int,
) -> Evaluation:
    t, p = np.array(tally.y_true), np.array(tally.y_pred)
    f = np.array(tally.flagged, dtype=bool)
    conf = np.array(tally.conf, dtype=np.float64)
    probs = np.array(tally.probs, dtype=np.float64).reshape(len(t), len(annotator.classes))
    correct = t == p
    top_p = probs.max(axis=1) if len(t) else np.zeros(0)
    top_ok = probs.argmax(axis=1) == t if len(t) else np.zeros(0, bool)
    report = _classification_report(annotator, tally, t, p, f, conf, probs, n_bins)
    report.update(_mask_report(annotator, tally, thresholds))
    report["skipped"] = skipped
    return Evaluation(report, conf, correct, f, top_p, top_ok, examples, tally.names, thresholds, tally.per_image())


def _classification_report(
    annotator: Annotator,
    tally: _Tally,
    t: np.ndarray,
    p: np.ndarray,
    f: np.ndarray,
    conf: np.ndarray,
    probs: np.ndarray,
    n_bins: int,
) -> dict[str, Any]:
    correct = t == p
    rc = metrics.risk_coverage_curve(conf, correct)
    rc_points = []
    for coverage in np.linspace(0.1, 1.0, 10):
        k = max(1, int(round(coverage * len(t)))) if len(t) else 0
        rc_points.append(
            {"coverage": round(float(coverage), 2), "accuracy": float(rc["accuracy"][k - 1]) if k else None}
        )
    member_pred = np.array(tally.member_pred).reshape(len(t), len(tally.names))
    top_p = probs.max(axis=1) if len(t) else np.zeros(0)
    top_ok = probs.argmax(axis=1) == t if len(t) else np.zeros(0, bool)
    return {
        "n_images": int(len(t)),
        "classes": annotator.classes,
        "version": annotator.version,
        "accuracy": _nan_to_none(metrics.accuracy(t, p)),
        "member_accuracy": {n: _nan_to_none(metrics.accuracy(t, member_pred[:, i])) for i, n in enumerate(tally.names)},
        "macro_f1": _nan_to_none(metrics.macro_f1(t, p)),
        "auroc": _nan_to_none(metrics.auroc(probs, t)) if len(t) else None,
        "ece": _nan_to_none(metrics.expected_calibration_error(top_p, top_ok, n_bins)),
        "flagged_rate": float(f.mean()) if len(t) else None,
        "n_flagged": int(f.sum()),
        "n_flagged_by_neighbours": tally.flagged_by_neighbours,
        "flagged_by_class": metrics.flagged_by_class(t, f, annotator.classes),
        "selective_accuracy": float(correct[~f].mean()) if (~f).any() else None,
        "flagged_accuracy": float(correct[f].mean()) if f.any() else None,
        "uncertainty_threshold": float(annotator.settings.uncertainty_threshold),
        "aurc": _nan_to_none(rc["aurc"]),
        "risk_coverage": rc_points,
        "reliability": [
            {k: (_nan_to_none(v) if isinstance(v, float) else v) for k, v in b.items()}
            for b in metrics.reliability_bins(top_p, top_ok, n_bins)
        ],
    }


def _mask_report(annotator: Annotator, tally: _Tally, thresholds: MaskThresholds) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for row, given in tally.given.items():
        served = tally.served[row].summary()
        threshold = _threshold(annotator, thresholds, row)
        rows[row] = {"given_true_class": given.summary(), "end_to_end": served, "threshold": threshold}
    s = annotator.settings
    rule = "segments" if annotator.mask_source == "segments" else f"cam:{s.mask_fusion}"
    rule += "+superpixels" if annotator.refines and rule != "segments" else ""
    return {
        "masks": rows,
        "served_rule": rule,
        "n_mask_images": tally.n_masks,
        "n_mask_images_flagged": tally.n_masks_flagged,
        "mask_sources": tally.mask_sources,
        "mask_thresholds": thresholds.to_dict(),
    }


def _threshold(annotator: Annotator, thresholds: MaskThresholds, row: str) -> float | None:
    s = annotator.settings
    if row.startswith("member "):
        return thresholds.members.get(row[len("member ") :])
    if row in thresholds.rules:
        return thresholds.rules[row]
    if row == "segment head" or (row == "served" and annotator.mask_source == "segments"):
        return float(s.seg_threshold)
    if row == "served":
        return float(s.cam_threshold)
    return None


def validated_member(meta: VersionMeta, member_accuracy: dict[str, float | None]) -> dict[str, Any] | None:
    """The member one would serve alone, chosen as training can choose it (the highest accuracy on its
    out-of-fold predictions, ties to the first in the version's order), with its accuracy on these images.
    The best member *on these images* is the other comparator: chosen on the images it is scored on, it is
    biased upwards (three members, each with a standard error of 1.4-2.8 points on 160-200 images). None for a
    version whose training recorded no member accuracies."""
    recorded = meta.metrics.get("members") or {}
    held_out = {m.name: recorded.get(m.name, {}).get("oof_accuracy") for m in meta.members}
    candidates = [name for name, acc in held_out.items() if acc is not None]
    if not candidates:
        return None
    name = max(candidates, key=held_out.__getitem__)  # max keeps the first of equals: the version's order
    return {"name": name, "held_out_accuracy": float(held_out[name]), "accuracy": member_accuracy.get(name)}


def evaluate_folder(
    dataset_dir: str | Path,
    annotator: Annotator,
    meta: VersionMeta,
    calibrate_on: str | Path | None = None,
    n_examples: int = 6,
) -> Evaluation:
    """`evaluate` on a dataset folder; mask thresholds from the version, or chosen on `calibrate_on`
    (an override: then the served CAM mask uses the rule and threshold chosen there too).

    When `calibrate_on` is the folder the version was trained on, only its validation split is used
    (the images whose labels fitted the heads are not used to choose thresholds).
    """
    samples, _ = read_folder_dataset(dataset_dir)
    if calibrate_on is None:
        served, thresholds = annotator, version_thresholds(annotator, meta)
    else:
        thresholds = thresholds_calibrated_on(Path(calibrate_on), dataset_dir, annotator, meta)
        served = serving_with(annotator, thresholds)
    ev = evaluate(served, samples, thresholds, n_examples)
    ev.report["validated_member"] = validated_member(meta, ev.report["member_accuracy"])
    return ev


def thresholds_calibrated_on(
    cal_dir: Path, dataset_dir: str | Path, annotator: Annotator, meta: VersionMeta
) -> MaskThresholds:
    """`evaluate_folder`'s `calibrate_on` thresholds: on the version's validation split when `cal_dir` is its
    training folder, else on all of `cal_dir`; never on the evaluated folder."""
    if Path(dataset_dir).resolve() == cal_dir.resolve():
        raise ValueError("--calibrate-on must not be the evaluated data set: choose thresholds on other images")
    source = meta.training.source
    if source and Path(source).resolve() == cal_dir.resolve():
        s = annotator.settings
        cal_samples = validation_split_of(cal_dir, s.val_fraction, s.seed, meta)
        label = f"validation split of {cal_dir}"
    else:
        cal_samples, _ = read_folder_dataset(cal_dir)
        label = str(cal_dir)
        log.info("%s is not the version's training folder (%s): calibrating on all of it", cal_dir, source)
    return calibrate_thresholds(annotator, cal_samples, f"calibrated on {label}")


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f} %" if pct else f"{value:.3f}"


def _by_neighbours(report: dict[str, Any]) -> str:
    n = report.get("n_flagged_by_neighbours")
    return f"; {n} by the nearest-image check" if n else ""


def format_table(report: dict[str, Any], title: str = "") -> str:
    """The human-readable tables `evaluate` prints."""
    lines = [title] if title else []
    n, nf = report["n_images"], report["n_flagged"]
    members = ", ".join(f"{k} {_fmt(v)}" for k, v in report["member_accuracy"].items())
    by_class = ", ".join(f"{c} {v['flagged']} of {v['n']}" for c, v in report["flagged_by_class"].items())
    lines += [
        f"version {report['version']}   {n} images   classes: {', '.join(report['classes'])}",
        "",
        "| classification | value |",
        "|---|---|",
        f"| accuracy | {_fmt(report['accuracy'])} |",
        f"| members alone | {members} |",
        *_validated_row(report.get("validated_member")),
        f"| macro-F1 | {_fmt(report['macro_f1'])} |",
        f"| AUROC | {_fmt(report['auroc'])} |",
        f"| ECE (15 bins) | {_fmt(report['ece'])} |",
        f"| flagged for review | {_fmt(report['flagged_rate'], True)} ({nf} of {n}{_by_neighbours(report)}) |",
        f"| flagged, by true class | {by_class} |",
        f"| selective accuracy (unflagged) | {_fmt(report['selective_accuracy'])} ({n - nf} images) |",
        f"| accuracy on flagged | {_fmt(report['flagged_accuracy'])} ({nf} images) |",
        "",
    ]
    return "\n".join(lines + mask_table(report))


def _validated_row(chosen: dict[str, Any] | None) -> list[str]:
    if not chosen:
        return []
    held_out = f"{chosen['held_out_accuracy']:.3f}"
    return [f"| member validated best (held-out accuracy {held_out}) | {chosen['name']} {_fmt(chosen['accuracy'])} |"]


def mask_table(report: dict[str, Any]) -> list[str]:
    th = report["mask_thresholds"]
    lines = [
        f"masks: {report['n_mask_images']} images with a ground-truth mask ({report['n_mask_images_flagged']} "
        f"flagged); served: {report['served_rule']}; thresholds: {th['source']}",
        "",
        "| mask | threshold | IoU end to end (as served) | IoU given the true class | Dice given the true class |",
        "|---|---|---|---|---|",
    ]
    for key, row in report["masks"].items():
        label = f"**{key} ({report['served_rule']})**" if key == "served" else key
        threshold = row.get("threshold")
        lines.append(
            f"| {label} | {'-' if threshold is None else f'{threshold:.2f}'} | "
            f"{_fmt(row['end_to_end']['iou']['mean'])} | {_fmt(row['given_true_class']['iou']['mean'])} | "
            f"{_fmt(row['given_true_class']['dice']['mean'])} |"
        )
    return lines
