"""The classification phase, on cached pooled features (milliseconds per epoch):

1. each member's MC-dropout head on the train split, early-stopped on the held-out split (its epoch count), or,
   where that split has too few images of a class, by cross-validation over every labelled image (`cv_epochs`);
2. cross-fitting: k heads per member, each trained for that many epochs on the other folds of every labelled
   image, predict their own fold: out-of-fold probabilities for all of them, the calibration set of the
   temperatures, the review threshold and (with `member_weights=learned`) the member weights (four times the
   images of a held-out split, and each scored by a head that never saw it, as a new image will be); after
   last-stage fine-tuning, each fold's heads read the features of a stage fine-tuned again without that fold
   (`CrossFit`, finetune.py), else only the held-out split calibrates;
3. the served head trained on every labelled image for the same number of epochs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core.settings import Settings
from ..engine.ensemble import Ensemble, MCDropoutHead, Member
from ..engine.uncertainty import mc_statistics
from .calibration import fit_temperature
from .features import FeatureCache
from .groups import grouped_folds

log = logging.getLogger(__name__)

CV_FOLDS = 5
# Early stopping on the held-out split needs this many held-out images of every class. With fewer, one image
# decides a class's loss: on 12 photographs (3 held out) two members stopped after 1 and 2 epochs, heads with no
# opinion whose votes took the ensemble to 0.50 accuracy where its best member had 0.89 (README, "Few labels").
MIN_HELD_OUT_PER_CLASS = 2


def held_out_too_small(val_labels: torch.Tensor, num_classes: int) -> bool:
    """Does the held-out split have fewer than `MIN_HELD_OUT_PER_CLASS` images of some class?"""
    return bool((torch.bincount(val_labels, minlength=num_classes) < MIN_HELD_OUT_PER_CLASS).any())


@dataclass
class Split:
    """Which cached samples train the heads and which calibrate them; class index per sample (-1: none)."""

    labels: torch.Tensor  # [N]
    train: torch.Tensor  # sample indices
    val: torch.Tensor

    @classmethod
    def of(cls, cache: FeatureCache, classes: Sequence[str], val_keys: set[str]) -> Split:
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[s.label] if s.label is not None else -1 for s in cache.samples])
        labelled = [i for i in range(len(labels)) if labels[i] >= 0]
        val = [i for i in labelled if cache.samples[i].key in val_keys]
        train = [i for i in labelled if cache.samples[i].key not in val_keys]
        return cls(labels, torch.tensor(train, dtype=torch.long), torch.tensor(val, dtype=torch.long))

    @property
    def labelled(self) -> torch.Tensor:
        """Every labelled sample index, train and held-out, sorted: the rows of cross-fitting and calibration."""
        return torch.cat([self.train, self.val]).sort().values

    def label_of(self, i: int) -> int | None:
        return int(self.labels[i]) if self.labels[i] >= 0 else None


@dataclass
class CrossFit:
    """The calibration folds of the labelled rows and, per member that kept its fine-tuned stage, the pooled
    features [N, K] of every cached sample made by a stage fine-tuned without each fold (one tensor per fold)."""

    rows: torch.Tensor  # the labelled sample indices, sorted
    folds: np.ndarray  # fold per row
    pooled: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def rests(self) -> list[torch.Tensor]:
        """Per fold, the labelled rows outside it (what that fold's stage is fine-tuned on)."""
        return [self.rows[torch.from_numpy(self.folds != k)] for k in range(int(self.folds.max()) + 1)]


@dataclass
class MemberStats:
    """Per member: MC mean probabilities and normalised entropies of some samples, in a fixed order."""

    index: list[int]
    probs: list[np.ndarray] = field(default_factory=list)  # per member [n, C]
    entropy: list[np.ndarray] = field(default_factory=list)  # per member [n]
    # [M, n]: each member's nearest labelled image's class (engine/neighbours.py), where the version has the check
    neighbours: np.ndarray | None = None

    def of(self, i: int) -> tuple[list[np.ndarray], list[float]]:
        k = self.index.index(i)
        return [p[k] for p in self.probs], [float(h[k]) for h in self.entropy]

    def nearest(self, i: int) -> list[int] | None:
        """Row i's members' nearest labelled classes (None without the check)."""
        if self.neighbours is None:
            return None
        return [int(c) for c in self.neighbours[:, self.index.index(i)]]


@dataclass
class Heads:
    """What the classification phase leaves for calibration, the pixel phase and the version."""

    temperatures: list[float]
    weights: list[float]  # each member's vote and share of the ensemble mean (sum 1)
    metrics: dict[str, Any]  # per member
    calibration: MemberStats  # out-of-fold statistics of every labelled image (temperature-scaled)
    pixels: MemberStats  # the pixel set's samples, by the served heads


def train_member_heads(
    ensemble: Ensemble,
    cache: FeatureCache,
    split: Split,
    settings: Settings,
    backbone_saw_train: bool = False,
    refits: CrossFit | None = None,
) -> Heads:
    """Train and cross-fit every member's head (see the module docstring), fit its temperature on the
    out-of-fold logits, weigh the members, and sample the MC statistics of the pixel set.

    `backbone_saw_train`: a backbone stage was fine-tuned on the train split, so its features of those images
    are fitted to their labels and out-of-fold heads look more certain there than on new images (measured:
    out-of-fold accuracy 1.000 on the train images against 0.905 on new ones, and a review threshold that
    flagged 38 % of new images against a 20 % budget). Calibration then uses the held-out split only, unless
    `refits` holds, for every fine-tuned member, the features of stages fine-tuned without each fold: then each
    fold's heads train on its own stage's features and every labelled image calibrates."""
    labelled = split.labelled
    if refits is not None and not torch.equal(refits.rows, labelled):
        raise ValueError("the refitted folds cover other rows than the labelled images")
    folds = refits.folds if refits else calibration_folds(cache, labelled, split.labels[labelled].numpy(), settings)
    unseen = split.val if backbone_saw_train and refits is None and len(split.val) else labelled
    keep = torch.isin(labelled, unseen)  # the calibration rows of the out-of-fold arrays
    pixel_index = sorted(cache.pixels)
    heads = Heads([], [], {}, MemberStats(labelled[keep].tolist()), MemberStats(pixel_index))
    generator = torch.Generator().manual_seed(settings.seed)
    oof_logits = []
    few_held_out = held_out_too_small(split.labels[split.val], len(ensemble.classes))
    if few_held_out:
        log.info("the held-out split is too small to early-stop on: head epochs chosen by cross-validation")
    for m, member in enumerate(ensemble.members):
        x = cache.pooled[m]
        with torch.enable_grad():
            fold_x = [f[labelled] for f in refits.pooled[m]] if refits and m in refits.pooled else None
            if few_held_out:
                info = cv_epochs(member, x[labelled], split.labels[labelled], folds, settings, fold_x)
            else:
                info = train_head(
                    member.head,
                    x[split.train],
                    split.labels[split.train],
                    x[split.val],
                    split.labels[split.val],
                    len(ensemble.classes),
                    settings,
                )
            epochs = int(info["best_epoch"]) + 1
            logits, samples = cross_fit(
                member, x[labelled], split.labels[labelled], folds, epochs, settings, generator, fold_x
            )
            retrain(member, x[labelled], split.labels[labelled], epochs, settings)
        logits, samples = logits[keep], samples[:, keep]
        y = split.labels[labelled][keep]
        temperature = fit_temperature(logits, y)
        member.temperature.fill_(temperature)
        stats = mc_statistics((samples / temperature).softmax(-1))
        heads.calibration.probs.append(stats.mean_probs.numpy())
        heads.calibration.entropy.append(stats.entropy.numpy())
        oof_logits.append(logits / temperature)
        accuracy = float((logits.argmax(-1) == y).float().mean())
        heads.temperatures.append(temperature)
        heads.metrics[member.name] = {"oof_accuracy": accuracy, "temperature": temperature, "epochs": epochs, **info}
        log.info(
            "member %s: out-of-fold accuracy %.3f, temperature %.3f, %d epochs",
            member.name,
            accuracy,
            temperature,
            epochs,
        )
    learned = member_weights(oof_logits, split.labels[labelled][keep])
    n = len(ensemble.members)
    heads.weights = learned if settings.member_weights == "learned" else [round(1.0 / n, 4)] * n
    for member, weight, held_out in zip(ensemble.members, heads.weights, learned, strict=True):
        heads.metrics[member.name].update(weight=weight, learned_weight=held_out)
    # `heads.pixels` after the temperatures above: what the version's own heads say about the pixel set
    heads.pixels = member_mc_stats(ensemble.members, cache.pooled, heads.pixels.index, settings.mc_samples, generator)
    return heads


def cross_fit(
    member: Member,
    x: torch.Tensor,
    y: torch.Tensor,
    folds: np.ndarray,
    epochs: int,
    settings: Settings,
    generator: torch.Generator,
    fold_x: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-fold logits [N, C] and MC logit samples [T, N, C] of fresh heads like the member's; `fold_x`: per
    fold, the features [N, K] of a backbone fine-tuned without that fold (instead of `x` for every fold)."""
    n_classes = member.head.fc.out_features
    logits = torch.zeros(len(y), n_classes)
    samples = torch.zeros(settings.mc_samples, len(y), n_classes)
    for held, rest, xf in fold_rows(folds, x, fold_x):
        head = fresh_head(member)
        fixed_epochs = dataclasses.replace(settings, epochs=epochs)
        train_head(head, xf[rest], y[rest], xf[rest][:0], y[rest][:0], n_classes, fixed_epochs)
        with torch.no_grad():
            logits[held] = head.fc(xf[held])
            samples[:, held] = head.sample(xf[held], settings.mc_samples, generator)
    return logits, samples


def cv_epochs(
    member: Member,
    x: torch.Tensor,
    y: torch.Tensor,
    folds: np.ndarray,
    settings: Settings,
    fold_x: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Early stopping by cross-validation: the epoch count whose heads (trained on the other folds) have the
    lowest loss over every fold's images, each scored once; `fold_x` as in `cross_fit`. Returns what
    `train_head` returns (`best_epoch`, `val_loss`)."""
    n_classes = member.head.fc.out_features
    total = torch.zeros(settings.epochs, dtype=torch.float64)
    for held, rest, xf in fold_rows(folds, x, fold_x):
        curve: list[float] = []
        train_head(fresh_head(member), xf[rest], y[rest], xf[held], y[held], n_classes, settings, curve)
        total += torch.tensor(curve, dtype=torch.float64) * len(held)
    best = int(total.argmin())
    return {"best_epoch": best, "val_loss": float(total[best]) / len(y), "epochs_by": "cross-validation"}


def fold_rows(
    folds: np.ndarray, x: torch.Tensor, fold_x: Sequence[torch.Tensor] | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per fold: its rows, the other rows, and the features its heads read (`fold_x[fold]`, else `x`)."""
    for fold in range(int(folds.max()) + 1):
        held = torch.from_numpy(np.flatnonzero(folds == fold))
        rest = torch.from_numpy(np.flatnonzero(folds != fold))
        yield held, rest, (x if fold_x is None else fold_x[fold])


def fresh_head(member: Member) -> MCDropoutHead:
    """A new head shaped like the member's (train_head starts it from zero)."""
    return MCDropoutHead(member.head.fc.in_features, member.head.fc.out_features, member.head.p)


def retrain(member: Member, x: torch.Tensor, y: torch.Tensor, epochs: int, settings: Settings) -> None:
    """The served head: every labelled image, the early-stopped number of epochs."""
    fresh = fresh_head(member)
    train_head(fresh, x, y, x[:0], y[:0], member.head.fc.out_features, dataclasses.replace(settings, epochs=epochs))
    member.head.load_state_dict(fresh.state_dict())


def member_weights(logits: Sequence[torch.Tensor], labels: torch.Tensor, step: float = 0.1) -> list[float]:
    """Weights on the simplex (a grid of `step`) that minimise the out-of-fold log-loss of the weighted mean of
    the members' probabilities; equal weights win ties. A member no better than chance gets little say."""
    probs = [lg.softmax(-1).double() for lg in logits]
    n = len(probs)
    best = (float("inf"), [1.0 / n] * n)
    for combo in _simplex(n, round(1 / step)):
        w = [c * step for c in combo]
        mixed = sum(wi * p for wi, p in zip(w, probs, strict=True))
        loss = float(F.nll_loss(torch.log(mixed.clamp_min(1e-12)), labels))
        equal = all(abs(wi - 1.0 / n) < step / 2 for wi in w)
        if loss < best[0] - 1e-9 or (abs(loss - best[0]) <= 1e-9 and equal):
            best = (loss, w)
    total = sum(best[1])
    return [round(wi / total, 4) for wi in best[1]]


def _simplex(n: int, units: int) -> Iterator[tuple[int, ...]]:
    if n == 1:
        yield (units,)
        return
    for first in range(units + 1):
        for rest in _simplex(n - 1, units - first):
            yield (first, *rest)


def calibration_folds(
    cache: FeatureCache, rows: torch.Tensor, labels: np.ndarray, settings: Settings, k: int = CV_FOLDS
) -> np.ndarray:
    """The cross-fitting folds: by appearance (groups.py) when set and possible, else stratified random."""
    if cache.groups is not None:  # set by the trainer with calibration_groups=appearance
        folds = grouped_folds(cache.groups[rows.numpy()], labels, k)
        if folds is not None:
            return folds
        log.info("appearance folds would leave a class out of a fold's training part: stratified folds instead")
    return stratified_folds(labels, k, settings.seed)


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index per item, classes dealt evenly (seeded); fewer folds when a class has fewer items."""
    rng = np.random.default_rng(seed)
    k = max(2, min(k, min(np.bincount(labels)[np.bincount(labels) > 0])))
    folds = np.zeros(len(labels), dtype=int)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        folds[idx] = np.arange(len(idx)) % k
    return folds


def member_mc_stats(
    members: Sequence[Member],
    pooled: Sequence[torch.Tensor],
    index: list[int],
    samples: int,
    generator: torch.Generator,
) -> MemberStats:
    """Every member's MC statistics (T = `samples` head-dropout masks, after its temperature) of the rows `index`
    of its pooled features."""
    stats = MemberStats(index)
    rows = torch.tensor(index, dtype=torch.long)
    for member, x in zip(members, pooled, strict=True):
        with torch.no_grad():
            st = mc_statistics(member.mc_probs(x[rows].to(member.device), samples, generator))
        stats.probs.append(st.mean_probs.cpu().numpy())
        stats.entropy.append(st.entropy.cpu().numpy())
    return stats


def train_head(
    head: torch.nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    settings: Settings,
    curve: list[float] | None = None,
) -> dict[str, float]:
    """Full-batch AdamW with class-balanced cross-entropy; keeps the epoch with the best
    validation loss (early stopping without a patience knob: every epoch is cheap). `curve`: gets the
    validation loss of every epoch.

    It trains on features divided by their root mean square and folds that scale into `head.fc` at the end,
    so the served head still reads raw pooled features (and CAMs still use `fc.weight`). The head starts from
    zero (uniform probabilities), so stopping early shrinks it towards "no opinion" as L2 regularisation would.
    On raw features from a random start at lr 1e-2, the self-supervised ResNet-50 member (pooled-feature norm
    about 40, the mobile members' 13-18) overshot to one class in the few epochs early stopping chose (test
    accuracy 0.505 on the photograph benchmark; 0.74 scaled). The features are scaled, not centred: a featureless
    image (all activations near 0) then gets the prior, not whatever the far side of the training mean says
    (centred, an all-zero feature vector got 0.94-1.00 for one class; a grey image was no longer flagged)."""
    torch.manual_seed(settings.seed)
    device = head.fc.weight.device  # a member's head is where its backbone is; the cached features on the CPU
    train_x, train_y, val_x, val_y = (t.to(device) for t in (train_x, train_y, val_x, val_y))
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.bias.zero_()
    scale = feature_scale(train_x)
    train_x, val_x = train_x / scale, val_x / scale
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
        if curve is not None:
            curve.append(float(monitor))
        if float(monitor) < best_loss:
            best_loss, best_epoch = float(monitor), epoch
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    with torch.no_grad():
        head.fc.weight.div_(scale)  # fc(x / scale) == fc'(x)
    return {"best_epoch": best_epoch, "val_loss": best_loss}


def feature_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-feature root mean square of `x` [N, K], floored at a thousandth of the mean square, so that a
    feature that is zero on the training images cannot get a huge folded weight."""
    if len(x) == 0:
        return torch.ones(x.shape[1], device=x.device)
    square = x.pow(2).mean(dim=0)
    return (square + 1e-3 * square.mean().clamp_min(1e-12)).sqrt()
