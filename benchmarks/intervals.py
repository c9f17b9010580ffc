"""95 % intervals of a quality run's numbers, resampling the objects of its test images.

The photograph benchmark's test split shows some objects several times (multi-class: its 40 Food images come
from 6 cut-outs, its 40 Plant images from 11), and the images of one object are right or wrong together: a
bootstrap over images would be too sure. This one resamples clusters (`evaluation/metrics.py`
`cluster_bootstrap`): a positive image's cluster is the object it shows (its stamp in `make_photo_dataset.py`'s
`manifest.json`), a Background image's the photograph it was cropped from. Positives share photographs too,
which these clusters do not resample, so the intervals are if anything too narrow. Without such a manifest
(`make_dataset.py`'s textures) each image is its own cluster.

`quality.py` adds them to each run's report (`intervals`) and summary. By hand, on a trained version:

    .venv/bin/python benchmarks/intervals.py --data runs/photo --variant multiclass \
        --models runs/quality/multiclass/labels/models --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from axx_backend.core.settings import Settings
from axx_backend.core.versions import ModelStore
from axx_backend.engine.annotator import Annotator
from axx_backend.evaluation.evaluate import evaluate_folder
from axx_backend.evaluation.metrics import cluster_bootstrap, percentile_interval

RESAMPLES = 2000
LEVEL = 0.95


def clusters_of(data: Path, variant: str, split: str, keys: Sequence[str]) -> tuple[list[str], str]:
    """Each image's cluster id and what the clusters are ("object" or "image")."""
    manifest = data / "manifest.json"
    if not manifest.is_file():
        return list(keys), "image"
    prefix = f"{variant}/{split}/images/"
    entries = {e["image"][len(prefix) :]: e for e in json.loads(manifest.read_text())["images"]}
    if not all(k in entries and "background" in entries[k] for k in keys):
        return list(keys), "image"
    out = []
    for k in keys:
        entry = entries[k]
        obj = entry.get("object")
        out.append(f"object:{obj['stamp']}" if obj else f"photograph:{entry['background']['source']}")
    return out, "object"


def intervals(
    per_image: Sequence[dict[str, Any]],
    clusters: Sequence[str],
    member_names: Sequence[str],
    validated: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """[low, high] of accuracy, flag rate, selective accuracy, served IoU end to end and the accuracy less a
    member's (the best on these images, and `validated`, the member training rated best)."""
    correct = np.array([r["pred"] == r["true"] for r in per_image])
    flagged = np.array([r["flagged"] for r in per_image], dtype=bool)
    member_ok = np.array([[m == r["true"] for m in r["member_pred"]] for r in per_image]).reshape(len(correct), -1)
    iou = np.array([np.nan if r["served_iou"] is None else r["served_iou"] for r in per_image], dtype=np.float64)
    best = int(member_ok.mean(axis=0).argmax()) if len(correct) else 0

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if values.size else np.nan

    statistics = {
        "accuracy": lambda rows: mean(correct[rows]),
        "flagged_rate": lambda rows: mean(flagged[rows]),
        "selective_accuracy": lambda rows: mean(correct[rows][~flagged[rows]]),
        "iou_end_to_end": lambda rows: mean(iou[rows][np.isfinite(iou[rows])]),
        "accuracy_minus_best_member": lambda rows: mean(correct[rows]) - mean(member_ok[rows, best]),
    }
    if validated in member_names:
        v = list(member_names).index(validated)
        statistics["accuracy_minus_validated_member"] = lambda rows: mean(correct[rows]) - mean(member_ok[rows, v])
    positives = {c for c, value in zip(clusters, iou, strict=True) if np.isfinite(value)}
    out: dict[str, Any] = {
        "level": LEVEL,
        "resamples": RESAMPLES,
        "clusters": len(set(clusters)),
        "clusters_with_masks": len(positives),
        "best_member": member_names[best] if member_names else None,
    }
    for name, statistic in statistics.items():
        low, high = percentile_interval(cluster_bootstrap(statistic, clusters, RESAMPLES, seed), LEVEL)
        out[name] = [round(low, 4), round(high, 4)]
    return out


def run_intervals(data: Path, variant: str, per_image: Sequence[dict[str, Any]], report: dict[str, Any]) -> dict:
    """`intervals` of one evaluated run (`report`: its `evaluate` report) on `data`/`variant`'s test split."""
    clusters, kind = clusters_of(data, variant, "test", [r["key"] for r in per_image])
    validated = (report.get("validated_member") or {}).get("name")
    return {"clustered_by": kind, **intervals(per_image, clusters, list(report["member_accuracy"]), validated)}


def format_intervals(values: dict[str, Any]) -> str:
    """One line: each number's interval."""
    names = ("accuracy", "selective_accuracy", "flagged_rate", "iou_end_to_end", "accuracy_minus_best_member",
             "accuracy_minus_validated_member")  # fmt: skip
    parts = [f"{n} [{values[n][0]:.3f}, {values[n][1]:.3f}]" for n in names if n in values]
    return (
        f"{values['level']:.0%} intervals over {values['clusters']} {values['clustered_by']} clusters "
        f"({values['clusters_with_masks']} with masks; {values['resamples']} resamples): " + ", ".join(parts)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--variant", default="multiclass")
    parser.add_argument("--models", type=Path, required=True, help="a model dir; its current version is evaluated")
    parser.add_argument("--seed", type=int, default=0, help="as quality.py ran (it seeds the MC dropout masks)")
    args = parser.parse_args(argv)
    store = ModelStore(args.models)
    path = store.version_path(None)
    if path is None:
        sys.exit(f"{args.models} has no current version")
    settings = Settings.from_env(preset="offline", model_dir=str(args.models), seed=args.seed)
    annotator = Annotator.from_version(path, settings, explicit=set())
    ev = evaluate_folder(args.data / args.variant / "test", annotator, store.metadata(path.name), n_examples=0)
    values = run_intervals(args.data, args.variant, ev.per_image, ev.report)
    print(format_intervals(values))
    served = ev.report["masks"]["served"]
    numbers = {k: ev.report[k] for k in ("accuracy", "member_accuracy", "selective_accuracy", "flagged_rate")}
    numbers["iou_end_to_end"] = served["end_to_end"]["iou"]["mean"]
    numbers["iou_given_true_class"] = served["given_true_class"]["iou"]["mean"]
    print(json.dumps({**numbers, "intervals": values}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
