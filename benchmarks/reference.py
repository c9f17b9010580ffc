"""The plain reference and the trivial rows of a quality table, computed on a train/test folder pair.

METHOD notes: "A plain reference belongs in every quality table, computed in the same run: the same
frozen members, an L2-regularised logistic-regression head per member (C by cross-validated log-loss),
XGrad-CAM of that head, the mean of the members' min-max-normalised CAMs, one threshold chosen on
training masks. Plus a centred box covering 25 % of the image and the whole image."

- Members: frozen ImageNet backbones (eval mode); images resized (bilinear) to `input_size`; the pooled
  feature is the global average of the last feature map.
- Head per member: multinomial logistic regression on standardised pooled features, loss
  `mean cross-entropy + ||W||^2 / (2 C N)` (scikit-learn's `0.5 ||W||^2 + C * sum loss`; intercept not
  penalised), solved by Newton steps in float64 (on this benchmark's features it matches scikit-learn's
  `LogisticRegression` within 1e-6 in probability at the chosen C, 2e-4 at C = 100). C from `C_GRID` by
  5-fold stratified cross-validated log-loss on the training set. With two classes a softmax head with C
  equals scikit-learn's binary head with 2C.
- Classification: the mean of the members' probabilities, argmax.
- CAM: for a linear head on GAP features, XGrad-CAM is `ReLU(sum_k w_ck A_k) / (h w)` with `w` the
  weight on the *raw* features: `W / sigma` when the head reads `(x - mu) / sigma`. The shift `mu` only
  moves the logit by a constant, which has no gradient, so it is not part of the map (adding it inside
  the ReLU would change which pixels are clipped, which min-max normalisation cannot undo).
  Each map is upsampled (bilinear) to the image size and min-max normalised; the reference's map is the
  mean of the members' maps. One threshold per map source, from `THRESHOLDS`, maximises the mean IoU
  over the training images' masks (maps of their true class).
- Rows, over the test images that have a mask (the positives), mean of the per-image IoU:
  reference given the true class; reference end to end (empty mask, IoU 0, when the reference predicts
  another class, a negative one included); each member given the true class, and the best of them by
  test IoU (as `quality.py`'s `iou_best_member`); a centred square of 25 % of the image area; the whole image.

    .venv/bin/python benchmarks/make_photo_dataset.py --out runs/photo
    .venv/bin/python benchmarks/reference.py --train runs/photo/binary/train --test runs/photo/binary/test --json

(~8 min on 2 busy CPU cores for 400 images at 320 px, nearly all of it feature extraction; `--cache DIR`
keeps the features for a rerun.)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from axx_backend.core.data import Sample, read_folder_dataset
from axx_backend.core.settings import PRESETS
from axx_backend.engine.saliency import fast_xgradcam, normalize_maps, upsample
from axx_backend.engine.weights import load_backbone

DEFAULT_MEMBERS = PRESETS["offline"]
C_GRID = tuple(float(c) for c in np.logspace(-3, 2, 11))  # 1e-3 .. 1e2, half-decades
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.951, 0.05))
N_FOLDS = 5
BATCH_SIZE = 16


# ---------------------------------------------------------------- features


@dataclass
class SplitData:
    """One folder: labels as class indices, the masks (None for images without one)."""

    samples: list[Sample]
    classes: list[str]
    labels: np.ndarray  # [N] int, indices into classes
    masks: list[np.ndarray | None]

    @property
    def positives(self) -> list[int]:
        return [i for i, m in enumerate(self.masks) if m is not None]

    @property
    def positive_masks(self) -> list[np.ndarray]:
        return [m for m in self.masks if m is not None]


def read_split(folder: Path, classes: Sequence[str]) -> SplitData:
    samples, found = read_folder_dataset(folder)
    if list(found) != list(classes):
        raise ValueError(f"{folder} has classes {found}, expected {list(classes)}")
    labels = np.array([classes.index(s.label) for s in samples])
    return SplitData(samples, list(classes), labels, [s.load_mask() for s in samples])


def load_pixels(samples: Sequence[Sample], input_size: int) -> torch.Tensor:
    """uint8 [N, 3, S, S]: every image resized (bilinear) to the members' input size; kept as bytes (4x less RAM)."""
    arrays = [np.asarray(s.load().image.resize((input_size, input_size), Image.BILINEAR)) for s in samples]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.inference_mode()
def extract_features(name: str, pixels: torch.Tensor, keep_maps: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled [N, K] float64, last feature maps [len(keep_maps), K, h, w] float32) of the frozen member."""
    backbone, info = load_backbone(name)
    backbone.eval()
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    keep = set(keep_maps)
    pooled, maps = [], []
    for start in range(0, len(pixels), BATCH_SIZE):
        x = pixels[start : start + BATCH_SIZE].float() / 255.0
        feats = backbone.forward_features((x - mean) / std)
        pooled.append(feats.mean(dim=(2, 3)).double())
        # clone: a view would keep the whole batch's maps alive, the negatives' too
        maps += [feats[i - start].clone() for i in range(start, start + len(x)) if i in keep]
    return torch.cat(pooled), torch.stack(maps) if maps else torch.empty(0)


def cached_features(
    name: str, folder: Path, data: SplitData, input_size: int, cache: Path | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`extract_features`, stored under `cache` keyed by member, input size and the folder's files."""
    if cache is None:
        return extract_features(name, load_pixels(data.samples, input_size), data.positives)
    key = hashlib.sha256(f"{name}|{input_size}|{folder.resolve()}".encode())
    for s in data.samples:
        key.update(f"{s.key}|{s.path.stat().st_size}|{s.path.stat().st_mtime_ns}".encode())  # type: ignore[union-attr]
    path = cache / f"{name}-{key.hexdigest()[:16]}.pt"
    if path.is_file():
        stored = torch.load(path)
        return stored["pooled"], stored["maps"]
    pooled, maps = extract_features(name, load_pixels(data.samples, input_size), data.positives)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"pooled": pooled, "maps": maps}, path)
    return pooled, maps


# ---------------------------------------------------------------- logistic regression


@dataclass
class LinearHead:
    """Logits `((x - mean) / scale) @ weight.T + bias` on pooled features x."""

    mean: torch.Tensor  # [K]
    scale: torch.Tensor  # [K]
    weight: torch.Tensor  # [C, K], on standardised features
    bias: torch.Tensor  # [C]

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return ((pooled.double() - self.mean) / self.scale) @ self.weight.T + self.bias

    def probabilities(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(pooled), dim=1)

    @property
    def raw_weight(self) -> torch.Tensor:
        """The weight on raw features (what XGrad-CAM's gradient sees): [C, K]."""
        return self.weight / self.scale


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: the heads' matrices are small, and on a busy machine a thread pool's
    synchronisation made each tiny op ~10x slower than the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def fit_logistic(x: torch.Tensor, y: np.ndarray, n_classes: int, c: float) -> LinearHead:
    """L2-regularised multinomial logistic regression on standardised features, solved to convergence.

    The optimal weight rows lie in the span of the (standardised) training samples: the loss only sees
    `W z_i`, and any part of W orthogonal to every z_i adds penalty and nothing else. So the problem is
    solved exactly in the r <= N coordinates of that span, where Newton's method is cheap (a Hessian of
    (r + 1) C squared entries) and converges in a few steps, even with thousands of channels.
    """
    x = x.double()
    mean = x.mean(dim=0)
    # A channel that never varies (a dead ReLU) keeps scale 1: its standardised value is 0 either way.
    std = x.std(dim=0, unbiased=False)
    scale = torch.where(std > 1e-8, std, torch.ones_like(std))
    z = (x - mean) / scale
    _, s, vt = torch.linalg.svd(z, full_matrices=False)
    basis = vt[s > s[0] * max(z.shape) * torch.finfo(z.dtype).eps].T  # [K, r], orthonormal columns
    theta = _newton_multinomial(z @ basis, torch.as_tensor(y, dtype=torch.long), n_classes, 1.0 / (2.0 * c * len(z)))
    return LinearHead(mean, scale, theta[:, :-1] @ basis.T, theta[:, -1])


def _newton_multinomial(q: torch.Tensor, y: torch.Tensor, n_classes: int, penalty: float) -> torch.Tensor:
    """argmin of `mean CE(q W^T + b) + penalty * ||W||^2` by damped Newton steps; returns [W | b] as [C, r+1]."""
    n, r = q.shape
    design = torch.cat([q, torch.ones(n, 1, dtype=q.dtype)], dim=1)  # [N, r+1]: the last column is the intercept
    onehot = F.one_hot(y, n_classes).to(q.dtype)
    penalised = torch.ones(r + 1, dtype=q.dtype)
    penalised[-1] = 0.0  # the intercept is not penalised (as in scikit-learn)

    def objective(theta: torch.Tensor) -> float:
        return float(F.cross_entropy(design @ theta.T, y) + penalty * (theta[:, :-1] ** 2).sum())

    theta = torch.zeros(n_classes, r + 1, dtype=q.dtype)
    for _ in range(100):
        probs = torch.softmax(design @ theta.T, dim=1)
        grad = (probs - onehot).T @ design / n + 2 * penalty * theta * penalised
        step = torch.linalg.solve(_hessian(design, probs, penalty, penalised), grad.reshape(-1)).view_as(theta)
        # The Newton decrement g^T H^-1 g is about twice the gap to the optimum: below float64's resolution
        # of an objective near 1, further steps only chase rounding noise.
        decrement = float((grad * step).sum())
        if decrement < 1e-15:
            break
        # Backtracking (Armijo): a full Newton step can overshoot far from the optimum.
        f0, t = objective(theta), 1.0
        while objective(theta - t * step) > f0 - 1e-4 * t * decrement:
            t /= 2
            if t < 1e-6:
                return theta  # no descent left to find: converged as far as rounding allows
        theta = theta - t * step
    return theta


def _hessian(design: torch.Tensor, probs: torch.Tensor, penalty: float, penalised: torch.Tensor) -> torch.Tensor:
    """The objective's Hessian, [C (r+1), C (r+1)]: blocks X^T diag(p_c (delta_cd - p_d)) X / N plus the penalty."""
    n, d = design.shape
    n_classes = probs.shape[1]
    blocks = torch.empty(n_classes, d, n_classes, d, dtype=design.dtype)
    for a in range(n_classes):
        for b in range(a, n_classes):
            weight = probs[:, a] * (float(a == b) - probs[:, b])
            block = (design * weight[:, None]).T @ design / n
            blocks[a, :, b, :] = block
            blocks[b, :, a, :] = block
    # Softmax does not change when every intercept moves by the same amount: a flat direction, which a
    # tiny ridge on the intercepts makes solvable without moving the solution (the gradient sums to 0 there).
    diagonal = (2 * penalty * penalised + 1e-9 * (1 - penalised)).repeat(n_classes)
    return blocks.reshape(n_classes * d, n_classes * d) + torch.diag(diagonal)


def stratified_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per sample: each class shuffled (seeded) and dealt round-robin over the folds."""
    rng = np.random.default_rng([seed, 5])
    folds = np.empty(len(labels), dtype=int)
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        folds[idx] = np.arange(len(idx)) % n_folds
    return folds


def cross_validated_log_loss(x: torch.Tensor, y: np.ndarray, n_classes: int, c: float, folds: np.ndarray) -> float:
    """Mean held-out log-loss over all training samples (each predicted by the fold model that did not see it)."""
    losses = np.empty(len(y))
    for fold in np.unique(folds):
        held = folds == fold
        head = fit_logistic(x[~held], y[~held], n_classes, c)
        log_probs = torch.log_softmax(head.logits(x[held]), dim=1)
        losses[held] = -log_probs[torch.arange(int(held.sum())), torch.as_tensor(y[held])].numpy()
    return float(losses.mean())


@one_thread()
def choose_c(x: torch.Tensor, y: np.ndarray, n_classes: int, seed: int) -> tuple[float, dict[float, float]]:
    """The C of `C_GRID` with the lowest cross-validated log-loss (ties: the smaller C), and every C's loss."""
    folds = stratified_folds(y, N_FOLDS, seed)
    losses = {c: cross_validated_log_loss(x, y, n_classes, c, folds) for c in C_GRID}
    return min(C_GRID, key=lambda c: (round(losses[c], 12), c)), losses


# ---------------------------------------------------------------- maps and IoU


def class_cams(maps: torch.Tensor, head: LinearHead, classes: Sequence[int], sizes: Sequence[tuple[int, int]]) -> list:
    """XGrad-CAM of the head for `classes[i]` on `maps[i]`, upsampled to `sizes[i]` and min-max normalised."""
    cams = fast_xgradcam(maps, head.raw_weight.float(), torch.as_tensor(list(classes)))
    return [normalize_maps(upsample(cam[None], size))[0].numpy() for cam, size in zip(cams, sizes, strict=True)]


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(pred, truth).sum()
    return float(np.logical_and(pred, truth).sum() / union) if union else 1.0


def mean_iou(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float) -> float:
    return float(np.mean([iou(m >= threshold, t) for m, t in zip(maps, masks, strict=True)]))


def choose_threshold(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[float, float]:
    """(threshold of `THRESHOLDS` with the best mean IoU (ties: the lower one), that IoU)."""
    scores = [mean_iou(maps, masks, t) for t in THRESHOLDS]
    best = int(np.argmax(scores))
    return THRESHOLDS[best], scores[best]


def centred_box(shape: tuple[int, int], area_fraction: float = 0.25) -> np.ndarray:
    """A centred square covering `area_fraction` of the image (clipped to the image on a very long one)."""
    h, w = shape
    side = np.sqrt(area_fraction * h * w)
    bh, bw = min(h, round(side)), min(w, round(side))
    box = np.zeros(shape, bool)
    top, left = (h - bh) // 2, (w - bw) // 2
    box[top : top + bh, left : left + bw] = True
    return box


# ---------------------------------------------------------------- the rows


@dataclass
class MemberResult:
    name: str
    c: float
    cv_log_losses: dict[float, float]
    test_probs: torch.Tensor  # [N_test, C]
    train_cams: list[np.ndarray]  # true-class maps of the training positives
    test_cams: list[np.ndarray]  # true-class maps of the test positives


def run_member(
    name: str,
    data: tuple[SplitData, SplitData],
    folders: tuple[Path, Path],
    input_size: int,
    seed: int,
    cache: Path | None,
) -> MemberResult:
    """Features, C, the head, its test probabilities and the true-class maps of the positives, for one member."""
    train, test = data
    n_classes = len(train.classes)
    train_pooled, train_maps = cached_features(name, folders[0], train, input_size, cache)
    test_pooled, test_maps = cached_features(name, folders[1], test, input_size, cache)
    c, losses = choose_c(train_pooled, train.labels, n_classes, seed)
    head = fit_logistic(train_pooled, train.labels, n_classes, c)

    def cams(data: SplitData, maps: torch.Tensor) -> list[np.ndarray]:
        sizes = [m.shape for m in data.positive_masks]
        return class_cams(maps, head, data.labels[data.positives].tolist(), sizes)

    return MemberResult(
        name, c, losses, head.probabilities(test_pooled), cams(train, train_maps), cams(test, test_maps)
    )


def map_rows(train_cams: list, test_cams: list, train: SplitData, test: SplitData) -> dict:
    """Threshold on the training masks, then the test positives' IoU at it."""
    threshold, train_iou = choose_threshold(train_cams, [train.masks[i] for i in train.positives])
    per_image = [iou(m >= threshold, test.masks[i]) for m, i in zip(test_cams, test.positives, strict=True)]
    return {"threshold": threshold, "train_iou": round(train_iou, 4), "per_image": per_image}


def summary(values: Sequence[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    sem = float(arr.std(ddof=1) / np.sqrt(len(arr))) if len(arr) > 1 else 0.0
    return {"mean": round(float(arr.mean()), 4), "sem": round(sem, 4), "n": len(arr)}


def reference_rows(
    train_dir: str | Path,
    test_dir: str | Path,
    members: Sequence[str] = DEFAULT_MEMBERS,
    input_size: int = 320,
    seed: int = 0,
    cache: Path | None = None,
) -> dict:
    """Every number of the reference and trivial rows (see the module docstring)."""
    start = time.perf_counter()
    train_dir, test_dir = Path(train_dir), Path(test_dir)
    _, classes = read_folder_dataset(train_dir)
    train, test = read_split(train_dir, classes), read_split(test_dir, classes)
    results = [run_member(m, (train, test), (train_dir, test_dir), input_size, seed, cache) for m in members]
    predicted = torch.stack([r.test_probs for r in results]).mean(dim=0).argmax(dim=1).numpy()
    correct = predicted == test.labels
    member_rows = {r.name: map_rows(r.train_cams, r.test_cams, train, test) for r in results}
    mean_train = [np.mean(ms, axis=0) for ms in zip(*(r.train_cams for r in results), strict=True)]
    mean_test = [np.mean(ms, axis=0) for ms in zip(*(r.test_cams for r in results), strict=True)]
    ref = map_rows(mean_train, mean_test, train, test)
    pos = test.positives
    # As served: a positive image predicted as any other class (a negative one included) gets no mask.
    end_to_end = [v if correct[i] else 0.0 for v, i in zip(ref["per_image"], pos, strict=True)]
    truths = [test.masks[i] for i in pos]
    best = max(members, key=lambda m: np.mean(member_rows[m]["per_image"]))
    return {
        "train": str(train_dir),
        "test": str(test_dir),
        "classes": list(classes),
        "n_train": len(train.samples),
        "n_test": len(test.samples),
        "n_test_positive": len(pos),
        "input_size": input_size,
        "seed": seed,
        "accuracy": round(float(correct.mean()), 4),
        "members": {
            r.name: {
                "C": r.c,
                "cv_log_loss": round(r.cv_log_losses[r.c], 4),
                "cv_log_losses": {f"{c:g}": round(v, 4) for c, v in r.cv_log_losses.items()},
                "accuracy": round(float((r.test_probs.argmax(dim=1).numpy() == test.labels).mean()), 4),
                "threshold": member_rows[r.name]["threshold"],
                "train_iou": member_rows[r.name]["train_iou"],
                "iou_true_class": summary(member_rows[r.name]["per_image"]),
            }
            for r in results
        },
        "rows": {
            "reference (given the true class)": {**summary(ref["per_image"]), "threshold": ref["threshold"]},
            "reference (end to end)": {**summary(end_to_end), "threshold": ref["threshold"]},
            f"best member (given the true class): {best}": {
                **summary(member_rows[best]["per_image"]),
                "threshold": member_rows[best]["threshold"],
            },
            "centred box 25 %": summary([iou(centred_box(t.shape), t) for t in truths]),
            "whole image": summary([iou(np.ones_like(t), t) for t in truths]),
        },
        "reference_threshold": ref["threshold"],
        "reference_train_iou": ref["train_iou"],
        "best_member": best,
        "seconds": round(time.perf_counter() - start, 1),
    }


def format_tables(result: dict) -> str:
    """The classification table and the IoU table, markdown."""
    lines = [
        f"### Reference on {result['test']} ({result['n_train']} train, {result['n_test']} test images, "
        f"{result['n_test_positive']} test positives; classes {', '.join(result['classes'])}; "
        f"input {result['input_size']} px)",
        "",
        "| classifier | C | CV log-loss | test accuracy |",
        "|---|---|---|---|",
    ]
    for name, m in result["members"].items():
        lines.append(f"| {name} (LR head) | {m['C']:g} | {m['cv_log_loss']:.4f} | {m['accuracy']:.3f} |")
    lines += [f"| reference (mean of the members' probabilities) | | | {result['accuracy']:.3f} |", ""]
    lines += ["| mask (test positives) | mean IoU | ± s.e. | threshold (on train masks) |", "|---|---|---|---|"]
    rows = dict(result["rows"])
    for name, m in result["members"].items():
        rows[f"{name} (given the true class)"] = {**m["iou_true_class"], "threshold": m["threshold"]}
    for label, row in rows.items():
        threshold = f"{row['threshold']:.2f}" if "threshold" in row else "-"
        lines.append(f"| {label} | {row['mean']:.3f} | {row['sem']:.3f} | {threshold} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True, help="dataset folder (images/<class>/, masks/<class>/)")
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--members", default=",".join(DEFAULT_MEMBERS))
    parser.add_argument("--input-size", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0, help="seeds the cross-validation folds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=None, help="keep extracted features here between runs")
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    members = [m.strip() for m in args.members.split(",") if m.strip()]
    result = reference_rows(args.train, args.test, members, args.input_size, args.seed, args.cache)
    print(format_tables(result), flush=True)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
