"""Training a version, one code path for a folder and a Label Studio project:

1. optional fine-tuning of the backbones (`finetune`: last stage or all);
2. one backbone pass per image and member, caching pooled features (and, where the pixel phase
   needs them, the last feature map and the stride-16 map the segmentation head reads, both
   from that same pass); the MC-dropout heads then train in milliseconds per epoch;
3. temperature and review threshold calibrated on a held-out split;
4. the pixel phase (training/pixels.py): CAM thresholds, pseudo-masks, segmentation heads and
   the cross-validated choice between them;
5. an atomic write of the version, which becomes current.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..core.data import Sample, read_folder_dataset, stratified_split
from ..core.images import ImageError
from ..core.settings import Settings
from ..core.version_meta import MemberSpec, Thresholds, TrainingInfo, VersionMeta
from ..core.versions import ModelStore
from ..engine.annotator import Annotator
from ..engine.ensemble import build_members_for_preset, select_device
from ..engine.uncertainty import confidence, decide, mc_statistics
from ..engine.weights import fingerprint
from .calibration import calibrate_uncertainty_threshold, fit_temperature, flag_rate, risk_coverage
from .finetune import FINETUNE_MODES, finetune_ensemble
from .pixels import fit_pixels

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]  # (stage, fraction done); jobs report through it


@dataclass
class FeatureCache:
    """Pooled features per member for the readable samples (and their mirrored copies), and
    feature maps (float16) for the samples the pixel phase needs: the last one (CAM) and the one
    the segmentation head reads (`Member.seg_layer`)."""

    samples: list[Sample]  # the samples that could be read, in order
    pooled: list[torch.Tensor]  # per member [N, K]
    pooled_flipped: list[torch.Tensor] | None  # per member [N, K]
    maps: dict[int, list[torch.Tensor]]  # sample index -> per member [K, h, w]
    seg_maps: dict[int, list[torch.Tensor]]  # sample index -> per member [K', h', w'] (stride 16)
    skipped: list[str]  # "key: reason" of unreadable images


@torch.inference_mode()
def extract_features(
    annotator: Annotator,
    samples: Sequence[Sample],
    flip: bool,
    keep_maps: set[str] | None = None,
    progress: Progress | None = None,
) -> FeatureCache:
    members = list(annotator.ensemble.members)
    keep_maps = keep_maps or set()
    kept: list[Sample] = []
    skipped: list[str] = []
    pooled: list[list[torch.Tensor]] = [[] for _ in members]
    flipped: list[list[torch.Tensor]] = [[] for _ in members]
    maps: dict[int, list[torch.Tensor]] = {}
    seg_maps: dict[int, list[torch.Tensor]] = {}
    batch = max(1, annotator.settings.batch_size)
    bar = tqdm(total=len(samples), desc="features", unit="img", disable=None)
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        images, first = [], len(kept)
        for sample in chunk:
            try:
                images.append(sample.load())
                kept.append(sample)
            except (ImageError, OSError) as exc:
                skipped.append(f"{sample.key}: {exc}")
                log.warning("skipping %s", exc)
        if images:
            x = annotator.preprocess(images)
            views = [x, x.flip(-1)] if flip else [x]
            for i, member in enumerate(members):
                for v, view in enumerate(views):
                    normalized = member.normalize(view)
                    if annotator.settings.channels_last and annotator.device.type == "cpu":
                        normalized = normalized.contiguous(memory_format=torch.channels_last)
                    wanted = [b for b in range(len(images)) if v == 0 and kept[first + b].key in keep_maps]
                    if wanted:  # the seg-layer map comes from this same pass (a forward hook)
                        fmap, smap = member.features_and_seg(normalized)
                        fmap, smap = fmap.float(), smap.float()
                    else:
                        fmap = member.features(normalized).float()
                    (pooled if v == 0 else flipped)[i].append(fmap.mean(dim=(2, 3)).cpu())
                    for b in wanted:
                        maps.setdefault(first + b, []).append(fmap[b].half().cpu().clone())
                        seg_maps.setdefault(first + b, []).append(smap[b].half().cpu().clone())
        bar.update(len(chunk))
        if progress:
            progress("features", min(1.0, (start + len(chunk)) / max(1, len(samples))))
    bar.close()
    if not kept:
        raise ValueError("no readable training image: " + "; ".join(skipped[:5]))
    return FeatureCache(
        kept,
        [torch.cat(p) for p in pooled],
        [torch.cat(p) for p in flipped] if flip else None,
        maps,
        seg_maps,
        skipped,
    )


def train_head(
    head: torch.nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    settings: Settings,
) -> dict[str, float]:
    """Full-batch AdamW with class-balanced cross-entropy; keeps the epoch with the best
    validation loss (early stopping without a patience knob: every epoch is cheap)."""
    torch.manual_seed(settings.seed)
    counts = torch.bincount(train_y, minlength=num_classes).float()
    weights = counts.sum() / (num_classes * counts.clamp_min(1))
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    best_loss, best_state, best_epoch = float("inf"), None, 0
    has_val = len(val_y) > 0
    for epoch in range(settings.epochs):
        head.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(head(train_x), train_y, weight=weights)
        loss.backward()
        optimizer.step()
        head.eval()
        with torch.no_grad():
            monitor = F.cross_entropy(head(val_x), val_y) if has_val else loss.detach()
        if float(monitor) < best_loss:
            best_loss, best_epoch = float(monitor), epoch
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    return {"best_epoch": best_epoch, "val_loss": best_loss}


def train_version(
    dataset_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    settings: Settings,
    progress: Progress | None = None,
) -> str:
    """`axx-backend train`: train on a dataset folder and write a new current version."""
    samples, classes = read_folder_dataset(dataset_dir)
    log.info("dataset %s: %d images, classes %s", dataset_dir, len(samples), classes)
    return train_on_samples(samples, classes, model_dir, settings, progress, source=str(dataset_dir))


def train_on_samples(
    samples: Sequence[Sample],
    classes: Sequence[str],
    model_dir: str | os.PathLike[str],
    settings: Settings,
    progress: Progress | None = None,
    source: str = "",
) -> str:
    """Train heads for `classes` on labelled samples (and segmentation heads when some have
    oracle masks); calibrate on a held-out split; write the version atomically."""
    labelled = [s for s in samples if s.label is not None]
    unknown = sorted({s.label for s in labelled} - set(classes))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classes {list(classes)}")
    if len(labelled) < 2:
        raise ValueError(f"need at least two labelled images, got {len(labelled)}")
    torch.manual_seed(settings.seed)  # the heads' initialisation: the same data gives the same version
    ensemble, preset = build_members_for_preset(
        settings.preset, classes, settings.dropout, settings.weights_dir, settings.members
    )
    negative = [c for c in classes if settings.is_negative(c)]
    annotator = Annotator(ensemble, settings, negative_classes=set(negative))

    # One split for every phase, by sample: stratified by class and by "has a mask", so
    # oracle masks land in validation too.
    split_keys = [f"{s.label}|{s.has_mask}" for s in labelled]
    _, val_pos = stratified_split(split_keys, settings.val_fraction, settings.seed)
    val_keys = {labelled[k].key for k in val_pos}

    mode = resolve_finetune(settings, annotator.device)
    finetune_metrics: dict[str, Any] = {}
    if mode != "head":
        images, readable = load_resized(annotator, labelled)
        ft_labels = torch.tensor([classes.index(s.label) for s in readable])
        ft_train = [i for i, s in enumerate(readable) if s.key not in val_keys]
        ft_val = [i for i, s in enumerate(readable) if s.key in val_keys]
        log.info("fine-tuning (%s) for %d epochs on %d images", mode, settings.finetune_epochs, len(readable))
        with torch.enable_grad():
            finetune_metrics = finetune_ensemble(
                ensemble,
                images,
                ft_labels,
                ft_train,
                ft_val,
                mode,
                settings.finetune_epochs,
                settings.batch_size,
                settings.seed,
                progress,
            )
        del images

    # Feature maps are kept only where the pixel phase needs them: images with oracle masks,
    # and a capped random share of the others as pseudo-mask candidates.
    has_masks = any(s.has_mask for s in samples)
    candidates = [s.key for s in samples if not s.has_mask]
    rng = np.random.default_rng(settings.seed)
    pseudo_pool = set(rng.permutation(candidates)[: settings.max_pseudo_masks].tolist()) if has_masks else set()
    keep = {s.key for s in samples if s.has_mask} | pseudo_pool
    cache = extract_features(annotator, list(samples), settings.tta_flip, keep, progress)

    index = {c: i for i, c in enumerate(classes)}
    labels_of = {i: (index[s.label] if s.label is not None else None) for i, s in enumerate(cache.samples)}
    labelled_idx = [i for i, lab in labels_of.items() if lab is not None]
    train_idx = [i for i in labelled_idx if cache.samples[i].key not in val_keys]
    val_idx = [i for i in labelled_idx if cache.samples[i].key in val_keys]
    labels = torch.tensor([labels_of[i] if labels_of[i] is not None else -1 for i in range(len(cache.samples))])
    train_t, val_t = torch.tensor(train_idx, dtype=torch.long), torch.tensor(val_idx, dtype=torch.long)
    mapped = sorted(cache.maps)
    mapped_t = torch.tensor(mapped, dtype=torch.long)

    member_specs: list[MemberSpec] = []
    val_probs: list[np.ndarray] = []
    val_entropy: list[np.ndarray] = []
    mapped_probs: list[np.ndarray] = []
    mapped_entropy: list[np.ndarray] = []
    member_metrics: dict[str, Any] = {}
    generator = torch.Generator().manual_seed(settings.seed)
    for i, member in enumerate(ensemble.members):
        x = cache.pooled[i]
        train_x = x[train_t]
        train_y = labels[train_t]
        if cache.pooled_flipped is not None:
            train_x = torch.cat([train_x, cache.pooled_flipped[i][train_t]])
            train_y = torch.cat([train_y, train_y])
        with torch.enable_grad():
            info = train_head(member.head, train_x, train_y, x[val_t], labels[val_t], len(classes), settings)
        with torch.no_grad():
            temperature = fit_temperature(member.head.fc(x[val_t]), labels[val_t])
            member.temperature.fill_(temperature)
            both = torch.cat([val_t, mapped_t])
            mc = member.head.sample(x[both], settings.mc_samples, generator) / temperature
            stats = mc_statistics(mc.softmax(-1))
        n_val = len(val_idx)
        val_probs.append(stats.mean_probs[:n_val].numpy())
        val_entropy.append(stats.entropy[:n_val].numpy())
        mapped_probs.append(stats.mean_probs[n_val:].numpy())
        mapped_entropy.append(stats.entropy[n_val:].numpy())
        accuracy = float((stats.mean_probs[:n_val].argmax(-1) == labels[val_t]).float().mean()) if n_val else None
        member_metrics[member.name] = {
            "val_accuracy": accuracy,
            "temperature": temperature,
            **info,
            **finetune_metrics.get(member.name, {}),
        }
        log.info(
            "member %s: val accuracy %s, temperature %.3f, best epoch %d",
            member.name,
            accuracy,
            temperature,
            info["best_epoch"],
        )
        member_specs.append(
            MemberSpec(
                name=member.name,
                source=member.weight_info.source,
                fingerprint=member.weight_info.fingerprint if mode == "head" else fingerprint(member.backbone),
                finetuned=mode != "head",
                mean=tuple(member.weight_info.mean),
                std=tuple(member.weight_info.std),
                temperature=temperature,
                seg_layer=member.seg_layer,  # the map a segmentation head of this version reads
            )
        )

    thresholds: dict[str, Any] = {
        "uncertainty_threshold": settings.uncertainty_threshold,
        "min_uncertain_to_flag": settings.min_uncertain_to_flag,
        "cam_threshold": settings.cam_threshold,
        "mask_fusion": settings.mask_fusion,
        "seg_threshold": settings.seg_threshold,
    }
    metrics: dict[str, Any] = {"members": member_metrics, "n_train": len(train_idx), "n_val": len(val_idx)}
    if val_idx:
        threshold = calibrate_uncertainty_threshold(
            val_probs,
            val_entropy,
            labels[val_t].numpy(),
            settings.target_flag_rate,
            settings.min_uncertain_to_flag,
            default=settings.uncertainty_threshold,
        )
        thresholds["uncertainty_threshold"] = threshold
        metrics.update(_validation_metrics(val_probs, val_entropy, labels[val_t].numpy(), threshold, settings))
        log.info(
            "calibrated uncertainty threshold %.4f: flags %.0f%% of validation, accuracy %.3f, selective %s",
            threshold,
            100 * metrics["flagged_rate"],
            metrics["accuracy"],
            metrics["selective_accuracy"],
        )
    else:
        log.warning("no validation split (too few images): keeping the default thresholds")

    pixels = None
    oracle = {i: m for i in mapped if (m := cache.samples[i].load_mask()) is not None}
    if oracle:
        pixels = fit_pixels(
            ensemble,
            cache.maps,
            cache.seg_maps,
            {i: [p[k] for p in mapped_probs] for k, i in enumerate(mapped)},
            {i: [float(h[k]) for h in mapped_entropy] for k, i in enumerate(mapped)},
            labels_of,
            oracle,
            {index[c] for c in negative},
            thresholds["uncertainty_threshold"],
            settings,
        )
        # Served CAM rule and threshold, every rule's and member's threshold: calibrated on the oracle masks.
        thresholds.update(pixels.thresholds())
        metrics["pixels"] = pixels.metrics
    mask_source = "seg_head" if pixels is not None and pixels.use_seg_head else "cam"

    def fill(tmp: Path) -> VersionMeta:
        from safetensors.torch import save_file

        heads = {}
        for member in ensemble.members:
            heads[f"{member.name}.weight"] = member.head.fc.weight.detach().cpu().contiguous()
            heads[f"{member.name}.bias"] = member.head.fc.bias.detach().cpu().contiguous()
            if pixels is not None and member.name in pixels.seg_heads:
                seg = pixels.seg_heads[member.name].conv
                heads[f"{member.name}.seg.weight"] = seg.weight.detach().cpu().contiguous()
                heads[f"{member.name}.seg.bias"] = seg.bias.detach().cpu().contiguous()
        save_file(heads, str(tmp / "heads.safetensors"))
        if mode != "head":
            for member in ensemble.members:
                state = {k: v.detach().cpu().contiguous() for k, v in member.backbone.state_dict().items()}
                save_file(state, str(tmp / f"backbone-{member.name}.safetensors"))
        return VersionMeta(
            classes=tuple(classes),
            members=tuple(member_specs),
            preset=preset,
            negative_classes=tuple(negative),
            input_size=settings.input_size,
            dropout=settings.dropout,
            mc_samples=settings.mc_samples,
            mask_source=mask_source,
            thresholds=Thresholds(**thresholds),
            metrics=metrics,
            training=TrainingInfo(
                source=source,
                n_images=len(cache.samples),
                n_labelled=len(labelled_idx),
                oracle_masks=len(oracle),
                skipped=tuple(cache.skipped),
                per_class={c: int((labels == index[c]).sum()) for c in classes},
                finetune=mode,
                finetune_epochs=settings.finetune_epochs if mode != "head" else 0,
                device=str(select_device(settings.device)),
                val_keys=tuple(sorted(val_keys)),
            ),
        )

    version = ModelStore(model_dir).write_version(fill)
    log.info("wrote version %s to %s (masks from %s)", version, model_dir, mask_source)
    if progress:
        progress("done", 1.0)
    return version


def resolve_finetune(settings: Settings, device: torch.device) -> str:
    """`auto`: the last stage on a GPU, the head alone on the CPU (minutes instead of hours)."""
    if settings.finetune == "auto":
        return "last-stage" if device.type == "cuda" else "head"
    if settings.finetune not in FINETUNE_MODES:
        raise ValueError(f"finetune must be auto or one of {FINETUNE_MODES}, got {settings.finetune!r}")
    return settings.finetune


def load_resized(annotator: Annotator, samples: Sequence[Sample]) -> tuple[torch.Tensor, list[Sample]]:
    """The readable images resized to the input size, uint8 [N, 3, S, S] on the CPU."""
    size = (annotator.input_size, annotator.input_size)
    arrays, readable = [], []
    for sample in tqdm(samples, desc="load", unit="img", disable=None):
        try:
            img = sample.load().resize(size, Image.BILINEAR)
        except (ImageError, OSError) as exc:
            log.warning("skipping %s", exc)
            continue
        arrays.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
        readable.append(sample)
    if not arrays:
        raise ValueError("no readable training image")
    return torch.stack(arrays), readable


def _validation_metrics(
    probs: Sequence[np.ndarray], entropy: Sequence[np.ndarray], labels: np.ndarray, threshold: float, settings: Settings
) -> dict[str, Any]:
    _, flags = flag_rate(probs, entropy, threshold, settings.min_uncertain_to_flag)
    predicted = np.array(
        [
            decide([p[i] for p in probs], [h[i] for h in entropy], threshold, settings.min_uncertain_to_flag).label
            for i in range(len(labels))
        ]
    )
    correct = predicted == labels
    ensemble_mean = np.mean(probs, axis=0)
    confidences = np.array([confidence(p) for p in ensemble_mean])
    return {
        "accuracy": float(correct.mean()),
        "flagged_rate": float(flags.mean()),
        "selective_accuracy": float(correct[~flags].mean()) if (~flags).any() else None,
        "flagged_accuracy": float(correct[flags].mean()) if flags.any() else None,
        "risk_coverage": risk_coverage(correct, confidences),
    }
