"""Metrics against hand-computed cases, threshold calibration, and `evaluate --json` end to end."""

import argparse
import json
import math
import re

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from axx_backend.core.settings import Settings
from axx_backend.core.synthetic import make_dataset
from axx_backend.core.thresholds import (
    calibrate_fusion,
    calibrate_members,
    choose_rule,
    rule_map,
    threshold_ious,
)
from axx_backend.core.version_meta import MemberSpec, VersionMeta
from axx_backend.core.versions import ModelStore
from axx_backend.engine.annotator import Annotator
from axx_backend.engine.masks import fuse_maps
from axx_backend.evaluation import metrics
from axx_backend.evaluation.commands import register
from axx_backend.evaluation.evaluate import (
    MaskThresholds,
    _attach_masks,
    evaluate_folder,
    iter_results,
    trivial_masks,
    validated_member,
)
from axx_backend.training import read_folder_dataset
from axx_backend.training.selection import binary_entropy, map_disagreement, map_entropy

from .scripts import load_benchmark

# ---------------------------------------------------------------- classification


def test_accuracy_and_macro_f1_by_hand():
    assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    # class 0: TP 1 (#0), FP 1 (#4), FN 1 (#1) -> F1 = 2/(2+1+1) = 0.5
    # class 1: TP 2 (#2, #3), FP 1 (#1), FN 0  -> F1 = 4/5 = 0.8
    # class 2: TP 0, FP 0, FN 1 (#4)           -> F1 = 0
    assert metrics.macro_f1([0, 0, 1, 1, 2], [0, 1, 1, 1, 0]) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    # A class never predicted and never true does not count: only classes 0 and 1 occur here.
    assert metrics.macro_f1([0, 1], [0, 1]) == 1.0


def test_flags_counted_by_true_class_by_hand():
    flags = metrics.flagged_by_class([0, 1, 1, 2, 1], [True, True, False, False, True], ["a", "b", "c", "d"])
    assert flags == {"a": {"n": 1, "flagged": 1}, "b": {"n": 3, "flagged": 2}, "c": {"n": 1, "flagged": 0},
                     "d": {"n": 0, "flagged": 0}}  # fmt: skip


def test_binary_auroc_by_hand_with_ties_and_undefined():
    # positives 0.35, 0.8; negatives 0.1, 0.4: pairs (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3/4
    assert metrics.binary_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # positives 0.5, 0.9; negatives 0.5, 0.5: the two ties count 1/2 each -> (0.5 + 0.5 + 1 + 1)/4
    assert metrics.binary_auroc([0.5, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx(0.75)
    assert metrics.binary_auroc([0.9, 0.1], [1, 0]) == 1.0
    assert metrics.binary_auroc([0.9, 0.1], [0, 1]) == 0.0
    assert math.isnan(metrics.binary_auroc([0.2, 0.3], [1, 1]))


def test_multiclass_auroc_is_the_macro_one_vs_rest_mean():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.35, 0.4, 0.25], [0.3, 0.4, 0.3]])
    y = [0, 1, 2, 1]
    # class 0: positive 0.7 above every negative                                   -> 1
    # class 1: positives 0.5, 0.4 vs negatives 0.2, 0.4: 1 + 1 + 1 + 1/2 (tie)     -> 3.5/4
    # class 2: positive 0.25 vs negatives 0.1, 0.3, 0.3: above one of three        -> 1/3
    assert metrics.auroc(probs, y) == pytest.approx((1 + 0.875 + 1 / 3) / 3)
    # Two classes: the binary AUROC of class 1's probability.
    two = np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]])
    assert metrics.auroc(two, [0, 0, 1, 1]) == pytest.approx(0.75)


def test_ece_and_reliability_bins_by_hand():
    conf = np.array([0.9, 0.9, 0.6, 0.3])
    correct = np.array([1, 0, 1, 1])
    # 5 bins (0,.2] (.2,.4] (.4,.6] (.6,.8] (.8,1]: 0.6 falls in (.4,.6] (right-closed)
    bins = metrics.reliability_bins(conf, correct, n_bins=5)
    assert [b["count"] for b in bins] == [0, 1, 1, 0, 2]
    assert bins[4]["accuracy"] == 0.5 and bins[4]["confidence"] == pytest.approx(0.9)
    # |0.5-0.9| * 2/4 + |1-0.6| * 1/4 + |1-0.3| * 1/4 = 0.2 + 0.1 + 0.175
    assert metrics.expected_calibration_error(conf, correct, n_bins=5) == pytest.approx(0.475)
    # Perfectly calibrated: confidence 0.75 and 3 of 4 right.
    assert metrics.expected_calibration_error(np.full(4, 0.75), np.array([1, 1, 1, 0])) == pytest.approx(0.0)


def test_risk_coverage_by_hand():
    rc = metrics.risk_coverage_curve(np.array([0.6, 0.9, 0.7, 0.8]), np.array([1, 1, 1, 0]))
    # sorted by confidence: 0.9 (right), 0.8 (wrong), 0.7 (right), 0.6 (right)
    assert rc["coverage"].tolist() == [0.25, 0.5, 0.75, 1.0]
    assert rc["accuracy"] == pytest.approx([1.0, 0.5, 2 / 3, 0.75])
    assert rc["aurc"] == pytest.approx((0 + 0.5 + 1 / 3 + 0.25) / 4)


def test_cluster_bootstrap_of_a_mean_matches_scipys_bootstrap_of_the_cluster_means():
    """Equal clusters: resampling whole clusters and averaging their images is resampling the cluster means,
    which scipy.stats.bootstrap does independently (percentile method)."""
    from scipy.stats import bootstrap

    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(40), 5)
    values = (rng.random(40)[clusters] + 0.3 * rng.random(200) > 0.7).astype(float)  # correlated within a cluster
    ours = metrics.percentile_interval(metrics.cluster_bootstrap(lambda rows: values[rows].mean(), clusters, 5000))
    means = values.reshape(40, 5).mean(axis=1)
    theirs = bootstrap((means,), np.mean, n_resamples=5000, method="percentile", rng=1).confidence_interval
    assert ours == pytest.approx((theirs.low, theirs.high), abs=0.01)
    # and it is wider than a bootstrap that takes the 200 images for independent ones
    alone = metrics.percentile_interval(metrics.cluster_bootstrap(lambda rows: values[rows].mean(), range(200), 5000))
    assert ours[1] - ours[0] > 1.5 * (alone[1] - alone[0])


def test_cluster_bootstrap_by_hand():
    """Two clusters, three right images and one wrong: a resample is AA (1/4, accuracy 1), AB or BA (1/2,
    3/4) or BB (1/4, 0); NaN statistics are left out of the interval."""
    right = np.array([1.0, 1.0, 1.0, 0.0])
    values = metrics.cluster_bootstrap(lambda rows: right[rows].mean(), ["a", "a", "a", "b"], 4000, seed=3)
    assert set(np.round(values, 6)) == {0.0, 0.75, 1.0}
    assert np.mean(values == 0.75) == pytest.approx(0.5, abs=0.03)
    assert metrics.percentile_interval(values) == (0.0, 1.0)
    assert metrics.percentile_interval(np.array([np.nan, 0.2, 0.4]), level=1.0) == (0.2, 0.4)
    assert all(math.isnan(v) for v in metrics.percentile_interval(np.array([np.nan])))


# ---------------------------------------------------------------- masks


def test_mask_scores_per_image_and_pixel_summed():
    score = metrics.MaskScore()
    score.add(np.array([[1, 1, 0, 0]]), np.array([[0, 1, 1, 0]]))  # IoU 1/3, Dice 1/2; 1 of 3 pixels
    score.add(np.array([[1, 1, 1, 1]]), np.array([[1, 1, 1, 1]]))  # IoU 1, Dice 1; 4 of 4 pixels
    score.add(None, np.array([[0, 0, 1, 1]]))  # no mask served: IoU 0, Dice 0; 0 of 2 pixels
    s = score.summary()
    assert s["iou"]["n"] == 3
    assert s["iou"]["mean"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert s["dice"]["mean"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert s["iou"]["pixel"] == pytest.approx(5 / 9)  # intersections 1+4+0, unions 3+4+2
    assert s["dice"]["pixel"] == pytest.approx(2 * 5 / (6 + 8))  # |P| 2+4+0, |T| 2+4+2
    with pytest.raises(ValueError, match="shape"):
        score.add(np.zeros((2, 2)), np.zeros((1, 4)))
    assert metrics.MaskScore().summary()["iou"] == {"mean": None, "pixel": None, "n": 0}


# 1x4 "images": ground truth = the two left pixels.
GT = np.array([[1, 1, 0, 0]], bool)
MAP_A = np.array([[0.9, 0.5, 0.3, 0.1]])
MAP_B = np.array([[0.7, 0.9, 0.6, 0.0]])
GRID = (0.2, 0.4, 0.6, 0.8)


def test_each_fusion_rule_gets_its_own_threshold():
    # mean = [.8 .7 .45 .05]: t=.2,.4 -> [1 1 1 0] IoU 2/3; t=.6 -> [1 1 0 0] IoU 1; t=.8 -> empty, IoU 0
    # min  = [.7 .5 .3  0  ]: t=.2 -> 2/3; t=.4 -> [1 1 0 0] IoU 1; t=.6 -> [1 0 0 0] IoU 1/2; t=.8 -> 0
    scores = threshold_ious([rule_map([MAP_A, MAP_B], "mean")], [GT], GRID)
    assert scores == pytest.approx([2 / 3, 2 / 3, 1.0, 0.0])
    assert calibrate_fusion([[MAP_A, MAP_B]], [GT], ("mean", "intersection"), GRID) == {
        "mean": 0.6,
        "intersection": 0.4,
    }
    # Each member alone: A is right at .4, B at .6 (.6 > .6 is false); ties go to the lowest threshold.
    assert calibrate_members({"a": [MAP_A], "b": [MAP_B]}, [GT], GRID) == {"a": 0.4, "b": 0.6}
    rule, t, best = choose_rule([[MAP_A, MAP_B]], [GT], ("mean", "intersection"), GRID)
    assert (rule, t, best) == ("mean", 0.6, 1.0)  # both reach 1: a tie goes to mean


def test_rule_map_thresholds_like_fuse_maps():
    rng = np.random.default_rng(0)
    maps = [rng.random((9, 7)) for _ in range(3)]
    for rule in ("mean", "intersection", "votes:1", "votes:2", "votes:3"):
        for t in (0.1, 0.35, 0.5, 0.8):
            expected, _ = fuse_maps(maps, rule, t)
            assert np.array_equal(rule_map(maps, rule) > t, expected.astype(bool)), (rule, t)


def test_calibration_refuses_empty_or_mismatched_input():
    with pytest.raises(ValueError, match="no validation image"):
        calibrate_fusion([], [])
    with pytest.raises(ValueError, match="shape"):
        calibrate_fusion([[np.zeros((2, 2))]], [np.zeros((3, 3), bool)])


def test_selection_scores_by_hand():
    assert binary_entropy(np.array([0.5]))[0] == pytest.approx(1.0)
    assert binary_entropy(np.array([0.0, 1.0])) == pytest.approx([0.0, 0.0], abs=1e-4)
    sure, unsure = np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]])
    # Members that agree and are sure: no entropy, no disagreement.
    assert map_entropy(np.mean([sure, sure], axis=0)) == pytest.approx(0.0, abs=1e-4)
    assert map_disagreement([sure, sure]) == pytest.approx(0.0, abs=1e-4)
    # Both members at 0.5: entropy 1, but they agree: BALD 0.
    assert map_entropy(np.mean([unsure, unsure], axis=0)) == pytest.approx(1.0)
    assert map_disagreement([unsure, unsure]) == pytest.approx(0.0, abs=1e-6)
    # Confident members that contradict each other: mean 0.5 -> entropy 1 and BALD 1.
    assert map_disagreement([sure, 1 - sure]) == pytest.approx(1.0, abs=1e-3)


def test_validated_member_is_chosen_on_held_out_accuracy_not_on_the_evaluated_images():
    def meta(held_out):
        members = tuple(MemberSpec(name) for name in ("a", "b", "c"))
        recorded = {n: {"oof_accuracy": acc, "temperature": 1.0} for n, acc in held_out.items()}
        return VersionMeta(classes=("x", "y"), members=members, metrics={"members": recorded})

    here = {"a": 0.95, "b": 0.80, "c": 0.90}
    # b validated best, though a is best on these images: b's accuracy here is what the report carries
    assert validated_member(meta({"a": 0.70, "b": 0.90, "c": 0.85}), here) == {
        "name": "b", "held_out_accuracy": 0.90, "accuracy": 0.80,
    }  # fmt: skip
    # ties go to the first member in the version's order, whatever they score here
    assert validated_member(meta({"a": 0.70, "b": 0.90, "c": 0.90}), here)["name"] == "b"
    assert validated_member(meta({"a": 0.90, "b": 0.90, "c": 0.90}), {"a": 0.5, "b": 0.9, "c": 0.9})["name"] == "a"
    # a member without a recorded accuracy cannot be chosen; a version without any gives None
    assert validated_member(meta({"a": None, "b": None, "c": 0.60}), here)["name"] == "c"
    assert validated_member(VersionMeta(classes=("x", "y"), members=(MemberSpec("a"),)), {"a": 0.9}) is None


# ---------------------------------------------------------------- end to end


def run_command(argv, capsys):
    parser = argparse.ArgumentParser(prog="axx-backend")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    code = args.func(args)
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def test_set(tmp_path_factory):
    """Held-out generated images (another seed than the training set), 8 per class."""
    return make_dataset(tmp_path_factory.mktemp("testset"), n_per_class=8, size=128, seed=7)


def test_evaluate_json_reports_every_metric_and_rule(trained_model_dir, test_set, tmp_path, capsys):
    out = tmp_path / "eval"
    code, stdout = run_command(
        ["evaluate", test_set, "--model-dir", trained_model_dir, "--json", "--out", out, "--examples", "3"], capsys
    )
    assert code == 0
    report = json.loads(stdout)
    assert report["n_images"] == 16
    for key in ("accuracy", "macro_f1", "auroc", "ece", "flagged_rate", "selective_accuracy"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["accuracy"] >= 0.75 and report["auroc"] >= 0.8
    assert report["flagged_accuracy"] is None or 0.0 <= report["flagged_accuracy"] <= 1.0
    n_flag = round(report["flagged_rate"] * 16)
    assert report["n_flagged"] == n_flag
    assert report["flagged_by_class"].keys() == set(report["classes"])
    assert [v["n"] for v in report["flagged_by_class"].values()] == [8, 8]  # the test set: 8 images per class
    assert sum(v["flagged"] for v in report["flagged_by_class"].values()) == n_flag
    members = ["tf_efficientnet_lite0", "mobilenetv2_100", "tf_efficientnet_lite2"]
    rows = report["masks"]
    expected = {f"member {m}" for m in members} | {"mean", "intersection", "served", "centred box 25 %", "whole image"}
    assert expected <= set(rows)
    for key, row in rows.items():
        # every row is measured on the same images, the positives, both ways
        for how in ("end_to_end", "given_true_class"):
            for metric in ("iou", "dice"):
                assert row[how][metric]["n"] == report["n_mask_images"], (key, how)
                assert 0.0 <= row[how][metric]["mean"] <= 1.0 and 0.0 <= row[how][metric]["pixel"] <= 1.0
        # end to end can only lose what classification loses
        assert row["end_to_end"]["iou"]["mean"] <= row["given_true_class"]["iou"]["mean"] + 1e-9, key
    assert report["n_mask_images"] == 8
    # Generated lesions are easy: the served mask finds them.
    assert rows["served"]["end_to_end"]["iou"]["mean"] > 0.4
    assert report["served_rule"].startswith("cam:") or report["served_rule"] == "segments"
    # A `segment head` row exactly when the version has a segment head.
    heads = load_file(str(ModelStore(trained_model_dir).path(report["version"]) / "heads.safetensors"))
    assert ("segment head" in rows) == ("segments.weight" in heads)
    # The trivial rows do not depend on the classification.
    for trivial in ("centred box 25 %", "whole image"):
        assert rows[trivial]["end_to_end"] == rows[trivial]["given_true_class"]
    assert set(report["member_accuracy"]) == set(members)
    # the member training validated best, with its accuracy here (one of the members' rows above)
    recorded = ModelStore(trained_model_dir).metadata(report["version"]).metrics["members"]
    chosen = report["validated_member"]
    assert chosen["held_out_accuracy"] == max(m["oof_accuracy"] for m in recorded.values())
    assert chosen["accuracy"] == report["member_accuracy"][chosen["name"]]
    for name in ("risk_coverage", "reliability", "examples"):
        path = out / f"{name}.png"
        assert path.is_file() and Image.open(path).size[0] > 200
    assert json.loads((out / "report.json").read_text())["n_images"] == 16


def test_evaluate_table_and_thresholds_calibrated_on_the_training_validation_split(
    trained_model_dir, test_set, dataset_dir, capsys
):
    code, stdout = run_command(
        ["evaluate", test_set, "--model-dir", trained_model_dir, "--calibrate-on", dataset_dir], capsys
    )
    assert code == 0
    assert "| accuracy |" in stdout and "IoU end to end (as served)" in stdout
    assert re.search(r"\| flagged, by true class \| \w+ \d+ of 8, \w+ \d+ of 8 \|", stdout)
    # the served row names what the version serves: its refined CAM rule or its segment head
    assert "| **served (cam:" in stdout or "| **served (segments)** |" in stdout
    assert "member tf_efficientnet_lite2" in stdout and "| intersection |" in stdout
    assert "| centred box 25 % |" in stdout
    assert f"validation split of {dataset_dir}" in stdout


def test_calibrate_on_overrides_the_served_cam_mask_too(trained_model_dir, test_set, dataset_dir):
    """--calibrate-on replaces the version's thresholds for every row, the served mask included."""
    store = ModelStore(trained_model_dir)
    forced = {"mask_source", "mask_fusion", "cam_threshold"}
    settings = Settings(mask_source="cam", mask_fusion="mean", cam_threshold=0.5)
    annotator = Annotator.from_version(store.path(store.current()), settings, explicit=forced)
    meta = store.metadata(store.current())
    report = evaluate_folder(test_set, annotator, meta, calibrate_on=dataset_dir, n_examples=0).report
    served = report["mask_thresholds"]["served"]
    assert served["rule"] in ("mean", "intersection")
    assert report["served_rule"] == f"cam:{served['rule']}+superpixels"
    rows = report["masks"]
    assert rows["served"]["threshold"] == served["threshold"] == rows[served["rule"]]["threshold"]
    # The served mask is that rule's mask at that threshold, image by image, both ways.
    for how in ("end_to_end", "given_true_class"):
        assert rows["served"][how]["iou"]["mean"] == pytest.approx(rows[served["rule"]][how]["iou"]["mean"], abs=1e-9)
    assert annotator.settings.cam_threshold == 0.5  # the caller's annotator is left as it was


def test_evaluate_refuses_to_calibrate_on_the_test_set(trained_model_dir, test_set, capsys):
    with pytest.raises(ValueError, match="calibrate-on"):
        run_command(["evaluate", test_set, "--model-dir", trained_model_dir, "--calibrate-on", test_set], capsys)


def test_the_rows_reproduce_the_served_mask(trained_model_dir, test_set):
    """With the served rule and threshold, the `mean` row is the served mask, image by image: the member
    maps evaluate fuses are the ones serving fuses, taken from the same forward."""
    store = ModelStore(trained_model_dir)
    forced = {"mask_source", "mask_fusion", "cam_threshold"}
    settings = Settings(mask_source="cam", mask_fusion="mean", cam_threshold=0.5, batch_size=4)
    annotator = Annotator.from_version(store.path(store.current()), settings, explicit=forced)
    samples, _ = read_folder_dataset(test_set)
    names = [m.name for m in annotator.ensemble.members]
    th = MaskThresholds({n: 0.5 for n in names}, {"mean": 0.5, "intersection": 0.5}, "test")
    results = [r for r in iter_results(annotator, samples, th) if r.given_true]
    assert len(results) == 8
    served = [r for r in results if not r.flagged and r.pred == r.true]
    assert len(served) >= 4
    for r in served:
        assert np.array_equal(r.end_to_end["mean"], r.annotation.mask.astype(bool)), r.key
    # A map does not depend on the other images of its batch: a batch of one gives the same maps.
    alone = Settings(mask_source="cam", mask_fusion="mean", cam_threshold=0.5, batch_size=1)
    single = Annotator.from_version(store.path(store.current()), alone, explicit=forced)
    first = [s for s in samples if s.key == served[0].key]
    (again,) = [r for r in iter_results(single, first, th)]
    for row in ("mean", "served", f"member {names[0]}"):
        assert np.array_equal(again.given_true[row], served[0].given_true[row]), row


def test_per_image_rows_add_up_to_the_report(trained_model_dir, test_set):
    store = ModelStore(trained_model_dir)
    annotator = Annotator.from_version(store.path(store.current()), Settings(batch_size=4), explicit=set())
    ev = evaluate_folder(test_set, annotator, store.metadata(store.current()), n_examples=0)
    rows, report = ev.per_image, ev.report
    assert len(rows) == len({r["key"] for r in rows}) == report["n_images"] == 16
    assert np.mean([r["pred"] == r["true"] for r in rows]) == report["accuracy"]
    assert sum(r["flagged"] for r in rows) == report["n_flagged"]
    for m, name in enumerate(report["member_accuracy"]):
        assert np.mean([r["member_pred"][m] == r["true"] for r in rows]) == report["member_accuracy"][name]
    ious = [r["served_iou"] for r in rows if r["served_iou"] is not None]
    assert len(ious) == report["n_mask_images"] == 8
    assert np.mean(ious) == pytest.approx(report["masks"]["served"]["end_to_end"]["iou"]["mean"], abs=1e-12)
    # a flagged or misclassified image with a mask scores 0: it was served no mask under its class
    missed = [r for r in rows if r["served_iou"] is not None and (r["flagged"] or r["pred"] != r["true"])]
    assert all(r["served_iou"] == 0.0 for r in missed)


def test_a_positive_served_under_another_class_counts_as_an_empty_mask(trained_model_dir, test_set):
    """End to end, a mask served under the wrong class is no mask for the true one (what the plain reference
    counts too): the served row is empty though the annotation has a mask, and the given-the-class rows stay."""
    store = ModelStore(trained_model_dir)
    annotator = Annotator.from_version(store.path(store.current()), Settings(batch_size=4), explicit=set())
    samples, _ = read_folder_dataset(test_set)
    names = [m.name for m in annotator.ensemble.members]
    th = MaskThresholds({n: 0.5 for n in names}, {"mean": 0.5, "intersection": 0.5}, "test")
    results = [r for r in iter_results(annotator, samples, th) if r.given_true]
    right = next(r for r in results if r.pred == r.true and r.annotation.mask is not None)
    assert right.end_to_end["served"] is right.annotation.mask
    # the same image, its annotation as served, had its truth been the other class
    sample = next(s for s in samples if s.key == right.key)
    (again,) = list(iter_results(annotator, [sample], None))
    again.true, again.gt = 1 - again.true, right.gt
    _attach_masks(annotator, annotator.forward([sample.load().image]), 0, again, th)
    assert again.annotation.mask is not None and again.pred != again.true
    assert again.end_to_end["served"] is None and again.end_to_end["mean"] is None
    assert again.given_true["mean"].shape == right.gt.shape


def test_trivial_masks_by_hand():
    masks = trivial_masks((4, 6))
    box = masks["centred box 25 %"]
    assert box.sum() == 6 and box[1:3, 1:4].all()  # half of each side, centred: 25 % of the area
    assert masks["whole image"].all()


# ---------------------------------------------------------------- benchmark data set builder


def test_gimp_pattern_reader_and_the_pasted_mask(tmp_path):
    builder = load_benchmark("make_dataset")
    # A 3x2 RGB GIMP pattern: header (size, version, width, height, bytes/pixel), 'GPAT', name.
    name = b"tiny\x00"
    header = np.array([24 + len(name), 1, 3, 2, 3], dtype=">u4").tobytes() + b"GPAT" + name
    pixels = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
    (tmp_path / "tiny.pat").write_bytes(header + pixels.tobytes())
    assert np.array_equal(builder.read_gimp_pattern(tmp_path / "tiny.pat"), pixels)

    # A stamp whose alpha is a 20x10 opaque block inside transparent margins: the mask is that block,
    # scaled with the stamp, and the image shows the stamp's colour exactly there.
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 15:25] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "stamp.png")
    stamp = builder.Stamp(tmp_path / "stamp.png", "animals")
    background = np.zeros((64, 64, 3), np.float32)
    image, mask, placement = builder.paste(np.random.default_rng(0), background, stamp)
    x, y, w, h = placement["box"]
    assert mask.sum() == pytest.approx(w * h, rel=0.1)  # the cropped stamp is the block itself
    assert h > w and max(w, h) <= 64 * builder.SCALE_RANGE[1] + 1
    assert mask[y : y + h, x : x + w].mean() > 0.9 and not mask[:y].any()
    inside = image[mask]
    assert inside[:, 0].mean() > 0.8 and inside[:, 1].max() < 0.2  # red where the mask is
    assert image[~mask].max() < 0.2  # the black background elsewhere
