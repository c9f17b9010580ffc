"""`axx-backend evaluate`: a version on a data set folder with image labels and (optionally) masks.

What is measured (METHOD.md "Evaluation"):
- classification over all images: accuracy of the served class, macro-F1, AUROC and ECE of the ensemble
  mean probabilities, and the review flag (share flagged, accuracy on the unflagged and on the flagged);
- masks over the images whose ground truth has a mask and that are served (not flagged), every rule on
  the same images: each member's own CAM mask, the `intersection` and `mean` fusions of the agreeing
  members' CAMs (each at its calibrated threshold), the mask exactly as served (`ensemble`), and, when
  the version has segmentation heads, their fused mask (`seg_head`, computed even when the version
  serves CAM masks). CAMs are of the served class; when the served class is negative every rule's mask
  is empty (a classification miss costs every rule alike).

The served result comes from `Annotator.annotate` itself; the per-member maps reuse the tensors of the
same forward (recorded while it runs), so the backbones run once per image.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..core.annotation import Annotation
from ..core.data import Sample, read_folder_dataset, stratified_split
from ..core.images import ImageError
from ..core.settings import Settings
from ..core.thresholds import FUSION_RULES, best_rule, best_thresholds, calibrate_members, fusion_scores
from ..core.version_meta import VersionMeta
from ..engine.annotator import Annotator, seg_map
from ..engine.ensemble import MemberOutput
from ..engine.masks import fuse_maps
from . import metrics

log = logging.getLogger(__name__)

CAM_RULES = FUSION_RULES


@dataclass
class ImageResult:
    """One evaluated image: the served annotation, the truth, and (when computed) the member maps."""

    key: str
    true: int  # index in the version's classes
    annotation: Annotation
    pred: int  # index of the served class
    image: Image.Image | None = None  # kept only for example pictures
    gt: np.ndarray | None = None  # bool [H, W] when the data set has a mask for the image
    maps: list[np.ndarray] | None = None  # every member's normalised CAM of `map_class`, [H, W]
    seg: list[np.ndarray] | None = None  # every member's segmentation-head probability, [H, W]
    map_class: int | None = None

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


def has_seg_heads(annotator: Annotator) -> bool:
    return all(getattr(m, "seg_head", None) is not None for m in annotator.ensemble.members)


def member_maps(
    annotator: Annotator,
    images: Sequence[Image.Image],
    classes: Sequence[int],
    forward: tuple[torch.Tensor, list[Any]] | None = None,
) -> list[tuple[list[np.ndarray], list[np.ndarray] | None]]:
    """Per image b: (every member's CAM of `classes[b]`, every member's seg-head probability or None),
    each at the image's size.

    `forward`: (preprocessed batch, `forward_mc` outputs) of exactly these images when already
    computed; otherwise one more forward runs here.
    """
    if not images:
        return []
    if forward is None:
        x = annotator.preprocess(images)
        generator = torch.Generator().manual_seed(annotator.settings.seed)
        outputs = annotator.ensemble.forward_mc(x, 1, generator, annotator.settings.precision)
    else:
        x, outputs = forward
    seg = has_seg_heads(annotator)
    members = list(annotator.ensemble.members)
    result = []
    for b, img in enumerate(images):
        size = (img.height, img.width)
        cams, segs = [], []
        for member, out in zip(members, outputs, strict=True):
            cams.append(annotator.cam(member, out.features[b : b + 1], x[b : b + 1], int(classes[b]), size))
            if seg:
                segs.append(seg_map(member.seg_head, out.seg_features[b : b + 1], size))
        result.append((cams, segs if seg else None))
    return result


@contextlib.contextmanager
def capture_forward(annotator: Annotator) -> Iterator[list[tuple[torch.Tensor, list[Any]]]]:
    """Record the (input, outputs) of every `ensemble.forward_mc` call made while annotating, so the
    member maps reuse the served forward instead of running the backbones a second time."""
    ensemble = annotator.ensemble
    original = ensemble.forward_mc
    calls: list[tuple[torch.Tensor, list[Any]]] = []

    def spy(images: torch.Tensor, *args: Any, **kwargs: Any) -> list[Any]:
        outputs = original(images, *args, **kwargs)
        calls.append((images, outputs))
        return outputs

    ensemble.forward_mc = spy  # an instance attribute shadows the method; removed below
    try:
        yield calls
    finally:
        del ensemble.forward_mc


def iter_results(
    annotator: Annotator,
    samples: Sequence[Sample],
    maps_for: str = "served",
    keep_images: set[str] | None = None,
    skipped: list[str] | None = None,
) -> Iterator[ImageResult]:
    """Annotate `samples` batch by batch and attach ground truth and member maps.

    `maps_for`: "served" computes every member's map of the served class for unflagged images with a
    ground-truth mask whose served class is positive; "true" computes the maps of the true class for
    every image with a mask (active-learning selection); "none" computes none.
    """
    index = {c: i for i, c in enumerate(annotator.classes)}
    missing = sorted({s.label for s in samples if s.label not in index})
    if missing:
        raise ValueError(f"classes {missing} of the data set are not classes of the version {annotator.classes}")
    batch = max(1, annotator.settings.batch_size)
    for start in range(0, len(samples), batch):
        chunk: list[tuple[Sample, Image.Image]] = []
        for sample in samples[start : start + batch]:
            try:
                chunk.append((sample, sample.load()))
            except (ImageError, OSError) as exc:
                log.warning("skipping %s", exc)
                if skipped is not None:
                    skipped.append(f"{sample.key}: {exc}")
        if not chunk:
            continue
        with capture_forward(annotator) as calls:
            annotations = annotator.annotate([img for _, img in chunk])
        # Reuse the served forward when it was one call on exactly this chunk (batch size permitting).
        served_forward = calls[0] if len(calls) == 1 and calls[0][0].shape[0] == len(chunk) else None
        results = []
        for (sample, img), ann in zip(chunk, annotations, strict=True):
            gt = gt_mask(sample, img.size)
            keep = keep_images is not None and sample.key in keep_images
            results.append(
                ImageResult(sample.key, index[sample.label], ann, index[ann.label], img if keep else None, gt)
            )
        wanted = []
        for j, r in enumerate(results):
            if r.gt is None or maps_for == "none":
                continue
            if maps_for == "true":
                r.map_class = r.true
            elif not r.flagged and annotator.classes[r.pred] not in annotator.negative:
                r.map_class = r.pred
            if r.map_class is not None:
                wanted.append(j)
        if wanted:
            images = [chunk[j][1] for j in wanted]
            forward = None
            if served_forward is not None:
                x, outputs = served_forward
                sel = torch.tensor(wanted, device=x.device)
                forward = (x[sel], [_select(o, sel) for o in outputs])
            maps = member_maps(annotator, images, [results[j].map_class for j in wanted], forward)
            for j, (cams, segs) in zip(wanted, maps, strict=True):
                results[j].maps, results[j].seg = cams, segs
        yield from results


def _select(output: MemberOutput, sel: torch.Tensor) -> MemberOutput:
    """The images `sel` of a member's forward (only the maps are read)."""
    seg = None if output.seg_features is None else output.seg_features[sel]
    return dataclasses.replace(output, features=output.features[sel], seg_features=seg)


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


def serving_with(annotator: Annotator, thresholds: MaskThresholds) -> Annotator:
    """A copy of `annotator` whose CAM masks use the calibrated rule (the best on the calibration images)
    at its calibrated threshold: what the version would serve had it stored these thresholds. Unchanged
    when `thresholds` were not calibrated here or the version serves segmentation-head masks."""
    if thresholds.served is None or annotator.mask_source != "cam":
        return annotator
    rule, threshold = thresholds.served
    served = copy.copy(annotator)
    served.settings = annotator.settings.replace(mask_fusion=rule, cam_threshold=threshold)
    return served


def version_thresholds(annotator: Annotator, meta: VersionMeta) -> MaskThresholds:
    """The mask thresholds a version stores: `fusion_thresholds` / `member_cam_thresholds` when it has
    them; else its calibrated `cam_threshold` for its own `mask_fusion` rule, and the default for the rest."""
    stored = meta.thresholds
    rules = {k: float(v) for k, v in stored.fusion_thresholds.items()}
    members = {k: float(v) for k, v in stored.member_cam_thresholds.items()}
    default = float(Settings().cam_threshold)
    calibrated = (meta.metrics.get("pixels") or {}).get("cam_calibration")
    notes = []
    if rules:
        notes.append("version")
    elif calibrated and stored.mask_fusion in CAM_RULES:
        rules[stored.mask_fusion] = float(stored.cam_threshold)
        notes.append(f"version ({stored.mask_fusion} only)")
    missing = [r for r in CAM_RULES if r not in rules] + (["members"] if not members else [])
    if missing:
        notes.append(f"default {default:g} for {', '.join(missing)}")
    return MaskThresholds(
        {m.name: members.get(m.name, default) for m in annotator.ensemble.members},
        {rule: rules.get(rule, default) for rule in CAM_RULES},
        "; ".join(notes),
    )


def _calibration_maps(
    annotator: Annotator, samples: Sequence[Sample]
) -> tuple[list[list[np.ndarray]], dict[str, list[np.ndarray]], list[np.ndarray]]:
    """(agreeing members' maps per image, each member's maps, ground truths) of the images with a mask
    that the version serves correctly (unflagged, the true positive class): the maps serving would fuse."""
    fused: list[list[np.ndarray]] = []
    own: dict[str, list[np.ndarray]] = {m.name: [] for m in annotator.ensemble.members}
    gts: list[np.ndarray] = []
    for r in iter_results(annotator, [s for s in samples if s.has_mask]):
        if r.maps is None or r.pred != r.true or r.gt is None:
            continue
        fused.append([r.maps[i] for i in r.agreeing])
        gts.append(r.gt)
        for name, m in zip(own, r.maps, strict=True):
            own[name].append(m)
    return fused, own, gts


def calibrate_thresholds(annotator: Annotator, samples: Sequence[Sample], source: str) -> MaskThresholds:
    """Thresholds chosen on `samples` (validation images with masks): per member and per fusion rule."""
    fused, own, gts = _calibration_maps(annotator, samples)
    if not gts:
        raise ValueError(f"no correctly served image with a mask in {source} to calibrate the mask thresholds on")
    scores = fusion_scores(fused, gts, CAM_RULES)
    rule, threshold, _ = best_rule(scores)
    return MaskThresholds(
        calibrate_members(own, gts),
        best_thresholds(scores),
        source,
        {rule: round(float(s.max()), 4) for rule, s in scores.items()},
        len(gts),
        (rule, threshold),
    )


def validation_split_of(
    dataset_dir: Path, val_fraction: float, seed: int, meta: VersionMeta | None = None
) -> list[Sample]:
    """The validation samples `train` held out of `dataset_dir`.

    The version's recorded `training.val_keys` when it has them; otherwise the split recomputed the way
    the trainer makes it (stratified by class and by "has a mask", seeded).
    """
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


def _nan_to_none(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def evaluate(
    annotator: Annotator,
    samples: Sequence[Sample],
    thresholds: MaskThresholds,
    n_examples: int = 6,
    n_bins: int = 15,
) -> Evaluation:
    """Run the served pipeline on `samples` and measure it (see the module docstring)."""
    classes = annotator.classes
    names = [m.name for m in annotator.ensemble.members]
    with_masks = [s for s in samples if s.has_mask]
    # Example candidates spread evenly over the images with masks (and so over the classes).
    picks = np.unique(np.linspace(0, len(with_masks) - 1, min(len(with_masks), 3 * n_examples)).round().astype(int))
    keep = {with_masks[i].key for i in picks} if with_masks else set()

    scores = {key: metrics.MaskScore() for key in [*names, *CAM_RULES, "ensemble", "seg_head"]}
    served_all = metrics.MaskScore()
    y_true, y_pred, flagged, conf, probs = [], [], [], [], []
    n_masks, n_masks_flagged, masks_on_negative, n_negative = 0, 0, 0, 0
    mask_sources: dict[str, int] = {}
    examples: list[ImageResult] = []
    skipped: list[str] = []
    for r in iter_results(annotator, samples, "served", keep, skipped):
        ann = r.annotation
        y_true.append(r.true)
        y_pred.append(r.pred)
        flagged.append(ann.flagged)
        conf.append(ann.score)
        probs.append([ann.probs[c] for c in classes])
        if ann.mask_source:
            mask_sources[ann.mask_source] = mask_sources.get(ann.mask_source, 0) + 1
        if r.gt is None:
            if classes[r.true] in annotator.negative:
                n_negative += 1
                masks_on_negative += int(ann.mask_area > 0)
            continue
        n_masks += 1
        served_all.add(ann.mask, r.gt)
        if ann.flagged:
            n_masks_flagged += 1
            continue
        scores["ensemble"].add(ann.mask, r.gt)
        if r.seg is not None:
            agreeing_seg = [r.seg[i] for i in r.agreeing]
            scores["seg_head"].add(fuse_maps(agreeing_seg, "mean", annotator.settings.seg_threshold)[0], r.gt)
        elif r.maps is None and has_seg_heads(annotator):
            scores["seg_head"].add(None, r.gt)
        if r.maps is None:  # served class is negative: no rule gives a mask
            for key in [*names, *CAM_RULES]:
                scores[key].add(None, r.gt)
        else:
            for name, m in zip(names, r.maps, strict=True):
                scores[name].add(m > thresholds.members[name], r.gt)
            agreeing = [r.maps[i] for i in r.agreeing]
            for rule in CAM_RULES:
                scores[rule].add(fuse_maps(agreeing, rule, thresholds.rules[rule])[0], r.gt)
        if r.image is not None and r.maps is not None and len(examples) < n_examples:
            examples.append(r)
        else:
            r.image = None

    t = np.array(y_true)
    p = np.array(y_pred)
    f = np.array(flagged, dtype=bool)
    conf_arr = np.array(conf, dtype=np.float64)
    probs_arr = np.array(probs, dtype=np.float64).reshape(len(t), len(classes))
    correct = t == p
    top_p = probs_arr.max(axis=1) if len(t) else np.zeros(0)
    top_ok = probs_arr.argmax(axis=1) == t if len(t) else np.zeros(0, bool)
    rc = metrics.risk_coverage_curve(conf_arr, correct)
    rc_points = []
    for coverage in np.linspace(0.1, 1.0, 10):
        k = max(1, int(round(coverage * len(t)))) if len(t) else 0
        rc_points.append(
            {"coverage": round(float(coverage), 2), "accuracy": float(rc["accuracy"][k - 1]) if k else None}
        )

    summaries = {key: s.summary() for key, s in scores.items()}
    if not scores["seg_head"].n:
        summaries.pop("seg_head")
    iou = {key: s["iou"] for key, s in summaries.items()}
    dice = {key: s["dice"] for key, s in summaries.items()}
    for key in names:
        iou[key]["threshold"] = thresholds.members[key]
    for rule in CAM_RULES:
        iou[rule]["threshold"] = thresholds.rules[rule]
    if annotator.mask_source == "seg_head":
        iou["ensemble"]["threshold"] = float(annotator.settings.seg_threshold)
        iou["ensemble"]["rule"] = "seg_head"
    else:
        iou["ensemble"]["threshold"] = float(annotator.settings.cam_threshold)
        iou["ensemble"]["rule"] = f"cam:{annotator.settings.mask_fusion}"
    if "seg_head" in iou:
        iou["seg_head"]["threshold"] = float(annotator.settings.seg_threshold)

    report: dict[str, Any] = {
        "n_images": int(len(t)),
        "classes": classes,
        "version": annotator.version,
        "accuracy": _nan_to_none(metrics.accuracy(t, p)),
        "macro_f1": _nan_to_none(metrics.macro_f1(t, p)),
        "auroc": _nan_to_none(metrics.auroc(probs_arr, t)) if len(t) else None,
        "ece": _nan_to_none(metrics.expected_calibration_error(top_p, top_ok, n_bins)),
        "flagged_rate": float(f.mean()) if len(t) else None,
        "n_flagged": int(f.sum()),
        "selective_accuracy": float(correct[~f].mean()) if (~f).any() else None,
        "flagged_accuracy": float(correct[f].mean()) if f.any() else None,
        "uncertainty_threshold": float(annotator.settings.uncertainty_threshold),
        "aurc": _nan_to_none(rc["aurc"]),
        "risk_coverage": rc_points,
        "reliability": [
            {k: (_nan_to_none(v) if isinstance(v, float) else v) for k, v in b.items()}
            for b in metrics.reliability_bins(top_p, top_ok, n_bins)
        ],
        "iou": iou,
        "dice": dice,
        "n_mask_images": n_masks,
        "n_mask_images_flagged": n_masks_flagged,
        "served_including_flagged": {
            "iou": served_all.summary()["iou"]["mean"],
            "dice": served_all.summary()["dice"]["mean"],
            "n": served_all.n,
        },
        "masks_on_negative_images": {"n_images": n_negative, "with_mask": masks_on_negative},
        "mask_sources": mask_sources,
        "mask_thresholds": thresholds.to_dict(),
        "skipped": skipped,
    }
    return Evaluation(report, conf_arr, correct, f, top_p, top_ok, examples, names, thresholds)


def evaluate_folder(
    dataset_dir: str | os.PathLike[str],
    annotator: Annotator,
    meta: VersionMeta,
    calibrate_on: str | os.PathLike[str] | None = None,
    n_examples: int = 6,
) -> Evaluation:
    """`evaluate` on a dataset folder; mask thresholds from the version, or chosen on `calibrate_on`
    (an override: then the served CAM mask uses the rule and threshold chosen there too).

    When `calibrate_on` is the folder the version was trained on, only its validation split is used
    (the images whose labels fitted the heads are not used to choose thresholds).
    """
    samples, _ = read_folder_dataset(dataset_dir)
    if calibrate_on is not None:
        cal_dir = Path(calibrate_on)
        source = meta.training.source
        if source and Path(source).resolve() == cal_dir.resolve():
            s = annotator.settings
            cal_samples = validation_split_of(cal_dir, s.val_fraction, s.seed, meta)
            label = f"validation split of {cal_dir}"
        else:
            cal_samples, _ = read_folder_dataset(cal_dir)
            label = str(cal_dir)
            log.info("%s is not the version's training folder (%s): calibrating on all of it", cal_dir, source)
        if Path(dataset_dir).resolve() == cal_dir.resolve():
            raise ValueError("--calibrate-on must not be the evaluated data set: choose thresholds on other images")
        thresholds = calibrate_thresholds(annotator, cal_samples, f"calibrated on {label}")
        annotator = serving_with(annotator, thresholds)  # an override: the served CAM mask follows it
    else:
        thresholds = version_thresholds(annotator, meta)
    return evaluate(annotator, samples, thresholds, n_examples)


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f} %" if pct else f"{value:.3f}"


def format_table(report: dict[str, Any], title: str = "") -> str:
    """The human-readable table `evaluate` prints."""
    lines = []
    if title:
        lines.append(title)
    n = report["n_images"]
    nf = report["n_flagged"]
    lines += [
        f"version {report['version']}   {n} images   classes: {', '.join(report['classes'])}",
        "",
        "| classification | value |",
        "|---|---|",
        f"| accuracy | {_fmt(report['accuracy'])} |",
        f"| macro-F1 | {_fmt(report['macro_f1'])} |",
        f"| AUROC | {_fmt(report['auroc'])} |",
        f"| ECE (15 bins) | {_fmt(report['ece'])} |",
        f"| flagged for review | {_fmt(report['flagged_rate'], True)} ({nf} of {n}) |",
        f"| selective accuracy (unflagged) | {_fmt(report['selective_accuracy'])} ({n - nf} images) |",
        f"| accuracy on flagged | {_fmt(report['flagged_accuracy'])} ({nf} images) |",
        "",
    ]
    th = report["mask_thresholds"]
    n_iou = report["iou"]["ensemble"]["n"]
    lines += [
        f"masks: {n_iou} served images with a ground-truth mask ({report['n_mask_images_flagged']} more flagged); "
        f"thresholds: {th['source']}",
        "",
        "| mask | threshold | IoU | Dice | pixel IoU |",
        "|---|---|---|---|---|",
    ]
    for key, row in report["iou"].items():
        dice = report["dice"][key]
        if key == "ensemble":
            label = f"**ensemble (served: {row.get('rule')})**"
        elif key in CAM_RULES:
            label = f"{key} of agreeing members"
        elif key == "seg_head":
            label = "segmentation head"
        else:
            label = f"member {key}"
        threshold = row.get("threshold")
        lines.append(
            f"| {label} | {'-' if threshold is None else f'{threshold:.2f}'} | {_fmt(row['mean'])} | "
            f"{_fmt(dice['mean'])} | {_fmt(row['pixel'])} |"
        )
    neg = report["masks_on_negative_images"]
    lines += [
        "",
        f"negative-class images given a mask: {neg['with_mask']} of {neg['n_images']}",
    ]
    return "\n".join(lines)
