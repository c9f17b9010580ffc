"""Prediction speed on the CPU: the limit, our predict, and the naive MC-Dropout + grad-cam pipeline.

Members: the paper's ensemble (resnet50, efficientnet_b0, densenet121) with random weights
(`weights="random"`: nothing is downloaded; sockets are disabled while this script runs, so any
attempt to reach the network fails loudly). Images: random RGB noise of `size`x`size` pixels made
with a fixed seed. For each input size and batch size three things are timed, in ms per image:

(a) limit    the least any pipeline must do: per member one plain inference forward
             (normalise -> backbone -> the head's pooling -> linear) on the already preprocessed
             batch, eval mode, `torch.inference_mode`, on the same prepared (channels_last) modules;
(b) predict  `Annotator.annotate` on the PIL images: preprocessing, one backbone pass per member,
             T head-only dropout samples, MC statistics, decision, fast XGrad-CAM from the same
             forward for every agreeing member, upsampling, fusion into one mask;
(c) naive    per member T full stochastic forwards (dropout on in the head via `member.head.train()`,
             BatchNorm frozen), then grad-cam's XGradCAM (`saliency.gradcam_maps`, a second forward
             and a backward, batched over the images) for each member's predicted class, then the
             same decision, upsampling and fusion. It runs on the same prepared modules under
             `torch.inference_mode`, i.e. it gets every advantage but the algorithmic one.

So that every image really takes the mask path, each head's class rows are made equal with a
bias margin of 1 for class "a": all members predict "a" for every image and dropout sample
(p = 0.73, normalised entropy 0.84), the threshold is 1.01 (no member is uncertain), and the class
names ("a", "b") are not negative names. This only changes values, not the work done; the script
checks that every annotation of (b) and (c) got a mask from all three members.

Timing: (a) and (b) get one warm-up run each, then their timed runs interleave (a, b, a, b, ...)
so that load from other processes hits both alike; the median of up to `--repeats` runs is shown
(the fastest run and the CPU time of this process too). The naive pipeline is costly (about 35
plain forwards per image): it runs on the first n images of the batch as one batch, n as large as
`--budget` allows (up to the batch), after a warm-up with T=1 (the same forward and backward
shapes), and is repeated when that fits. When n is below the batch, (b) is also timed on those n
images as one batch, and c/b at the same batch is shown too (per-image cost depends on the batch).
`--budget` (seconds) is shared among the configurations in proportion to size^2 * batch, unused
time passing on; what each configuration got is printed. At least 1 warm-up and 1 timed run of
(a) and (b) and 1 naive run of 1 image are always made, so a loaded machine can overrun the budget;
past `--max-wall` seconds the naive runs of configurations other than 512^2 batch 8 are skipped.
Peak RSS per stage: the kernel's high-water mark is reset (/proc/self/clear_refs) before each
stage and read (VmHWM) after it; without that, the process-wide `ru_maxrss` is shown.

A breakdown of one extra (b) run per configuration shows where predict's time goes (functions of
axx_backend are wrapped with timers at run time; nothing in the package is changed).

The last line printed is one JSON object for 512^2 batch 8 (or the largest configuration run).

    .venv/bin/python benchmarks/predict_speed.py            # 224 and 512, batch 1 and 8
    .venv/bin/python benchmarks/predict_speed.py --quick    # a smoke run of a few seconds
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import resource
import socket
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPT_START = time.perf_counter()  # before torch is imported: --max-wall and the wall time count from here
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _no_network(*args: object, **kwargs: object) -> None:
    raise RuntimeError("predict_speed.py must not use the network (weights='random'): something tried to connect")


socket.create_connection = _no_network  # type: ignore[assignment]
socket.socket.connect = _no_network  # type: ignore[method-assign, assignment]
socket.socket.connect_ex = _no_network  # type: ignore[method-assign, assignment]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import axx_backend.engine.annotator as annotator_mod  # noqa: E402
from axx_backend.core.annotation import Annotation  # noqa: E402
from axx_backend.core.settings import POOLINGS, PRESETS, Settings  # noqa: E402
from axx_backend.engine.annotator import Annotator  # noqa: E402
from axx_backend.engine.ensemble import Ensemble, MCDropoutHead, Member, autocast_for, native_bf16  # noqa: E402
from axx_backend.engine.fold import fold_batchnorm  # noqa: E402
from axx_backend.engine.masks import fuse_maps, iou  # noqa: E402
from axx_backend.engine.saliency import gradcam_maps, normalize_maps, upsample  # noqa: E402
from axx_backend.engine.segments import SegmentHead  # noqa: E402
from axx_backend.engine.uncertainty import decide, mc_statistics  # noqa: E402

CLASSES = ("a", "b")
TARGET_PREDICT_VS_LIMIT = 1.3
TARGET_NAIVE_VS_PREDICT = 20.0


# ---------------------------------------------------------------------------------------------
# memory


def _vm_hwm_kb() -> int | None:
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _can_reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _vm_hwm_kb() is not None


RESETTABLE_PEAK = _can_reset_peak()


def reset_peak_rss() -> None:
    gc.collect()
    if RESETTABLE_PEAK:
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """Peak RSS since the last `reset_peak_rss` (or of the whole process where it cannot be reset)."""
    kb = _vm_hwm_kb() if RESETTABLE_PEAK else None
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return kb / 1024.0


# ---------------------------------------------------------------------------------------------
# setup


def build_ensemble(names: Sequence[str], pooling: str, fold: bool = True) -> Ensemble:
    """The members with random weights and rigged heads; `fold`: BatchNorm folded as a served version's are
    (engine/fold.py), for (a), (b) and (c) alike."""
    torch.manual_seed(0)  # the same random weights every run, so that mask IoUs compare between runs
    ensemble = Ensemble.build(names, CLASSES, dropout=0.3, weights="random", pooling=pooling)
    for member in ensemble.members if fold else []:
        fold_batchnorm(member.backbone.eval())
    with torch.no_grad():
        for member in ensemble.members:
            fc = member.head.fc
            fc.weight[1:] = fc.weight[0]  # all class logits differ by the bias only, under any dropout mask
            fc.bias.zero_()
            fc.bias[0] = 1.0  # -> every member predicts "a" with p = 0.73 for every image and sample
    for member in ensemble.members:
        if member.weight_info.source != "random":
            raise RuntimeError(f"{member.name}: weights from {member.weight_info.source}, expected random")
    return ensemble


def make_images(count: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB") for _ in range(count)]


def is_channels_last(member: Member) -> bool:
    for p in member.backbone.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last)
    return False


def member_input(member: Member, x: torch.Tensor) -> torch.Tensor:
    """Normalised input in the layout of the member's weights (what `Ensemble.forward_mc` feeds)."""
    normalized = member.normalize(x)
    if is_channels_last(member):
        normalized = normalized.contiguous(memory_format=torch.channels_last)
    return normalized


# ---------------------------------------------------------------------------------------------
# the three pipelines


def limit_forward(ensemble: Ensemble, x: torch.Tensor, precision: str = "fp32") -> list[torch.Tensor]:
    """(a) One plain inference forward per member on the preprocessed batch (bf16: the ensemble of a bf16
    annotator, its weights cast once, under the same autocast as predict's backbones)."""
    with torch.inference_mode(), autocast_for(x.device, precision):
        return [member(member_input(member, x)) for member in ensemble.members]


def random_segment_head(annotator: Annotator) -> SegmentHead:
    """A segment head of the right width for these members (its weights do not change its cost)."""
    fwd = annotator.forward(make_images(1, annotator.input_size, 0), levels=True)
    cam = np.zeros((annotator.map_side, annotator.map_side), np.float32)
    width = annotator.segment_features(fwd, 0, cam)[0].shape[1]
    g = torch.Generator().manual_seed(0)
    return SegmentHead(
        torch.zeros(width), torch.ones(width), torch.randn(width, generator=g) / width**0.5, torch.zeros(())
    )


def predict(annotator: Annotator, images: Sequence[Image.Image]) -> list[Annotation]:
    """(b) Our full predict."""
    return annotator.annotate(images)


def naive_pipeline(annotator: Annotator, images: Sequence[Image.Image], samples: int) -> list[np.ndarray | None]:
    """(c) T full stochastic passes per member + grad-cam XGradCAM + the same decision and fusion."""
    s = annotator.settings
    members: list[Member] = list(annotator.ensemble.members)
    x = annotator.preprocess(images)
    torch.manual_seed(s.seed)
    mc_probs = []
    for member in members:
        normalized = member_input(member, x)
        temperature = member.temperature.clamp_min(1e-3)
        member.eval()
        member.head.train()  # dropout on in the head only; BatchNorm stays frozen
        try:
            with torch.inference_mode():
                logits = torch.stack([member(normalized) for _ in range(samples)])
        finally:
            member.eval()
        mc_probs.append((logits / temperature).softmax(dim=-1))
    stats = [mc_statistics(p) for p in mc_probs]
    maps = [
        gradcam_maps(member, member.normalize(x), st.mean_probs.argmax(dim=-1), method="xgradcam")
        for member, st in zip(members, stats, strict=True)
    ]
    masks: list[np.ndarray | None] = []
    for b, img in enumerate(images):
        probs = [st.mean_probs[b].cpu().numpy() for st in stats]
        entropies = [float(st.entropy[b]) for st in stats]
        decision = decide(probs, entropies, s.uncertainty_threshold, s.min_uncertain_to_flag)
        if decision.flagged or annotator.classes[decision.label] in annotator.negative:
            masks.append(None)
            continue
        size = (img.height, img.width)
        fused = [
            normalize_maps(upsample(torch.from_numpy(maps[i][b : b + 1]), size))[0].numpy() for i in decision.agreeing
        ]
        if len(fused) != len(members):
            raise RuntimeError(f"naive: only {len(fused)} of {len(members)} members agree; the benchmark expects all")
        masks.append(fuse_maps(fused, s.mask_fusion, s.cam_threshold)[0])
    return masks


# ---------------------------------------------------------------------------------------------
# timing


def timed(fn: Callable[[], object], repeats: int, warmup: int) -> tuple[list[float], list[float], object]:
    """Wall and CPU seconds of `repeats` calls after `warmup` calls; also the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    walls, cpus = [], []
    for _ in range(repeats):
        cpu, start = time.process_time(), time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return walls, cpus, result


def stage(walls: list[float], cpus: list[float], images: int) -> dict[str, Any]:
    """ms/image: median (the reported value) and min of the wall times, median CPU time."""
    return {
        "ms_per_image": statistics.median(walls) * 1000 / images,
        "min_ms_per_image": min(walls) * 1000 / images,
        "cpu_ms_per_image": statistics.median(cpus) * 1000 / images,
        "runs_s": walls,
    }


BREAKDOWN_PARTS = (
    ("preprocess", "PIL -> tensor"),
    ("backbone", "Member.features"),
    ("head_mc", "MCDropoutHead.sample"),
    ("mc_stats", "mc_statistics"),
    ("decide", "decide"),
    ("cam", "Annotator._cam (fast XGrad-CAM, upsample, normalise)"),
    ("regions", "Annotator.segmentations (Felzenszwalb, every AXX_SUPERPIXEL_SCALES scale)"),
    ("refine", "pool (CAMs averaged in regions)"),
    ("segments", "region_features + SegmentHead.heat"),
    ("fuse", "rule_map"),
)


@contextmanager
def instrumented(totals: dict[str, float]) -> Iterator[list[str]]:
    """Wrap axx_backend's predict steps with timers (in this process only; nothing is edited).

    Yields the parts whose function was not found (the package changes; they then count as `other`).
    """
    patches = [
        ("preprocess", Annotator, ("preprocess",)),
        ("backbone", Member, ("features",)),
        ("head_mc", MCDropoutHead, ("sample",)),
        ("mc_stats", annotator_mod, ("mc_statistics",)),
        ("decide", annotator_mod, ("decide",)),
        ("cam", Annotator, ("_cam",)),
        ("regions", Annotator, ("segmentations",)),
        ("refine", annotator_mod, ("pool",)),
        ("segments", annotator_mod, ("region_features",)),
        ("segments", SegmentHead, ("heat",)),
        ("fuse", annotator_mod, ("rule_map",)),
    ]
    saved = []
    missing = []
    for key, owner, names in patches:
        attr = next((n for n in names if n in vars(owner)), None)
        if attr is None:
            missing.append(key)
            continue
        original = vars(owner)[attr]
        saved.append((owner, attr, original))

        def wrapper(*args: Any, _original: Callable[..., Any] = original, _key: str = key, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_key] += time.perf_counter() - start

        setattr(owner, attr, wrapper)
    try:
        yield missing
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def predict_breakdown(annotator: Annotator, images: Sequence[Image.Image]) -> dict[str, float]:
    """ms/image of each predict step in one instrumented run; `other` is the rest (glue, pool, softmax)."""
    totals: dict[str, float] = defaultdict(float)
    with instrumented(totals) as missing:
        start = time.perf_counter()
        annotator.annotate(images)
        total = time.perf_counter() - start
    parts = {key: None if key in missing else totals[key] * 1000 / len(images) for key, _ in BREAKDOWN_PARTS}
    parts["other"] = total * 1000 / len(images) - sum(v for v in parts.values() if v is not None)
    parts["total"] = total * 1000 / len(images)
    return parts


# ---------------------------------------------------------------------------------------------
# one configuration


def make_annotator(
    ensemble: Ensemble, size: int, batch: int, args: argparse.Namespace, precision: str, plain_cam: bool = False
) -> Annotator:
    """(b)'s annotator; `plain_cam`: without the refinement to image regions, what the naive pipeline's masks
    must equal (with top10 pooling only for ReLU maps: EfficientNet-B0's channel factor divides by the L1 mass
    where grad-cam's divides by the sum, engine/pooling.py). CAMs from the class's own weights: class-contrastive
    ones (the same cost) are zero for the rigged heads, which would make every mask empty and every mask
    comparison void."""
    settings = Settings(
        refine="none" if plain_cam else "superpixels",
        cam_weights="class",
        input_size=size,
        batch_size=batch,
        device="cpu",
        precision=precision,
        mc_samples=args.samples,
        uncertainty_threshold=1.01,  # nobody uncertain: every image takes the mask path
        seed=args.seed,
    )
    if args.mask_source == "segments" and not plain_cam:  # a trained version's path: the segment head
        # sized by an fp32 annotator: a bf16 one casts the ensemble's weights in place, and a second annotator
        # over the cast ensemble would copy the cast weights for its fp32 recheck
        head = random_segment_head(Annotator(ensemble, settings.replace(precision="fp32")))
        annotator = Annotator(ensemble, settings, mask_source="segments", segment_head=head)
    else:
        annotator = Annotator(ensemble, settings)
    if annotator.negative:
        raise RuntimeError(f"classes {annotator.negative} count as negative: they would get no mask")
    return annotator


@dataclass
class BF16Runs:
    """(a) and (b) again with the backbones under bf16 autocast, timed in the same rounds as fp32's."""

    a_walls: list[float] = field(default_factory=list)
    a_cpus: list[float] = field(default_factory=list)
    b_walls: list[float] = field(default_factory=list)
    b_cpus: list[float] = field(default_factory=list)
    annotations: list[Annotation] = field(default_factory=list)
    rechecked: int = 0  # images the timed bf16 predicts ran again in fp32 (Annotator.recheck, for decisions or masks)

    def run(self, limit: Callable[[], object], predict: Callable[[], list[Annotation]], annotator: Annotator) -> float:
        walls, cpus, _ = timed(limit, 1, 0)
        self.a_walls += walls
        self.a_cpus += cpus
        before = annotator.rechecked
        walls, cpus, self.annotations = timed(predict, 1, 0)
        self.rechecked += annotator.rechecked - before
        self.b_walls += walls
        self.b_cpus += cpus
        return self.a_walls[-1] + self.b_walls[-1]

    def summary(self, batch: int, row: dict[str, Any], fp32: Sequence[Annotation]) -> dict[str, Any]:
        """Times, their ratios to fp32's, and how far bf16's decisions and masks moved from fp32's."""
        limit, predict = stage(self.a_walls, self.a_cpus, batch), stage(self.b_walls, self.b_cpus, batch)
        pairs = list(zip(fp32, self.annotations, strict=True))
        ious = [iou(b.mask, a.mask) for a, b in pairs if a.mask is not None and b.mask is not None]
        return {
            "limit": limit,
            "predict": predict,
            "predict_vs_fp32": predict["ms_per_image"] / row["predict"]["ms_per_image"],
            "limit_vs_fp32": limit["ms_per_image"] / row["limit"]["ms_per_image"],
            "predict_vs_limit": predict["ms_per_image"] / limit["ms_per_image"],
            "decisions_changed": sum(a.label != b.label or a.flagged != b.flagged for a, b in pairs),
            "rechecked_share": self.rechecked / (len(self.b_walls) * batch),
            "mask_iou_vs_fp32": {"mean": float(np.mean(ious)), "min": float(np.min(ious))} if ious else None,
        }


STAGES = ("limit", "predict", "naive")


@dataclass
class Budget:
    """Seconds for the timed work, and what a naive image costs in units of the limit's time L.

    `naive_units` starts at T + 6 (T forwards, grad-cam's forward + backward, slack) and is
    lowered to what a naive run measured, so later configurations plan with this machine's cost.
    """

    end: float  # perf_counter() when --budget runs out
    hard_end: float  # perf_counter() when --max-wall runs out: non-target naive runs are skipped beyond it
    naive_units: float

    def left(self) -> float:
        return self.end - time.perf_counter()

    def hard_left(self) -> float:
        return self.hard_end - time.perf_counter()


def run_config(
    ensemble: Ensemble, size: int, batch: int, args: argparse.Namespace, allowed_s: float, budget: Budget, target: bool
) -> dict[str, Any]:
    """Time (a), (b), (c) at one size and batch, fitting the optional runs into `allowed_s` seconds.

    Always: 1 warm-up + 1 timed run of (a) and of (b), and (unless beyond --max-wall and not the
    target configuration) 1 naive run on 1 image. Within the allowance, in this order: more (a)/(b)
    runs up to --repeats, the breakdown run, more naive images (up to the batch or
    --naive-max-images), the naive warm-up, more naive runs up to --repeats.
    """
    begin = time.perf_counter()

    def left() -> float:
        return allowed_s - (time.perf_counter() - begin)

    annotator = make_annotator(ensemble, size, batch, args, "fp32")
    # bf16 serving casts its ensemble's weights in place: it gets a copy of its own
    half = make_annotator(copy.deepcopy(ensemble), size, batch, args, "bf16") if args.bf16 else None
    images = make_images(batch, size, args.seed + size * 1000 + batch)
    x = annotator.preprocess(images)
    row: dict[str, Any] = {"size": size, "batch": batch, "allowed_s": allowed_s, "naive": None}

    def run_limit() -> object:
        return limit_forward(ensemble, x)

    def run_predict() -> list[Annotation]:
        return predict(annotator, images)

    def run_limit_bf16() -> object:
        assert half is not None
        return limit_forward(half.ensemble, x, "bf16")

    def run_predict_bf16() -> list[Annotation]:
        assert half is not None
        return predict(half, images)

    # warm-up of (a) and (b), each alone, giving their peak RSS
    peaks = {}
    for key, fn in (("limit", run_limit), ("predict", run_predict)):
        reset_peak_rss()
        fn()
        peaks[key] = peak_rss_mb()
    if half is not None:
        run_limit_bf16()
        run_predict_bf16()

    # timed runs of (a) and (b), interleaved so that load from other processes hits both alike
    max_images = batch if args.naive_max_images <= 0 else min(batch, args.naive_max_images)
    a_walls: list[float] = []
    a_cpus: list[float] = []
    b_walls: list[float] = []
    b_cpus: list[float] = []
    annotations: list[Annotation] = []
    bf16 = BF16Runs()
    while True:
        walls, cpus, _ = timed(run_limit, 1, 0)
        a_walls += walls
        a_cpus += cpus
        walls, cpus, annotations = timed(run_predict, 1, 0)
        b_walls += walls
        b_cpus += cpus
        round_s = a_walls[-1] + b_walls[-1]
        if half is not None:
            round_s += bf16.run(run_limit_bf16, run_predict_bf16, half)
        per_image = statistics.median(a_walls) / batch  # L, seconds
        naive_image_s = budget.naive_units * per_image
        if len(a_walls) >= args.repeats or left() - round_s < naive_image_s * min(max_images, 4):
            break
    row["limit"] = stage(a_walls, a_cpus, batch) | {"peak_rss_mb": peaks["limit"]}
    row["predict"] = stage(b_walls, b_cpus, batch) | {"peak_rss_mb": peaks["predict"]}
    row["predict_vs_limit"] = row["predict"]["ms_per_image"] / row["limit"]["ms_per_image"]
    if half is not None:
        row["bf16"] = bf16.summary(batch, row, annotations)
    missing = [i for i, a in enumerate(annotations) if a.mask is None or sum(m.agrees for m in a.members) != 3]
    if missing:
        raise RuntimeError(f"predict: images {missing} took no mask from all 3 members (flagged or disagreeing)")
    if args.breakdown and left() - statistics.median(b_walls) > naive_image_s:
        row["predict_breakdown_ms_per_image"] = predict_breakdown(annotator, images)

    # (c) naive, on as many images of the batch as fit (at least one), as one batch
    if not target and budget.hard_left() < naive_image_s:
        row["naive_skipped"] = f"--max-wall: about {naive_image_s:.0f} s for one image, {budget.hard_left():.0f} s left"
        return row
    warm_image_s = naive_image_s * 5 / budget.naive_units  # T=1: about 1 forward + grad-cam
    count = max(1, min(max_images, int(left() // (naive_image_s + warm_image_s))))
    subset = images[:count]
    reset_peak_rss()
    start = time.perf_counter()
    naive_pipeline(annotator, subset, 1)  # warm-up: every forward/backward shape, 1 stochastic pass
    warm_s = time.perf_counter() - start
    walls, cpus, naive_masks = [], [], []
    while True:
        w, c, naive_masks = timed(lambda: naive_pipeline(annotator, subset, args.samples), 1, 0)
        walls += w
        cpus += c
        if len(walls) >= args.repeats or left() < statistics.median(walls) * 1.1:
            break
    row["naive"] = stage(walls, cpus, count) | {"images": count, "warmup_T1_s": warm_s, "peak_rss_mb": peak_rss_mb()}
    # the least cost seen so far: load from other processes only ever adds to it
    units = min(walls) / count / per_image
    budget.naive_units = max(args.samples + 2.0, min(units, budget.naive_units))
    if count < batch:
        # (b) on the naive's images as one batch too: per image, batch size can matter (cache effects)
        walls, cpus, _ = timed(lambda: predict(annotator, subset), 1, 1)
        row["predict_naive_batch"] = stage(walls, cpus, count)
        row["naive_vs_predict_same_batch"] = row["naive"]["ms_per_image"] / row["predict_naive_batch"]["ms_per_image"]
    # sanity: the same masks (fast XGrad-CAM == grad-cam's XGradCAM for a GAP-linear head), against predict
    # without the refinement to image regions (which the naive pipeline does not do)
    unrefined = make_annotator(ensemble, size, batch, args, "fp32", plain_cam=True).annotate(subset)
    ious = [iou(a.mask, m) for a, m in zip(unrefined, naive_masks, strict=True) if m is not None]
    row["mask_iou_predict_vs_naive"] = float(np.mean(ious)) if ious else None
    row["naive_vs_predict"] = row["naive"]["ms_per_image"] / row["predict"]["ms_per_image"]
    return row


# ---------------------------------------------------------------------------------------------
# output


def cell(value: float | None, width: int, digits: int = 1) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def stage_value(row: dict[str, Any], key: str, field: str) -> float | None:
    return None if row[key] is None else row[key][field]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else numerator / denominator


def print_header(header: str) -> None:
    print(header)
    print("-" * len(header))


def print_table(rows: list[dict[str, Any]], rss_label: str) -> None:
    header = (
        f"{'size':>5} {'batch':>5} | {'(a) limit':>10} {'(b) predict':>11} {'(c) naive':>11} {'naive n':>7} | "
        f"{'b/a':>5} {'c/b':>6} | {'IoU b~c':>7} | {rss_label}"
    )
    print_header(header)
    for r in rows:
        rss = "/".join(cell(stage_value(r, k, "peak_rss_mb"), 0, 0) for k in STAGES)
        naive_n = "-" if r["naive"] is None else str(r["naive"]["images"])
        print(
            f"{r['size']:>5} {r['batch']:>5} | {cell(r['limit']['ms_per_image'], 10)} "
            f"{cell(r['predict']['ms_per_image'], 11)} {cell(stage_value(r, 'naive', 'ms_per_image'), 11)} "
            f"{naive_n:>7} | {cell(r['predict_vs_limit'], 5, 2)} {cell(r.get('naive_vs_predict'), 6)} | "
            f"{cell(r.get('mask_iou_predict_vs_naive'), 7, 3)} | {rss}"
        )
    for r in rows:
        if r.get("naive_skipped"):
            print(f"  {r['size']}^2 batch {r['batch']}: naive skipped ({r['naive_skipped']})")
        if r.get("predict_naive_batch"):
            n = r["naive"]["images"]
            print(
                f"  {r['size']}^2 batch {r['batch']}: naive ran on {n} images as one batch; predict on those {n} as "
                f"one batch: {r['predict_naive_batch']['ms_per_image']:.1f} ms/image, "
                f"c/b at the same batch {r['naive_vs_predict_same_batch']:.1f}"
            )


def print_robust_table(rows: list[dict[str, Any]]) -> None:
    """The same runs read two more ways: the fastest run, and CPU time (less hit by other processes)."""
    header = (
        f"{'size':>5} {'batch':>5} | {'a min':>8} {'b min':>8} {'c min':>9} {'b/a':>5} {'c/b':>6} | "
        f"{'a cpu':>8} {'b cpu':>8} {'c cpu':>9} {'b/a':>5} {'c/b':>6}"
    )
    print_header(header)
    for r in rows:
        a, b, c = (stage_value(r, k, "min_ms_per_image") for k in STAGES)
        ac, bc, cc = (stage_value(r, k, "cpu_ms_per_image") for k in STAGES)
        print(
            f"{r['size']:>5} {r['batch']:>5} | {cell(a, 8)} {cell(b, 8)} {cell(c, 9)} {cell(ratio(b, a), 5, 2)} "
            f"{cell(ratio(c, b), 6)} | {cell(ac, 8)} {cell(bc, 8)} {cell(cc, 9)} {cell(ratio(bc, ac), 5, 2)} "
            f"{cell(ratio(cc, bc), 6)}"
        )


def print_breakdown(rows: list[dict[str, Any]]) -> None:
    keys = [k for k, _ in BREAKDOWN_PARTS] + ["other", "total"]
    header = f"{'size':>5} {'batch':>5} | " + " ".join(f"{k:>10}" for k in keys) + f" | {'limit':>8}"
    print_header(header)
    for r in rows:
        parts = r.get("predict_breakdown_ms_per_image")
        if parts:
            cells = " ".join(cell(parts[k], 10) for k in keys)
            print(f"{r['size']:>5} {r['batch']:>5} | {cells} | {cell(r['limit']['ms_per_image'], 8)}")
        else:
            print(f"{r['size']:>5} {r['batch']:>5} | (left out: no time left in the budget)")
    print("parts: " + "; ".join(f"{k} = {what}" for k, what in BREAKDOWN_PARTS) + "; other = the rest of annotate")


def print_bf16_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'size':>5} {'batch':>5} | {'a bf16':>8} {'b bf16':>8} | {'a16/a':>6} {'b16/b':>6} {'b16/a16':>7} | "
        f"{'mask IoU vs fp32 mean/min':>25} | {'decisions changed':>17} | {'run again in fp32':>17}"
    )
    print_header(header)
    for r in rows:
        h = r.get("bf16")
        if h is None:
            continue
        ious = h["mask_iou_vs_fp32"]
        iou_cell = "-" if ious is None else f"{ious['mean']:.3f}/{ious['min']:.3f}"
        print(
            f"{r['size']:>5} {r['batch']:>5} | {cell(h['limit']['ms_per_image'], 8)} "
            f"{cell(h['predict']['ms_per_image'], 8)} | {cell(h['limit_vs_fp32'], 6, 2)} "
            f"{cell(h['predict_vs_fp32'], 6, 2)} {cell(h['predict_vs_limit'], 7, 2)} | {iou_cell:>25} | "
            f"{h['decisions_changed']:>17} | {h['rechecked_share']:>16.0%}"
        )


def print_rss_table(peaks: dict[tuple[int, int], dict[str, float]]) -> None:
    precisions = sorted({p for by in peaks.values() for p in by})
    print(f"{'size':>5} {'batch':>5} | " + " ".join(f"{p:>8}" for p in precisions))
    for (size, batch), by in peaks.items():
        print(f"{size:>5} {batch:>5} | " + " ".join(cell(by.get(p), 8, 0) for p in precisions))


def fresh_process_peaks(args: argparse.Namespace, configs: Sequence[tuple[int, int]]) -> dict:
    """Peak RSS (MB) of one predict call per configuration and precision, each in a new process that loads what
    the server loads (no grad-cam): what a worker needs, without what earlier runs left in this one."""
    import subprocess

    peaks: dict[tuple[int, int], dict[str, float]] = {}
    for size, batch in configs:
        for precision in ("fp32", "bf16") if args.bf16 else ("fp32",):
            cmd = [sys.executable, __file__, "--rss-probe", str(size), str(batch), precision]
            cmd += ["--samples", str(args.samples), "--mask-source", args.mask_source, "--seed", str(args.seed)]
            cmd += ["--pooling", args.pooling]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            peaks.setdefault((size, batch), {})[precision] = json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]
    return peaks


def rss_probe(args: argparse.Namespace) -> int:
    """`--rss-probe SIZE BATCH PRECISION`: build, predict once, print the process's peak RSS as JSON."""
    size, batch, precision = int(args.rss_probe[0]), int(args.rss_probe[1]), args.rss_probe[2]
    annotator = make_annotator(build_ensemble(PRESETS["paper"], args.pooling), size, batch, args, precision)
    annotator.annotate(make_images(batch, size, args.seed + size * 1000 + batch))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec
    print(json.dumps({"peak_rss_mb": (_vm_hwm_kb() or 0) / 1024}))
    return 0


def bf16_summary(row: dict[str, Any]) -> dict[str, Any] | None:
    h = row.get("bf16")
    if h is None:
        return None
    return {
        "ratio_predict_bf16_vs_fp32": h["predict_vs_fp32"],
        "ratio_limit_bf16_vs_fp32": h["limit_vs_fp32"],
        "ratio_predict_vs_limit_bf16": h["predict_vs_limit"],
        "ms_per_image": {"limit": h["limit"]["ms_per_image"], "predict": h["predict"]["ms_per_image"]},
        "mask_iou_vs_fp32": h["mask_iou_vs_fp32"],
        "decisions_changed": h["decisions_changed"],
        "rechecked_share": h["rechecked_share"],
    }


def rounded(value: Any, digits: int = 3) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512], help="input sizes (default: 224 512)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per stage at most, median taken (default 3)")
    parser.add_argument("--samples", type=int, default=30, help="MC samples T (default 30)")
    parser.add_argument(
        "--naive-max-images",
        type=int,
        default=0,
        help="(c) runs on at most this many images of a batch; 0: the whole batch, as the budget allows (default 0)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=360.0,
        help="seconds for the timed work, shared by the configurations in proportion to size^2 * batch; the\n"
        "optional runs (repeats, breakdown, naive images) are left out when it runs short (default 360)",
    )
    parser.add_argument(
        "--max-wall",
        type=float,
        default=540.0,
        help="seconds after the start (imports included) past which the naive run of a configuration other than\n"
        "512^2 batch 8 is skipped (a loaded machine would otherwise take far longer) (default 540)",
    )
    parser.add_argument(
        "--no-breakdown", dest="breakdown", action="store_false", help="skip the timed predict breakdown"
    )
    parser.add_argument(
        "--mask-source",
        choices=("cam", "segments"),
        default="cam",
        help="(b)'s mask: the refined CAM (a version without a segment head) or the segment head (default cam)",
    )
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=native_bf16(torch.device("cpu")),
        help="also time (a) and (b) with bf16 backbones and compare their masks with fp32's (default: on where\n"
        "the CPU has native bf16, as AXX_PRECISION=auto serves)",
    )
    parser.add_argument(
        "--rss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="peak RSS of predict per configuration and precision, each in a fresh process (default on)",
    )
    parser.add_argument(
        "--pooling",
        choices=POOLINGS,
        default=Settings().pooling,
        help="the heads' pooling (default: what training gives a version now, AXX_POOLING's default)",
    )
    parser.add_argument("--rss-probe", nargs=3, metavar=("SIZE", "BATCH", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 224^2, batch 1, 1 run of each stage")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.repeats, args.budget = [224], [1], 1, 0.0
    if args.repeats < 1 or args.samples < 1:
        parser.error("--repeats and --samples must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rss_probe:
        return rss_probe(args)
    import pytorch_grad_cam  # noqa: F401  (imported here, so that its import time is in no timed run)

    wall_start = time.perf_counter()
    names = PRESETS["paper"]
    threads = torch.get_num_threads()
    load_start = os.getloadavg()
    print(
        f"torch {torch.__version__}, torch threads {threads} (interop {torch.get_num_interop_threads()}), "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, python {platform.python_version()}"
    )
    print(
        f"members {', '.join(names)} (random weights, {args.pooling} pooling), T={args.samples}, classes {CLASSES}, "
        "fp32, channels_last"
    )
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in load_start)}")

    ensemble = build_ensemble(names, args.pooling)
    configs = [(size, batch) for size in args.sizes for batch in args.batches]
    target = (512, 8) if (512, 8) in configs else max(configs)
    budget = Budget(wall_start + args.budget, SCRIPT_START + args.max_wall, args.samples + 6.0)
    remaining_weight = sum(size * size * batch for size, batch in configs)
    rows = []
    for size, batch in configs:
        start = time.perf_counter()
        weight = size * size * batch
        allowed = max(0.0, budget.left()) * weight / remaining_weight
        remaining_weight -= weight
        row = run_config(ensemble, size, batch, args, allowed, budget, (size, batch) == target)
        row["config_wall_s"] = time.perf_counter() - start
        row["load_avg_1min"] = os.getloadavg()[0]
        rows.append(row)
        naive = row["naive"]
        print(
            f"  {size}^2 batch {batch}: a {row['limit']['ms_per_image']:.1f}, b {row['predict']['ms_per_image']:.1f}, "
            + ("c skipped" if naive is None else f"c {naive['ms_per_image']:.1f}")
            + f" ms/image; runs {[0 if row[k] is None else len(row[k]['runs_s']) for k in STAGES]}"
            + ("" if naive is None else f", naive on {naive['images']} images")
            + f"; {row['config_wall_s']:.0f} s of {allowed:.0f} s allowed, load {row['load_avg_1min']:.2f}",
            flush=True,
        )

    wall = time.perf_counter() - SCRIPT_START
    rss_label = "peak RSS MB a/b/c" if RESETTABLE_PEAK else "process peak RSS MB after a/b/c"
    print()
    print(
        f"ms/image: median of up to {args.repeats} runs after 1 warm-up (runs per stage above and in the JSON), "
        f"T={args.samples}, torch threads={threads}"
    )
    print_table(rows, rss_label)
    print()
    print("the same runs: fastest wall time, and median CPU time of this process (ms/image):")
    print_robust_table(rows)
    if args.breakdown:
        print()
        print("where predict's time goes (one instrumented run, ms/image):")
        print_breakdown(rows)
    if args.bf16:
        print()
        print("bf16 backbones (AXX_PRECISION=bf16, what `auto` serves on this CPU), timed in the same rounds as fp32")
        print("(ms/image; decisions cannot move here: the heads are rigged; benchmarks/precision.py measures them;")
        print(" 'run again in fp32': the share of timed bf16 images on bf16's edge, see AXX_PRECISION_RECHECK):")
        print_bf16_table(rows)
    peaks: dict[tuple[int, int], dict[str, float]] = {}
    if args.rss:
        peaks = fresh_process_peaks(args, configs)
        print()
        print("peak RSS (MB) of one predict call, each in a fresh process loading what the server loads:")
        print_rss_table(peaks)
    load_end = os.getloadavg()
    print()
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in load_end)}; wall {wall:.1f} s (imports included)")

    main_row = next(r for r in rows if (r["size"], r["batch"]) == target)

    def value(key: str, field: str = "ms_per_image") -> float | None:
        return stage_value(main_row, key, field)

    predict_vs_limit = main_row["predict_vs_limit"]
    naive_vs_predict = main_row.get("naive_vs_predict")
    summary = {
        "ratio_predict_vs_limit": predict_vs_limit,
        "ratio_naive_vs_predict": naive_vs_predict,
        "size": main_row["size"],
        "batch": main_row["batch"],
        "ms_per_image": {k: value(k) for k in STAGES},
        "torch_threads": threads,
        "ratio_predict_vs_limit_min": ratio(value("predict", "min_ms_per_image"), value("limit", "min_ms_per_image")),
        "ratio_predict_vs_limit_cpu": ratio(value("predict", "cpu_ms_per_image"), value("limit", "cpu_ms_per_image")),
        "ratio_naive_vs_predict_cpu": ratio(value("naive", "cpu_ms_per_image"), value("predict", "cpu_ms_per_image")),
        "ratio_naive_vs_predict_same_batch": main_row.get("naive_vs_predict_same_batch"),
        "targets_met": {
            "predict_vs_limit<=1.3": predict_vs_limit <= TARGET_PREDICT_VS_LIMIT,
            "naive_vs_predict>=20": naive_vs_predict is not None and naive_vs_predict >= TARGET_NAIVE_VS_PREDICT,
        },
        "mc_samples": args.samples,
        "members": list(names),
        "naive_images": None if main_row["naive"] is None else main_row["naive"]["images"],
        "runs": {k: 0 if main_row[k] is None else len(main_row[k]["runs_s"]) for k in STAGES},
        "peak_rss_mb": {k: value(k, "peak_rss_mb") for k in STAGES},
        "peak_rss_per_stage": RESETTABLE_PEAK,
        "mask_iou_predict_vs_naive": main_row.get("mask_iou_predict_vs_naive"),
        "bf16": bf16_summary(main_row),
        "peak_rss_mb_predict_512_b8": peaks.get((512, 8), {}).get("fp32"),
        "peak_rss_mb_predict_512_b8_bf16": peaks.get((512, 8), {}).get("bf16"),
        "peak_rss_mb_fresh_process": {f"{size}x{batch}": by for (size, batch), by in peaks.items()},
        "predict_breakdown_ms_per_image": main_row.get("predict_breakdown_ms_per_image"),
        "load_avg_1min": {"start": load_start[0], "end": load_end[0]},
        "wall_s": wall,
        "all": [
            {
                "size": r["size"],
                "batch": r["batch"],
                "ms_per_image": {k: stage_value(r, k, "ms_per_image") for k in STAGES},
                "b/a": r["predict_vs_limit"],
                "c/b": r.get("naive_vs_predict"),
                "b16/b": r["bf16"]["predict_vs_fp32"] if r.get("bf16") else None,
                "runs": [0 if r[k] is None else len(r[k]["runs_s"]) for k in STAGES],
                "naive_images": None if r["naive"] is None else r["naive"]["images"],
                "load_1min": r["load_avg_1min"],
            }
            for r in rows
        ],
    }
    print(json.dumps(rounded(summary), separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
