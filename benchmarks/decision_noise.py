"""How much of a version's review decisions is Monte Carlo noise, and what other vote weights would decide.

The MC-dropout statistics come from T dropout masks on the pooled features, drawn from a generator seeded by
`AXX_SEED`: the seed is a draw like any other, so the flag rate and accuracy on a test folder move with it.
This script computes every member's pooled features once (the version's own forward: preprocessing,
precision, temperatures), then redraws the masks with `--seeds` seeds for each T in `--samples` and decides
with the version's calibrated threshold, reporting the range of the flag rate and the accuracy. With
`--votes` it also decides once (seed 0, the version's T) with the weights the version recorded but does not
serve (`learned_weight`, training/heads.py `member_weights`) beside the served ones.

    .venv/bin/python benchmarks/decision_noise.py --model-dir runs/quality/multiclass/labels/models \
        --data runs/photo/multiclass/test --samples 30 100 300 --seeds 6 --votes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from axx_backend.core.data import read_folder_dataset  # noqa: E402
from axx_backend.core.settings import Settings  # noqa: E402
from axx_backend.core.version_meta import load_version  # noqa: E402
from axx_backend.core.versions import ModelStore  # noqa: E402
from axx_backend.engine.annotator import Annotator  # noqa: E402
from axx_backend.engine.uncertainty import decide  # noqa: E402
from axx_backend.training.features import extract_features  # noqa: E402
from axx_backend.training.heads import member_mc_stats  # noqa: E402


def pooled_features(annotator: Annotator, data: Path) -> tuple[list[torch.Tensor], np.ndarray]:
    """Every member's pooled features [N, K] of the readable test images (training's feature pass), and their
    class indices [N]."""
    samples, _ = read_folder_dataset(data)
    cache = extract_features(annotator, [s for s in samples if s.label in annotator.classes])
    labels = np.array([annotator.classes.index(s.label) for s in cache.samples])
    return cache.pooled, labels


@torch.no_grad()
def member_statistics(
    annotator: Annotator, pooled: list[torch.Tensor], samples: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every member's mean probabilities [N, C] and normalised entropy [N] from T = `samples` masks drawn from
    `seed`, as `Annotator.forward` draws them."""
    generator = torch.Generator().manual_seed(seed)
    every = list(range(len(pooled[0])))
    stats = member_mc_stats(annotator.ensemble.members, pooled, every, samples, generator)
    return stats.probs, stats.entropy


def decisions(
    annotator: Annotator, stats: tuple[list[np.ndarray], list[np.ndarray]], weights: list[float]
) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N], flagged [N]) of the version's decision rule with these member weights."""
    probs, entropy = stats
    s = annotator.settings
    made = [
        decide(
            [p[i] for p in probs], [h[i] for h in entropy], s.uncertainty_threshold, s.min_uncertain_to_flag, weights
        )
        for i in range(len(probs[0]))
    ]
    return np.array([d.label for d in made]), np.array([d.flagged for d in made])


def summary(labels: np.ndarray, flagged: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """(accuracy, flag rate, selective accuracy)."""
    right = labels == truth
    return float(right.mean()), float(flagged.mean()), float(right[~flagged].mean()) if (~flagged).any() else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="a folder in the `train` layout")
    parser.add_argument("--samples", type=int, nargs="+", default=[30, 100, 300])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--votes", action="store_true", help="also decide with the recorded, unserved weights")
    args = parser.parse_args(argv)
    version_dir = ModelStore(args.model_dir).version_path()
    if version_dir is None:
        sys.exit(f"no current version in {args.model_dir}")
    annotator = Annotator.from_version(version_dir, Settings.from_env())
    pooled, truth = pooled_features(annotator, args.data)
    print(f"{version_dir.name}: {len(truth)} images, threshold {annotator.settings.uncertainty_threshold:.3f}")
    weights = annotator.weights
    for samples in args.samples:
        runs = [
            summary(*decisions(annotator, member_statistics(annotator, pooled, samples, seed), weights), truth)
            for seed in range(args.seeds)
        ]
        acc, flag, _ = (np.array(column) for column in zip(*runs, strict=True))
        print(
            f"T = {samples:4d}, seeds 0-{args.seeds - 1}: flagged {flag.min():.3f}-{flag.max():.3f} "
            f"(mean {flag.mean():.3f}), accuracy {acc.min():.3f}-{acc.max():.3f} (mean {acc.mean():.3f})"
        )
    if args.votes:
        stats = member_statistics(annotator, pooled, annotator.settings.mc_samples, 0)
        members = load_version(version_dir).metrics.get("members", {})
        names = [m.name for m in annotator.ensemble.members]
        learned = [float(members.get(n, {}).get("learned_weight", 0.0)) for n in names]
        for rule, rule_weights in (("served", weights), ("learned", learned)):
            acc, flag, selective = summary(*decisions(annotator, stats, rule_weights), truth)
            print(f"votes {rule} {rule_weights}: accuracy {acc:.3f}, flagged {flag:.3f}, selective {selective:.3f}")
        alone = [float(np.mean(p.argmax(-1) == truth)) for p in stats[0]]
        print("members alone: " + ", ".join(f"{n} {a:.3f}" for n, a in zip(names, alone, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
