"""Fine-tuning the backbones on image-level labels (docs/METHOD.md "Learning" 2).

`last-stage` (the default where it pays) trains the stride-32 stage of each backbone, everything after it in
`forward_features`, and the head, on the CPU in minutes: what enters that stage (the stride-16 map, the same
map the segment head reads) is computed once per image and view (the image and its mirror) and cached, so an
epoch runs only the stage. BatchNorm statistics stay frozen (batches are small; ImageNet's are better), the
head's dropout is on, the loss is class-balanced cross-entropy, AdamW; the epoch with the best held-out loss is
kept, within `finetune_seconds` (and, with `finetune_patience` > 0, a member stops after that many epochs
without a better one). A member keeps its fine-tuned stage only when its held-out loss beats the frozen
backbone's (with a head trained on the same images): a validation split says whether it pays.

The depthwise convolution kernels of the stage stay frozen (`Tail.parameters`): they are 2-4 % of a mobile
stage's parameters, and their weight gradient is the slow kernel on the CPU (oneDNN: in bf16 it made the
EfficientNet-Lite stages 1.4-1.55x slower than fp32). Without it every stage trains under bf16 autocast where
`AXX_PRECISION` resolves to bf16 (fp32 weights and optimizer; held-out losses and the features kept for the heads
stay fp32): the Lite0 and Lite2 stages in 0.5-0.65x the time of training every weight in fp32 (one epoch of 320
cached samples at 320 px), MobileNetV2's in about the same time, the ResNet-50 stage in 0.55-0.6x.

`all` fine-tunes every layer on whole images (slow on a CPU; for a GPU), as before.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.settings import Settings
from ..engine.ensemble import Ensemble, Member, autocast_for, resolve_precision
from .features import FeatureCache
from .heads import CrossFit, train_head

log = logging.getLogger(__name__)

FINETUNE_MODES = ("head", "last-stage", "all")
HEAD_MODULES = {"global_pool", "fc", "classifier", "head", "head_drop", "flatten", "pre_logits", "fc_norm"}


@dataclass
class Tail:
    """The modules after the stride-16 stage, run in order: what `forward_features` does from there."""

    modules: list[nn.Module]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.modules:
            x = module(x)
        return x

    def parameters(self) -> list[nn.Parameter]:
        """What fine-tuning trains: every parameter but the depthwise convolution kernels (module docstring)."""
        return [
            p
            for m in self.modules
            for module in m.modules()
            for name, p in module.named_parameters(recurse=False)
            if not (name == "weight" and is_depthwise(module))
        ]


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def tail_of(member: Member) -> Tail | None:
    """The member's backbone after its stride-16 stage, or None when it has no such stage."""
    if not member.level_names:
        return None
    path = member.level_names[-1].split(".")
    modules: list[nn.Module] = []
    for depth in range(len(path), 0, -1):
        parent = member.backbone.get_submodule(".".join(path[: depth - 1])) if depth > 1 else member.backbone
        names = [name for name, _ in parent.named_children()]
        after = names[names.index(path[depth - 1]) + 1 :]
        modules += [parent.get_submodule(n) for n in after if depth > 1 or n not in HEAD_MODULES]
    return Tail(modules)


def check_tail(member: Member, tail: Tail, stage_input: torch.Tensor, pooled: torch.Tensor) -> bool:
    """Does the tail reproduce the member's pooled features from cached stage inputs? (Not for a backbone whose
    `forward_features` is more than its modules in order.)"""
    with torch.no_grad():
        again = member.pool(tail(stage_input.to(member.device).float())).cpu()
    scale = pooled.abs().max().clamp_min(1e-6)
    return again.shape == pooled.shape and bool(((again - pooled).abs().max() / scale) < 1e-2)


def finetune_member(
    member: Member,
    tail: Tail,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    train: torch.Tensor,
    val: torch.Tensor,
    epochs: int,
    seconds: float,
    seed: int = 0,
    precision: str = "fp32",
    patience: int | None = None,
    name: str = "",
) -> dict[str, Any]:
    """Fine-tune the tail and the head in place on cached stage inputs [N, C, h, w] (and their mirrors) and
    keep the epoch with the best held-out loss (the frozen state when none beats it); returns what happened.
    `precision` ("fp32" or "bf16"): the training passes' autocast. `patience`: stop after that many epochs
    without a better held-out loss (None: run every epoch; without a held-out split every epoch runs).
    `name`: what the log calls this run (the member's name by default)."""
    name = name or member.name
    stage_params = tail.parameters()
    for p in member.parameters():
        p.requires_grad_(False)
    for p in [*stage_params, *member.head.parameters()]:
        p.requires_grad_(True)
    groups = [{"params": stage_params, "lr": 1e-4}, {"params": list(member.head.parameters()), "lr": 1e-3}]
    optimizer = adamw(groups, weight_decay=1e-4)
    weights = class_weights(labels[train], member.head.fc.out_features).to(member.device)
    before = held_out_loss(member, tail, inputs, labels, val)
    best = (before, _state(member, tail), -1)
    generator = torch.Generator().manual_seed(seed)
    start, ran = time.monotonic(), 0
    for epoch in range(epochs):
        _epoch(member, tail, inputs, labels, train, weights, optimizer, generator, precision)
        ran = epoch + 1
        loss = held_out_loss(member, tail, inputs, labels, val)
        if len(val):
            log.info("finetune %s epoch %d/%d: held-out loss %.4f (frozen %.4f)", name, epoch + 1, epochs, loss, before)
        else:  # a fixed number of epochs (a refit): no held-out loss to show
            log.info("finetune %s epoch %d/%d", name, epoch + 1, epochs)
        if loss < best[0] or not len(val):  # without a held-out split: the last epoch (a fixed count)
            best = (loss, _state(member, tail), epoch)
        if patience is not None and len(val) and epoch - best[2] >= patience:
            log.info("finetune %s: stopping after %d epochs without a better held-out loss", name, epoch + 1)
            break
        elapsed = time.monotonic() - start
        if elapsed * (epoch + 2) / (epoch + 1) > seconds:  # the next epoch would overrun the budget
            log.info("finetune %s: stopping after %d epochs (AXX_FINETUNE_SECONDS)", name, epoch + 1)
            break
    _load(member, tail, best[1])
    for p in member.parameters():
        p.requires_grad_(True)
    member.eval()
    return {
        "finetune_val_loss": best[0],
        "frozen_val_loss": before,
        "finetune_best_epoch": best[2],
        "finetune_epochs_run": ran,
        "finetune_seconds": round(time.monotonic() - start, 1),
        "finetune_precision": precision,
    }


def adamw(groups: list[dict[str, Any]], weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where PyTorch has the fused kernel (CPU, CUDA): one pass over the parameters per step
    instead of several (the ResNet-50 stage's 15 M parameters: 9 ms per step against 31 ms on this CPU)."""
    device = groups[0]["params"][0].device.type
    return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=device in ("cpu", "cuda") or None)


def _epoch(
    member: Member,
    tail: Tail,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    train: torch.Tensor,
    weights: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    precision: str,
    batch_size: int = 16,
) -> None:
    """One pass over every training image in each view (the mirror is the augmentation)."""
    member.eval()  # BatchNorm frozen
    member.head.train()  # the head's dropout on
    device = member.device
    pairs = torch.stack(torch.meshgrid(torch.arange(2), train, indexing="ij"), -1).reshape(-1, 2)  # (mirror?, i)
    order = pairs[torch.randperm(len(pairs), generator=generator)]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        x = torch.stack([inputs[int(i)].flip(-1) if v else inputs[int(i)] for v, i in batch]).to(device).float()
        with autocast_for(x.device, precision):
            logits = member.head(member.pool(tail(x)))
        loss = F.cross_entropy(logits.float(), labels[batch[:, 1]].to(device), weight=weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    member.head.eval()


@torch.no_grad()
def held_out_loss(member: Member, tail: Tail, inputs: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> float:
    if not len(index):
        return math.inf
    member.eval()
    device, total = member.device, 0.0
    for start in range(0, len(index), 32):
        batch = index[start : start + 32]
        logits = member.head.fc(member.pool(tail(inputs[batch].to(device).float())))
        total += float(F.cross_entropy(logits, labels[batch].to(device), reduction="sum"))
    return total / len(index)


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=num_classes).float()
    return counts.sum() / (num_classes * counts.clamp_min(1))


def _state(member: Member, tail: Tail) -> list[torch.Tensor]:
    return [p.detach().clone() for p in [*tail.parameters(), *member.head.parameters()]]


def _load(member: Member, tail: Tail, state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, saved in zip([*tail.parameters(), *member.head.parameters()], state, strict=True):
            p.copy_(saved)


def finetune_last_stages(
    ensemble: Ensemble,
    cache: FeatureCache,
    labels: torch.Tensor,
    train: torch.Tensor,
    val: torch.Tensor,
    settings: Settings,
    cross_fit: CrossFit | None = None,
) -> dict[str, dict[str, Any]]:
    """`last-stage` for every member (see the module docstring), on `cache.stage_inputs`, from a head trained on
    the train split's frozen features (the baseline it must beat); the cached pooled features and pixel-set
    maps are recomputed for the members that keep their fine-tuned stage. With `cross_fit`, a member that keeps
    its stage is fine-tuned again from the frozen backbone once per fold, on the other folds, for the kept
    number of epochs, so that calibration can score every labelled image with a stage that never saw it."""
    metrics: dict[str, dict[str, Any]] = {}
    assert cache.stage_inputs is not None
    for m, member in enumerate(ensemble.members):
        inputs = cache.stage_inputs[m]
        tail = tail_of(member)
        if tail is None or not check_tail(member, tail, inputs[:2], cache.pooled[m][:2]):
            log.warning("%s: no stage to fine-tune on cached inputs; its backbone stays frozen", member.name)
            metrics[member.name] = {"kept": False}
            continue
        pooled = cache.pooled[m]  # train_head starts the head from zero, seeded: nothing of it carries over
        info = train_head(
            member.head, pooled[train], labels[train], pooled[val], labels[val], len(ensemble.classes), settings
        )
        frozen = _state(member, tail)
        budget = settings.finetune_seconds / len(ensemble.members)
        epochs, seed = settings.finetune_epochs, settings.seed + m
        precision = resolve_precision(settings.precision, member.device)
        patience = settings.finetune_patience or None
        result = finetune_member(member, tail, inputs, labels, train, val, epochs, budget, seed, precision, patience)
        # Kept when an epoch beat the frozen backbone's held-out loss. A margin on top (1e-3 and 2 %, tried first)
        # decided by noise: held-out splits from the training images' photographs are near-saturated (frozen losses
        # 5e-4 to 4e-2 on the photograph benchmark), and it rejected stages that raised new-object accuracy
        # from 0.79 to 0.905 where it kept them.
        result["kept"] = result["finetune_best_epoch"] >= 0
        if not result["kept"]:
            _load(member, tail, frozen)
        else:
            if cross_fit is not None:
                start, tuned = time.monotonic(), _state(member, tail)
                epochs_kept = (int(info["best_epoch"]) + 1, result["finetune_best_epoch"] + 1)
                replay = dataclasses.replace(settings, finetune_seconds=budget, seed=seed, precision=precision)
                cross_fit.pooled[m] = [
                    refit_without(member, tail, frozen, inputs, pooled, labels, rest, epochs_kept, replay, fold)
                    for fold, rest in enumerate(cross_fit.rests())
                ]
                _load(member, tail, tuned)
                result["cross_fit_seconds"] = round(time.monotonic() - start, 1)
            maps = stage_features(tail, inputs, member.device)
            cache.pooled[m] = member.pool(maps)
            for i, view in cache.pixels.items():
                view.last_maps[m] = maps[i].half().clone()
        log.info(
            "finetune %s: %s (held-out loss %.4f, frozen %.4f)",
            member.name,
            "kept" if result["kept"] else "not kept",
            result["finetune_val_loss"],
            result["frozen_val_loss"],
        )
        metrics[member.name] = result
    return metrics


def refit_without(
    member: Member,
    tail: Tail,
    frozen: list[torch.Tensor],
    inputs: torch.Tensor,
    pooled: torch.Tensor,
    labels: torch.Tensor,
    rest: torch.Tensor,
    epochs: tuple[int, int],
    settings: Settings,
    fold: int = 0,
) -> torch.Tensor:
    """The member's fine-tuning replayed on `rest` alone (the labelled rows outside calibration fold `fold`),
    from the frozen stage and a head trained on the frozen features, for the kept `epochs` (head, stage), in the
    kept run's `settings.precision` (resolved: "fp32" or "bf16") and within `settings.finetune_seconds`: the
    pooled features [N, K] its stage then makes of every cached sample."""
    head_epochs, stage_epochs = epochs
    _load(member, tail, frozen)  # the frozen stage; train_head then starts the head from zero
    n_classes = member.head.fc.out_features
    fixed = dataclasses.replace(settings, epochs=head_epochs)
    train_head(member.head, pooled[rest], labels[rest], pooled[rest][:0], labels[rest][:0], n_classes, fixed)
    seconds, precision = settings.finetune_seconds, settings.precision
    name = f"{member.name} (refit without fold {fold + 1})"
    finetune_member(
        member, tail, inputs, labels, rest, rest[:0], stage_epochs, seconds, settings.seed, precision, name=name
    )
    return member.pool(stage_features(tail, inputs, member.device))


@torch.no_grad()
def stage_features(tail: Tail, inputs: torch.Tensor, device: torch.device, batch_size: int = 32) -> torch.Tensor:
    """The last feature maps [N, K, h, w] the tail makes on `device` of cached stage inputs, back on the CPU."""
    batches = range(0, len(inputs), batch_size)
    return torch.cat([tail(inputs[i : i + batch_size].to(device).float()).cpu() for i in batches])


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image random flip, resized crop (scale 0.8-1) and brightness/contrast jitter (+-10 %)."""
    out = []
    size = images.shape[-2:]
    for img in images:
        if torch.rand((), generator=generator) < 0.5:
            img = img.flip(-1)
        scale = 0.8 + 0.2 * float(torch.rand((), generator=generator))
        h, w = int(size[0] * math.sqrt(scale)), int(size[1] * math.sqrt(scale))
        top = int(torch.randint(0, size[0] - h + 1, (), generator=generator))
        left = int(torch.randint(0, size[1] - w + 1, (), generator=generator))
        img = F.interpolate(
            img[None, :, top : top + h, left : left + w], size=size, mode="bilinear", align_corners=False
        )[0]
        brightness = 1 + 0.2 * (float(torch.rand((), generator=generator)) - 0.5)
        contrast = 1 + 0.2 * (float(torch.rand((), generator=generator)) - 0.5)
        mean = img.mean()
        out.append(((img - mean) * contrast + mean * brightness).clamp(0, 1))
    return torch.stack(out)


def finetune_ensemble(
    ensemble: Ensemble,
    images: torch.Tensor,
    labels: torch.Tensor,
    train_idx: Sequence[int],
    val_idx: Sequence[int],
    epochs: int,
    batch_size: int,
    seed: int = 0,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, dict[str, float]]:
    """`all`: fine-tune every layer of every member in place on resized uint8 images [N, 3, S, S]."""
    metrics = {}
    train_t, val_t = torch.tensor(list(train_idx), dtype=torch.long), torch.tensor(list(val_idx), dtype=torch.long)
    weights = class_weights(labels[train_t], len(ensemble.classes))
    device = next(ensemble.parameters()).device
    for m, member in enumerate(ensemble.members):
        groups = [
            {"params": list(member.backbone.parameters()), "lr": 1e-4},
            {"params": list(member.head.parameters()), "lr": 1e-3},
        ]
        optimizer = adamw(groups, weight_decay=1e-4)
        generator = torch.Generator().manual_seed(seed + m)
        best = (float("inf"), None, -1)
        for epoch in range(epochs):
            member.eval()  # BatchNorm frozen
            member.head.train()
            order = train_t[torch.randperm(len(train_t), generator=generator)]
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                x = member.normalize(augment(images[batch].to(device).float().div_(255.0), generator))
                loss = F.cross_entropy(member(x), labels[batch].to(device), weight=weights.to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            member.eval()
            val_loss = _image_loss(member, images, labels, val_t if len(val_t) else train_t, batch_size, device)
            if val_loss < best[0]:
                best = (val_loss, {k: v.detach().clone() for k, v in member.state_dict().items()}, epoch)
            if progress:
                progress("finetune", (m * epochs + epoch + 1) / (len(ensemble.members) * epochs))
        if best[1] is not None:
            member.load_state_dict(best[1])
        member.eval()
        metrics[member.name] = {"finetune_val_loss": best[0], "finetune_best_epoch": best[2]}
    return metrics


@torch.no_grad()
def _image_loss(
    member: Member, images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, batch_size: int, device: torch.device
) -> float:
    total = 0.0
    for start in range(0, len(idx), batch_size):
        batch = idx[start : start + batch_size]
        logits = member(member.normalize(images[batch].to(device).float().div_(255.0)))
        total += float(F.cross_entropy(logits, labels[batch].to(device), reduction="sum"))
    return total / max(1, len(idx))
