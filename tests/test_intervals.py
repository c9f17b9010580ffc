"""benchmarks/intervals.py: clusters from the photograph benchmark's manifest, intervals on hand-made runs."""

import json

import pytest

from .scripts import load_benchmark

intervals = load_benchmark("intervals")


def _manifest(tmp_path, entries):
    (tmp_path / "manifest.json").write_text(json.dumps({"images": entries}))
    return tmp_path


def test_clusters_are_the_objects_and_the_background_photographs(tmp_path):
    def entry(key, stamp=None, photo="wallpaper:Path"):
        e = {"image": f"multiclass/test/images/{key}", "background": {"source": photo}}
        return {**e, "object": {"stamp": stamp}} if stamp else e

    data = _manifest(tmp_path, [
        entry("Food/0000.jpg", "food/lime.png"), entry("Food/0001.jpg", "food/lime.png", "skimage:moon"),
        entry("Food/0002.jpg", "food/corn.png"), entry("Background/0000.jpg"),
        entry("Background/0001.jpg", photo="skimage:moon"), entry("Background/0002.jpg"),
        {"image": "binary/test/images/Food/0000.jpg", "background": {"source": "x"}, "object": {"stamp": "other.png"}},
    ])  # fmt: skip
    keys = ["Food/0000.jpg", "Food/0001.jpg", "Food/0002.jpg", "Background/0000.jpg", "Background/0001.jpg",
            "Background/0002.jpg"]  # fmt: skip
    clusters, kind = intervals.clusters_of(data, "multiclass", "test", keys)
    assert kind == "object"
    assert clusters[0] == clusters[1] != clusters[2]  # one object in two photographs: one cluster
    assert clusters[3] == clusters[5] != clusters[4]  # Background images: by photograph
    # an image the manifest does not know, or no manifest: every image is its own cluster
    assert intervals.clusters_of(data, "multiclass", "test", [*keys, "Food/0009.jpg"])[1] == "image"
    assert intervals.clusters_of(tmp_path / "none", "multiclass", "test", keys) == (keys, "image")


def _row(key, true, pred, flagged=False, members=None, iou=None):
    return {"key": key, "true": true, "pred": pred, "flagged": flagged, "member_pred": members or [pred, pred],
            "served_iou": iou}  # fmt: skip


def test_intervals_of_a_hand_made_run():
    """Object a: three images right (IoU 0.8); object b: one image, wrong (IoU 0). Two clusters, so a resample
    is aa, ab, ba or bb: accuracy 1, 3/4 or 0, and the interval spans them."""
    rows = [_row("a1", 0, 0, iou=0.8, members=[0, 1]), _row("a2", 0, 0, iou=0.8, members=[0, 1]),
            _row("a3", 0, 0, flagged=True, iou=0.0, members=[0, 1]),
            _row("b1", 0, 1, iou=0.0, members=[1, 0])]  # fmt: skip
    values = intervals.intervals(rows, ["a", "a", "a", "b"], ["m0", "m1"], validated="m1")
    assert values["clusters"] == values["clusters_with_masks"] == 2
    assert values["accuracy"] == [0.0, 1.0]
    assert values["flagged_rate"] == [0.0, pytest.approx(1 / 3, abs=1e-4)]
    assert values["iou_end_to_end"] == [0.0, pytest.approx(1.6 / 3, abs=1e-4)]
    # selective accuracy: bb leaves b1 alone (0), aa two right images (1)
    assert values["selective_accuracy"] == [0.0, 1.0]
    # m0 is right exactly where the ensemble is: the best member, level on every resample
    assert values["best_member"] == "m0"
    assert values["accuracy_minus_best_member"] == [0.0, 0.0]
    # m1 is wrong on a1-a3 and right on b1: ahead by 1 on aa, by 1/2 on ab, behind by 1 on bb
    low, high = values["accuracy_minus_validated_member"]
    assert low == -1.0 and high == 1.0
    assert "accuracy [0.000, 1.000]" in intervals.format_intervals({**values, "clustered_by": "object"})
