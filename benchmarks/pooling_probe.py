"""Frozen probes of the heads' pooling (docs/METHOD.md "Pooling"): for each member, the last feature maps of a
train/test folder pair, pooled several ways (global average, max, mean of the top 5/10/20/30 % of cells per
channel); an L2 logistic regression per pooling (scikit-learn, standardised features, C by 5-fold
cross-validated log-loss on the training images); test accuracy and log-loss per member and for the ensemble
(the mean of the members' probabilities).

    .venv/bin/python benchmarks/pooling_probe.py --train runs/photo/binary/train --test runs/photo/binary/test \\
        --cache runs/pooling-cache

(~3 min per member for 400 images at 320 px on 2 cores, nearly all of it the forward; `--cache` keeps the maps.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import DEFAULT_MEMBERS, load_pixels, read_split  # noqa: E402

from axx_backend.core.data import read_folder_dataset  # noqa: E402
from axx_backend.engine.weights import load_backbone  # noqa: E402

C_GRID = np.logspace(-3, 1, 9)
TOP_SHARES = (0.05, 0.1, 0.2, 0.3)


@torch.inference_mode()
def last_maps(name: str, pixels: torch.Tensor) -> torch.Tensor:
    """The frozen member's last feature maps [N, K, h, w] (float16 to keep them small)."""
    backbone, info = load_backbone(name)
    backbone.eval()
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    maps = [backbone.forward_features((pixels[s : s + 16].float() / 255.0 - mean) / std).half()
            for s in range(0, len(pixels), 16)]  # fmt: skip
    return torch.cat(maps)


def poolings(maps: torch.Tensor) -> dict[str, np.ndarray]:
    flat = maps.float().flatten(2)
    out = {"average": flat.mean(2), "max": flat.amax(2)}
    for share in TOP_SHARES:
        n = max(1, round(share * flat.shape[2]))
        out[f"top {round(share * 100)} %"] = flat.topk(n, dim=2).values.mean(2)
    return {k: v.numpy() for k, v in out.items()}


def probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(test probabilities, chosen C, its cross-validated log-loss on the training images)."""
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    best = (np.inf, 1.0)
    for c in C_GRID:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        p = cross_val_predict(model, x_train, y_train, cv=folds, method="predict_proba")
        best = min(best, (log_loss(y_train, p), c))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=best[1], max_iter=2000)).fit(x_train, y_train)
    return model.predict_proba(x_test), best[1], best[0]


def cached_maps(name: str, folder: Path, split: str, input_size: int, cache: Path | None) -> torch.Tensor:
    path = cache / f"{name}-{split}-{input_size}.pt" if cache else None
    if path and path.is_file():
        return torch.load(path, weights_only=True)
    classes = read_folder_dataset(folder)[1]
    maps = last_maps(name, load_pixels(read_split(folder, classes).samples, input_size))
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(maps, path)
    return maps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--members", default=",".join(DEFAULT_MEMBERS))
    parser.add_argument("--input-size", type=int, default=320)
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    classes = read_folder_dataset(args.train)[1]
    y_train = read_split(args.train, classes).labels
    y_test = read_split(args.test, classes).labels
    probs: dict[str, list[np.ndarray]] = {}
    rows = []
    for name in [m.strip() for m in args.members.split(",") if m.strip()]:
        pooled_train = poolings(cached_maps(name, args.train, "train", args.input_size, args.cache))
        pooled_test = poolings(cached_maps(name, args.test, "test", args.input_size, args.cache))
        for kind in pooled_train:
            p, c, cv = probe(pooled_train[kind], y_train, pooled_test[kind])
            probs.setdefault(kind, []).append(p)
            acc = float((p.argmax(1) == y_test).mean())
            rows.append({"member": name, "pooling": kind, "C": float(c), "cv_log_loss": round(cv, 4),
                         "test_accuracy": acc, "test_log_loss": round(log_loss(y_test, p), 4)})  # fmt: skip
            print(f"{name:24s} {kind:10s} C {c:<7.3g} cv log-loss {cv:.3f}  test accuracy {acc:.3f}", flush=True)
    ensemble = {}
    for kind, ps in probs.items():
        mean = np.mean(ps, axis=0)
        ensemble[kind] = {"test_accuracy": float((mean.argmax(1) == y_test).mean()),
                          "test_log_loss": round(log_loss(y_test, mean), 4)}  # fmt: skip
        print(f"ensemble {kind:10s} test accuracy {ensemble[kind]['test_accuracy']:.3f}")
    print(json.dumps({"members": rows, "ensemble": ensemble}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
