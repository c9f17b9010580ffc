"""The version format: what `version.json` holds, typed, in one place.

Training writes a `VersionMeta` (`save_version`); the annotator, the server's registry, `evaluate` and
`axx-backend versions` read one (`load_version`). Versions written by older releases still load: every
field added since has a default that means "what the older release did" (e.g. no member `weight`:
the members vote equally).

`metrics` stays a free-form report (validation numbers for people and `evaluate`); nothing that
prediction depends on lives there.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VERSION_FILE = "version.json"
FORMAT = 2  # 1: the first releases (untyped dict); 2: this module


class VersionError(RuntimeError):
    """A version is missing, incomplete or unreadable."""


@dataclass(frozen=True)
class MemberSpec:
    """One ensemble member as trained: which backbone weights, how inputs are normalised, its temperature."""

    name: str  # a timm model name
    source: str = ""  # where the backbone weights came from ("pip:<package>", "file:<path>", ...)
    fingerprint: str | None = None  # of the backbone weights; loading other weights is refused
    finetuned: bool = False  # the backbone is stored in the version (`backbone-<name>.safetensors`)
    mean: tuple[float, float, float] | None = None  # input normalisation; None: the weights' own
    std: tuple[float, float, float] | None = None
    temperature: float = 1.0
    weight: float = 1.0  # the member's vote and share of the ensemble mean (relative to the others')
    weights: str = "auto"  # how to find the backbone weights when they are not stored in the version


@dataclass(frozen=True)
class Thresholds:
    """Decision and mask thresholds calibrated by training (each replaces the `Settings` default unless that
    setting is given explicitly)."""

    uncertainty_threshold: float = 0.5
    min_uncertain_to_flag: int = 2
    cam_threshold: float = 0.5  # of the served fusion rule `mask_fusion`
    mask_fusion: str = "mean"
    seg_threshold: float = 0.5
    fusion_thresholds: dict[str, float] = field(default_factory=dict)  # per rule; empty: not calibrated on masks
    member_cam_thresholds: dict[str, float] = field(default_factory=dict)  # a member's own CAM mask
    # bf16 serving's recheck margins, widened to how far training saw bf16 move decisions and score maps
    # (training/recheck_margin.py)
    precision_recheck: float = 0.05
    precision_recheck_mask: float = 0.01
    precision: str = "auto"  # "fp32" where bf16 as served did not pay on the training machine


@dataclass(frozen=True)
class MaskConfig:
    """How a version makes its CAM masks (defaults: what versions before these fields did)."""

    cam_weights: str = "class"  # "class" (w_c) or "contrastive" (w_c minus the others' mean)
    refine: str = "none"  # "none" or "superpixels" (engine/refine.py)
    superpixel_scales: tuple[float, ...] = (200.0, 400.0, 800.0)


@dataclass(frozen=True)
class TrainingInfo:
    """Where a version's data came from and how it was trained."""

    source: str = ""
    n_images: int = 0
    n_labelled: int = 0
    oracle_masks: int = 0
    skipped: tuple[str, ...] = ()  # "key: reason" of unreadable images, "key: mask not used: reason" of masks
    per_class: dict[str, int] = field(default_factory=dict)
    finetune: str = "head"
    finetune_epochs: int = 0
    device: str = "cpu"
    val_keys: tuple[str, ...] = ()  # the samples held out for calibration (evaluate never calibrates on others)


@dataclass(frozen=True)
class VersionMeta:
    """Everything a version's files need to be served, and the report of its training."""

    classes: tuple[str, ...]
    members: tuple[MemberSpec, ...]
    preset: str = "custom"
    negative_classes: tuple[str, ...] | None = None  # None: the settings' negative-class rule decides
    input_size: int = 320
    dropout: float = 0.3
    mc_samples: int = 30
    pooling: str = "avg"  # what the heads read (engine/pooling.py); versions before 2026-12 pooled by average
    mask_source: str = "cam"  # "cam" or "segments" (the segment head); "seg_head" in versions before it
    masks: MaskConfig = field(default_factory=MaskConfig)
    thresholds: Thresholds = field(default_factory=Thresholds)
    training: TrainingInfo = field(default_factory=TrainingInfo)
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str = ""  # set by ModelStore when the version is written
    created: str = ""
    format: int = FORMAT

    def member(self, name: str) -> MemberSpec:
        for spec in self.members:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def cam_calibrated(self) -> bool:
        """The CAM thresholds were chosen on oracle masks (not the defaults)."""
        return bool(self.thresholds.fusion_thresholds)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VersionMeta:
        """Read a `version.json` of any format; unknown keys are ignored."""
        if "classes" not in data or "members" not in data:
            raise VersionError("version.json has no classes or members")
        fields = _known(cls, data)
        fields["classes"] = tuple(data["classes"])
        fields["members"] = tuple(_member(m) for m in data["members"])
        if data.get("negative_classes") is not None:
            fields["negative_classes"] = tuple(data["negative_classes"])
        fields["masks"] = _build(MaskConfig, data.get("masks") or {})
        fields["thresholds"] = _build(Thresholds, data.get("thresholds") or {})
        fields["training"] = _build(TrainingInfo, data.get("training") or {})
        fields["format"] = int(data.get("format", 1))
        return cls(**fields)


def load_version(version_dir: str | os.PathLike[str]) -> VersionMeta:
    """The typed `version.json` of a version directory."""
    path = Path(version_dir) / VERSION_FILE
    if not path.is_file():
        raise VersionError(f"{version_dir} is not a complete version (no {VERSION_FILE})")
    try:
        return VersionMeta.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise VersionError(f"{path} is not valid JSON: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise VersionError(f"{path} does not describe a version: {exc}") from exc


def save_version(version_dir: str | os.PathLike[str], meta: VersionMeta) -> None:
    """Write `version.json` durably (flushed and fsynced: it is what makes a version complete)."""
    with open(Path(version_dir) / VERSION_FILE, "w") as fh:
        json.dump(meta.to_dict(), fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def _member(data: Mapping[str, Any]) -> MemberSpec:
    spec = _build(MemberSpec, data)
    if spec.mean is not None:
        spec = dataclasses.replace(spec, mean=tuple(spec.mean), std=tuple(spec.std or ()))  # type: ignore[arg-type]
    return spec


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _build(cls: type, data: Mapping[str, Any]) -> Any:
    """A dataclass from the keys it knows; JSON lists become the tuples the fields declare."""
    values = _known(cls, data)
    for f in dataclasses.fields(cls):
        if f.name in values and isinstance(values[f.name], list) and str(f.type).startswith("tuple"):
            values[f.name] = tuple(values[f.name])
    return cls(**values)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_jsonable(v) for v in value]
    return value
