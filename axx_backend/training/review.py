"""The review loop on a set of samples with one version: which images get a mask next, which labels look wrong.

One code path for a dataset folder (`axx-backend select DATASET_DIR`, `label-check DATASET_DIR`) and a Label
Studio project (`jobs/review.py` turns tasks into samples and stamps). Results are cached under the version's
`review/` directory per data source (`source`: the folder's path, or the project's URL and id): profiles, so a
second `select` loads no model; the last label check, so the Label Studio views can show it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.data import Sample
from ..core.settings import Settings
from ..core.version_meta import VersionMeta, load_version
from ..engine.annotator import Annotator
from .label_check import LABEL_CHECK_FILE, LabelCheck, check_cached, labelled_cache, version_epochs
from .profiles import NO_CLASS, Profile, ProfileStore, file_stamp, profile_samples, profiles_path, review_dir, scores_of
from .selection import choose

log = logging.getLogger(__name__)


def project_source(url: str | None, project: str) -> str:
    """The data-source name of a Label Studio project (the review cache's key)."""
    return f"labelstudio:{(url or '').rstrip('/')}:project:{project}"


def folder_source(dataset_dir: str | os.PathLike[str]) -> str:
    return f"folder:{Path(dataset_dir).resolve()}"


def label_check_path(version_dir: str | os.PathLike[str], source: str) -> Path:
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    return review_dir(version_dir) / f"{Path(LABEL_CHECK_FILE).stem}-{digest}.json"


class VersionHandle:
    """A version directory: its metadata at once, its annotator only when something must be computed."""

    def __init__(self, version_dir: str | os.PathLike[str], settings: Settings) -> None:
        self.path = Path(version_dir)
        self.settings = settings
        self.meta: VersionMeta = load_version(self.path)
        self.name = self.meta.version or self.path.name
        self._annotator: Annotator | None = None

    def annotator(self) -> Annotator:
        if self._annotator is None:
            self._annotator = Annotator.from_version(self.path, self.settings)
        return self._annotator

    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes)

    def is_negative(self, label: str) -> bool:
        if self.meta.negative_classes is not None:
            return label in self.meta.negative_classes
        return self.settings.is_negative(label)

    def store(self, source: str) -> ProfileStore:
        return ProfileStore(profiles_path(self.path, source))


# --- which images get a mask next -------------------------------------------------------------------------------------
@dataclass
class Pick:
    key: str
    rank: int  # 1 = draw this mask first
    label: str  # the class whose mask is asked for
    known: bool  # the class is annotated (else the version's confident, unflagged decision)
    entropy: float
    bald: float
    confidence: float


@dataclass
class Selection:
    version: str
    strategy: str
    k: int
    candidates: int
    picks: list[Pick] = field(default_factory=list)
    anchors: int = 0  # images that already have a mask (the first centres of `diverse`)
    cached: int = 0
    computed: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["selected"] = out.pop("picks")
        out["seconds"] = round(self.seconds, 3)
        return out


def is_candidate(profile: Profile, sample: Sample, version: VersionHandle) -> bool:
    """No mask yet, and a class that gets one is known (annotated, or decided confidently and unflagged)."""
    if sample.has_mask or profile.label == NO_CLASS:
        return False
    return not version.is_negative(version.classes[profile.label])


def select_samples(
    version: VersionHandle,
    samples: Sequence[Sample],
    stamps: Sequence[str],
    source: str,
    k: int,
    strategy: str,
    seed: int = 0,
) -> Selection:
    """The k candidates `strategy` picks among `samples`, in pick order (module docstring of selection.py)."""
    start = time.perf_counter()
    profiled = profile_samples(version.annotator, samples, stamps, version.store(source))
    by_key = {p.key: p for p in profiled.profiles}
    readable = [s for s in samples if s.key in by_key]
    candidates = [s for s in readable if is_candidate(by_key[s.key], s, version)]
    anchors = [by_key[s.key] for s in readable if s.has_mask]
    chosen = choose(strategy, scores_of([by_key[s.key] for s in candidates], anchors), k, np.random.default_rng(seed))
    picks = [_pick(by_key[candidates[i].key], candidates[i], rank, version) for rank, i in enumerate(chosen, 1)]
    return Selection(
        version.name, strategy, k, len(candidates), picks, len(anchors), profiled.cached, profiled.computed,
        list(profiled.skipped or []), time.perf_counter() - start,
    )  # fmt: skip


def _pick(profile: Profile, sample: Sample, rank: int, version: VersionHandle) -> Pick:
    return Pick(
        key=sample.key,
        rank=rank,
        label=version.classes[profile.label],
        known=sample.label is not None,
        entropy=round(profile.entropy, 6),
        bald=round(profile.bald, 6),
        confidence=round(profile.confidence, 6),
    )


# --- which labels look wrong ------------------------------------------------------------------------------------------
def check_samples(version: VersionHandle, samples: Sequence[Sample], stamps: Sequence[str], source: str) -> LabelCheck:
    """The label check of the labelled `samples` (out-of-fold heads on cached profiles; the mask folds on the
    oracle-masked ones), stored as the version's last check of `source`."""
    annotator = version.annotator()
    cache = labelled_cache(annotator, samples, stamps, version.store(source))
    names = [m.name for m in annotator.ensemble.members]
    result = check_cached(annotator, cache, version_epochs(version.meta.metrics, names, version.settings), version.name)
    result.save(label_check_path(version.path, source))
    return result


def stored_check(version_dir: str | os.PathLike[str], source: str) -> LabelCheck | None:
    """The version's last label check of `source`, if one was made."""
    try:
        return LabelCheck.load(label_check_path(version_dir, source))
    except (OSError, ValueError, TypeError) as exc:
        log.warning("stored label check of %s unreadable: %s", version_dir, exc)
        return None


def folder_stamps(samples: Sequence[Sample]) -> list[str]:
    return [file_stamp(s) for s in samples]
