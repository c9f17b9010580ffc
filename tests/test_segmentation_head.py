"""The segmentation head on the stride-16 stage: the hook, what a head learns there, the k-fold
head-vs-CAM decision, the calibrated thresholds a version stores, and loading older versions."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from axx_backend.core.settings import Settings
from axx_backend.core.synthetic import blob_mask, make_image
from axx_backend.core.versions import ModelStore, VersionError
from axx_backend.engine.annotator import Annotator
from axx_backend.engine.ensemble import Ensemble, Member, seg_layer_of
from axx_backend.engine.masks import iou
from axx_backend.engine.saliency import upsample
from axx_backend.engine.segmentation import SegHead, seg_probabilities, train_seg_head
from axx_backend.engine.weights import WeightInfo, create_backbone
from axx_backend.evaluation.evaluate import version_thresholds
from axx_backend.training.pixels import fit_pixels, kfold


@pytest.mark.parametrize(
    ("name", "layer", "channels"),
    [("mobilenetv2_100", "blocks.4", 96), ("resnet50", "layer3", 1024), ("densenet121", "features.denseblock3", 1024)],
)
def test_the_hook_captures_the_stride_16_map_in_the_same_forward(name, layer, channels):
    backbone = create_backbone(name).eval()
    assert seg_layer_of(backbone) == layer
    member = Member(name, backbone, 2, 0.0, WeightInfo("random", (0.5,) * 3, (0.25,) * 3, "-"))
    stems = []  # the first module of the net runs once per backbone pass
    first = next(m for m in backbone.modules() if isinstance(m, nn.Conv2d))
    first.register_forward_hook(lambda *_: stems.append(1))
    x = member.normalize(torch.rand(2, 3, 224, 224))
    with torch.no_grad():
        last, seg = member.features_and_seg(x)
        alone = member.features(x)
    assert len(stems) == 2  # one pass for features_and_seg, one for features
    assert last.shape[-2:] == (7, 7) and seg.shape == (2, channels, 14, 14)
    assert member.seg_channels == channels
    assert torch.allclose(last, alone)
    # The hook lives only for the call.
    assert not backbone.get_submodule(layer)._forward_hooks


def test_a_model_without_finer_stages_keeps_the_head_on_the_last_map():
    assert seg_layer_of(nn.Conv2d(3, 4, 3)) is None
    vit = create_backbone("vit_tiny_patch16_224")
    assert seg_layer_of(vit) is None  # every block is at stride 16: no finer stage than the last


def test_forward_mc_computes_the_seg_map_only_for_a_member_with_a_head():
    ensemble = Ensemble.build(["mobilenetv2_100"], ["a", "b"], weights="random")
    x = torch.rand(2, 3, 128, 128)
    (plain,) = ensemble.forward_mc(x, 4)
    assert plain.seg_features is None
    member = ensemble.members[0]
    member.seg_head = SegHead(member.seg_channels)
    (with_head,) = ensemble.forward_mc(x, 4)
    assert with_head.seg_features.shape == (2, 96, 8, 8)
    assert torch.allclose(with_head.features, plain.features) and torch.allclose(with_head.logits, plain.logits)


def test_a_head_on_the_stride_16_map_learns_a_generated_object_and_beats_chance():
    """Pretrained features of generated lesions: 12 masks train the head, 8 unseen images test it."""
    ensemble = Ensemble.build(["mobilenetv2_100"], ["Healthy", "Lesion"])  # ImageNet weights (pip)
    member = ensemble.members[0]
    rng = np.random.default_rng(0)
    data = [make_image(rng, 128, True) for _ in range(20)]
    x = torch.from_numpy(np.stack([img for img, _ in data])).permute(0, 3, 1, 2).float() / 255
    truth = torch.from_numpy(np.stack([m for _, m in data])).float()
    target = nn.functional.interpolate(truth[:, None], size=(32, 32), mode="area")[:, 0].gt(0.5).float()
    with torch.no_grad():
        last, mid = member.features_and_seg(member.normalize(x))
    scores = {}
    for key, feats in (("stride16", mid), ("stride32", last)):
        head = SegHead(feats.shape[1])
        train_seg_head(head, feats[:12], target[:12], torch.ones(12))
        probs = upsample(seg_probabilities(head, feats[12:]), (128, 128)).numpy()
        scores[key] = np.mean([iou(p > 0.5, m) for p, (_, m) in zip(probs, data[12:], strict=True)])
    everything = np.mean([iou(np.ones((128, 128)), m) for _, m in data[12:]])  # chance: mark all
    assert scores["stride16"] > 0.5 and scores["stride16"] > 3 * everything
    assert scores["stride16"] > scores["stride32"]


def test_kfold_deals_every_item_once_into_seeded_folds():
    folds = kfold(list(range(12)), 5, seed=0)
    assert len(folds) == 5 and sorted(i for f in folds for i in f) == list(range(12))
    assert sorted(len(f) for f in folds) == [2, 2, 2, 3, 3]
    assert kfold(list(range(12)), 5, seed=0) == folds
    assert kfold(list(range(12)), 5, seed=1) != folds
    assert sorted(kfold([4, 7, 9], 5, seed=0)) == [[4], [7], [9]]  # leave-one-out below k items


class Stub(nn.Module):
    """A backbone stand-in: fit_pixels reads only cached maps and the heads."""

    num_features = 4


def toy_members(n=2):
    members = []
    for m in range(n):
        member = Member(f"m{m}", Stub(), 2, 0.0, WeightInfo("random", (0.0,) * 3, (1.0,) * 3, "-"))
        with torch.no_grad():
            member.head.fc.weight.zero_()
            member.head.fc.weight[1, 0] = 1.0  # class 1's CAM is channel 0 of the last map
        members.append(member)
    return Ensemble(members, ["Healthy", "Lesion"])


def toy_pixels(cam_knows: bool, n_pos=10, n_neg=4, n_unlabelled=0, seed=0):
    """Positives with oracle masks, labelled negatives, and unlabelled positives (pseudo-mask candidates);
    the object is in the CAM's map (`cam_knows`) or in the seg map."""
    rng = np.random.default_rng(seed)
    ensemble = toy_members()
    maps, seg_maps, probs, entropy, labels, oracle = {}, {}, {}, {}, {}, {}
    for i in range(n_pos + n_neg + n_unlabelled):
        positive = i < n_pos or i >= n_pos + n_neg
        mask = blob_mask(rng, 64) if positive else np.zeros((64, 64), bool)
        area = torch.from_numpy(mask).float()[None, None]
        obj8 = nn.functional.interpolate(area, size=(8, 8), mode="area")[0, 0]
        obj16 = nn.functional.interpolate(area, size=(16, 16), mode="area")[0, 0]
        last = torch.from_numpy(rng.random((4, 8, 8))).float() * 0.3
        seg = torch.from_numpy(rng.normal(size=(6, 16, 16))).float()
        if cam_knows:
            last[0] = obj8 + 0.05 * last[0]
        else:
            seg[0] = 4 * obj16 - 2 + 0.1 * seg[0]
        maps[i], seg_maps[i] = [last, last.clone()], [seg, seg.clone()]
        p = np.array([0.03, 0.97]) if positive else np.array([0.97, 0.03])
        probs[i], entropy[i], labels[i] = [p, p], [0.1, 0.1], int(positive) if i < n_pos + n_neg else None
        if i < n_pos:
            oracle[i] = mask
    settings = Settings(input_size=64, seg_epochs=150)
    return fit_pixels(ensemble, maps, seg_maps, probs, entropy, labels, oracle, {0}, 0.5, settings)


def test_the_k_fold_decision_keeps_the_cam_when_the_head_cannot_learn():
    result = toy_pixels(cam_knows=True)
    m = result.metrics
    assert m["cv_folds"] == 5 and m["cv_masks"] == 10 and m["oracle_masks"] == 10
    assert m["val_iou_cam"] > 0.6 > m["val_iou_seg_head"]
    assert not result.use_seg_head and "CAM masks kept" in m["seg_head_decision"]
    # The final heads exist anyway (evaluate reports them; AL selection scores them).
    assert set(result.seg_heads) == {"m0", "m1"} and result.seg_heads["m0"].conv.in_channels == 6
    # Calibrated thresholds for the version: every rule, every member, and the served rule's.
    stored = result.thresholds()
    assert set(stored["fusion_thresholds"]) == {"mean", "intersection"}
    assert set(stored["member_cam_thresholds"]) == {"m0", "m1"}
    assert stored["cam_threshold"] == stored["fusion_thresholds"][stored["mask_fusion"]]


def test_the_k_fold_decision_takes_the_head_when_it_beats_the_cam():
    result = toy_pixels(cam_knows=False)
    assert result.metrics["val_iou_seg_head"] > 0.6 > result.metrics["val_iou_cam"]
    assert result.use_seg_head


def test_pseudo_masks_from_a_useless_cam_are_dropped_by_the_k_fold_choice_of_lambda():
    """80 pseudo-masks at lambda 0.1 weigh 8 against 10 oracle masks: from a CAM that does not see the
    object they teach the head noise, and the folds choose lambda 0 (oracle masks only)."""
    result = toy_pixels(cam_knows=False, n_unlabelled=80)
    by_lambda = result.metrics["val_iou_seg_head_by_lambda"]
    assert result.metrics["pseudo_masks"] == 84  # the 80 unlabelled positives and the 4 negatives
    assert by_lambda["0.0"] > by_lambda["0.1"]
    assert result.metrics["seg_lambda"] == 0.0 and result.use_seg_head


def test_fewer_oracle_masks_than_min_pixel_labels_keep_the_cam():
    result = toy_pixels(cam_knows=False, n_pos=4)
    assert not result.use_seg_head and "min 5" in result.metrics["seg_head_decision"]
    assert result.thresholds()["fusion_thresholds"]  # 4 masks still calibrate the CAM thresholds


# ---------------------------------------------------------------- versions


def test_a_version_stores_the_seg_layer_and_calibrated_thresholds(trained_model_dir):
    store = ModelStore(trained_model_dir)
    meta = store.metadata(store.current())
    layers = {spec.name: spec.seg_layer for spec in meta.members}
    assert layers == {"tf_efficientnet_lite0": "blocks.4", "mobilenetv2_100": "blocks.4", "resnet50": "layer3"}
    heads = load_file(str(store.path(store.current()) / "heads.safetensors"))
    assert heads["resnet50.seg.weight"].shape[1] == 1024 and heads["mobilenetv2_100.seg.weight"].shape[1] == 96
    th = meta.thresholds
    assert set(th.fusion_thresholds) == {"mean", "intersection"}
    assert th.cam_threshold == th.fusion_thresholds[th.mask_fusion]
    assert set(th.member_cam_thresholds) == set(layers)
    annotator = Annotator.from_version(store.path(store.current()), Settings(), explicit=set())
    assert version_thresholds(annotator, meta).source == "version"  # evaluate needs no --calibrate-on
    # An explicitly chosen rule gets the version's threshold for that rule.
    other = "intersection" if th.mask_fusion == "mean" else "mean"
    chosen = Annotator.from_version(
        store.path(store.current()), Settings(mask_fusion=other, mask_source="cam"), explicit={"mask_fusion"}
    )
    assert chosen.settings.cam_threshold == th.fusion_thresholds[other]


def _copy_version(store, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(store.path(store.current()), copy)
    return copy, json.loads((copy / "version.json").read_text()), load_file(str(copy / "heads.safetensors"))


def test_an_old_version_with_heads_on_the_last_map_still_loads_and_serves(trained_model_dir, dataset_dir, tmp_path):
    store = ModelStore(trained_model_dir)
    copy, meta, heads = _copy_version(store, tmp_path)
    for spec in meta["members"]:  # the layout before seg_layer: a head of num_features inputs
        del spec["seg_layer"]
        channels = 2048 if spec["name"] == "resnet50" else 1280
        heads[f"{spec['name']}.seg.weight"] = torch.full((1, channels, 1, 1), 0.01)
    (copy / "version.json").write_text(json.dumps(meta))
    save_file(heads, str(copy / "heads.safetensors"))
    settings = Settings(mask_source="seg_head", uncertainty_threshold=1.0)
    annotator = Annotator.from_version(copy, settings, explicit={"mask_source", "uncertainty_threshold"})
    for member in annotator.ensemble.members:
        assert member.seg_layer is None and member.seg_head.conv.in_channels == member.num_features
    outputs = annotator.ensemble.forward_mc(torch.rand(1, 3, 224, 224), 2)
    assert all(o.seg_features.shape == o.features.shape for o in outputs)
    (ann,) = annotator.annotate([Image.open(dataset_dir / "images" / "Lesion" / "lesion_000.png")])
    assert ann.label == "Lesion" and ann.mask_source == "seg_head" and ann.mask.shape == (128, 128)


def test_a_head_that_does_not_fit_its_layer_is_refused_with_a_clear_message(trained_model_dir, tmp_path):
    store = ModelStore(trained_model_dir)
    copy, meta, heads = _copy_version(store, tmp_path)
    heads["resnet50.seg.weight"] = torch.zeros(1, 2048, 1, 1)  # the old size, but seg_layer says layer3
    save_file(heads, str(copy / "heads.safetensors"))
    with pytest.raises(VersionError, match="resnet50's segmentation head has 2048 inputs.*layer3.*1024"):
        Annotator.from_version(copy, Settings(), explicit=set())
