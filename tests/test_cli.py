"""`axx-backend train` then `axx-backend annotate`, as a user runs them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from axx_backend.core.settings import Settings
from axx_backend.core.synthetic import make_dataset, make_image
from axx_backend.core.versions import ModelStore, VersionError
from axx_backend.engine.annotator import Annotator
from axx_backend.engine.masks import iou

from .conftest import run_cli


def test_train_writes_a_calibrated_version(trained_model_dir):
    store = ModelStore(trained_model_dir)
    name = store.current()
    assert name is not None and store.list_versions() == [name]
    meta = store.metadata(name)
    assert list(meta.classes) == ["Healthy", "Lesion"]
    assert list(meta.negative_classes) == ["Healthy"]
    assert meta.preset == "offline"
    assert [m.name for m in meta.members] == ["tf_efficientnet_lite0", "mobilenetv2_100", "tf_efficientnet_lite2"]
    assert all(m.source.startswith("pip:") and len(m.fingerprint) == 16 for m in meta.members)
    assert 0.0 <= meta.thresholds.uncertainty_threshold <= 1.0
    assert meta.metrics["n_val"] > 0 and meta.metrics["accuracy"] >= 0.75
    assert (store.path(name) / "heads.safetensors").is_file()


def test_a_version_serves_bf16_with_the_recheck_margins_its_training_measured(trained_model_dir):
    """Where this machine serves bf16, training ran its calibration images through the version in fp32 and bf16,
    widened the decision recheck margin to cover how far bf16 moved entropies near the review threshold there and
    the decisions it changed (no wider than needed), chose the mask margin from how far bf16 moved the served
    score maps, and kept bf16 only if it paid as served; elsewhere the margins are the settings'. Serving takes the
    version's margins and precision unless AXX_PRECISION_RECHECK(_MASK) or AXX_PRECISION is set."""
    from axx_backend.engine.ensemble import resolve_precision
    from axx_backend.training.recheck_margin import BF16_PAYS, MARGINS, MASK_MARGINS, covering

    store = ModelStore(trained_model_dir)
    meta = store.metadata(store.current())
    seen, margin = meta.metrics["bf16_recheck"], meta.thresholds.precision_recheck
    mask_margin = meta.thresholds.precision_recheck_mask
    default, default_mask = Settings().precision_recheck, Settings().precision_recheck_mask
    assert seen["measured"] == (resolve_precision("auto", torch.device("cpu")) == "bf16")
    if seen["measured"]:
        assert meta.metrics["review_calibration"]["on"] == "labelled, out of fold"  # no unlabelled images here
        assert seen["images"] == min(64, meta.metrics["n_calibration"])
        assert 0 <= seen["missed"] <= seen["changed"] <= seen["images"]
        assert margin in {default, *MARGINS} and margin >= covering(seen["largest_move"], default)
        if seen["changed"] == seen["missed"]:  # no decision bf16 changed that a margin reaches: the moves decide
            assert margin == covering(seen["largest_move"], default)
        masks = seen["masks"]
        assert mask_margin == masks["margin"] and mask_margin in {default_mask, *MASK_MARGINS}
        assert 0 <= masks["missed"] <= masks["under_floor"] <= masks["masked"] <= seen["images"]
        assert masks["near"] <= masks["masked"] and masks["p90_move"] <= masks["largest_move"]
        assert "bf16 recheck margin" in meta.metrics["seconds"]
        # bf16 as served (rechecks included) was timed against fp32: the version keeps bf16 only where it paid
        assert meta.thresholds.precision == ("fp32" if seen["served_time_vs_fp32"] > BF16_PAYS else "auto")
    else:
        assert (margin, mask_margin, meta.thresholds.precision) == (default, default_mask, "auto")
        assert "bf16 recheck margin" not in meta.metrics["seconds"]
    version = store.path(store.current())
    served = Annotator.from_version(version, Settings(device="cpu")).settings
    assert (served.precision_recheck, served.precision_recheck_mask) == (margin, mask_margin)
    mine = Settings(device="cpu", precision_recheck=0.07, precision_recheck_mask=0.002)
    explicit = Annotator.from_version(version, mine, {"precision_recheck", "precision_recheck_mask"}).settings
    assert (explicit.precision_recheck, explicit.precision_recheck_mask) == (0.07, 0.002)
    cpu = torch.device("cpu")
    assert Annotator.from_version(version, Settings(device="cpu")).precision == resolve_precision(
        meta.thresholds.precision, cpu
    )
    asked = Annotator.from_version(version, Settings(device="cpu", precision="bf16"), {"precision"})
    assert asked.precision == "bf16"  # AXX_PRECISION set explicitly wins


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    """Lesion and healthy images of sizes unlike the training set, odd modes, and a corrupt file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(42)
    truth = {}
    for i in range(4):
        img, mask = make_image(rng, 160 + 40 * i, positive=True)
        Image.fromarray(img).save(root / f"lesion_{i}.png")
        truth[f"lesion_{i}.png"] = mask
    (root / "nested").mkdir()
    img, _ = make_image(rng, 150, positive=False)
    Image.fromarray(img).save(root / "nested" / "healthy.jpg", quality=95)
    truth["nested/healthy.jpg"] = np.zeros((150, 150), bool)
    img, mask = make_image(rng, 140, positive=True)
    rgba = Image.fromarray(img).convert("RGBA")
    rgba.save(root / "lesion_rgba.png")
    truth["lesion_rgba.png"] = mask
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "notes.txt").write_text("not an image: a line with an error (issue 12: by content, not suffix)")
    return root, truth


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, trained_model_dir, images_dir):
    out = tmp_path_factory.mktemp("out")
    proc = run_cli("annotate", images_dir[0], "--out", out, "--model-dir", trained_model_dir)
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return out, {line["path"]: line for line in lines}, json.loads(proc.stdout.strip().splitlines()[-1])


def test_annotate_writes_one_line_per_image_and_reports_the_corrupt_one(annotated, images_dir):
    out, lines, summary = annotated
    _, truth = images_dir
    assert set(lines) == set(truth) | {"broken.png", "notes.txt"}  # issue 12: one line per file
    assert "error" in lines["broken.png"] and "broken.png" in lines["broken.png"]["error"]
    assert "error" in lines["notes.txt"] and "notes.txt" in lines["notes.txt"]["error"]
    assert summary["images"] == len(truth) + 2 and summary["errors"] == 2
    for path in truth:
        line = lines[path]
        assert {"label", "score", "flagged", "members", "mask_area"} <= set(line)
        assert len(line["members"]) == 3
        for member in line["members"]:
            assert {"name", "probs", "entropy", "mutual_info", "label"} <= set(member)
            assert abs(sum(member["probs"]) - 1) < 1e-4


def test_masks_are_binary_png_at_image_size_and_find_the_lesions(annotated, images_dir):
    out, lines, _ = annotated
    _, truth = images_dir
    ious = []
    for path, gt in truth.items():
        mask = np.asarray(Image.open(out / "masks" / (path + ".png")))  # issue 12: x.png -> masks/x.png.png
        assert mask.shape == gt.shape
        assert set(np.unique(mask)) <= {0, 255}
        assert int((mask > 0).sum()) == lines[path]["mask_area"]
        overlay = Image.open(out / "overlays" / (path + ".png"))
        assert overlay.size == (gt.shape[1], gt.shape[0])
        if gt.any() and not lines[path]["flagged"]:
            assert lines[path]["label"] == "Lesion"
            ious.append(iou(mask, gt))
        if not gt.any():
            assert lines[path]["label"] == "Healthy" or lines[path]["flagged"]
            assert mask.max() == 0  # a negative class never gets a mask
    assert len(ious) >= 3, "most lesion images should be predicted confidently"
    assert np.mean(ious) > 0.4


def test_gradcam_path_gives_the_same_masks_as_the_fast_path(trained_model_dir, images_dir):
    root, truth = images_dir
    store = ModelStore(trained_model_dir)
    images = [Image.open(root / p).convert("RGB") for p in sorted(truth) if p.startswith("lesion_")]
    # The version may serve seg-head masks: compare the CAM paths, both on fp32 features (grad-cam runs its own
    # fp32 forward; what bf16 changes is measured by benchmarks/precision.py).
    cam = {"mask_source": "cam", "precision": "fp32"}
    fast = Annotator.from_version(store.path(store.current()), Settings(cam_method="fast", **cam), explicit=set())
    general = Annotator.from_version(
        store.path(store.current()), Settings(cam_method="xgradcam", **cam), explicit=set()
    )
    # The version records its heads' pooling (the default) and both paths serve with it.
    assert store.metadata(store.current()).pooling == Settings().pooling
    assert {m.pooling for m in [*fast.ensemble.members, *general.ensemble.members]} == {Settings().pooling}
    for a, b in zip(fast.annotate(images), general.annotate(images), strict=True):
        assert a.label == b.label and a.flagged == b.flagged
        if a.mask is not None:
            assert iou(a.mask, b.mask) > 0.99


def test_an_image_gets_the_same_result_alone_or_in_a_batch(trained_model_dir, images_dir):
    root, _ = images_dir
    store = ModelStore(trained_model_dir)
    annotator = Annotator.from_version(store.path(store.current()), Settings(batch_size=8), explicit=set())
    a = Image.open(root / "lesion_0.png").convert("RGB")
    b = Image.open(root / "lesion_1.png").convert("RGB")
    alone = annotator.annotate([a])[0]
    batched = annotator.annotate([a, b])[0]
    assert alone.probs == pytest.approx(batched.probs, abs=1e-5)
    assert alone.flagged == batched.flagged


def test_a_version_refuses_backbone_weights_it_was_not_trained_on(tmp_path, trained_model_dir):
    import shutil

    store = ModelStore(trained_model_dir)
    copy = tmp_path / "copy"
    shutil.copytree(store.path(store.current()), copy)
    meta = json.loads((copy / "version.json").read_text())
    # A member that loads the shipped backbone (a fine-tuned member's is stored in the version: the copy drops
    # it), recorded as trained on other weights.
    member = meta["members"][0]
    (copy / f"backbone-{member['name']}.safetensors").unlink(missing_ok=True)
    member["finetuned"] = False
    member["fingerprint"] = "0" * 16
    (copy / "version.json").write_text(json.dumps(meta))
    with pytest.raises(VersionError, match=member["name"]):
        Annotator.from_version(copy, Settings(), explicit=set())


def test_annotate_without_a_trained_version_says_what_to_do(tmp_path, images_dir):
    proc = run_cli("annotate", images_dir[0], "--out", tmp_path / "o", "--model-dir", tmp_path / "empty", check=False)
    assert proc.returncode == 1
    assert "axx-backend train" in proc.stderr


def test_train_on_a_folder_without_classes_is_a_clear_error(tmp_path):
    (tmp_path / "images" / "only").mkdir(parents=True)
    proc = run_cli("train", tmp_path, "--model-dir", tmp_path / "m", check=False)
    assert proc.returncode == 1 and "two class folders" in proc.stderr


def test_a_version_trained_with_masks_says_which_source_makes_its_masks(trained_model_dir, annotated):
    store = ModelStore(trained_model_dir)
    meta = store.metadata(store.current())
    pixels = meta.metrics["pixels"]
    assert meta.training.oracle_masks == 14
    assert pixels["oracle_masks"] == 14  # every mask: the head-or-CAM choice is cross-validated over them all
    beats_cam = pixels["val_iou_segments"] > pixels["val_iou_cam"] and pixels["oracle_masks"] >= 5
    assert meta.mask_source == ("segments" if beats_cam else "cam")
    _, lines, _ = annotated
    sources = {line["mask_source"] for line in lines.values() if line.get("mask_area")}
    assert sources == ({"segments"} if beats_cam else {f"cam:{meta.thresholds.mask_fusion}+superpixels"})


def test_a_version_trained_without_masks_serves_the_segment_head_on_pseudo_masks(tmp_path):
    """The photograph benchmark's choice without masks (AXX_LABELS_ONLY_MASKS=segments, the default): the
    segment head learns from the refined CAM of the positives and every region of the negatives; with
    `cam`, the refined CAM serves and no head is trained."""
    from safetensors.torch import load_file

    from axx_backend.core.synthetic import make_dataset

    dataset = make_dataset(tmp_path / "d", n_per_class=8, size=96, seed=3, masks=False)
    for choice, source in (("segments", "segments"), ("cam", "cam")):
        model_dir = tmp_path / choice
        env = {"AXX_LABELS_ONLY_MASKS": choice}
        run_cli("train", dataset, "--model-dir", model_dir, "--preset", "offline", "--input-size", "128", env=env)
        store = ModelStore(model_dir)
        meta = store.metadata(store.current())
        assert meta.mask_source == source and meta.training.oracle_masks == 0
        assert not meta.cam_calibrated and meta.thresholds.cam_threshold == Settings().cam_threshold
        heads = load_file(str(store.path(store.current()) / "heads.safetensors"))
        assert ("segments.weight" in heads) == (choice == "segments")
        if choice == "segments":
            assert meta.metrics["pixels"]["pseudo_masks"] > 0 and meta.metrics["pixels"]["negatives"] > 0


def test_a_tiny_dataset_keeps_the_backbones_frozen_and_early_stops_its_heads_by_cross_validation(tmp_path):
    """Three images a class: the held-out split holds at most one of a class, too few to early-stop on or to tell
    whether fine-tuning pays. `auto` then keeps the backbones frozen, and each head's epoch count comes from
    cross-validation over every labelled image."""
    data = make_dataset(tmp_path / "data", n_per_class=3, size=96, seed=3)
    run_cli("train", data, "--model-dir", tmp_path / "m", "--preset", "offline", "--input-size", "96")
    store = ModelStore(tmp_path / "m")
    meta = store.metadata(store.current())
    assert meta.training.finetune == "head" and not any(spec.finetuned for spec in meta.members)
    assert "finetune (last stage)" not in meta.metrics["seconds"]
    assert all(meta.metrics["members"][spec.name]["epochs_by"] == "cross-validation" for spec in meta.members)


def test_train_reads_unlabelled_images_and_spends_the_flag_budget_on_them(tmp_path):
    """`train --unlabelled DIR`: the images join training unlabelled (a project's tasks still to annotate), and from
    `min_review_pool` of them the review threshold is calibrated there; fewer, and it is calibrated out of fold."""
    data = make_dataset(tmp_path / "data", n_per_class=4, size=96, seed=3, masks=False)
    pool = make_dataset(tmp_path / "pool", n_per_class=5, size=96, seed=4, masks=False) / "images"
    (pool / "Lesion" / "notes.txt").write_text("not an image")
    for min_pool, on in ((8, "unlabelled"), (11, "labelled, out of fold")):
        model_dir = tmp_path / f"m{min_pool}"
        run_cli("train", data, "--model-dir", model_dir, "--preset", "offline", "--input-size", "96", "--unlabelled",
                pool, env={"AXX_MIN_REVIEW_POOL": str(min_pool), "AXX_PSEUDO_LABELS": "auto"})  # fmt: skip
        meta = ModelStore(model_dir).metadata(ModelStore(model_dir).current())
        assert meta.training.n_images == 18 and meta.training.n_labelled == 8
        review = meta.metrics["review_calibration"]
        assert review["on"] == on and review["images"] == (10 if on == "unlabelled" else 8)
        listed = run_cli("versions", "--model-dir", model_dir).stdout
        pseudo = meta.metrics.get("pseudo_labels")
        if on == "unlabelled":
            assert review["flagged_rate"] <= Settings().target_flag_rate
            assert f"flagged_unlabelled={review['flagged_rate']:.3f}" in listed
            # self-training ran: what it chose is recorded, even none (10 images rarely give every appearance
            # group a sure image of each class)
            assert pseudo is not None and 0 <= pseudo["images"] <= pseudo["unanimous"] <= 10 and pseudo["of"] == 10
            assert sum(pseudo["classes"].values()) == pseudo["images"] and pseudo["scene_groups"] >= 1
            assert "pseudo-labels" in meta.metrics["seconds"]  # its own step, timed
            assert f"pseudo_labelled={pseudo['images']}" in listed
        else:
            assert "flagged_unlabelled" not in listed and pseudo is None
    proc = run_cli("train", data, "--model-dir", tmp_path / "x", "--unlabelled", tmp_path / "nowhere", check=False)
    assert proc.returncode != 0 and "is not a folder of unlabelled images" in proc.stderr


def test_finetune_last_stage_records_each_member_and_reloads(tmp_path, dataset_dir):
    """`--finetune last-stage` on cached stage inputs: every member says whether its fine-tuned stage was kept;
    a kept one is stored (only its stride-32 stage differs from the weights it started from) and reloads."""
    from safetensors.torch import load_file

    from axx_backend.engine.weights import load_backbone
    from axx_backend.training.finetune import tail_of

    model_dir = tmp_path / "m"
    run_cli("train", dataset_dir, "--model-dir", model_dir, "--preset", "offline", "--input-size", "96",
            "--finetune", "last-stage", "--epochs", "2")  # fmt: skip
    store = ModelStore(model_dir)
    version = store.path(store.current())
    meta = store.metadata(store.current())
    assert meta.training.finetune == "last-stage"
    # the version says where training time went, by the steps that ran (no 0-second "all layers" step; the bf16
    # recheck margin only where this machine serves bf16)
    steps = {"features", "finetune (last stage)", "heads and calibration", "pixels"}
    steps |= {"bf16 recheck margin"} if meta.metrics["bf16_recheck"]["measured"] else set()
    assert steps == set(meta.metrics["seconds"])
    annotator = Annotator.from_version(version, Settings(), explicit=set())  # the fingerprints of kept stages match
    for spec, member in zip(meta.members, annotator.ensemble.members, strict=True):
        info = meta.metrics["members"][spec.name]
        assert "kept" in info and "frozen_val_loss" in info and spec.finetuned == info["kept"]
        assert (version / f"backbone-{spec.name}.safetensors").is_file() == spec.finetuned
        if spec.finetuned:  # only the modules after the stride-16 stage moved
            tuned = load_file(str(version / f"backbone-{spec.name}.safetensors"))
            start = load_backbone(spec.name, "pip")[0].state_dict()
            module_names = {id(m): name for name, m in member.backbone.named_modules()}
            tail = tuple(module_names[id(m)] + "." for m in tail_of(member).modules)
            moved = [k for k in start if not torch.equal(tuned[k], start[k])]
            assert moved and all(k.startswith(tail) for k in moved), moved[:5]
    if any(spec.finetuned for spec in meta.members):  # calibrated out of fold on stages refitted without each fold
        assert meta.metrics["calibration"].startswith("out of fold (")
        assert meta.metrics["n_calibration"] == meta.training.n_labelled
        assert all("cross_fit_seconds" in meta.metrics["members"][s.name] for s in meta.members if s.finetuned)
