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


# Two class controls and two brush controls: which ones the backend uses is a setting (AXX_CHOICES_CONTROL,
# AXX_BRUSH_CONTROL), the brush label of "Severe" has another name (AXX_BRUSH_LABELS) and "Mild" is negative
# only because AXX_NEGATIVE_CLASSES says so (by the default rule it is a positive class without a brush label).
TWO_CONTROLS = """<View>
  <Image name="image" value="$image"/>
  <Choices name="diagnosis" toName="image"><Choice value="Lesion"/><Choice value="Healthy"/></Choices>
  <BrushLabels name="lesion" toName="image"><Label value="Lesion"/></BrushLabels>
  <Choices name="severity" toName="image"><Choice value="Mild"/><Choice value="Severe"/></Choices>
  <BrushLabels name="areas" toName="image"><Label value="Severe area"/></BrushLabels>
</View>"""
SERVING_ENV = {
    "AXX_CHOICES_CONTROL": "severity",
    "AXX_BRUSH_CONTROL": "areas",
    "AXX_BRUSH_LABELS": "Severe=Severe area",
    "AXX_NEGATIVE_CLASSES": "Mild",
}


def test_training_reads_the_labeling_config_with_the_settings_serving_uses(monkeypatch, tmp_path):
    from axx_backend.jobs import project as job
    from axx_backend.labelstudio.client import LabelStudioClient
    from axx_backend.server.settings import ServerSettings

    for name, value in SERVING_ENV.items():
        monkeypatch.setenv(name, value)
    severe = np.zeros((6, 8), bool)
    severe[2:4, 2:6] = True
    areas = {**brush(severe), "from_name": "areas", "value": {**brush(severe)["value"], "brushlabels": ["Severe area"]}}
    sev = {**choice("Severe"), "from_name": "severity"}
    mild = {**choice("Mild"), "from_name": "severity"}
    tasks = [
        {"id": 1, "data": {"image": "/a.png"}, "annotations": [annotation(1, "t", [choice("Lesion"), sev, areas])]},
        {"id": 2, "data": {"image": "/b.png"}, "annotations": [annotation(2, "t", [choice("Lesion"), mild])]},
    ]
    monkeypatch.setattr(LabelStudioClient, "get_project", lambda self, pid: {"id": pid, "label_config": TWO_CONTROLS})
    monkeypatch.setattr(LabelStudioClient, "export_tasks", lambda self, pid: tasks)
    trained = {}

    def train_on_samples(samples, classes, model_dir, settings, progress, source, after_fit=None):
        trained.update(samples=samples, classes=classes, source=source, after_fit=after_fit)
        return "v-test"

    monkeypatch.setattr(job, "train_on_samples", train_on_samples)
    payload = {"source": "labelstudio", "url": "http://127.0.0.1:1", "api_key": "k", "model_dir": str(tmp_path)}
    assert job.train_project("5", payload) == "v-test"

    serving = parse_config(TWO_CONTROLS, ServerSettings.from_env().config)  # what /predict reads
    assert serving.classes == ("Mild", "Severe") and dict(serving.brush_map) == {"Severe": "Severe area"}
    assert trained["classes"] == list(serving.classes)
    assert [(s.key, s.label, s.has_mask) for s in trained["samples"]] == [("1", "Severe", True), ("2", "Mild", False)]
    assert (trained["samples"][0].mask == severe).all()
    assert trained["source"] == "http://127.0.0.1:1 project 5"
