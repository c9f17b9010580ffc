"""The prediction pipeline: images -> ensemble forward -> MC statistics -> decision ->
saliency -> mask -> `Annotation`. The only entry point the CLI and the server call."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..core.annotation import Annotation, MemberResult
from ..core.settings import Settings
from ..core.version_meta import MemberSpec, VersionError, VersionMeta, load_version
from ..core.versions import ModelStore
from .ensemble import Ensemble, Member, MemberOutput, select_device
from .masks import fuse_maps
from .saliency import fast_xgradcam, gradcam_maps, normalize_maps, upsample
from .segmentation import SegHead, seg_probabilities
from .uncertainty import confidence, decide, mc_statistics
from .weights import load_backbone

log = logging.getLogger(__name__)

# Values a version calibrates; they replace the defaults of Settings unless set explicitly.
CALIBRATED = ("uncertainty_threshold", "cam_threshold", "mask_fusion", "min_uncertain_to_flag", "seg_threshold")


class Annotator:
    """Runs the pipeline of METHOD.md on PIL images with one ensemble."""

    def __init__(
        self,
        ensemble: Ensemble,
        settings: Settings,
        version: str | None = None,
        input_size: int | None = None,
        negative_classes: set[str] | None = None,
        mask_source: str = "cam",
    ) -> None:
        self.settings = settings
        if settings.mask_source != "auto":
            mask_source = settings.mask_source
        if mask_source == "seg_head" and not all(m.seg_head is not None for m in ensemble.members):
            raise VersionError("mask_source seg_head, but this version has no segmentation heads")
        self.mask_source = mask_source
        self.version = version
        self.input_size = input_size or settings.input_size
        self.device = select_device(settings.device)
        self.ensemble = ensemble.prepare(self.device, settings.channels_last and self.device.type == "cpu")
        if negative_classes is None:
            negative_classes = {c for c in ensemble.classes if settings.is_negative(c)}
        self.negative = negative_classes

    @property
    def classes(self) -> list[str]:
        return self.ensemble.classes

    @classmethod
    def from_version(
        cls, version_dir: str | os.PathLike[str], settings: Settings | None = None, explicit: set[str] | None = None
    ) -> Annotator:
        """Load a trained version; its calibrated thresholds win unless named in `explicit`."""
        settings = settings or Settings.from_env()
        explicit = settings.explicit_from_env() if explicit is None else explicit
        version_dir = Path(version_dir)
        meta = load_version(version_dir)
        settings = settings.replace(**calibrated_settings(meta, settings, explicit))
        negative = None
        if meta.negative_classes is not None and not explicit & {"negative_classes", "negative_pattern"}:
            negative = set(meta.negative_classes)
        return cls(
            load_ensemble(version_dir, meta, settings),
            settings,
            version=meta.version or version_dir.name,
            input_size=meta.input_size,
            negative_classes=negative,
            mask_source=meta.mask_source,
        )

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        size = (self.input_size, self.input_size)
        arrays = [np.asarray(img.convert("RGB").resize(size, Image.BILINEAR), dtype=np.float32) for img in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div_(255.0).to(self.device)

    def annotate(self, images: Sequence[Image.Image], with_heat: bool = False) -> list[Annotation]:
        results: list[Annotation] = []
        batch = max(1, self.settings.batch_size)
        for start in range(0, len(images), batch):
            results.extend(self._annotate_batch(images[start : start + batch], with_heat))
        return results

    def _annotate_batch(self, images: Sequence[Image.Image], with_heat: bool) -> list[Annotation]:
        s = self.settings
        x = self.preprocess(images)
        generator = torch.Generator().manual_seed(s.seed)
        outputs = self.ensemble.forward_mc(x, s.mc_samples, generator, s.precision, full_mc=s.mc_mode == "full")
        stats = [mc_statistics(out.mc_probs) for out in outputs]
        members: list[Member] = list(self.ensemble.members)
        classes = self.classes
        annotations = []
        for b, img in enumerate(images):
            probs = [st.mean_probs[b].cpu().numpy() for st in stats]
            entropies = [float(st.entropy[b]) for st in stats]
            decision = decide(probs, entropies, s.uncertainty_threshold, s.min_uncertain_to_flag)
            ensemble_mean = np.mean(probs, axis=0)
            member_results = [
                MemberResult(
                    name=m.name,
                    probs=[float(p) for p in probs[i]],
                    label=classes[int(probs[i].argmax())],
                    entropy=entropies[i],
                    mutual_info=float(stats[i].mutual_info[b]),
                    std_top=float(stats[i].std_top[b]),
                    uncertain=entropies[i] > s.uncertainty_threshold,
                    agrees=i in decision.agreeing,
                )
                for i, m in enumerate(members)
            ]
            label = classes[decision.label]
            ann = Annotation(
                label=label,
                probs={c: float(p) for c, p in zip(classes, ensemble_mean, strict=True)},
                score=confidence(ensemble_mean),
                class_score=decision.class_score,
                flagged=decision.flagged,
                reason=decision.reason,
                members=member_results,
                width=img.width,
                height=img.height,
            )
            if not decision.flagged and label not in self.negative:
                size = (img.height, img.width)
                maps = [
                    self._saliency(members[i], outputs[i], b, x[b : b + 1], decision.label, size)
                    for i in decision.agreeing
                ]
                if self.mask_source == "seg_head":
                    ann.mask, heat = fuse_maps(maps, "mean", s.seg_threshold)
                    ann.mask_source = "seg_head"
                else:
                    ann.mask, heat = fuse_maps(maps, s.mask_fusion, s.cam_threshold)
                    ann.mask_source = f"cam:{s.mask_fusion}"
                if with_heat:
                    ann.heat = heat
            annotations.append(ann)
        return annotations

    def _saliency(
        self, member: Member, output: MemberOutput, b: int, image: torch.Tensor, label: int, size: tuple[int, int]
    ) -> np.ndarray:
        """One member's map of image `b` at its original size: its segmentation head's foreground
        probability, or its normalised CAM of class `label`."""
        if self.mask_source == "seg_head":
            assert member.seg_head is not None and output.seg_features is not None
            return seg_map(member.seg_head, output.seg_features[b : b + 1], size)
        return self.cam(member, output.features[b : b + 1], image, label, size)

    def cam(
        self, member: Member, features: torch.Tensor, image: torch.Tensor, label: int, size: tuple[int, int]
    ) -> np.ndarray:
        """One member's normalised CAM of class `label` at `size` = (H, W): fast XGrad-CAM from the
        features, or a grad-cam method from the image (`cam_method`)."""
        if self.settings.cam_method == "fast":
            return member_cam(member, features, label, size)
        classes = torch.tensor([label], device=features.device)
        cam = torch.from_numpy(gradcam_maps(member, member.normalize(image), classes, self.settings.cam_method))
        # Normalise, upsample, normalise again: the order of grad-cam's XGradCAM output.
        return normalize_maps(upsample(cam.float().cpu(), size))[0].numpy()


def member_cam(member: Member, features: torch.Tensor, label: int, size: tuple[int, int]) -> np.ndarray:
    """A member's normalised fast XGrad-CAM of class `label` at `size` = (H, W), from its last feature
    map [1, K, h, w]: what serving fuses, and what training calibrates thresholds on (cached maps)."""
    with torch.no_grad():
        classes = torch.tensor([label], device=features.device)
        cam = normalize_maps(fast_xgradcam(features.float(), member.head.fc.weight.detach(), classes))
    # Normalise, upsample, normalise again: the order of grad-cam's XGradCAM output.
    return normalize_maps(upsample(cam.cpu(), size))[0].numpy()


def seg_map(head: SegHead, seg_features: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A segmentation head's foreground probability at `size` = (H, W), from the map it reads [1, K, h, w]."""
    return upsample(seg_probabilities(head, seg_features).cpu(), size)[0].numpy()


def calibrated_settings(meta: VersionMeta, settings: Settings, explicit: set[str]) -> dict[str, Any]:
    """The settings a version calibrated (thresholds, fusion rule), except those given explicitly."""
    stored = meta.thresholds
    calibrated = {k: getattr(stored, k) for k in CALIBRATED if k not in explicit}
    # A fusion rule chosen explicitly gets the version's threshold for that rule, when it has one.
    rules = stored.fusion_thresholds
    if "mask_fusion" in explicit and "cam_threshold" not in explicit and settings.mask_fusion in rules:
        calibrated["cam_threshold"] = float(rules[settings.mask_fusion])
    return calibrated


def load_ensemble(version_dir: Path, meta: VersionMeta, settings: Settings) -> Ensemble:
    """Rebuild the members of a version; refuse weights that differ from the ones it was trained on."""
    from safetensors.torch import load_file

    heads = load_file(str(version_dir / "heads.safetensors"))
    members = [_load_member(version_dir, spec, meta, heads, settings) for spec in meta.members]
    return Ensemble(members, list(meta.classes)).eval()


def _load_member(
    version_dir: Path, spec: MemberSpec, meta: VersionMeta, heads: dict[str, torch.Tensor], settings: Settings
) -> Member:
    name = spec.name
    finetuned = version_dir / f"backbone-{name}.safetensors"
    if finetuned.is_file():
        backbone, info = load_backbone(name, str(finetuned))
    else:
        backbone, info = load_backbone(name, spec.weights, settings.weights_dir)
        if spec.fingerprint and info.fingerprint != spec.fingerprint:
            raise VersionError(
                f"version {version_dir.name}: member {name} was trained on weights {spec.fingerprint} "
                f"({spec.source}), but they now resolve to {info.fingerprint} ({info.source})"
            )
    if spec.mean is not None and spec.std is not None:
        info = type(info)(info.source, spec.mean, spec.std, info.fingerprint)
    member = Member(name, backbone, len(meta.classes), meta.dropout, info)
    member.head.fc.weight.data.copy_(heads[f"{name}.weight"])
    member.head.fc.bias.data.copy_(heads[f"{name}.bias"])
    member.temperature.fill_(float(spec.temperature))
    if f"{name}.seg.weight" in heads:
        _load_seg_head(version_dir, member, spec, heads)
    return member


def _load_seg_head(version_dir: Path, member: Member, spec: MemberSpec, heads: dict[str, torch.Tensor]) -> None:
    # Versions written before the stride-16 head have no `seg_layer`: theirs reads the last map.
    member.seg_layer = spec.seg_layer
    weight = heads[f"{member.name}.seg.weight"]
    try:
        channels = member.seg_channels
    except ValueError as exc:
        raise VersionError(f"version {version_dir.name}: member {member.name}: {exc}") from exc
    if weight.shape[1] != channels:
        raise VersionError(
            f"version {version_dir.name}: member {member.name}'s segmentation head has {weight.shape[1]} inputs, "
            f"but the map it reads ({member.seg_layer or 'last feature map'}) has {channels} channels"
        )
    member.seg_head = SegHead(channels)
    member.seg_head.conv.weight.data.copy_(weight)
    member.seg_head.conv.bias.data.copy_(heads[f"{member.name}.seg.bias"])


def load_annotator(
    model_dir: str | os.PathLike[str], settings: Settings, version: str | None = None, explicit: set[str] | None = None
) -> Annotator:
    store = ModelStore(model_dir)
    name = version or store.current()
    if name is None:
        raise VersionError(
            f"{model_dir} has no current version: run `axx-backend train DATASET_DIR --model-dir {model_dir}`"
        )
    return Annotator.from_version(store.path(name), settings, explicit)
