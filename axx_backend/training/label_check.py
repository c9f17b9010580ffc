"""Which annotations are probably wrong: out-of-fold predictions on cached features, no backbone pass.

Classes: k fresh heads per member, each trained on the other folds' images and annotated classes, predict their
own fold (`heads.cross_fit` on stratified folds); the members' out-of-fold probabilities, averaged with the
version's member weights, give each annotated image p(annotated class). The ranking key is 1 - p (Cleanlab's
self-confidence). An annotation is *contradicted* when the out-of-fold ensemble is confident in another class:
that class's probability reaches the class's own threshold, the mean out-of-fold probability of the class over
the images annotated with it (confident learning, Northcutt et al. 2021).

Masks: the oracle masks of a positive class, k-fold: the segment head trained on the other folds' masks
predicts each held-out image's mask; the ranking key is 1 - IoU with the drawn mask. A mask is contradicted
when its IoU is under half the median IoU of the checked masks.

After a training run the out-of-fold probabilities are those training computed for calibration
(`Heads.calibration`) when they cover every labelled image, so the check costs only the mask folds (seconds);
when calibration kept the held-out split only (a fine-tuned backbone), fresh out-of-fold heads cover the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.data import Sample
from ..core.settings import Settings
from ..engine.annotator import Annotator
from ..engine.masks import iou
from ..engine.uncertainty import mc_statistics
from .features import FeatureCache, extract_features
from .heads import CV_FOLDS, Heads, MemberStats, Split, cross_fit, member_mc_stats, stratified_folds
from .pixels import PixelSet, fit_head, kfold
from .profiles import ProfileStore, profile_samples

log = logging.getLogger(__name__)

LABEL_CHECK_FILE = "label_check.json"  # in a version's review directory
MIN_MASKS = 3  # fewer oracle masks of a positive class: no mask check (a fold would train on one or two)


@dataclass
class ClassCheck:
    key: str
    label: str  # the annotated class
    predicted: str  # the out-of-fold ensemble's class (among the classes it is confident in, when any)
    p_label: float  # out-of-fold ensemble probability of the annotated class
    score: float  # 1 - p_label: the higher, the likelier the annotation is wrong
    contradicted: bool  # a confident out-of-fold ensemble says another class


@dataclass
class MaskCheck:
    key: str
    label: str
    iou: float  # of the drawn mask with the out-of-fold segment head's mask
    score: float  # 1 - iou
    contradicted: bool


@dataclass
class LabelCheck:
    """The check of one version on one set of annotations; `classes` and `masks` sorted by score, highest first."""

    version: str
    classes: list[ClassCheck] = field(default_factory=list)
    masks: list[MaskCheck] = field(default_factory=list)
    seconds: float = 0.0
    fingerprint: str = ""  # of the annotations checked (`annotations_fingerprint`): a stored check is stale without it

    def suspects(self) -> list[tuple[str, float, list[str]]]:
        """(key, score, reasons) of every contradicted annotation, highest score first."""
        found: dict[str, tuple[float, list[str]]] = {}
        for item in [*self.classes, *self.masks]:
            if not item.contradicted:
                continue
            reason = f"class {item.label}: ensemble says {item.predicted}" if isinstance(item, ClassCheck) else (
                f"mask of {item.label}: IoU {item.iou:.2f} with the segment head"
            )  # fmt: skip
            score, reasons = found.get(item.key, (0.0, []))
            found[item.key] = (max(score, item.score), [*reasons, reason])
        return sorted(((k, s, r) for k, (s, r) in found.items()), key=lambda t: (-t[1], t[0]))

    def scores(self) -> dict[str, float]:
        """Every checked annotation's score (the larger of its class and mask scores): the `mislabeling` value."""
        out: dict[str, float] = {}
        for item in [*self.classes, *self.masks]:
            out[item.key] = max(out.get(item.key, 0.0), item.score)
        return out

    def summary(self, top: int = 20) -> dict[str, Any]:
        """What the /jobs report and the CLI show: counts and the top suspects."""
        suspects = self.suspects()
        return {
            "version": self.version,
            "checked_classes": len(self.classes),
            "checked_masks": len(self.masks),
            "contradicted_classes": sum(c.contradicted for c in self.classes),
            "contradicted_masks": sum(m.contradicted for m in self.masks),
            "suspects": [{"key": k, "score": round(s, 4), "reasons": r} for k, s, r in suspects[:top]],
            "seconds": round(self.seconds, 2),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "classes": [asdict(c) for c in self.classes],
                "masks": [asdict(m) for m in self.masks], "seconds": self.seconds,
                "fingerprint": self.fingerprint}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelCheck:
        return cls(
            version=str(data.get("version", "")),
            classes=[ClassCheck(**c) for c in data.get("classes", [])],
            masks=[MaskCheck(**m) for m in data.get("masks", [])],
            seconds=float(data.get("seconds", 0.0)),
            fingerprint=str(data.get("fingerprint", "")),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LabelCheck | None:
        path = Path(path)
        if not path.is_file():
            return None
        return cls.from_dict(json.loads(path.read_text()))


def annotations_fingerprint(samples: Sequence[Sample]) -> str:
    """What a label check depends on besides the version: each labelled sample's key, class and mask presence."""
    items = sorted(f"{s.key}|{s.label}|{s.has_mask}" for s in samples if s.label is not None)
    return hashlib.sha1("\n".join(items).encode()).hexdigest()[:16]


# --- classes ----------------------------------------------------------------------------------------------------------
def class_check(
    member_probs: Sequence[np.ndarray],
    weights: Sequence[float],
    labels: np.ndarray,
    keys: Sequence[str],
    classes: Sequence[str],
) -> list[ClassCheck]:
    """Rank annotations by out-of-fold evidence against them (module docstring); `member_probs` per member [N, C]."""
    probs = np.average(np.stack([np.asarray(p, dtype=np.float64) for p in member_probs]), axis=0, weights=weights)
    labels = np.asarray(labels, dtype=int)
    thresholds = np.array([probs[labels == c, c].mean() if (labels == c).any() else 1.0 for c in range(probs.shape[1])])
    out = []
    for i, key in enumerate(keys):
        p, y = probs[i], int(labels[i])
        confident = [c for c in range(len(p)) if p[c] >= thresholds[c]]
        predicted = max(confident, key=lambda c: p[c]) if confident else int(np.argmax(p))
        out.append(
            ClassCheck(
                key=str(key),
                label=classes[y],
                predicted=classes[predicted],
                p_label=round(float(p[y]), 6),
                score=round(1.0 - float(p[y]), 6),
                contradicted=bool(confident) and predicted != y,
            )
        )
    return sorted(out, key=lambda c: (-c.score, c.key))


def out_of_fold_probs(
    annotator: Annotator, cache: FeatureCache, index: torch.Tensor, labels: torch.Tensor, epochs: Sequence[int]
) -> list[np.ndarray]:
    """Each member's out-of-fold MC-mean probabilities [N, C] of the samples `index` (fresh heads per fold, the
    member's temperature), trained on `labels` for the member's number of epochs."""
    settings = annotator.settings
    folds = stratified_folds(labels.numpy(), CV_FOLDS, settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    out = []
    for m, member in enumerate(annotator.ensemble.members):
        with torch.enable_grad():
            _, samples = cross_fit(member, cache.pooled[m][index], labels, folds, epochs[m], settings, generator)
        out.append(mc_statistics((samples / float(member.temperature)).softmax(-1)).mean_probs.numpy())
    return out


# --- masks ------------------------------------------------------------------------------------------------------------
def mask_check(data: PixelSet) -> list[MaskCheck]:
    """k-fold over the oracle masks of a positive class: each drawn mask against the segment head trained
    without its fold (lambda 0: oracle masks only, so no pseudo-mask hides a wrong mask)."""
    positives = data.positives
    if len(positives) < MIN_MASKS:
        return []
    names = data.annotator.classes
    found: list[tuple[int, float]] = []
    for held in kfold(positives, CV_FOLDS, data.settings.seed):
        head = fit_head(data, [i for i in data.oracle if i not in held], {}, 0.0)
        if head is None:
            continue
        for i in held:
            found.append((i, iou(data.head_heat(head, i) > data.settings.seg_threshold, data.oracle[i])))
    if not found:
        return []
    floor = 0.5 * float(np.median([v for _, v in found]))
    checks = [
        MaskCheck(data.cache.samples[i].key, names[data.classes[i]], round(v, 6), round(1.0 - v, 6), v < floor)
        for i, v in found
    ]
    return sorted(checks, key=lambda c: (-c.score, c.key))


def served_pixel_stats(annotator: Annotator, cache: FeatureCache) -> MemberStats:
    """The version's own heads' MC statistics of the pixel set (what `PixelSet` reads to know which members vote)."""
    s = annotator.settings
    generator = torch.Generator().manual_seed(s.seed)
    return member_mc_stats(annotator.ensemble.members, cache.pooled, sorted(cache.pixels), s.mc_samples, generator)


# --- the two ways in: right after training, and on a version with cached profiles -------------------------------------
def check_training_run(
    annotator: Annotator, cache: FeatureCache, split: Split, heads: Heads, threshold: float, version: str = ""
) -> LabelCheck:
    """The check right after training: its out-of-fold calibration probabilities when they cover every labelled
    image, else (calibration kept the held-out split only: a fine-tuned backbone saw the rest) fresh out-of-fold
    heads on every labelled image's cached features; then its pixel set."""
    start = time.perf_counter()
    labelled = split.labelled
    cal = heads.calibration
    if len(cal.index) == len(labelled):
        index, probs = list(cal.index), cal.probs
    else:
        epochs = [int(heads.metrics[m.name]["epochs"]) for m in annotator.ensemble.members]
        probs = out_of_fold_probs(annotator, cache, labelled, split.labels[labelled], epochs)
        index = labelled.tolist()
    keys = [cache.samples[i].key for i in index]
    labels = split.labels[index].numpy()
    result = LabelCheck(version, class_check(probs, heads.weights, labels, keys, annotator.classes))
    if cache.pixels:
        result.masks = mask_check(PixelSet(annotator, cache, split, heads, threshold))
    result.seconds = time.perf_counter() - start
    return result


def check_cached(annotator: Annotator, cache: FeatureCache, epochs: Sequence[int], version: str = "") -> LabelCheck:
    """The check of a version on labelled cached features (`cache.samples` all labelled; pixel views of the
    oracle-masked ones): fresh out-of-fold heads, then the mask folds."""
    start = time.perf_counter()
    index = torch.arange(len(cache.samples))
    labels = torch.tensor([annotator.classes.index(str(s.label)) for s in cache.samples])
    probs = out_of_fold_probs(annotator, cache, index, labels, epochs)
    keys = [s.key for s in cache.samples]
    result = LabelCheck(version, class_check(probs, annotator.weights, labels.numpy(), keys, annotator.classes))
    if cache.pixels:
        split = Split(labels, index, index[:0])
        heads = Heads([float(m.temperature) for m in annotator.ensemble.members], list(annotator.weights), {},
                      MemberStats([]), served_pixel_stats(annotator, cache))  # fmt: skip
        result.masks = mask_check(PixelSet(annotator, cache, split, heads, annotator.settings.uncertainty_threshold))
    result.seconds = time.perf_counter() - start
    return result


def version_epochs(meta_metrics: dict[str, Any], names: Sequence[str], settings: Settings) -> list[int]:
    """Each member's early-stopped epoch count recorded by training (the out-of-fold heads train as long)."""
    members = meta_metrics.get("members") or {}
    return [int((members.get(name) or {}).get("epochs") or settings.epochs) for name in names]


def labelled_cache(
    annotator: Annotator, samples: Sequence[Sample], stamps: Sequence[str], store: ProfileStore | None = None
) -> FeatureCache:
    """The labelled samples' pooled features from their profiles (cached on disk), and pixel views of those
    with an oracle mask of a positive class (one backbone pass over those only)."""
    labelled = [(s, st) for s, st in zip(samples, stamps, strict=True) if s.label is not None]
    profiled = profile_samples(lambda: annotator, [s for s, _ in labelled], [st for _, st in labelled], store)
    by_key = {p.key: p for p in profiled.profiles}
    kept = [s for s, _ in labelled if s.key in by_key]
    if len(kept) < 2:
        raise ValueError(f"the label check needs at least two readable labelled images, got {len(kept)}")
    members = range(len(annotator.ensemble.members))
    pooled = [torch.from_numpy(np.stack([by_key[s.key].pooled[m] for s in kept])) for m in members]
    cache = FeatureCache(kept, pooled, skipped=list(profiled.skipped or []))
    masked = [s for s in kept if s.has_mask and s.label not in annotator.negative]
    if len(masked) >= MIN_MASKS:
        views = extract_features(annotator, masked, pixel_keys={s.key for s in masked})
        position = {s.key: i for i, s in enumerate(kept)}
        cache.pixels = {position[views.samples[j].key]: view for j, view in views.pixels.items()}
    return cache
