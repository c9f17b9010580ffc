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
        {"id": 5, "data": {"image": "/e.png"}, "annotations": [annotation(5, "t", ["not a region"])]},  # skipped
        {
            "id": 6,
            "data": {"image": "/f.png"},
            "annotations": [annotation(6, 3, [choice("Lesion")]), annotation(7, "t", [choice("Healthy")])],
        },  # skipped: unorderable
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
    assert (trained["samples"][0].load_mask() == severe).all()
    assert trained["source"] == "http://127.0.0.1:1 project 5"


def test_a_brush_region_that_cannot_be_decoded_costs_only_its_own_pixels(caplog):
    """Annotations come in with imported tasks. A region that declares more RLE values than its size (the SDK's
    decoder would allocate what the header says: up to 4 GiB), one without a size, a truncated one, one over the
    pixel limit and one of another size than the first are each left out with a warning; the task keeps its
    label and its good region, and nothing large is allocated."""
    import tracemalloc

    cfg = parse_config(CONFIG)
    good = np.zeros((6, 8), bool)
    good[1:4, 2:6] = True
    other = np.ones((6, 8), bool)
    huge = brush(other)
    huge["value"] = {**huge["value"], "rle": [255, 255, 255, 255, *huge["value"]["rle"][4:]]}  # 2^32 - 1 values
    sizeless = {k: v for k, v in brush(other).items() if k != "original_height"}
    truncated = brush(other)
    truncated["value"] = {**truncated["value"], "rle": truncated["value"]["rle"][:6]}
    too_large = {**brush(other), "original_width": 100_000, "original_height": 100_000}
    not_bytes = brush(other)
    not_bytes["value"] = {**not_bytes["value"], "rle": "not a list"}
    wider = brush(np.ones((6, 9), bool))  # a valid region, but not of the first region's size
    # 192 values of 32 bits each (a run of 2^32 - 1): more than a byte can hold
    bits = format(6 * 8 * 4, "032b") + format(31, "05b") + format(7, "04b") * 4 + "1" + "00" + "1" * 8 + "1" * 32
    bits += "0" * (-len(bits) % 8)
    wide_values = brush(other)
    wide_values["value"] = {**wide_values["value"], "rle": [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]}
    results = [choice("Lesion"), brush(good), huge, sizeless, truncated, too_large, not_bytes, wider, wide_values]
    task = {"id": 7, "data": {"image": "/x.png"}, "annotations": [annotation(1, "t", results)]}
    tracemalloc.start()
    try:
        label, mask = annotation_label_and_mask(task, cfg, max_pixels=10**8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert label == "Lesion"
    assert mask.shape == (6, 8) and (mask == good).all()
    assert peak < 10 * 2**20
    warned = [r.getMessage() for r in caplog.records if "brush region not used" in r.getMessage()]
    assert len(warned) == 7 and all(w.startswith("task 7: ") for w in warned)
    assert any("cannot be decoded (OverflowError)" in w for w in warned)
    assert any("holds 4294967295 values, a 8x6 RGBA mask 192" in w for w in warned)
    assert any("a 9x6 region beside 8x6" in w for w in warned)


def test_a_project_keeps_its_brushes_encoded_until_a_mask_is_read():
    """A sample holds the checked RLE, not the decoded mask (a project's masks at once would grow with its images);
    a brush whose stream turns out broken when read is left out with a reason, and the task keeps its label."""
    from axx_backend.core.data import with_usable_mask

    cfg = parse_config(CONFIG)
    good = np.zeros((6, 8), bool)
    good[2:5, 1:4] = True
    broken = brush(good)
    broken["value"] = {**broken["value"], "rle": broken["value"]["rle"][:6]}  # the header intact, the stream cut
    tasks = [
        {"id": 1, "data": {"image": "/a.png"}, "annotations": [annotation(1, "t", [choice("Lesion"), brush(good)])]},
        {"id": 2, "data": {"image": "/b.png"}, "annotations": [annotation(2, "t", [choice("Lesion"), broken])]},
    ]
    first, second = tasks_to_samples(tasks, cfg, ImageFetcher("http://127.0.0.1:1", None))
    assert not isinstance(first.mask, np.ndarray) and (first.load_mask() == good).all()
    skipped = []
    assert with_usable_mask(first, (8, 6), skipped) is first and not skipped
    kept = with_usable_mask(second, (8, 6), skipped)
    assert kept.label == "Lesion" and not kept.has_mask
    assert skipped == ["2: mask not used: no brush region could be decoded"]
