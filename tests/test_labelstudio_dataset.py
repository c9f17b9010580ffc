"""Label Studio tasks -> training samples: the latest valid annotation wins, brushes decode to masks."""

import numpy as np
from label_studio_sdk.converter.brush import mask2rle

from axx_backend.labelstudio.config import parse_config
from axx_backend.labelstudio.dataset import annotation_label_and_mask, tasks_to_samples
from axx_backend.labelstudio.images import ImageFetcher

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="diagnosis" toName="image"><Choice value="Lesion"/><Choice value="Healthy"/>
    <Choice value="Needs review"/></Choices>
  <BrushLabels name="lesion" toName="image"><Label value="Lesion"/></BrushLabels>
</View>"""


def brush(mask):
    h, w = mask.shape
    return {
        "from_name": "lesion",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": w,
        "original_height": h,
        "value": {"format": "rle", "rle": mask2rle((mask > 0).astype(np.uint8) * 255), "brushlabels": ["Lesion"]},
    }


def choice(value):
    return {"from_name": "diagnosis", "to_name": "image", "type": "choices", "value": {"choices": [value]}}


def annotation(id_, updated, result, cancelled=False):
    return {"id": id_, "updated_at": updated, "was_cancelled": cancelled, "result": result}


def test_latest_valid_annotation_gives_class_and_union_of_brush_regions():
    cfg = parse_config(CONFIG)
    a = np.zeros((6, 8), bool)
    a[1:3, 1:3] = True
    b = np.zeros((6, 8), bool)
    b[4:6, 5:8] = True
    task = {
        "id": 1,
        "data": {"image": "/data/upload/1/x.png"},
        "annotations": [
            annotation(10, "2026-01-01T10:00:00Z", [choice("Healthy")]),
            annotation(11, "2026-01-02T10:00:00Z", [choice("Lesion"), brush(a), brush(b)]),
            annotation(12, "2026-01-03T10:00:00Z", [choice("Healthy")], cancelled=True),  # cancelled: ignored
        ],
    }
    label, mask = annotation_label_and_mask(task, cfg)
    assert label == "Lesion"
    assert mask.shape == (6, 8) and (mask == (a | b)).all()


def test_review_choice_is_not_a_class_and_empty_tasks_are_candidates():
    cfg = parse_config(CONFIG)
    fetcher = ImageFetcher("http://127.0.0.1:1", None)
    tasks = [
        {"id": 1, "data": {"image": "/a.png"}, "annotations": [annotation(1, "t", [choice("Needs review")])]},
        {"id": 2, "data": {"image": "/b.png"}, "annotations": []},
        {"id": 3, "data": {"image": "/c.png", "truth": "Healthy"}, "annotations": []},
        {"id": 4, "data": {}, "annotations": []},  # no image: skipped
    ]
    samples = tasks_to_samples(tasks, cfg, fetcher, label_field="truth")
    assert [(s.key, s.label, s.has_mask) for s in samples] == [
        ("1", None, False),
        ("2", None, False),
        ("3", "Healthy", False),
    ]
