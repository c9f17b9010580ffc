"""The prediction pipeline (docs/METHOD.md "Prediction"), in two explicit steps that serving, `evaluate` and
training share:

    forward(images)  -> Forward: one backbone pass per member, the MC statistics (and, for the segment
                        head, the earlier stages of the same pass)
    conclude(forward) -> [Annotation]: the decision, the maps of the agreeing members, the refinement to
                        image regions, the fused mask at the image's size

`annotate(images)` is `conclude(forward(images))`, batch by batch. Maps are computed at the working
resolution (the model's input size, where the image regions are cut) and upsampled once, at the end.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..core.annotation import Annotation, MemberResult
from ..core.settings import Settings
from ..core.thresholds import rule_map
from ..core.version_meta import MemberSpec, VersionError, VersionMeta, load_version
from ..core.versions import ModelStore
from .ensemble import Ensemble, Member, MemberOutput, resolve_precision, select_device
from .fold import fold_batchnorm
from .masks import worst_iou_within
from .neighbours import NEIGHBOURS_FILE, NeighbourBank
from .refine import SuperpixelSpec, pool, segment_image
from .saliency import gradcam_maps, member_cam, normalize_maps, upsample
from .segments import SegmentHead, region_features
from .uncertainty import Decision, MCStats, confidence, decide, mc_statistics, near_a_decision, put_rows
from .weights import load_backbone

log = logging.getLogger(__name__)

# Values a version calibrates; they replace the defaults of Settings unless set explicitly.
CALIBRATED = (
    "uncertainty_threshold",
    "cam_threshold",
    "mask_fusion",
    "min_uncertain_to_flag",
    "seg_threshold",
    "precision_recheck",  # how far bf16 moved the version's decisions where it trained
    "precision_recheck_mask",  # ... and its served score maps
    "precision",  # fp32 where bf16 as served did not pay where it trained
)
# Choices a version records; an explicit setting wins (e.g. AXX_REFINE=none to compare).
RECORDED = ("cam_weights", "refine", "superpixel_scales")


@dataclass
class Forward:
    """One batch through the ensemble: everything `conclude` and the measuring code read."""

    images: list[Image.Image]  # what the annotations' sizes come from (none for `forward_input`'s passes)
    x: torch.Tensor  # [B, 3, S, S] in [0, 1]: the model's input, also the working image of the maps
    outputs: list[MemberOutput]  # per member
    stats: list[MCStats]  # per member
    segmentations: dict[int, list[np.ndarray]] = field(default_factory=dict)  # image index -> region labels
    rechecked: list[int] = field(default_factory=list)  # images of a bf16 forward run again in fp32

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def member_probs(self, b: int) -> list[np.ndarray]:
        return [st.mean_probs[b].cpu().numpy() for st in self.stats]

    def member_entropy(self, b: int) -> list[float]:
        return [float(st.entropy[b]) for st in self.stats]

    def working_image(self, b: int, side: int) -> np.ndarray:
        """Image b as the model saw it, at `side` x `side`: RGB uint8 [side, side, 3]."""
        x = self.x[b : b + 1]
        if x.shape[-1] != side:
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        return (x[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()


class Annotator:
    """Runs the pipeline on PIL images with one ensemble (and, when the version has one, a segment head)."""

    def __init__(
        self,
        ensemble: Ensemble,
        settings: Settings,
        version: str | None = None,
        input_size: int | None = None,
        negative_classes: set[str] | None = None,
        mask_source: str = "cam",
        segment_head: SegmentHead | None = None,
        weights: Sequence[float] | None = None,
        recheck_twin: Ensemble | None = None,
        neighbours: NeighbourBank | None = None,
    ) -> None:
        """`recheck_twin`: the fp32 ensemble a bf16 annotator runs again the images near a decision with, where
        the caller holds one with the same weights (default: a copy of `ensemble` made before the bf16 cast).
        `neighbours`: the version's labelled images for the nearest-image check (unless `neighbour_check` is off)."""
        self.settings = settings
        self.weights = list(weights) if weights is not None else [1.0] * len(ensemble.members)
        if settings.mask_source != "auto":
            mask_source = settings.mask_source
        if mask_source == "segments" and segment_head is None:
            raise VersionError("mask_source segments, but this version has no segment head")
        self.mask_source = mask_source
        self.segment_head = segment_head
        self.version = version
        self.input_size = input_size or settings.input_size
        # Maps, regions and masks are made at this side (the input size, at most `map_side`), then upsampled once.
        self.map_side = min(self.input_size, settings.map_side)
        self.device = select_device(settings.device)
        self.precision = resolve_precision(settings.precision, self.device)
        log.info("backbones run in %s on %s (AXX_PRECISION=%s)", self.precision, self.device, settings.precision)
        # bf16 casts the ensemble's weights in place (the annotator takes the ensemble over), unless grad-cam
        # makes the CAMs: its autograd pass runs the members in fp32
        channels_last = settings.channels_last and self.device.type == "cpu"
        bf16_weights = self.precision == "bf16" and settings.cam_method == "fast"
        # what `recheck` runs in fp32: a copy of the weights where the bf16 cast (in place) takes the served ones
        self.recheck_ensemble: Ensemble | None = None
        if self.precision == "bf16" and max(settings.precision_recheck, settings.precision_recheck_mask) > 0:
            if recheck_twin is None:
                recheck_twin = copy.deepcopy(ensemble) if bf16_weights else ensemble
            self.recheck_ensemble = recheck_twin.prepare(self.device, channels_last)
        self.rechecked = 0  # images run again in fp32, for decisions or masks (the cost: benchmarks/precision.py)
        self.rechecked_masks = 0  # of those, images run again for their mask
        self.ensemble = ensemble.prepare(self.device, channels_last, bf16_weights)
        if negative_classes is None:
            negative_classes = {c for c in ensemble.classes if settings.is_negative(c)}
        self.negative = negative_classes
        use_bank = neighbours is not None and settings.neighbour_check != "off"
        self.neighbours = neighbours.to(self.device) if use_bank and neighbours is not None else None

    @property
    def classes(self) -> list[str]:
        return self.ensemble.classes

    @property
    def refines(self) -> bool:
        return self.settings.refine == "superpixels"

    @classmethod
    def from_version(
        cls, version_dir: str | os.PathLike[str], settings: Settings | None = None, explicit: set[str] | None = None
    ) -> Annotator:
        """Load a trained version; its calibrated thresholds and recorded choices win unless named in `explicit`."""
        settings = settings or Settings.from_env()
        explicit = settings.explicit_from_env() if explicit is None else explicit
        version_dir = Path(version_dir)
        meta = load_version(version_dir)
        ensemble, segment_head = load_ensemble(version_dir, meta, settings)
        neighbours = load_neighbours(version_dir, len(meta.members))
        name = meta.version or version_dir.name
        return cls.from_meta(meta, ensemble, segment_head, settings, explicit, version=name, neighbours=neighbours)

    @classmethod
    def from_meta(
        cls,
        meta: VersionMeta,
        ensemble: Ensemble,
        segment_head: SegmentHead | None,
        settings: Settings,
        explicit: set[str],
        version: str | None = None,
        recheck_twin: Ensemble | None = None,
        neighbours: NeighbourBank | None = None,
    ) -> Annotator:
        """The annotator that serves the version `meta` describes, from its members as `load_ensemble` rebuilds them
        (BatchNorms folded) and its segment head: `from_version` for a stored version, training for the version it
        is about to write (so what training measures is what serving will run)."""
        settings = settings.replace(**calibrated_settings(meta, settings, explicit))
        negative = None
        if meta.negative_classes is not None and not explicit & {"negative_classes", "negative_pattern"}:
            negative = set(meta.negative_classes)
        return cls(
            ensemble,
            settings,
            version=version or meta.version or None,
            input_size=meta.input_size,
            negative_classes=negative,
            mask_source=meta.mask_source if meta.mask_source in ("cam", "segments") else "cam",
            segment_head=segment_head,
            weights=[spec.weight for spec in meta.members],
            recheck_twin=recheck_twin,
            neighbours=neighbours,
        )

    # --- forward ---------------------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        size = (self.input_size, self.input_size)
        arrays = [np.asarray(img.convert("RGB").resize(size, Image.BILINEAR), dtype=np.float32) for img in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div_(255.0).to(self.device)

    def forward(self, images: Sequence[Image.Image], levels: bool | None = None) -> Forward:
        """One backbone pass per member on a batch; `levels` (default: when the segment head serves) also
        keeps the earlier stages the segment head reads."""
        return self.forward_input(self.preprocess(images), levels, images)

    def forward_input(self, x: torch.Tensor, levels: bool | None = None, images: Sequence[Image.Image] = ()) -> Forward:
        """`forward` of preprocessed images `x` ([B, 3, S, S] in [0, 1] on the annotator's device); `images`, the
        PIL images they came from, only `conclude` reads (for the annotations' sizes)."""
        want_levels = self.mask_source == "segments" if levels is None else levels
        fwd = Forward(list(images), x, *self._pass(self.ensemble, self.precision, x, want_levels))
        if self.recheck_ensemble is not None:
            self.recheck(fwd, want_levels)
        return fwd

    def _pass(
        self, ensemble: Ensemble, precision: str, x: torch.Tensor, levels: bool
    ) -> tuple[list[MemberOutput], list[MCStats]]:
        s = self.settings
        # seeded per pass, and the dropout masks are shared by the batch: an image's samples do not depend on
        # which images share its pass
        generator = torch.Generator().manual_seed(s.seed)
        outputs = ensemble.forward_mc(x, s.mc_samples, generator, precision, full_mc=s.mc_mode == "full", levels=levels)
        samples = [out.mc_probs for out in outputs]
        if s.tta_flip:  # the mirrored image's samples join the statistics; the maps stay the image's own
            mirrored = ensemble.forward_mc(x.flip(-1), s.mc_samples, generator, precision)
            samples = [torch.cat([a, b.mc_probs]) for a, b in zip(samples, mirrored, strict=True)]
        return outputs, [mc_statistics(p) for p in samples]

    def recheck(self, fwd: Forward, levels: bool) -> None:
        """Run again in fp32 the images of a bf16 forward whose decision bf16's rounding could have changed
        (`Settings.precision_recheck`), and keep their fp32 outputs: their decisions, maps and masks are those
        fp32 serving makes."""
        s = self.settings
        if self.recheck_ensemble is None or s.precision_recheck <= 0:
            return
        rule = (s.uncertainty_threshold, s.min_uncertain_to_flag, self.weights, s.precision_recheck)
        near = [
            b
            for b in range(len(fwd))
            if near_a_decision(fwd.member_probs(b), fwd.member_entropy(b), *rule, self.nearest_classes(fwd, b))
        ]
        self._again_in_fp32(fwd, near, levels)

    def _again_in_fp32(self, fwd: Forward, images: list[int], levels: bool) -> None:
        """Replace the outputs and statistics of `images` in a bf16 forward with fp32 passes'. One image per
        pass: the fp32 activations of a whole batch would raise the peak memory of serving (about 0.5 GB for the
        paper's members at 512² batch 8), and the MC samples do not depend on the batch (`_pass`)."""
        if self.recheck_ensemble is None:
            return
        for b in images:
            row = torch.tensor([b], device=fwd.x.device)
            outputs, stats = self._pass(self.recheck_ensemble, "fp32", fwd.x[row], levels)
            for mine, theirs in zip(fwd.outputs, outputs, strict=True):
                mine.put(row, theirs)
            for mine_stats, their_stats in zip(fwd.stats, stats, strict=True):
                put_rows(mine_stats, row, their_stats)
        fwd.rechecked.extend(images)
        self.rechecked += len(images)

    def _mask_on_edge(self, fwd: Forward, b: int, score: np.ndarray, threshold: float) -> bool:
        """Could bf16's rounding, moving the score by less than `Settings.precision_recheck_mask`, leave image
        b's mask below `Settings.precision_recheck_iou` against fp32's? (Only bf16 images not run in fp32 yet.)"""
        s = self.settings
        if self.recheck_ensemble is None or b in fwd.rechecked or s.precision_recheck_mask <= 0:
            return False
        return worst_iou_within(score, threshold, s.precision_recheck_mask) < s.precision_recheck_iou

    # --- conclude --------------------------------------------------------------------------------------------------
    def decide(self, fwd: Forward, b: int) -> Decision:
        s = self.settings
        probs, entropy = fwd.member_probs(b), fwd.member_entropy(b)
        neighbours = self.nearest_classes(fwd, b)
        return decide(probs, entropy, s.uncertainty_threshold, s.min_uncertain_to_flag, self.weights, neighbours)

    def nearest_classes(self, fwd: Forward, b: int) -> list[int] | None:
        """Each member's nearest labelled image's class for image b (None without a neighbour bank)."""
        if self.neighbours is None:
            return None
        return self.neighbours.nearest_classes([out.pooled[b : b + 1] for out in fwd.outputs])[:, 0].tolist()

    def conclude(self, fwd: Forward, with_heat: bool = False) -> list[Annotation]:
        edge: list[int] = []
        annotations = [self._conclude_one(fwd, b, with_heat, edge) for b in range(len(fwd))]
        if edge:  # masks bf16's rounding could move far: those images are concluded again from an fp32 pass
            self._again_in_fp32(fwd, edge, levels=all(out.levels is not None for out in fwd.outputs))
            self.rechecked_masks += len(edge)
            for b in edge:
                annotations[b] = self._conclude_one(fwd, b, with_heat)
        return annotations

    def _conclude_one(self, fwd: Forward, b: int, with_heat: bool, edge: list[int] | None = None) -> Annotation:
        """Image b's annotation; when its mask is on bf16's edge, b is added to `edge` (when given) instead."""
        decision = self.decide(fwd, b)
        ann = self._annotation(fwd, b, decision)
        if decision.flagged or ann.label in self.negative:
            return ann
        score, threshold, source = self.mask_score(fwd, b, decision.label, decision.agreeing)
        if edge is not None and self._mask_on_edge(fwd, b, score, threshold):
            edge.append(b)
            return ann
        heat = to_size(score, (ann.height, ann.width))
        ann.mask = (heat > threshold).astype(np.uint8)
        ann.mask_source = source
        if with_heat:
            ann.heat = heat
        return ann

    def _annotation(self, fwd: Forward, b: int, decision: Decision) -> Annotation:
        s, classes = self.settings, self.classes
        probs, entropies = fwd.member_probs(b), fwd.member_entropy(b)
        ensemble_mean = np.average(probs, axis=0, weights=self.weights)
        members = [
            MemberResult(
                name=m.name,
                probs=[float(p) for p in probs[i]],
                label=classes[int(probs[i].argmax())],
                entropy=entropies[i],
                mutual_info=float(fwd.stats[i].mutual_info[b]),
                std_top=float(fwd.stats[i].std_top[b]),
                uncertain=entropies[i] > s.uncertainty_threshold,
                agrees=i in decision.agreeing,
            )
            for i, m in enumerate(self.ensemble.members)
        ]
        image = fwd.images[b]
        return Annotation(
            label=classes[decision.label],
            probs={c: float(p) for c, p in zip(classes, ensemble_mean, strict=True)},
            score=confidence(ensemble_mean),
            class_score=decision.class_score,
            flagged=decision.flagged,
            reason=decision.reason,
            members=members,
            width=image.width,
            height=image.height,
        )

    # --- maps ------------------------------------------------------------------------------------------------------
    def mask_score(self, fwd: Forward, b: int, label: int, members: Sequence[int]) -> tuple[np.ndarray, float, str]:
        """(score map [S, S], threshold, source) of the served mask of class `label` from `members`: the mask
        is where the score exceeds the threshold (for a CAM fusion rule, `core.thresholds.rule_map`)."""
        s = self.settings
        if self.mask_source == "segments":
            return self.segment_score(fwd, b, label, members), s.seg_threshold, "segments"
        source = f"cam:{s.mask_fusion}" + ("+superpixels" if self.refines else "")
        return rule_map(self.refined_maps(fwd, b, label, members), s.mask_fusion), s.cam_threshold, source

    def refined_maps(self, fwd: Forward, b: int, label: int, members: Sequence[int] | None = None) -> list[np.ndarray]:
        """`maps`, each averaged inside image b's regions when the version refines: what CAM masks fuse."""
        maps = self.maps(fwd, b, label, members)
        if not self.refines:
            return maps
        return [pool(m, self.segmentations(fwd, b)) for m in maps]

    def maps(self, fwd: Forward, b: int, label: int, members: Sequence[int] | None = None) -> list[np.ndarray]:
        """Each member's (of `members`, default all) normalised CAM of class `label`, [S, S], before refinement."""
        chosen = range(len(fwd.outputs)) if members is None else members
        size = (self.map_side, self.map_side)
        return [self._cam(self.ensemble.members[i], fwd.outputs[i], fwd.x[b : b + 1], b, label, size) for i in chosen]

    def _cam(
        self, member: Member, output: MemberOutput, image: torch.Tensor, b: int, label: int, size: tuple[int, int]
    ) -> np.ndarray:
        s = self.settings
        weight = member.head.fc.weight
        if s.cam_method == "fast":
            features, pooled = output.features[b : b + 1], output.pooled[b : b + 1]
            return member_cam(features, weight, label, size, s.cam_weights, member.pooling, pooled)
        classes = torch.tensor([label], device=image.device)
        cam = torch.from_numpy(gradcam_maps(member, member.normalize(image), classes, s.cam_method, s.cam_weights))
        return normalize_maps(upsample(cam.float().cpu(), size))[0].numpy()

    def segmentations(self, fwd: Forward, b: int) -> list[np.ndarray]:
        """Image b's regions at every superpixel scale, cut once per forward."""
        if b not in fwd.segmentations:
            spec = SuperpixelSpec(scales=tuple(self.settings.superpixel_scales))
            fwd.segmentations[b] = segment_image(fwd.working_image(b, self.map_side), spec)
        return fwd.segmentations[b]

    def segment_features(self, fwd: Forward, b: int, cam: np.ndarray) -> list[np.ndarray]:
        """The segment head's input for image b, one array per superpixel scale."""
        if any(out.levels is None for out in fwd.outputs):
            raise ValueError("this forward kept no level maps: call forward(images, levels=True)")
        levels = [level[b] for out in fwd.outputs for level in out.levels or []]
        return region_features(levels, self.map_side, cam, self.segmentations(fwd, b))

    def segment_score(self, fwd: Forward, b: int, label: int, members: Sequence[int]) -> np.ndarray:
        """The segment head's foreground probability [S, S] of image b (its class evidence: the mean CAM of
        class `label` over `members`)."""
        assert self.segment_head is not None
        cam = np.mean(self.maps(fwd, b, label, members), axis=0)
        return self.segment_head.heat(self.segment_features(fwd, b, cam), self.segmentations(fwd, b))

    # --- the whole pipeline ----------------------------------------------------------------------------------------
    def annotate(self, images: Sequence[Image.Image], with_heat: bool = False) -> list[Annotation]:
        results: list[Annotation] = []
        batch = max(1, self.settings.batch_size)
        for start in range(0, len(images), batch):
            results.extend(self.conclude(self.forward(images[start : start + batch]), with_heat))
        return results


def to_size(score: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A working-resolution map [S, S] at the image's `size` = (H, W), bilinear."""
    if score.shape == size:
        return score
    t = torch.from_numpy(np.ascontiguousarray(score, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def calibrated_settings(meta: VersionMeta, settings: Settings, explicit: set[str]) -> dict[str, Any]:
    """The settings a version calibrated or recorded (thresholds, fusion rule, CAM weights, refinement),
    except those given explicitly."""
    stored = meta.thresholds
    calibrated = {k: getattr(stored, k) for k in CALIBRATED if k not in explicit}
    calibrated.update({k: getattr(meta.masks, k) for k in RECORDED if k not in explicit})
    # A fusion rule chosen explicitly gets the version's threshold for that rule, when it has one.
    rules = stored.fusion_thresholds
    if "mask_fusion" in explicit and "cam_threshold" not in explicit and settings.mask_fusion in rules:
        calibrated["cam_threshold"] = float(rules[settings.mask_fusion])
    return calibrated


def load_ensemble(version_dir: Path, meta: VersionMeta, settings: Settings) -> tuple[Ensemble, SegmentHead | None]:
    """Rebuild the members (refusing weights that differ from the ones they were trained on) and the
    segment head of a version."""
    from safetensors.torch import load_file

    heads = load_file(str(version_dir / "heads.safetensors"))
    members = [_load_member(version_dir, spec, meta, heads, settings) for spec in meta.members]
    if any(f"{m.name}.seg.weight" in heads for m in members):
        # Versions of 2026-11 had a 1x1 head per member on the stride-16 map; the segment head replaced it.
        log.warning("version %s: its per-member segmentation heads are no longer used: CAM masks", version_dir.name)
    segment_head = SegmentHead.from_tensors(heads)
    expected = sum(sum(m.level_channels()) for m in members) + 2
    if segment_head is not None and segment_head.num_features != expected:
        raise VersionError(
            f"version {version_dir.name}: its segment head reads {segment_head.num_features} features, "
            f"but its members' level maps give {expected}"
        )
    return Ensemble(members, list(meta.classes)).eval(), segment_head


def load_neighbours(version_dir: Path, members: int) -> NeighbourBank | None:
    """A version's neighbour bank; None for a version without one (trained before it, or with the check off)."""
    from safetensors.torch import load_file

    path = version_dir / NEIGHBOURS_FILE
    if not path.is_file():
        return None
    try:
        return NeighbourBank.from_tensors(load_file(str(path)), members)
    except ValueError as exc:
        raise VersionError(f"version {version_dir.name}: {NEIGHBOURS_FILE}: {exc}") from exc


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
    fold_batchnorm(backbone.eval())  # served only: one pass per convolution (engine/fold.py)
    member = Member(name, backbone, len(meta.classes), meta.dropout, info, meta.pooling)
    member.head.fc.weight.data.copy_(heads[f"{name}.weight"])
    member.head.fc.bias.data.copy_(heads[f"{name}.bias"])
    member.temperature.fill_(float(spec.temperature))
    return member


def load_annotator(
    model_dir: str | os.PathLike[str], settings: Settings, version: str | None = None, explicit: set[str] | None = None
) -> Annotator:
    path = ModelStore(model_dir).version_path(version)
    if path is None:
        raise VersionError(
            f"{model_dir} has no current version: run `axx-backend train DATASET_DIR --model-dir {model_dir}`"
        )
    return Annotator.from_version(path, settings, explicit)
