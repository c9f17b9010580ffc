"""Annotation -> Label Studio prediction JSON (the shape and the brush RLE: docs/LABEL_STUDIO.md, section 3).

One small writer per control tag type (the label-studio-ml YOLO example does the same): a Choices
writer, a BrushLabels writer and a TextArea writer for the explanation. The task score is what `AXX_SCORE`
chooses (`task_score`; default the ensemble confidence, `Annotation.score`, 1 - normalised entropy); every
choice is low for uncertain images, so sorting by prediction score ascending puts them first. Every region
carries `meta.text` (shown by Label Studio in the region details) and `meta.axx` (per-member probabilities,
entropies and the flag) so a reviewer sees why.
"""

from __future__ import annotations

import secrets
from typing import Any, Protocol

import numpy as np
from label_studio_sdk.converter.brush import mask2rle

from ..core.annotation import Annotation
from .config import ProjectConfig


def region_id() -> str:
    return secrets.token_hex(5)


def _round(x: float, digits: int = 6) -> float:
    return round(float(x), digits)


def explain(ann: Annotation) -> str:
    """One line a reviewer can read: decision, confidence, flag reason, each member's vote."""
    head = f"{ann.label} (p={ann.probs.get(ann.label, 0.0):.2f}, ensemble confidence {ann.score:.2f})"
    if ann.flagged:
        head = f"NEEDS REVIEW: {ann.reason}. Most likely {head}"
    elif ann.reason:
        head = f"{head}: {ann.reason}"
    votes = []
    for m in ann.members:
        state = "uncertain" if m.uncertain else "confident"
        votes.append(f"{m.name}: {m.label} p={max(m.probs):.2f} entropy={m.entropy:.2f} ({state})")
    mask = f"; mask {ann.mask_area} px from {ann.mask_source}" if ann.mask is not None else ""
    return f"{head}{mask}. Members: " + "; ".join(votes)


def annotation_meta(ann: Annotation) -> dict[str, Any]:
    """Region meta: `text` is what the Label Studio UI shows, `axx` the numbers behind it."""
    details = ann.to_dict()
    return {"text": [explain(ann)], "axx": details}


class ResultWriter(Protocol):
    def write(self, ann: Annotation, cfg: ProjectConfig) -> list[dict[str, Any]]: ...


class ChoicesWriter:
    """The class choice; on a flagged image the review choice (replacing the class when both share a control)."""

    def write(self, ann: Annotation, cfg: ProjectConfig) -> list[dict[str, Any]]:
        meta = annotation_meta(ann)
        review_here = ann.flagged and cfg.review_choice is not None and cfg.review_control == cfg.choices
        value = cfg.review_choice if review_here else ann.label
        out = [
            {
                "id": region_id(),
                "from_name": cfg.choices,
                "to_name": cfg.image,
                "type": "choices",
                "value": {"choices": [value]},
                # a review choice is scored with the ensemble confidence (low), a class with its probability
                "score": _round(ann.score if review_here else ann.probs.get(ann.label, ann.class_score)),
                "meta": meta,
            }
        ]
        if ann.flagged and cfg.review_choice is not None and cfg.review_control != cfg.choices:
            out.append(
                {
                    "id": region_id(),
                    "from_name": cfg.review_control,
                    "to_name": cfg.image,
                    "type": "choices",
                    "value": {"choices": [cfg.review_choice]},
                    "score": _round(ann.score),
                    "meta": meta,
                }
            )
        return out


class BrushLabelsWriter:
    """The mask as Label Studio RLE (`mask2rle` wants a 2-D uint8 with 255 for the label)."""

    def write(self, ann: Annotation, cfg: ProjectConfig) -> list[dict[str, Any]]:
        label = cfg.brush_map.get(ann.label)
        if ann.mask is None or label is None or ann.flagged or not ann.mask.any():
            return []
        mask = np.where(np.asarray(ann.mask) > 0, 255, 0).astype(np.uint8)
        h, w = mask.shape
        return [
            {
                "id": region_id(),
                "from_name": cfg.brush,
                "to_name": cfg.image,
                "type": "brushlabels",
                "original_width": int(w),
                "original_height": int(h),
                "image_rotation": 0,
                "value": {"format": "rle", "rle": [int(v) for v in mask2rle(mask)], "brushlabels": [label]},
                "score": _round(ann.class_score),
                "meta": annotation_meta(ann),
            }
        ]


class NotesWriter:
    """The explanation in a TextArea, when the config has one (visible without opening a region)."""

    def write(self, ann: Annotation, cfg: ProjectConfig) -> list[dict[str, Any]]:
        if cfg.notes is None:
            return []
        return [text_result(cfg, explain(ann), ann.score)]


def text_result(cfg: ProjectConfig, text: str, score: float | None = None) -> dict[str, Any]:
    assert cfg.notes is not None
    region: dict[str, Any] = {
        "id": region_id(),
        "from_name": cfg.notes,
        "to_name": cfg.image,
        "type": "textarea",
        "value": {"text": [text]},
    }
    if score is not None:
        region["score"] = _round(score)
    return region


WRITERS: tuple[ResultWriter, ...] = (ChoicesWriter(), BrushLabelsWriter(), NotesWriter())

# What a prediction's `score` can carry (AXX_SCORE); each is in [0, 1] and low for what a person should see first.
SCORES = ("confidence", "margin", "bald", "review")


def task_score(ann: Annotation, score_by: str = "confidence") -> float:
    """The task score `score_by` chooses:

    - `confidence`: 1 - normalised entropy of the ensemble mean (any doubt, aleatoric or epistemic);
    - `margin`: top-1 minus top-2 probability of the ensemble mean (how close the two likeliest classes are);
    - `bald`: 1 - the members' mean mutual information (MC-dropout disagreement: what more labels would fix);
    - `review`: flagged images first (0..0.5, by confidence), then the others (0.5..1, by confidence).
    """
    if score_by == "confidence":
        return ann.score
    if score_by == "margin":
        top = sorted(ann.probs.values(), reverse=True) + [0.0, 0.0]
        return float(top[0] - top[1])
    if score_by == "bald":
        mutual = [m.mutual_info for m in ann.members]
        return float(1.0 - (sum(mutual) / len(mutual) if mutual else 0.0))
    if score_by == "review":
        return 0.5 * ann.score + (0.0 if ann.flagged else 0.5)
    raise ValueError(f"AXX_SCORE must be one of {', '.join(SCORES)}, got {score_by!r}")


def build_prediction(
    ann: Annotation, cfg: ProjectConfig, model_version: str, score_by: str = "confidence"
) -> dict[str, Any]:
    """One task's prediction: every writer's regions, the task score `score_by` chooses (`task_score`)."""
    result: list[dict[str, Any]] = []
    for writer in WRITERS:
        result.extend(writer.write(ann, cfg))
    return {"result": result, "score": _round(task_score(ann, score_by)), "model_version": model_version}


def failed_prediction(cfg: ProjectConfig, model_version: str, reason: str) -> dict[str, Any]:
    """A task whose image could not be read: no regions (only the reason, in the TextArea when there is one).

    The score is None: Label Studio sorts missing scores last, so a broken image does not hide the truly
    uncertain ones. Label Studio drops a prediction's own `meta`; it stays in the /predict answer and the log.
    """
    result = [text_result(cfg, f"No prediction: {reason}")] if cfg.notes else []
    return {"result": result, "score": None, "model_version": model_version, "meta": {"error": reason}}
