"""Training a version, one code path for a folder and a Label Studio project, in named steps (each step's
seconds go into the version's `metrics.seconds`):

1. `extract_features` (features.py): one backbone pass per image and member through the annotator's own
   forward: pooled features for every image, maps and image regions for the pixel set, and (for last-stage
   fine-tuning) what enters the last stage; `--finetune all` fine-tunes every layer before it instead;
2. `finetune_step` (finetune.py): the last stage of each backbone on the cached inputs, kept where it pays;
3. `train_member_heads` (heads.py): the MC-dropout heads, cross-fitted (after fine-tuning, on stages fine-tuned
   again without each fold); temperatures and member weights;
4. `calibrate_review`: the review threshold (calibration.py), on images no trained part has seen: the
   unlabelled images where there are enough (the images the flags are served on), else out of fold;
5. `fit_pixels` (pixels.py): CAM thresholds, pseudo-masks, the segment head, and which makes the masks;
6. `serving_precision` (recheck_margin.py): where this machine serves bf16, how far bf16 moves the version's
   decisions and masks, which sets the margins of serving's fp32 rechecks, and whether bf16 then pays;
7. `write`: an atomic write of the version, which becomes current.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..core.data import Sample, iter_readable, read_folder_dataset, read_unlabelled_folder, stratified_split
from ..core.settings import Settings
from ..core.version_meta import MaskConfig, MemberSpec, Thresholds, TrainingInfo, VersionMeta
from ..core.versions import ModelStore
from ..engine.annotator import Annotator
from ..engine.ensemble import Ensemble, build_members_for_preset, resolve_precision, select_device
from ..engine.fold import fold_batchnorm
from ..engine.neighbours import NEIGHBOURS_FILE, NeighbourBank, build_bank
from ..engine.segments import SegmentHead
from ..engine.uncertainty import confidence, decide
from ..engine.weights import fingerprint
from .calibration import calibrate_uncertainty_threshold, flag_rate, image_view, risk_coverage
from .features import FeatureCache, Progress, extract_features
from .finetune import FINETUNE_MODES, finetune_ensemble, finetune_last_stages
from .groups import cache_groups, grouped_folds
from .heads import (
    MIN_HELD_OUT_PER_CLASS,
    CrossFit,
    Heads,
    MemberStats,
    Split,
    calibration_folds,
    held_out_too_small,
    member_mc_stats,
    train_member_heads,
)
from .pixels import PixelResult, fit_pixels
from .pseudo_labels import choose_pseudo_labels, class_counts, retrain_with_pseudo_labels, scene_groups
from .recheck_margin import (
    BF16_PAYS,
    Rule,
    compare_precisions,
    evenly_spaced,
    mask_margin,
    measure_margin,
    served_time_ratio,
)

log = logging.getLogger(__name__)

# Called once the heads and the pixel phase are done, before the version is written, with what training cached
# (annotator, features, split, heads, calibrated uncertainty threshold): the label check reads it (jobs/review.py).
AfterFit = Callable[[Annotator, FeatureCache, Split, Heads, float], None]


@contextmanager
def timed(step: str, seconds: dict[str, float]) -> Iterator[None]:
    """Record (and log) how long a step took: the version's `metrics.seconds` shows where training time goes."""
    start = time.perf_counter()
    yield
    seconds[step] = round(time.perf_counter() - start, 1)
    log.info("%s took %.1f s", step, seconds[step])


def train_version(
    dataset_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    settings: Settings,
    progress: Progress | None = None,
    unlabelled_dir: str | os.PathLike[str] | None = None,
) -> str:
    """`axx-backend train`: train on a dataset folder (and the images of `unlabelled_dir`, unlabelled) and write
    a new current version."""
    samples, classes = read_folder_dataset(dataset_dir)
    log.info("dataset %s: %d images, classes %s", dataset_dir, len(samples), classes)
    if unlabelled_dir is not None:
        unlabelled = read_unlabelled_folder(unlabelled_dir)
        log.info("unlabelled images %s: %d", unlabelled_dir, len(unlabelled))
        samples += unlabelled
    return train_on_samples(samples, classes, model_dir, settings, progress, source=str(dataset_dir))


def train_on_samples(
    samples: Sequence[Sample],
    classes: Sequence[str],
    model_dir: str | os.PathLike[str],
    settings: Settings,
    progress: Progress | None = None,
    source: str = "",
    after_fit: AfterFit | None = None,
) -> str:
    """Train heads for `classes` on labelled samples (and the segment head on oracle and pseudo-masks);
    calibrate on a held-out split; write the version atomically."""
    labelled = _labelled(samples, classes)
    samples = capped_unlabelled(samples, settings)
    torch.manual_seed(settings.seed)  # the heads' initialisation: the same data gives the same version
    ensemble, preset = build_members_for_preset(
        settings.preset, classes, settings.dropout, settings.weights_dir, settings.members, settings.pooling
    )
    negative = [c for c in classes if settings.is_negative(c)]
    # Features for training in fp32: heads, temperatures and thresholds are fitted on full-precision features
    # (and fine-tuning's cached stage inputs must reproduce them); serving may run bf16 (benchmarks/precision.py
    # measures what that changes).
    annotator = Annotator(ensemble, settings.replace(precision="fp32"), negative_classes=set(negative))
    val_keys = validation_keys(labelled, settings)
    mode = resolve_finetune(settings)
    seconds: dict[str, float] = {}
    finetune_metrics: dict[str, dict[str, Any]] = {}
    if mode == "all":
        with timed("finetune (all layers)", seconds):
            finetune_metrics = finetune_all(annotator, labelled, classes, val_keys, progress)
    with timed("features", seconds):
        keys = pixel_keys(samples, settings)
        cache = extract_features(annotator, list(samples), keys, progress, mode == "last-stage")
    if mode != "all" and settings.calibration_groups == "appearance":  # "all": these features saw the labels
        is_labelled = torch.tensor([s.label is not None for s in cache.samples], dtype=torch.bool)
        cache.groups = cache_groups(cache.averaged, settings.seed, is_labelled)
        val_keys = appearance_validation_keys(cache, classes, settings) or val_keys
    split = Split.of(cache, classes, val_keys)
    few_held_out = held_out_too_small(split.labels[split.val], len(classes))
    if mode == "last-stage" and settings.finetune == "auto" and few_held_out:
        log.info(
            "not fine-tuning the last stages: the held-out split has fewer than %d images of some class, too few to "
            "tell whether it pays (AXX_FINETUNE=last-stage forces it)",
            MIN_HELD_OUT_PER_CLASS,
        )
        mode = "head"
    refits = None
    if mode == "last-stage" and settings.calibration == "cross-fitted":
        refits = refit_folds(cache, split, settings)
    if mode == "last-stage":
        with timed("finetune (last stage)", seconds):
            finetune_metrics = finetune_step(ensemble, cache, split, settings, progress, refits)
    with timed("heads and calibration", seconds):
        tuned = any(m.get("kept") for m in finetune_metrics.values())
        refits = refits if tuned else None  # nothing fine-tuned: the heads' own 5 folds calibrate
        heads = train_member_heads(ensemble, cache, split, settings, backbone_saw_train=tuned, refits=refits)
        bank = neighbour_bank(cache, split, settings)
        pool = review_pool(ensemble, cache, split, settings)
        attach_neighbours(bank, cache, heads.calibration, heads.pixels, pool)
        thresholds, metrics = calibrate_review(heads, split, settings, pool)
    if pool is not None and settings.pseudo_labels == "auto":
        with timed("pseudo-labels", seconds):
            calibrated = (thresholds, metrics)
            thresholds, metrics = self_train(ensemble, cache, split, heads, pool, calibrated, settings, bank)
    for name, extra in finetune_metrics.items():
        heads.metrics[name].update(extra)
    metrics.update(
        members=heads.metrics,
        n_train=len(split.train),
        n_val=len(split.val),
        calibration=calibration_set(tuned, refits is not None),
        n_calibration=len(heads.calibration.index),
        neighbour_check={"bank_images": len(bank) if bank is not None else 0},
    )
    if progress:
        progress("pixels", 0.0)
    with timed("pixels", seconds):
        pixels = fit_pixels(annotator, cache, split, heads, thresholds["uncertainty_threshold"])
    metrics["seconds"] = seconds
    thresholds.update(pixels.thresholds())  # the served CAM rule and every rule's and member's threshold
    metrics["pixels"] = pixels.metrics
    meta = VersionMeta(
        classes=tuple(classes),
        members=member_specs(ensemble, heads, finetune_metrics),
        preset=preset,
        negative_classes=tuple(negative),
        input_size=settings.input_size,
        dropout=settings.dropout,
        mc_samples=settings.mc_samples,
        pooling=settings.pooling,
        mask_source=pixels.mask_source,
        masks=MaskConfig(settings.cam_weights, settings.refine, tuple(settings.superpixel_scales)),
        thresholds=Thresholds(**thresholds),
        metrics=metrics,
        training=training_info(cache, split, classes, mode, val_keys, pixels, settings, source),
    )
    margins, seen = serving_precision(annotator, meta, cache, heads, pool, pixels.segment_head, bank, settings, seconds)
    stored = dataclasses.replace(meta.thresholds, **margins)
    meta = dataclasses.replace(meta, thresholds=stored, metrics={**metrics, "bf16_recheck": seen})
    if after_fit is not None:
        after_fit(annotator, cache, split, heads, meta.thresholds.uncertainty_threshold)
    version = write(model_dir, ensemble, pixels, meta, bank)
    log.info("wrote version %s to %s (masks from %s)", version, model_dir, pixels.mask_source)
    if progress:
        progress("done", 1.0)
    return version


def _labelled(samples: Sequence[Sample], classes: Sequence[str]) -> list[Sample]:
    labelled = [s for s in samples if s.label is not None]
    unknown = sorted({s.label for s in labelled} - set(classes))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classes {list(classes)}")
    if len(labelled) < 2:
        raise ValueError(f"need at least two labelled images, got {len(labelled)}")
    return labelled


def capped_unlabelled(samples: Sequence[Sample], settings: Settings) -> list[Sample]:
    """`samples` with at most `max_unlabelled` of the images that have neither a label nor a mask (a seeded random
    choice, in their order); the others all stay."""
    bare = [i for i, s in enumerate(samples) if s.label is None and not s.has_mask]
    if len(bare) <= settings.max_unlabelled:
        return list(samples)
    dropped = set(np.random.default_rng(settings.seed).permutation(bare)[settings.max_unlabelled :].tolist())
    log.info("%d unlabelled images: training reads %d of them (AXX_MAX_UNLABELLED)", len(bare), settings.max_unlabelled)
    return [s for i, s in enumerate(samples) if i not in dropped]


def validation_keys(labelled: Sequence[Sample], settings: Settings) -> set[str]:
    """One held-out split for every phase, by sample: stratified by class and by "has a mask", so oracle
    masks land in validation too."""
    split_keys = [f"{s.label}|{s.has_mask}" for s in labelled]
    _, val_pos = stratified_split(split_keys, settings.val_fraction, settings.seed)
    return {labelled[k].key for k in val_pos}


def appearance_validation_keys(cache: FeatureCache, classes: Sequence[str], settings: Settings) -> set[str] | None:
    """A held-out split of whole appearance groups (groups.py), about `val_fraction` of the labelled images;
    None when grouping cannot keep every class on both sides."""
    if cache.groups is None:
        return None
    rows = [i for i, s in enumerate(cache.samples) if s.label in classes]
    labels = np.array([classes.index(cache.samples[i].label) for i in rows])
    k = max(2, round(1 / settings.val_fraction))
    folds = grouped_folds(cache.groups[rows], labels, k)
    if folds is None:
        return None
    sizes = np.bincount(folds)
    val_fold = int(np.argmin(np.abs(sizes - settings.val_fraction * len(rows))))
    if set(labels[folds == val_fold].tolist()) != set(range(len(classes))):
        return None  # a class missing from the held-out split: nothing to early-stop or calibrate it on
    return {cache.samples[rows[i]].key for i in np.flatnonzero(folds == val_fold)}


def pixel_keys(samples: Sequence[Sample], settings: Settings) -> set[str]:
    """The pixel set: every image with an oracle mask, and up to `max_pseudo_masks` others (pseudo-mask candidates
    and background examples for the segment head): a random share of the labelled ones, then, in the room they
    leave, of the unlabelled ones. Labelled first: an unlabelled image's class is only the ensemble's decision,
    and a project's many unlabelled tasks drawn alike crowded out the labelled candidates (README, "The flag
    budget on the images still to annotate")."""
    masked = {s.key for s in samples if s.has_mask}
    if not (settings.labels_only_masks == "segments" or masked):
        return masked
    rng = np.random.default_rng(settings.seed)
    labelled = [s.key for s in samples if not s.has_mask and s.label is not None]
    unlabelled = [s.key for s in samples if not s.has_mask and s.label is None]
    ranked = rng.permutation(labelled).tolist() + rng.permutation(unlabelled).tolist()
    return masked | set(ranked[: settings.max_pseudo_masks])


def refit_folds(cache: FeatureCache, split: Split, settings: Settings) -> CrossFit:
    """The folds over every labelled image that a kept stage is fine-tuned again without, one at a time."""
    rows = split.labelled
    return CrossFit(rows, calibration_folds(cache, rows, split.labels[rows].numpy(), settings, settings.refit_folds))


def finetune_step(
    ensemble: Ensemble,
    cache: FeatureCache,
    split: Split,
    settings: Settings,
    progress: Progress | None,
    refits: CrossFit | None = None,
) -> dict[str, dict[str, Any]]:
    """`last-stage`: each member's stride-32 stage on the cached stage inputs of the train split, kept where
    the held-out split says it pays (finetune.py); with `refits`, a kept stage again once per fold."""
    if progress:
        progress("finetune", 0.0)
    log.info(
        "fine-tuning the last stages for up to %d epochs / %.0f s", settings.finetune_epochs, settings.finetune_seconds
    )
    with torch.enable_grad():
        return finetune_last_stages(ensemble, cache, split.labels, split.train, split.val, settings, refits)


def finetune_all(
    annotator: Annotator,
    labelled: Sequence[Sample],
    classes: Sequence[str],
    val_keys: set[str],
    progress: Progress | None,
) -> dict[str, dict[str, Any]]:
    """`all`: every layer of each member on whole images (early stopping on the held-out split)."""
    settings = annotator.settings
    images, readable = load_resized(annotator, labelled)
    labels = torch.tensor([list(classes).index(s.label) for s in readable])
    train = [i for i, s in enumerate(readable) if s.key not in val_keys]
    val = [i for i, s in enumerate(readable) if s.key in val_keys]
    log.info("fine-tuning every layer for %d epochs on %d images", settings.finetune_epochs, len(readable))
    with torch.enable_grad():
        metrics = finetune_ensemble(
            annotator.ensemble,
            images,
            labels,
            train,
            val,
            settings.finetune_epochs,
            settings.batch_size,
            settings.seed,
            progress,
        )
    return {name: {**m, "kept": True} for name, m in metrics.items()}


def calibration_set(backbone_saw_train: bool, refitted: bool) -> str:
    """Which images the temperatures, member weights and review threshold were calibrated on."""
    if not backbone_saw_train:
        return "out of fold"
    if refitted:
        return "out of fold (each fold's fine-tuned stages fine-tuned again without it)"
    return "held-out split (a backbone stage was fine-tuned on the rest)"


def neighbour_bank(cache: FeatureCache, split: Split, settings: Settings) -> NeighbourBank | None:
    """The labelled images' features the version keeps for the nearest-image check (`Settings.neighbour_check`)."""
    if settings.neighbour_check == "off":
        return None
    return build_bank(cache.pooled, split.labels, settings.neighbour_bank_size, settings.seed)


def attach_neighbours(bank: NeighbourBank | None, cache: FeatureCache, *stats: MemberStats | None) -> None:
    """Set each of `stats`' members' nearest labelled classes, an image never matching itself: a labelled image
    scored out of fold is, in the bank, nearest itself, and would never be flagged by the check."""
    for st in stats:
        if bank is not None and st is not None:
            st.neighbours = bank.nearest_classes([p[st.index] for p in cache.pooled], exclude_rows=st.index)


def review_pool(ensemble: Ensemble, cache: FeatureCache, split: Split, settings: Settings) -> MemberStats | None:
    """The served heads' statistics of the unlabelled images, when the review threshold is calibrated on them
    (`Settings.review_calibration`): they are the images the flags will be served on, unseen by every head."""
    if settings.review_calibration != "auto":
        return None
    rows = torch.nonzero(split.labels < 0).flatten().tolist()
    if len(rows) < settings.min_review_pool:
        if rows:
            log.info(
                "%d unlabelled images, fewer than %d: the review threshold is calibrated out of fold",
                len(rows), settings.min_review_pool,
            )  # fmt: skip
        return None
    generator = torch.Generator().manual_seed(settings.seed + 1)  # not the pixel set's stream
    return member_mc_stats(ensemble.members, cache.pooled, rows, settings.mc_samples, generator)


def serving_precision(
    annotator: Annotator,
    meta: VersionMeta,
    cache: FeatureCache,
    heads: Heads,
    pool: MemberStats | None,
    segment_head: SegmentHead | None,
    neighbours: NeighbourBank | None,
    settings: Settings,
    seconds: dict[str, float],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The bf16 recheck margins the version `meta` serves with (`precision_recheck`, `precision_recheck_mask`) and,
    under `AXX_PRECISION=auto`, its `precision` (fp32 where bf16 as served does not take at most `BF16_PAYS` of
    fp32's time), where this machine serves bf16: the images the review threshold was calibrated on (the unlabelled
    pool, else the labelled images out of fold), at most `recheck_margin.MAX_IMAGES`, run through the version as
    serving builds it (`served_build`) in fp32 and in bf16 (`training/recheck_margin.py`; a step of `seconds`).
    Elsewhere, or with both margins 0, the settings' margins."""
    s = settings
    margins = {"precision_recheck": s.precision_recheck, "precision_recheck_mask": s.precision_recheck_mask}
    if max(margins.values()) <= 0 or resolve_precision(s.precision, annotator.device) != "bf16":
        return margins, {"measured": False}
    with timed("bf16 recheck margin", seconds):
        rows = pool.index if pool is not None else heads.calibration.index
        try:
            images, _ = load_resized(annotator, [cache.samples[rows[i]] for i in evenly_spaced(len(rows))])
        except ValueError:  # none readable now (tasks whose images went away since): keep the settings' margins
            log.warning("bf16 recheck margins: no calibration image could be read again; the settings' margins")
            return margins, {"measured": False}
        served, folded = served_build(meta, annotator.ensemble, segment_head, settings, neighbours)
        fp32, bf16 = served("fp32", folded), served("bf16", copy.deepcopy(folded))
        compared = compare_precisions(fp32, bf16, images, s.batch_size)
        seen: dict[str, Any] = {"measured": True, "images": len(images)}
        if s.precision_recheck > 0:
            stored = meta.thresholds
            rule = Rule(stored.uncertainty_threshold, stored.min_uncertain_to_flag, fp32.weights)
            margins["precision_recheck"], decisions = measure_margin(compared.passes, rule, s.precision_recheck)
            seen.update(decisions)
        if s.precision_recheck_mask > 0:
            margins["precision_recheck_mask"], seen["masks"] = mask_margin(
                compared.masks, s.precision_recheck_mask, s.precision_recheck_iou
            )
        if s.precision == "auto":  # bf16 as served, its rechecks included, against fp32: keep bf16 where it pays
            as_served = served("bf16", bf16.ensemble, recheck_twin=fp32.ensemble, **margins)
            ratio = served_time_ratio(as_served, fp32, images)
            seen["served_time_vs_fp32"] = ratio
            margins["precision"] = "fp32" if ratio > BF16_PAYS else "auto"
    log.info("bf16 on %d calibration images: serving %s; seen %s", len(images), margins, seen)
    return margins, seen


def served_build(
    meta: VersionMeta,
    ensemble: Ensemble,
    segment_head: SegmentHead | None,
    settings: Settings,
    neighbours: NeighbourBank | None = None,
) -> tuple[Callable[..., Annotator], Ensemble]:
    """How serving will load the version `meta` describes (`Annotator.from_meta`, every calibrated threshold and
    recorded choice the version's): a function (precision, ensemble, recheck_twin=None, **thresholds) -> its
    annotator, with no recheck unless given, and a copy of the trained members `ensemble` with their BatchNorms folded
    as loading folds them (bf16 rounds the folded weights, and a bf16 annotator casts the ensemble it is given in
    place: give it its own copy)."""
    folded = copy.deepcopy(ensemble)
    for member in folded.members:
        fold_batchnorm(member.backbone.eval())

    def served(
        precision: str, ensemble: Ensemble, recheck_twin: Ensemble | None = None, **thresholds: Any
    ) -> Annotator:
        stored = dataclasses.replace(
            meta.thresholds,
            precision=precision,
            **{"precision_recheck": 0.0, "precision_recheck_mask": 0.0, **thresholds},
        )
        version = dataclasses.replace(meta, thresholds=stored)
        return Annotator.from_meta(
            version, ensemble, segment_head, settings, set(), recheck_twin=recheck_twin, neighbours=neighbours
        )

    return served, folded


def self_train(
    ensemble: Ensemble,
    cache: FeatureCache,
    split: Split,
    heads: Heads,
    pool: MemberStats,
    calibrated: tuple[dict[str, Any], dict[str, Any]],
    settings: Settings,
    bank: NeighbourBank | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The served heads trained again with the pool's pseudo-labels (pseudo_labels.py), then the flag budget spent
    on the pool again with them; `calibrated`: `calibrate_review`'s result before, kept when nothing qualifies.
    Either way the metrics record what was chosen (`pseudo_labels`)."""
    thresholds, metrics = calibrated
    prior = np.bincount(split.labels[split.labelled].numpy(), minlength=len(ensemble.classes))
    groups = scene_groups(cache.averaged, pool, settings.seed)
    pseudo = choose_pseudo_labels(
        pool, thresholds["uncertainty_threshold"], settings.min_uncertain_to_flag, heads.weights, prior, groups
    )
    chosen = {
        "images": len(pseudo),
        "of": len(pool.index),
        "unanimous": pseudo.candidates,
        "scene_groups": len(np.unique(groups)),
        "classes": class_counts(pseudo, ensemble.classes),
    }
    if len(pseudo):
        retrain_with_pseudo_labels(ensemble, cache, split, heads, pseudo, settings)
        generator = torch.Generator().manual_seed(settings.seed + 2)  # the pixel set's statistics by the final heads
        heads.pixels = member_mc_stats(
            ensemble.members, cache.pooled, heads.pixels.index, settings.mc_samples, generator
        )
        out_of_fold = metrics["review_calibration"]["out_of_fold_threshold"]  # heads.calibration has not changed
        pool_again = review_pool(ensemble, cache, split, settings)
        attach_neighbours(bank, cache, heads.pixels, pool_again)
        thresholds, metrics = calibrate_review(heads, split, settings, pool_again, out_of_fold)
    log.info(
        "%d of %d unlabelled images decided unanimously without a flag; balanced to the labelled classes within "
        "%d scene groups, %d became pseudo-labels (%s)%s",
        pseudo.candidates, len(pool.index), chosen["scene_groups"], len(pseudo), chosen["classes"],
        "" if len(pseudo) else ": the heads keep the labelled images only",
    )  # fmt: skip
    return thresholds, {**metrics, "pseudo_labels": chosen}


def calibrate_review(
    heads: Heads,
    split: Split,
    settings: Settings,
    pool: MemberStats | None = None,
    out_of_fold: float | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The version's thresholds (the review threshold spends the flag budget on `pool`, the unlabelled images,
    when given, else on the out-of-fold predictions; the rest defaults until the pixel phase) and the
    out-of-fold metrics at that threshold. `out_of_fold`: the out-of-fold threshold when already known."""
    thresholds: dict[str, Any] = {
        "uncertainty_threshold": settings.uncertainty_threshold,
        "min_uncertain_to_flag": settings.min_uncertain_to_flag,
        "cam_threshold": settings.cam_threshold,
        "mask_fusion": settings.mask_fusion,
        "seg_threshold": settings.seg_threshold,
    }
    cal = heads.calibration
    labels = split.labels[cal.index].numpy()
    if out_of_fold is None:
        out_of_fold = review_threshold(cal, labels, heads, settings)
    threshold = out_of_fold if pool is None else review_threshold(pool, None, heads, settings)
    thresholds["uncertainty_threshold"] = threshold
    metrics = validation_metrics(cal.probs, cal.entropy, labels, threshold, settings, heads.weights, cal.neighbours)
    review: dict[str, Any] = {"on": "labelled, out of fold", "images": len(cal.index)}
    if pool is not None:
        k, w, nn = settings.min_uncertain_to_flag, heads.weights, pool.neighbours
        review = {
            "on": "unlabelled",
            "images": len(pool.index),
            "flagged_rate": flag_rate(pool.probs, pool.entropy, threshold, k, w, nn)[0],
            # what the labelled images alone would have set, and how much of the unlabelled it would flag
            "out_of_fold_threshold": out_of_fold,
            "out_of_fold_flagged_rate": flag_rate(pool.probs, pool.entropy, out_of_fold, k, w, nn)[0],
        }
        log.info(
            "review threshold calibrated on %d unlabelled images: flags %.0f%% of them (out of fold: %.0f%%)",
            len(pool.index), 100 * review["flagged_rate"], 100 * review["out_of_fold_flagged_rate"],
        )  # fmt: skip
    metrics["review_calibration"] = review
    log.info(
        "calibrated uncertainty threshold %.4f: flags %.0f%% out of fold, accuracy %.3f, selective %s",
        threshold,
        100 * metrics["flagged_rate"],
        metrics["accuracy"],
        metrics["selective_accuracy"],
    )
    return thresholds, metrics


def review_threshold(stats: MemberStats, labels: np.ndarray | None, heads: Heads, settings: Settings) -> float:
    """The uncertainty threshold that spends the flag budget on `stats`' images (`labels` None: unlabelled)."""
    return calibrate_uncertainty_threshold(
        stats.probs,
        stats.entropy,
        labels,
        settings.target_flag_rate,
        settings.min_uncertain_to_flag,
        default=settings.uncertainty_threshold,
        weights=heads.weights,
        neighbours=stats.neighbours,
    )


def member_specs(ensemble: Ensemble, heads: Heads, finetuned: dict[str, dict[str, Any]]) -> tuple[MemberSpec, ...]:
    tuned = {name for name, m in finetuned.items() if m.get("kept")}
    return tuple(
        MemberSpec(
            name=member.name,
            source=member.weight_info.source,
            fingerprint=fingerprint(member.backbone) if member.name in tuned else member.weight_info.fingerprint,
            finetuned=member.name in tuned,
            mean=tuple(member.weight_info.mean),
            std=tuple(member.weight_info.std),
            temperature=temperature,
            weight=weight,
        )
        for member, temperature, weight in zip(ensemble.members, heads.temperatures, heads.weights, strict=True)
    )


def training_info(
    cache: FeatureCache,
    split: Split,
    classes: Sequence[str],
    mode: str,
    val_keys: set[str],
    pixels: PixelResult,
    settings: Settings,
    source: str,
) -> TrainingInfo:
    return TrainingInfo(
        source=source,
        n_images=len(cache.samples),
        n_labelled=int((split.labels >= 0).sum()),
        oracle_masks=int(pixels.metrics.get("oracle_masks", 0)),
        skipped=tuple(cache.skipped),
        per_class={c: int((split.labels == i).sum()) for i, c in enumerate(classes)},
        finetune=mode,
        finetune_epochs=settings.finetune_epochs if mode != "head" else 0,
        device=str(select_device(settings.device)),
        val_keys=tuple(sorted(val_keys)),
    )


def write(
    model_dir: str | os.PathLike[str],
    ensemble: Ensemble,
    pixels: PixelResult,
    meta: VersionMeta,
    neighbours: NeighbourBank | None = None,
) -> str:
    """Write the version's files and metadata atomically; it becomes current."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> VersionMeta:
        tensors = {}
        for member in ensemble.members:
            tensors[f"{member.name}.weight"] = member.head.fc.weight.detach().cpu().contiguous()
            tensors[f"{member.name}.bias"] = member.head.fc.bias.detach().cpu().contiguous()
        if pixels.segment_head is not None:
            tensors.update(pixels.segment_head.tensors())
        save_file(tensors, str(tmp / "heads.safetensors"))
        if neighbours is not None:
            save_file(neighbours.tensors(), str(tmp / NEIGHBOURS_FILE))
        for member, spec in zip(ensemble.members, meta.members, strict=True):
            if spec.finetuned:
                state = {k: v.detach().cpu().contiguous() for k, v in member.backbone.state_dict().items()}
                save_file(state, str(tmp / f"backbone-{member.name}.safetensors"))
        return meta

    return ModelStore(model_dir).write_version(fill)


def resolve_finetune(settings: Settings) -> str:
    """`auto`: the last stage, on cached stage inputs (minutes on a CPU), kept where it pays."""
    if settings.finetune == "auto":
        return "last-stage"
    if settings.finetune not in FINETUNE_MODES:
        raise ValueError(f"finetune must be auto or one of {FINETUNE_MODES}, got {settings.finetune!r}")
    return settings.finetune


def load_resized(annotator: Annotator, samples: Sequence[Sample]) -> tuple[torch.Tensor, list[Sample]]:
    """The readable images resized to the input size, uint8 [N, 3, S, S] on the CPU."""
    size = (annotator.input_size, annotator.input_size)
    arrays, readable = [], []
    for sample, image in iter_readable(tqdm(samples, desc="load", unit="img", disable=None)):
        img = image.resize(size, Image.BILINEAR)
        arrays.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
        readable.append(sample)
    if not arrays:
        raise ValueError("no readable training image")
    return torch.stack(arrays), readable


def validation_metrics(
    probs: Sequence[np.ndarray],
    entropy: Sequence[np.ndarray],
    labels: np.ndarray,
    threshold: float,
    settings: Settings,
    weights: Sequence[float] | None = None,
    neighbours: np.ndarray | None = None,
) -> dict[str, Any]:
    k = settings.min_uncertain_to_flag
    views = (image_view(probs, entropy, neighbours, i) for i in range(len(labels)))
    decisions = [decide(p, h, threshold, k, weights, nn) for p, h, nn in views]
    flags = np.array([d.flagged for d in decisions], dtype=bool)
    correct = np.array([d.label for d in decisions]) == labels
    ensemble_mean = np.average(probs, axis=0, weights=weights)
    confidences = np.array([confidence(p) for p in ensemble_mean])
    return {
        "accuracy": float(correct.mean()),
        "flagged_rate": float(flags.mean()),
        "selective_accuracy": float(correct[~flags].mean()) if (~flags).any() else None,
        "flagged_accuracy": float(correct[flags].mean()) if flags.any() else None,
        "risk_coverage": risk_coverage(correct, confidences),
    }
