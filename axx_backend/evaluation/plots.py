"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..core.render import heat_colours, mask_outline
from . import metrics
from .evaluate import CAM_RULES, Evaluation, ImageResult


def _pyplot():  # noqa: ANN202 - matplotlib's module
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def risk_coverage_plot(ev: Evaluation, path: str | os.PathLike[str]) -> Path:
    """Selective accuracy of the most confident share of images, with the review flag's operating point."""
    plt = _pyplot()
    rc = metrics.risk_coverage_curve(ev.confidence, ev.correct)
    fig, ax = plt.subplots(figsize=(5.2, 4.0), dpi=110)
    ax.plot(rc["coverage"], rc["accuracy"], color="tab:blue", label="keep the most confident (task score)")
    overall = float(ev.correct.mean()) if ev.correct.size else float("nan")
    ax.axhline(overall, color="grey", ls="--", lw=1, label=f"all images: accuracy {overall:.3f}")
    r = ev.report
    if r["selective_accuracy"] is not None:
        coverage = 1.0 - r["flagged_rate"]
        ax.scatter(
            [coverage],
            [r["selective_accuracy"]],
            color="tab:red",
            zorder=3,
            label=f"review flag: {100 * r['flagged_rate']:.0f} % flagged, unflagged {r['selective_accuracy']:.3f}",
        )
    ax.set_xlabel("coverage (share of images kept)")
    ax.set_ylabel("accuracy on the kept images")
    ax.set_xlim(0, 1.02)
    low = float(np.nanmin(rc["accuracy"])) if rc["accuracy"].size else 0.0
    ax.set_ylim(max(0.0, min(low, overall) - 0.05), 1.01)
    ax.set_title(f"Risk-coverage ({r['n_images']} images, AURC {r['aurc']:.3f})")
    ax.legend(fontsize=7.5, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def reliability_plot(ev: Evaluation, path: str | os.PathLike[str], n_bins: int = 15) -> Path:
    """Accuracy against mean confidence per equal-width bin; the bar width shows the bin, the label its count."""
    plt = _pyplot()
    bins = metrics.reliability_bins(ev.top_probability, ev.top_correct, n_bins)
    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=110)
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    for b in bins:
        if not b["count"]:
            continue
        ax.bar(b["lo"], b["accuracy"], width=b["hi"] - b["lo"], align="edge", color="tab:blue", alpha=0.7, ec="k")
        ax.plot([b["confidence"]], [b["accuracy"]], "o", color="tab:red", ms=3)
        ax.text((b["lo"] + b["hi"]) / 2, min(b["accuracy"], 0.93) + 0.02, str(b["count"]), ha="center", fontsize=6)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (max ensemble probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {ev.report['ece']:.3f}, {n_bins} bins)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _tint(image: np.ndarray, heat: np.ndarray | None, mask: np.ndarray | None, colour=(255, 255, 255)) -> np.ndarray:
    out = image.astype(np.float32)
    if heat is not None:
        out = 0.45 * out + 0.55 * heat_colours(heat).astype(np.float32)
    out = out.astype(np.uint8)
    if mask is not None and mask.any():
        edge = mask_outline(mask)
        grown = edge.copy()
        grown[1:] |= edge[:-1]
        grown[:, 1:] |= edge[:, :-1]
        out[grown] = colour
    return out


def examples_grid(ev: Evaluation, path: str | os.PathLike[str], thumb: int = 160) -> Path | None:
    """Rows: example images. Columns: image, ground truth, each member's map of the true class (heat + its
    mask outline), the mean and the intersection of the members, the segment head (when there is one) and
    the mask as served. IoU in each caption; masks given the true class except "served"."""
    if not ev.examples:
        return None
    plt = _pyplot()
    rows = [*(f"member {n}" for n in ev.member_names), *CAM_RULES]
    rows += ["segment head"] if "segment head" in ev.examples[0].given_true else []
    columns = ["image", "ground truth", *ev.member_names, *rows[len(ev.member_names) :], "served"]
    fig, axes = plt.subplots(
        len(ev.examples), len(columns), figsize=(1.45 * len(columns), 1.55 * len(ev.examples)), dpi=100, squeeze=False
    )
    for row, r in enumerate(ev.examples):
        for col, (panel, caption) in enumerate(_example_panels(r, rows)):
            ax = axes[row][col]
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(caption, fontsize=6.5, labelpad=1)
            if row == 0:
                ax.set_title(_short(columns[col]), fontsize=7)
    fig.tight_layout(pad=0.3, w_pad=0.2, h_pad=0.4)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    save_palette_png(Image.open(buffer), path)
    return Path(path)


def _example_panels(r: ImageResult, rows: Sequence[str]) -> list[tuple[np.ndarray, str]]:
    assert r.image is not None and r.gt is not None
    img = np.asarray(r.image.convert("RGB"))
    panels = [(img, f"{r.annotation.label} {r.annotation.score:.2f}"), (_tint(img, None, r.gt, (0, 255, 0)), "truth")]
    heats = [*r.member_maps, r.heat, None, None]
    for name, heat in zip(rows, heats, strict=False):
        mask = r.given_true[name]
        mark = " (not agreeing)" if name.startswith("member ") and rows.index(name) not in r.agreeing else ""
        panels.append((_tint(img, heat, mask), f"IoU {metrics.iou(mask, r.gt):.2f}{mark}"))
    served = r.annotation.mask
    shown = served if served is not None else np.zeros_like(r.gt)
    panels.append((_tint(img, None, shown, (255, 0, 255)), f"IoU {metrics.iou(shown, r.gt):.2f}"))
    return panels


def save_palette_png(image: Image.Image, path: str | os.PathLike[str]) -> None:
    """A 256-colour PNG: photo grids are 5x smaller than in RGB, with no visible loss at this size."""
    image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, optimize=True
    )


def _short(name: str) -> str:
    return name.removeprefix("tf_").removesuffix("_100")


def write_plots(ev: Evaluation, out_dir: str | os.PathLike[str], prefix: str = "") -> dict[str, str]:
    """All evaluation plots into `out_dir`; returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "risk_coverage": risk_coverage_plot(ev, out / f"{prefix}risk_coverage.png"),
        "reliability": reliability_plot(ev, out / f"{prefix}reliability.png"),
    }
    grid = examples_grid(ev, out / f"{prefix}examples.png")
    if grid is not None:
        written["examples"] = grid
    return {k: str(v) for k, v in written.items()}


def al_curve_plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> Path:
    """Test IoU against the number of oracle masks, one line per mask source."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.8), dpi=110)
    x = [row["n_oracle"] for row in rows]
    series = [
        ("iou_served", "served mask, end to end", "tab:blue", "o-"),
        ("iou_served_given_true_class", "served method, given the true class", "tab:purple", "d--"),
        ("iou_mean_calibrated", "refined CAM mean, given the true class", "tab:orange", "s--"),
        ("iou_seg_head", "segment head, given the true class", "tab:green", "^-"),
    ]
    for key, label, colour, style in series:
        ys = [row.get(key) for row in rows]
        if all(v is None or v == "" for v in ys):
            continue
        ax.plot(x, [np.nan if v in (None, "") else float(v) for v in ys], style, color=colour, label=label)
    if rows and rows[0].get("iou_served") not in (None, ""):
        base = float(rows[0]["iou_served"])
        ax.axhline(1.3 * base, color="grey", ls=":", lw=1, label=f"1.3 x labels only ({1.3 * base:.3f})")
    ax.set_xlabel("oracle masks revealed")
    ax.set_ylabel("test IoU (images with a mask)")
    ax.set_title(title or "Active learning (Belharbi protocol, offline)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
