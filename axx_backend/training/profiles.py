"""Review profiles: what selection and the label check read of one image, from one forward of a version.

A profile holds the image's decision (class, flag, confidence), the uncertainty of its mask for the class
whose mask would be drawn (its known class, else the ensemble's confident decision), and every member's pooled
features (the diversity space of `selection.py`, and what the label check's out-of-fold heads train on).

Profiles are cached on disk per version and per data source (`<version>/review/profiles-<source>.npz`), keyed
by sample key and a stamp that changes when the image or its known class does, so `axx-backend select` on
1,000 cached candidates loads no model at all.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.data import Sample, iter_readable
from ..engine.annotator import Annotator, Forward
from ..engine.uncertainty import confidence
from .selection import Scores, map_disagreement, map_entropy, unit_features

log = logging.getLogger(__name__)

NO_CLASS = -1  # a profile whose class is not known (unlabelled and flagged, or not confident)
REVIEW_DIR = "review"  # inside a version directory: what the review loop computed with that version


@dataclass
class Profile:
    key: str
    stamp: str  # what the profile was computed from (file, size, mtime or image URL; the known class)
    label: int  # the class whose mask is scored: the known class, else the unflagged decision; NO_CLASS
    decided: int  # the ensemble's class
    flagged: bool
    confidence: float  # 1 - normalised entropy of the ensemble mean
    entropy: float  # mask uncertainty: mean binary entropy of the served score map (0 without a class)
    bald: float  # disagreement between the members' maps of the class (0 without a class)
    pooled: list[np.ndarray]  # per member [K_m] float32: what its head reads (the version's pooling)


def review_dir(version_dir: str | os.PathLike[str]) -> Path:
    return Path(version_dir) / REVIEW_DIR


def profiles_path(version_dir: str | os.PathLike[str], source: str) -> Path:
    """The cache file of one data source (a dataset folder, a Label Studio project) for one version."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    return review_dir(version_dir) / f"profiles-{digest}.npz"


def file_stamp(sample: Sample) -> str:
    """A folder sample's stamp: its class, path, size and modification time."""
    path = sample.path
    if path is None:
        return f"{sample.label}|{sample.key}"
    try:
        st = os.stat(path)
    except OSError:
        return f"{sample.label}|{path}|missing"
    return f"{sample.label}|{path}|{st.st_size}|{st.st_mtime_ns}"


class ProfileStore:
    """Profiles on disk, one `.npz` (no pickles); a missing or unreadable file is an empty cache."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None

    def load(self) -> dict[str, Profile]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            with np.load(self.path, allow_pickle=False) as z:
                return _unpack({k: z[k] for k in z.files})
        except (OSError, ValueError, KeyError) as exc:
            log.warning("profile cache %s unreadable (%s): recomputing", self.path, exc)
            return {}

    def save(self, profiles: dict[str, Profile]) -> None:
        if self.path is None or not profiles:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **_pack(list(profiles.values())))
        os.replace(tmp, self.path)


def _pack(profiles: Sequence[Profile]) -> dict[str, np.ndarray]:
    arrays = {
        "key": np.array([p.key for p in profiles], dtype=str),
        "stamp": np.array([p.stamp for p in profiles], dtype=str),
        "label": np.array([p.label for p in profiles], dtype=np.int64),
        "decided": np.array([p.decided for p in profiles], dtype=np.int64),
        "flagged": np.array([p.flagged for p in profiles], dtype=bool),
        "confidence": np.array([p.confidence for p in profiles], dtype=np.float64),
        "entropy": np.array([p.entropy for p in profiles], dtype=np.float64),
        "bald": np.array([p.bald for p in profiles], dtype=np.float64),
    }
    for m in range(len(profiles[0].pooled)):
        arrays[f"pooled_{m}"] = np.stack([p.pooled[m] for p in profiles]).astype(np.float32)
    return arrays


def _unpack(z: dict[str, np.ndarray]) -> dict[str, Profile]:
    members = sorted(int(k.split("_")[1]) for k in z if k.startswith("pooled_"))
    pooled = [z[f"pooled_{m}"] for m in members]
    return {
        str(key): Profile(
            key=str(key),
            stamp=str(z["stamp"][i]),
            label=int(z["label"][i]),
            decided=int(z["decided"][i]),
            flagged=bool(z["flagged"][i]),
            confidence=float(z["confidence"][i]),
            entropy=float(z["entropy"][i]),
            bald=float(z["bald"][i]),
            pooled=[p[i] for p in pooled],
        )
        for i, key in enumerate(z["key"])
    }


@dataclass
class Profiled:
    """Profiles of the readable samples, in the samples' order, and what it took."""

    profiles: list[Profile]
    cached: int = 0
    computed: int = 0
    skipped: list[str] | None = None  # "key: reason" of images that could not be read


def profile_samples(
    annotator_of: Callable[[], Annotator],
    samples: Sequence[Sample],
    stamps: Sequence[str] | None = None,
    store: ProfileStore | None = None,
) -> Profiled:
    """Profiles of `samples` (stamps default to `file_stamp`): from `store` where the stamp matches, else one
    forward per batch (the annotator is only made, by `annotator_of`, when something must be computed)."""
    stamps = list(stamps) if stamps is not None else [file_stamp(s) for s in samples]
    cached = store.load() if store is not None else {}
    missing = [(s, st) for s, st in zip(samples, stamps, strict=True) if _stale(cached.get(s.key), st)]
    fresh: dict[str, Profile] = {}
    skipped: list[str] = []
    if missing:
        annotator = annotator_of()
        batch = max(1, annotator.settings.batch_size)
        for start in range(0, len(missing), batch):
            fresh.update(_profile_chunk(annotator, missing[start : start + batch], skipped))
        if store is not None:
            store.save({**cached, **fresh})
    known = {**cached, **fresh}
    wanted = {s.key: st for s, st in zip(samples, stamps, strict=True)}
    profiles = [known[s.key] for s in samples if not _stale(known.get(s.key), wanted[s.key])]
    return Profiled(profiles, cached=len(samples) - len(missing), computed=len(fresh), skipped=skipped)


def _stale(profile: Profile | None, stamp: str) -> bool:
    return profile is None or profile.stamp != stamp


@torch.inference_mode()
def _profile_chunk(annotator: Annotator, chunk: Sequence[tuple[Sample, str]], skipped: list[str]) -> dict[str, Profile]:
    stamps = {sample.key: stamp for sample, stamp in chunk}
    loaded = list(iter_readable([sample for sample, _ in chunk], skipped))
    if not loaded:
        return {}
    readable = [(sample, stamps[sample.key]) for sample, _ in loaded]
    images = [image for _, image in loaded]
    fwd = annotator.forward(images, levels=annotator.mask_source == "segments")
    return {s.key: profile_one(annotator, fwd, b, s, stamp) for b, (s, stamp) in enumerate(readable)}


def profile_one(annotator: Annotator, fwd: Forward, b: int, sample: Sample, stamp: str) -> Profile:
    """Image b of a forward: its decision, the mask uncertainty of its class, its pooled features."""
    decision = annotator.decide(fwd, b)
    if sample.label is not None:
        label = annotator.classes.index(sample.label)
    else:
        label = NO_CLASS if decision.flagged else decision.label
    entropy, bald = mask_uncertainty(annotator, fwd, b, label)
    mean = np.average(fwd.member_probs(b), axis=0, weights=annotator.weights)
    return Profile(
        key=sample.key,
        stamp=stamp,
        label=label,
        decided=decision.label,
        flagged=decision.flagged,
        confidence=confidence(mean),
        entropy=entropy,
        bald=bald,
        pooled=[out.pooled[b].cpu().numpy() for out in fwd.outputs],
    )


def mask_uncertainty(annotator: Annotator, fwd: Forward, b: int, label: int) -> tuple[float, float]:
    """(entropy of the served score map, disagreement of the members' maps) for class `label`: the segment
    head's probability when the version serves it, else the mean of the members' (refined) CAMs; every
    member's CAM for the disagreement. (0, 0) without a class or for a negative class (no mask to draw)."""
    if label == NO_CLASS or annotator.classes[label] in annotator.negative:
        return 0.0, 0.0
    maps = annotator.refined_maps(fwd, b, label)
    if annotator.mask_source == "segments":
        served = annotator.segment_score(fwd, b, label, list(range(len(fwd.outputs))))
    else:
        served = np.mean(maps, axis=0)
    return map_entropy(served), map_disagreement(maps)


def scores_of(candidates: Sequence[Profile], anchors: Sequence[Profile] = ()) -> Scores:
    """Selection's view of candidate profiles; `anchors`: profiles of images that already have a mask."""
    if not candidates:
        return Scores(np.zeros(0), np.zeros(0), np.zeros((0, 0), np.float32))
    members = len(candidates[0].pooled)
    features = unit_features([np.stack([p.pooled[m] for p in candidates]) for m in range(members)])
    anchor_features = None
    if anchors:
        anchor_features = unit_features([np.stack([p.pooled[m] for p in anchors]) for m in range(members)])
    return Scores(
        entropy=np.array([p.entropy for p in candidates]),
        bald=np.array([p.bald for p in candidates]),
        features=features,
        anchors=anchor_features,
    )
