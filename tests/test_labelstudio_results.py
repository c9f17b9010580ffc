"""Annotation -> Label Studio JSON: RLE round trips through the SDK, review choice, validation."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from axx_backend.core.annotation import Annotation, MemberResult
from axx_backend.labelstudio.config import parse_config
from axx_backend.labelstudio.results import SCORES, build_prediction, explain, failed_prediction, task_score

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="diagnosis" toName="image">
    <Choice value="Lesion"/><Choice value="Healthy"/><Choice value="Needs review"/>
  </Choices>
  <BrushLabels name="lesion" toName="image"><Label value="Lesion"/></BrushLabels>
  <TextArea name="notes" toName="image"/>
</View>"""


def member(name: str, label: str, p: float, uncertain: bool = False) -> MemberResult:
    probs = [p, 1 - p] if label == "Lesion" else [1 - p, p]
    return MemberResult(name, probs, label, 0.9 if uncertain else 0.1, 0.01, 0.02, uncertain, not uncertain)


def annotation(mask: np.ndarray | None, label: str = "Lesion", flagged: bool = False, score: float = 0.8) -> Annotation:
    h, w = mask.shape if mask is not None else (30, 40)
    members = [member("a", label, 0.9), member("b", label, 0.8, uncertain=flagged), member("c", label, 0.7, flagged)]
    return Annotation(
        label=label,
        probs={"Lesion": 0.85, "Healthy": 0.15} if label == "Lesion" else {"Lesion": 0.2, "Healthy": 0.8},
        score=score,
        class_score=0.85,
        flagged=flagged,
        reason="2 uncertain members (1, 2)" if flagged else "3 of 3 members agree",
        members=members,
        width=w,
        height=h,
        mask=mask,
        mask_source="cam:mean" if mask is not None else None,
    )


def blob(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, min(h, w) * rng.uniform(0.1, 0.3)
    return (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).astype(np.uint8)


def decode(region: dict) -> np.ndarray:
    h, w = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3]


@pytest.mark.parametrize(("h", "w", "seed"), [(48, 64, 0), (37, 53, 1), (512, 512, 2), (300, 1024, 3), (1, 1, 4)])
def test_rle_round_trip_through_the_sdk(h: int, w: int, seed: int) -> None:
    mask = blob(h, w, seed) if h > 1 else np.ones((1, 1), np.uint8)
    cfg = parse_config(CONFIG)
    pred = build_prediction(annotation(mask), cfg, "v1")
    (brush,) = [r for r in pred["result"] if r["type"] == "brushlabels"]
    assert (brush["original_width"], brush["original_height"], brush["image_rotation"]) == (w, h, 0)
    assert brush["value"]["format"] == "rle" and brush["value"]["brushlabels"] == ["Lesion"]
    decoded = decode(brush)
    np.testing.assert_array_equal(decoded > 0, mask > 0)
    assert set(np.unique(decoded)) <= {0, 255}
    assert cfg.validate(pred) == []


def test_random_noise_mask_round_trips() -> None:
    mask = (np.random.default_rng(5).random((97, 131)) > 0.5).astype(np.uint8)
    pred = build_prediction(annotation(mask), parse_config(CONFIG), "v1")
    (brush,) = [r for r in pred["result"] if r["type"] == "brushlabels"]
    np.testing.assert_array_equal(decode(brush) > 0, mask > 0)


def test_prediction_shape_scores_and_explanation() -> None:
    cfg = parse_config(CONFIG)
    ann = annotation(blob(30, 40), score=0.734)
    pred = build_prediction(ann, cfg, "v7")
    assert pred["model_version"] == "v7" and pred["score"] == pytest.approx(0.734)
    types = [r["type"] for r in pred["result"]]
    assert types == ["choices", "brushlabels", "textarea"]
    choice = pred["result"][0]
    assert choice["value"] == {"choices": ["Lesion"]} and choice["score"] == pytest.approx(0.85)
    assert all(0 <= r["score"] <= 1 for r in pred["result"])
    assert len({r["id"] for r in pred["result"]}) == 3
    meta = choice["meta"]["axx"]
    assert [m["name"] for m in meta["members"]] == ["a", "b", "c"] and meta["flagged"] is False
    assert "Members: a: Lesion p=0.90" in choice["meta"]["text"][0]
    assert pred["result"][2]["value"]["text"] == [explain(ann)]
    assert cfg.validate(pred) == []


def test_flagged_image_gets_the_review_choice_and_no_mask() -> None:
    cfg = parse_config(CONFIG)
    pred = build_prediction(annotation(blob(30, 40), flagged=True, score=0.05), cfg, "v1")
    assert [r["type"] for r in pred["result"]] == ["choices", "textarea"]
    assert pred["result"][0]["value"] == {"choices": ["Needs review"]}
    assert pred["result"][0]["score"] == pytest.approx(0.05)
    assert pred["result"][1]["value"]["text"][0].startswith("NEEDS REVIEW: 2 uncertain members")
    assert cfg.validate(pred) == []


def test_flagged_without_review_choice_keeps_the_class() -> None:
    config = CONFIG.replace('<Choice value="Needs review"/>', "")
    pred = build_prediction(annotation(None, flagged=True, score=0.05), parse_config(config), "v1")
    assert pred["result"][0]["value"] == {"choices": ["Lesion"]}


def test_review_choice_in_a_separate_control() -> None:
    config = CONFIG.replace('<Choice value="Needs review"/>', "").replace(
        "</View>", '<Choices name="qa" toName="image"><Choice value="Needs review"/></Choices></View>'
    )
    cfg = parse_config(config)
    pred = build_prediction(annotation(None, flagged=True, score=0.05), cfg, "v1")
    choices = [r for r in pred["result"] if r["type"] == "choices"]
    assert [(r["from_name"], r["value"]["choices"]) for r in choices] == [
        ("diagnosis", ["Lesion"]),
        ("qa", ["Needs review"]),
    ]
    assert cfg.validate(pred) == []


def test_negative_or_empty_mask_writes_no_brush() -> None:
    cfg = parse_config(CONFIG)
    healthy = build_prediction(annotation(None, label="Healthy"), cfg, "v1")
    assert [r["type"] for r in healthy["result"]] == ["choices", "textarea"]
    empty = build_prediction(annotation(np.zeros((20, 20), np.uint8)), cfg, "v1")
    assert "brushlabels" not in [r["type"] for r in empty["result"]]


def test_validation_catches_names_label_studio_would_store_silently() -> None:
    cfg = parse_config(CONFIG)
    pred = build_prediction(annotation(blob(30, 40)), cfg, "v1")
    pred["result"][1]["value"]["brushlabels"] = ["Tumour"]
    pred["result"][0]["from_name"] = "diagnosys"
    errors = cfg.validate(pred)
    assert any("diagnosys" in e for e in errors) and any("Tumour" in e for e in errors)


def test_failed_prediction() -> None:
    cfg = parse_config(CONFIG)
    pred = failed_prediction(cfg, "v1", "x.png: cannot read image")
    assert pred["score"] is None and pred["meta"] == {"error": "x.png: cannot read image"}
    assert [r["type"] for r in pred["result"]] == ["textarea"]
    assert cfg.validate(pred) == []
    no_notes = parse_config(CONFIG.replace('<TextArea name="notes" toName="image"/>', ""))
    assert failed_prediction(no_notes, "v1", "bad")["result"] == []


def test_each_score_choice_sorts_the_doubtful_first() -> None:
    sure, flagged = annotation(None, score=0.8), annotation(None, flagged=True, score=0.9)
    assert task_score(sure) == sure.score  # the default: the ensemble confidence
    assert task_score(sure, "margin") == pytest.approx(0.85 - 0.15)
    assert task_score(sure, "bald") == pytest.approx(1 - 0.01)  # the members' mean mutual information
    # `review`: a flagged image sorts before every unflagged one, whatever its confidence
    assert task_score(flagged, "review") < 0.5 <= task_score(sure, "review")
    for choice in SCORES:
        pred = build_prediction(sure, parse_config(CONFIG), "v1", choice)
        assert pred["score"] == pytest.approx(task_score(sure, choice), abs=1e-4)
    with pytest.raises(ValueError, match="AXX_SCORE"):
        task_score(sure, "loss")
