"""The level maps (hooks in the same forward), region pooling and features against plain loops, the segment
head against its optimality condition, the pixel phase's k-fold decision on hand-made data, and versions."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from skimage.data import astronaut
from torch import nn
from torch.nn import functional as F

from axx_backend.core.data import Sample
from axx_backend.core.settings import Settings
from axx_backend.core.version_meta import VersionError
from axx_backend.core.versions import ModelStore
from axx_backend.engine.annotator import Annotator
from axx_backend.engine.ensemble import Ensemble, Member, level_names_of
from axx_backend.engine.refine import SuperpixelSpec, pool, region_means, segment_image
from axx_backend.engine.segments import first_pixels, fit_segment_head, region_features, region_level_means
from axx_backend.engine.weights import WeightInfo, create_backbone
from axx_backend.evaluation.evaluate import version_thresholds
from axx_backend.training.features import FeatureCache, PixelView
from axx_backend.training.heads import Heads, MemberStats, Split
from axx_backend.training.pixels import fit_pixels, kfold

# ---------------------------------------------------------------- level maps


@pytest.mark.parametrize(
    ("name", "levels", "channels"),
    [
        ("mobilenetv2_100", ("blocks.2", "blocks.4"), (32, 96)),
        ("resnet50", ("layer2", "layer3"), (512, 1024)),
        ("densenet121", ("features.denseblock2", "features.denseblock3"), (512, 1024)),
    ],
)
def test_the_hooks_capture_the_stride_8_and_16_maps_in_the_same_forward(name, levels, channels):
    backbone = create_backbone(name).eval()
    assert level_names_of(backbone) == levels
    member = Member(name, backbone, 2, 0.0, WeightInfo("random", (0.5,) * 3, (0.25,) * 3, "-"))
    stems = []  # the first module of the net runs once per backbone pass
    first = next(m for m in backbone.modules() if isinstance(m, nn.Conv2d))
    first.register_forward_hook(lambda *_: stems.append(1))
    x = member.normalize(torch.rand(2, 3, 224, 224))
    with torch.no_grad():
        last, maps = member.features_and_levels(x)
        alone = member.features(x)
    assert len(stems) == 2  # one pass for features_and_levels, one for features
    assert last.shape[-2:] == (7, 7) and [m.shape for m in maps] == [(2, channels[0], 28, 28), (2, channels[1], 14, 14)]
    assert member.level_channels() == channels
    assert torch.allclose(last, alone)
    assert not any(backbone.get_submodule(layer)._forward_hooks for layer in levels)  # hooks live for the call


def test_a_model_without_finer_stages_has_no_levels():
    assert level_names_of(nn.Conv2d(3, 4, 3)) == ()
    assert level_names_of(create_backbone("vit_tiny_patch16_224")) == ()  # every block at stride 16


def test_forward_mc_keeps_the_level_maps_only_when_asked():
    ensemble = Ensemble.build(["mobilenetv2_100"], ["a", "b"], weights="random")
    x = torch.rand(2, 3, 128, 128)
    (plain,) = ensemble.forward_mc(x, 4)
    (levels,) = ensemble.forward_mc(x, 4, levels=True)
    assert plain.levels is None and [t.shape for t in levels.levels] == [(2, 32, 16, 16), (2, 96, 8, 8)]
    assert torch.allclose(levels.features, plain.features) and torch.allclose(levels.logits, plain.logits)


# ---------------------------------------------------------------- regions


def test_region_pooling_against_a_plain_loop():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(6, 7))
    labels[0, 0] = 4  # make sure the largest label occurs
    heat = rng.random((6, 7))
    expected = np.zeros_like(heat)
    for r in range(5):
        inside = labels == r
        expected[inside] = heat[inside].mean() if inside.any() else 0
    assert np.allclose(region_means(heat, labels)[labels], expected)
    two = [labels, np.zeros_like(labels)]  # the second segmentation is one region: the global mean
    assert np.allclose(pool(heat, two), (expected + heat.mean()) / 2)
    assert pool(heat, []) is heat


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_region_pooling_is_numpys_bit_for_bit(dtype):
    """`pool`'s compiled loop against the NumPy formulation it replaced (bincounts, a gather, a mean), on a
    photograph's regions at the default scales and on labels with unused values (empty regions)."""
    rng = np.random.default_rng(1)
    photo = np.asarray(Image.fromarray(astronaut()).resize((160, 160)))
    gappy = rng.integers(0, 40, size=(160, 160)) * 3  # two of every three labels unused
    segmentations = [*segment_image(photo), gappy]
    heat = rng.random((160, 160)).astype(dtype)
    expected = np.mean([region_means(heat, labels)[labels] for labels in segmentations], axis=0).astype(np.float32)
    pooled = pool(heat, segmentations)
    assert pooled.dtype == np.float32 and np.array_equal(pooled, expected)
    with pytest.raises(ValueError, match="regions of shape"):
        pool(heat, [gappy[:80]])


def test_felzenszwalb_regions_follow_the_image_and_grow_with_the_scale():
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 20:44] = (250, 20, 20)  # a red block on black
    small, large = segment_image(image, SuperpixelSpec(scales=(5.0, 2000.0), min_size=4))
    block = np.zeros((64, 64), bool)
    block[16:48, 20:44] = True
    for labels in (small, large):
        assert labels.shape == (64, 64) and labels.min() == 0
        for region in np.unique(labels):  # no region crosses the block's edge
            inside = block[labels == region]
            assert inside.all() or not inside.any()
    assert small.max() > large.max()


def _first_by_loop(labels):
    """Each label's first flat index, by scanning (the plain computation)."""
    first = {}
    for i, label in enumerate(labels.ravel().tolist()):
        first.setdefault(label, i)
    return np.array([first[k] for k in sorted(first)])


def test_first_pixels_of_felzenszwalb_regions_and_of_labels_in_any_order():
    from skimage import data

    photo = np.asarray(Image.fromarray(data.astronaut()).resize((160, 160), Image.BILINEAR))
    for labels in segment_image(photo, SuperpixelSpec(scales=(50.0, 800.0))):  # numbered by first appearance
        assert np.array_equal(first_pixels(labels), _first_by_loop(labels))
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(12)[rng.integers(0, 12, size=(9, 11))]  # any order, gaps too: the sort's answer
    assert np.array_equal(first_pixels(shuffled), _first_by_loop(shuffled))
    rising = np.array([[0, 2, 1], [1, 2, 3]])  # the running maximum skips a label
    assert np.array_equal(first_pixels(rising), _first_by_loop(rising))


def _reference_grid(levels, side):
    """The maps resampled to the pooling grid with F.interpolate, one by one (the plain computation)."""
    grid = side // 4
    return torch.cat([F.interpolate(lv[None].float(), size=(grid, grid), mode="bilinear")[0] for lv in levels])


def test_region_features_against_the_resampled_grid_and_a_plain_loop():
    rng = np.random.default_rng(1)
    side = 16
    labels = np.repeat(np.repeat(rng.integers(0, 3, size=(4, 4)), 4, 0), 4, 1)  # 4x4 blocks of 3 regions
    labels[:2, :2] = 3  # a region too small to own a grid cell (its centres are at 2, 6, 10, 14)
    levels = [
        torch.from_numpy(rng.random((2, 8, 8))).float(),  # down to the 4 x 4 grid
        torch.from_numpy(rng.random((3, 3, 3))).float(),  # up to it
        torch.from_numpy(rng.random((1, 2, 3, 5))).float().to(memory_format=torch.channels_last)[0],  # not square
        torch.from_numpy(rng.random((1, 1, 4))).float(),  # one row: a single tap on that axis
    ]
    cam = rng.random((side, side)).astype(np.float32)
    grid = _reference_grid(levels, side)  # [8, 4, 4]
    coarse = np.zeros_like(labels)  # a second scale: one region
    features, whole = region_features(levels, side, cam, [labels, coarse])
    assert features.shape == (4, 8 + 2) and whole.shape == (1, 8 + 2)
    centres = np.array([2, 6, 10, 14])
    for r in range(3):
        cells = [(i, j) for i, y in enumerate(centres) for j, x in enumerate(centres) if labels[y, x] == r]
        expected = np.mean([grid[:, i, j].numpy() for i, j in cells], axis=0)
        assert np.allclose(features[r, :8], expected, atol=1e-6)
        assert features[r, 8] == pytest.approx(cam[labels == r].mean(), abs=1e-6)
        assert features[r, 9] == pytest.approx((labels == r).mean())
    assert np.allclose(features[3, :8], grid[:, 0, 0].numpy(), atol=1e-6)  # the cell its first pixel lies in
    assert np.allclose(whole[0, :8], grid.mean(dim=(1, 2)).numpy(), atol=1e-6)
    assert whole[0, 9] == pytest.approx(1.0)


def test_region_level_means_of_real_maps_and_regions_match_the_resampled_grid():
    """Shapes as served: a ResNet-50's stride-8 and -16 maps of a 512 px image, regions at 320 px, 80 x 80 grid."""
    torch.manual_seed(0)
    levels = [torch.randn(1, 64, 64, 64).to(memory_format=torch.channels_last)[0], torch.randn(96, 32, 32)]
    image = np.asarray(Image.new("RGB", (320, 320), (20, 20, 20)))
    image = image.copy()
    image[40:200, 60:250] = (200, 120, 40)
    segmentations = segment_image(image, SuperpixelSpec(scales=(50.0, 400.0)))
    grid = _reference_grid(levels, 320).flatten(1)  # [160, 6400]
    centres = ((np.arange(80) + 0.5) * 4).astype(int)
    for (means, area), labels in zip(region_level_means(levels, 320, segmentations), segmentations, strict=True):
        owner = torch.from_numpy(labels[np.ix_(centres, centres)].ravel())
        n = labels.max() + 1
        sums = torch.zeros(160, n).index_add_(1, owner, grid)
        count = torch.bincount(owner, minlength=n)
        owned = (count > 0).numpy()
        assert owned.sum() >= 2
        np.testing.assert_allclose(means[owned], (sums / count.clamp_min(1)).T.numpy()[owned], rtol=1e-4, atol=1e-5)
        assert area.sum() == pytest.approx(1.0)


def test_the_segment_head_solves_its_regularised_logistic_regression():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.normal(size=300) > 0.8).astype(np.float32)  # a minority class
    w = rng.uniform(1, 5, size=300)
    c = 0.05
    head = fit_segment_head(x, y, w, c=c, max_iter=500)
    # At the optimum the gradient of c * sum(s * loss) + |v|^2 / 2 vanishes (an independent check).
    s = w / w.mean()
    s = s * np.where(y > 0, s.sum() / (2 * (s * y).sum()), s.sum() / (2 * (s * (1 - y)).sum()))
    z = (x - head.mean.numpy()) / head.std.numpy()
    p = head.probabilities(x)
    grad_v = c * z.T @ (s * (p - y)) + head.weight.numpy()
    grad_b = c * np.sum(s * (p - y))
    assert np.abs(grad_v).max() < 1e-3 and abs(grad_b) < 1e-3
    assert ((p > 0.5) == (y > 0)).mean() > 0.85  # it learned the rule
    with pytest.raises(ValueError, match="foreground and background"):
        fit_segment_head(x, np.zeros(300), w)


def test_kfold_deals_every_item_once_into_seeded_folds():
    folds = kfold(list(range(12)), 5, seed=0)
    assert len(folds) == 5 and sorted(i for f in folds for i in f) == list(range(12))
    assert sorted(len(f) for f in folds) == [2, 2, 2, 3, 3]
    assert kfold(list(range(12)), 5, seed=0) == folds
    assert kfold(list(range(12)), 5, seed=1) != folds
    assert sorted(kfold([4, 7, 9], 5, seed=0)) == [[4], [7], [9]]  # leave-one-out below k items


# ---------------------------------------------------------------- the pixel phase on hand-made data


class Stub(nn.Module):
    """A backbone stand-in: the pixel phase reads only cached maps and the heads."""

    num_features = 4
    feature_info = [{"module": "a", "reduction": 8, "num_chs": 3}, {"module": "b", "reduction": 32, "num_chs": 4}]


SIDE, BLOCK = 32, 8  # 4x4 regions of 8x8 pixels


def toy_image(rng, positive, cam_knows, head_knows):
    """One image's cached view: the object is a 2x2 block of regions; the CAM's channel 0 and/or the level
    features' channel 0 show it."""
    grid = np.zeros((4, 4), bool)
    if positive:
        y, x = rng.integers(0, 3, size=2)
        grid[y : y + 2, x : x + 2] = True
    mask = np.kron(grid, np.ones((BLOCK, BLOCK), bool))
    labels = np.arange(16).reshape(4, 4).repeat(BLOCK, 0).repeat(BLOCK, 1)
    last = torch.from_numpy(rng.random((4, 4, 4))).float() * 0.3
    if cam_knows:
        last[0] = torch.from_numpy(grid).float() + 0.05 * last[0]
    levels = rng.normal(size=(16, 3)).astype(np.float32)
    if head_knows:
        levels[:, 0] = 3 * grid.ravel() - 1.5 + 0.2 * levels[:, 0]
    view = PixelView([last.half(), last.half().clone()], [labels], [levels.astype(np.float16)], [np.full(16, 1 / 16)])
    return view, mask


def toy_pixels(cam_knows, head_knows, n_pos=10, n_neg=4, n_unlabelled=0, **settings):
    rng = np.random.default_rng(0)
    members = []
    for m in range(2):
        member = Member(f"m{m}", Stub(), 2, 0.0, WeightInfo("random", (0.0,) * 3, (1.0,) * 3, "-"))
        with torch.no_grad():
            member.head.fc.weight.zero_()
            member.head.fc.weight[1, 0] = 1.0  # class 1's CAM is channel 0 of the last map
        members.append(member)
    s = Settings(input_size=SIDE, refine="superpixels", **settings)
    annotator = Annotator(Ensemble(members, ["Healthy", "Lesion"]), s)
    cache = FeatureCache([], [torch.zeros(0, 4)] * 2)
    labels, probs = [], []
    for i in range(n_pos + n_neg + n_unlabelled):
        positive = i < n_pos or i >= n_pos + n_neg
        view, mask = toy_image(rng, positive, cam_knows, head_knows)
        cache.samples.append(Sample(str(i), None if i >= n_pos + n_neg else ("Lesion" if positive else "Healthy"),
                                    mask=mask if i < n_pos else None))  # fmt: skip
        cache.pixels[i] = view
        labels.append(-1 if i >= n_pos + n_neg else int(positive))
        probs.append([0.03, 0.97] if positive else [0.97, 0.03])
    # pooled features as the backbone pass caches them: each member's last map averaged over space
    cache.pooled = [torch.stack([cache.pixels[i].last_maps[m].float().mean(dim=(1, 2)) for i in cache.pixels])
                    for m in range(2)]  # fmt: skip
    index = list(range(len(labels)))
    stats = MemberStats(index, [np.array(probs)] * 2, [np.full(len(index), 0.1)] * 2)
    heads = Heads([1.0, 1.0], [0.5, 0.5], {}, MemberStats([]), stats)
    split = Split(torch.tensor(labels), torch.tensor([]), torch.tensor([]))
    return fit_pixels(annotator, cache, split, heads, 0.5)


def test_the_k_fold_decision_keeps_the_cam_when_the_head_does_not_beat_it():
    """The level features know nothing; the head can only copy the CAM column it reads: a tie keeps the CAM."""
    result = toy_pixels(cam_knows=True, head_knows=False)
    m = result.metrics
    assert m["cv_folds"] == 5 and m["cv_masks"] == 10 and m["oracle_masks"] == 10
    assert m["val_iou_cam"] > 0.95 and m["val_iou_segments"] <= m["val_iou_cam"]
    assert result.mask_source == "cam" and "refined CAM" in m["decision"]
    # Calibrated thresholds for the version: every rule, every member, and the served rule's.
    stored = result.thresholds()
    assert set(stored["fusion_thresholds"]) == {"mean", "intersection"}
    assert set(stored["member_cam_thresholds"]) == {"m0", "m1"}
    assert stored["cam_threshold"] == stored["fusion_thresholds"][stored["mask_fusion"]]


def test_the_k_fold_decision_takes_the_head_when_it_beats_the_cam():
    result = toy_pixels(cam_knows=False, head_knows=True)
    assert result.metrics["val_iou_segments"] > 0.9 > result.metrics["val_iou_cam"]
    assert result.mask_source == "segments" and result.segment_head is not None
    assert result.segment_head.num_features == 3 + 2


def test_pseudo_masks_from_a_useless_cam_are_dropped_by_the_k_fold_choice_of_lambda():
    """80 pseudo-masks from a CAM that does not see the object teach the head noise: the folds choose
    lambda 0 (oracle masks only) over 0.1 and 1."""
    result = toy_pixels(cam_knows=False, head_knows=True, n_unlabelled=80)
    by_lambda = result.metrics["val_iou_segments_by_lambda"]
    assert result.metrics["pseudo_candidates"] == 80 and result.metrics["negatives"] == 4
    assert by_lambda["0.0"] > by_lambda["1.0"]
    assert result.metrics["seg_lambda"] == 0.0 and result.mask_source == "segments"


def test_without_enough_oracle_masks_the_labels_only_choice_decides():
    result = toy_pixels(cam_knows=True, head_knows=True, n_pos=4, n_unlabelled=20)
    assert result.mask_source == "segments" and "pseudo-masks" in result.metrics["decision"]
    assert result.metrics["seg_lambda"] == 1.0
    assert result.thresholds()["fusion_thresholds"]  # 4 masks still calibrate the CAM thresholds
    cam = toy_pixels(cam_knows=True, head_knows=True, n_pos=4, n_unlabelled=20, labels_only_masks="cam")
    assert cam.mask_source == "cam" and cam.segment_head is None


# ---------------------------------------------------------------- versions


def test_a_version_stores_its_mask_choices_and_calibrated_thresholds(trained_model_dir):
    store = ModelStore(trained_model_dir)
    meta = store.metadata(store.current())
    assert meta.masks.refine == "superpixels" and meta.masks.cam_weights == "contrastive"
    heads = load_file(str(store.path(store.current()) / "heads.safetensors"))
    # The head is stored whichever source serves: evaluate reports it, selection may score it.
    assert "segments.weight" in heads and meta.mask_source in ("cam", "segments")
    th = meta.thresholds
    assert set(th.fusion_thresholds) == {"mean", "intersection"}
    assert th.cam_threshold == th.fusion_thresholds[th.mask_fusion]
    assert set(th.member_cam_thresholds) == {m.name for m in meta.members}
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


def test_a_version_of_2026_11_with_per_member_heads_loads_and_serves_unrefined_cam_masks(
    trained_model_dir, dataset_dir, tmp_path
):
    store = ModelStore(trained_model_dir)
    copy, meta, heads = _copy_version(store, tmp_path)
    for name in ("masks", "format"):  # that release wrote neither
        meta.pop(name)
    meta["mask_source"] = "seg_head"
    heads = {k: v for k, v in heads.items() if not k.startswith("segments.")}
    heads["resnet50.seg.weight"] = torch.zeros(1, 1024, 1, 1)
    (copy / "version.json").write_text(json.dumps(meta))
    save_file(heads, str(copy / "heads.safetensors"))
    annotator = Annotator.from_version(copy, Settings(uncertainty_threshold=1.0), explicit={"uncertainty_threshold"})
    assert annotator.mask_source == "cam" and not annotator.refines and annotator.settings.cam_weights == "class"
    (ann,) = annotator.annotate([Image.open(dataset_dir / "images" / "Lesion" / "lesion_000.png")])
    assert (
        ann.label == "Lesion"
        and ann.mask_source == f"cam:{annotator.settings.mask_fusion}"
        and ann.mask.shape == (128, 128)
    )


def test_a_segment_head_that_does_not_fit_the_members_is_refused(trained_model_dir, tmp_path):
    store = ModelStore(trained_model_dir)
    copy, _meta, heads = _copy_version(store, tmp_path)
    heads.update({"segments.mean": torch.zeros(7), "segments.std": torch.ones(7), "segments.weight": torch.zeros(7),
                  "segments.bias": torch.zeros(())})  # fmt: skip
    save_file(heads, str(copy / "heads.safetensors"))
    with pytest.raises(VersionError, match="segment head reads 7 features"):
        Annotator.from_version(copy, Settings(), explicit=set())


# ---------------------------------------------------------------- last-stage fine-tuning on cached inputs


def _resnet18_cache(labels, signal, pooling="avg"):
    torch.manual_seed(0)
    ensemble = Ensemble.build(["resnet18"], ["dark", "bright"], weights="random", pooling=pooling)
    member = ensemble.members[0]
    images = torch.rand(len(labels), 3, 64, 64) * 0.3 + signal.view(-1, 1, 1, 1) * 0.4
    with torch.no_grad():
        last, levels = member.features_and_levels(member.normalize(images))
    samples = [Sample(str(i), "x") for i in range(len(labels))]
    return ensemble, images, FeatureCache(samples, [member.pool(last)], stage_inputs=[levels[-1]])


@pytest.mark.parametrize("pooling", ["avg", "top10"])
def test_last_stage_fine_tuning_on_cached_inputs_is_kept_where_it_pays(pooling):
    """What enters layer4 is cached; the stem and the stages before it never change, nor BatchNorm statistics.
    A baseline head trained for one epoch leaves the held-out loss high: fine-tuning pays and is kept."""
    from axx_backend.training.finetune import finetune_last_stages, tail_of

    labels = torch.arange(48) % 2
    ensemble, images, cache = _resnet18_cache(labels, labels.float(), pooling)  # class 1: brighter images
    member = ensemble.members[0]
    before = {k: v.clone() for k, v in member.backbone.state_dict().items()}
    assert [type(m).__name__ for m in tail_of(member).modules] == ["Sequential"]  # resnet: layer4 alone
    settings = Settings(finetune_epochs=6, finetune_seconds=300, epochs=1)
    metrics = finetune_last_stages(ensemble, cache, labels, torch.arange(36), torch.arange(36, 48), settings)
    result = metrics["resnet18"]
    assert result["kept"] and result["finetune_val_loss"] < 0.9 * result["frozen_val_loss"]
    assert result["finetune_epochs_run"] == 6  # no early stopping by default (AXX_FINETUNE_PATIENCE=0)
    after = member.backbone.state_dict()
    for key, value in before.items():
        changed = not torch.equal(after[key], value)
        assert changed == (key.startswith("layer4.") and "running" not in key and "num_batches" not in key), key
    with torch.no_grad():  # the cache now holds the fine-tuned stage's features
        fresh = member.pool(member.features(member.normalize(images)))
    assert torch.allclose(cache.pooled[0], fresh, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_last_stage_fine_tuning_trains_under_the_precision_asked_and_keeps_fp32_features(precision):
    """bf16 autocast in the training passes only (AXX_PRECISION): the stage's convolutions run in bf16 while
    gradients flow, in fp32 for the held-out losses and the cached features; the fp32 weights still learn."""
    from axx_backend.training.finetune import finetune_last_stages

    labels = torch.arange(48) % 2
    ensemble, _, cache = _resnet18_cache(labels, labels.float())
    seen: dict[bool, set[torch.dtype]] = {True: set(), False: set()}
    conv = ensemble.members[0].backbone.layer4[0].conv1
    conv.register_forward_hook(lambda _m, _i, out: seen[torch.is_grad_enabled()].add(out.dtype))
    settings = Settings(finetune_epochs=6, finetune_seconds=300, epochs=1, precision=precision)
    result = finetune_last_stages(ensemble, cache, labels, torch.arange(36), torch.arange(36, 48), settings)["resnet18"]
    training_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert seen == {True: {training_dtype}, False: {torch.float32}}
    assert result["finetune_precision"] == precision and result["kept"]
    assert result["finetune_val_loss"] < 0.9 * result["frozen_val_loss"]
    assert conv.weight.dtype == torch.float32 and cache.pooled[0].dtype == torch.float32


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_depthwise_stage_learns_with_its_depthwise_kernels_frozen(precision):
    """MobileNetV2's last stage: pointwise convolutions, BatchNorm affines and the head learn, in the asked
    precision; the depthwise kernels (the slow weight gradient on the CPU) and everything before the stage stay."""
    from torch import nn

    from axx_backend.training.finetune import finetune_member, tail_of

    torch.manual_seed(0)
    member = Ensemble.build(["mobilenetv2_100"], ["dark", "bright"], weights="random").members[0]
    tail = tail_of(member)
    convs = [m for module in tail.modules for m in module.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convs if c.groups == c.in_channels > 1]
    pointwise = [c for c in convs if c.groups == 1]
    assert depthwise and pointwise
    trainable = {id(p) for p in tail.parameters()}
    assert not any(id(c.weight) in trainable for c in depthwise) and all(id(c.weight) in trainable for c in pointwise)
    before = {k: v.clone() for k, v in member.backbone.state_dict().items()}
    labels = torch.arange(24) % 2
    inputs = torch.randn(24, member.level_channels()[-1], 8, 8) + labels.view(-1, 1, 1, 1).float()
    train, val = torch.arange(16), torch.arange(16, 24)
    finetune_member(member, tail, inputs, labels, train, val, 2, 300, precision=precision)
    after = member.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {f"{n}.weight" for n, m in member.backbone.named_modules() if m in pointwise} <= changed
    assert not {f"{n}.weight" for n, m in member.backbone.named_modules() if m in depthwise} & changed
    assert not {k for k in changed if "running" in k}
    assert not {k for k in changed if k.startswith(("conv_stem", "bn1", "blocks.0."))}


def test_a_kept_stage_is_fine_tuned_again_without_each_fold_and_the_served_stage_stays_as_it_was(caplog):
    """The refits replay the member's fine-tuning on two folds of three (for calibration): one feature tensor per
    fold, each its own, and the stage that is served, with its cached features, is the one fine-tuned without
    refits. The log names each refit's fold and shows no held-out loss for it (it has none)."""
    from axx_backend.training.finetune import finetune_last_stages
    from axx_backend.training.heads import CrossFit

    labels = torch.arange(48) % 2
    settings = Settings(finetune_epochs=4, finetune_seconds=300, epochs=1)
    plain_ensemble, _, plain = _resnet18_cache(labels, labels.float())
    finetune_last_stages(plain_ensemble, plain, labels, torch.arange(36), torch.arange(36, 48), settings)
    ensemble, _, cache = _resnet18_cache(labels, labels.float())
    refits = CrossFit(torch.arange(48), np.arange(48) % 3)
    train, val = torch.arange(36), torch.arange(36, 48)
    with caplog.at_level(logging.INFO, logger="axx_backend.training.finetune"):
        metrics = finetune_last_stages(ensemble, cache, labels, train, val, settings, refits)
    epochs_logged = [r.getMessage() for r in caplog.records if " epoch " in r.getMessage()]
    assert sum("held-out loss" in m for m in epochs_logged) == 4  # the served run's epochs
    for fold in (1, 2, 3):
        refit = [m for m in epochs_logged if f"resnet18 (refit without fold {fold}) epoch" in m]
        assert refit and not any("held-out" in m for m in refit), epochs_logged
    assert metrics["resnet18"]["kept"] and metrics["resnet18"]["cross_fit_seconds"] >= 0
    assert len(refits.pooled[0]) == 3 and all(f.shape == cache.pooled[0].shape for f in refits.pooled[0])
    assert not any(torch.allclose(f, cache.pooled[0], atol=1e-3) for f in refits.pooled[0])
    assert not torch.allclose(refits.pooled[0][0], refits.pooled[0][1], atol=1e-3)
    assert torch.allclose(cache.pooled[0], plain.pooled[0], atol=1e-5)
    served, reference = ensemble.members[0].backbone.state_dict(), plain_ensemble.members[0].backbone.state_dict()
    assert all(torch.allclose(served[k].float(), reference[k].float(), atol=1e-5) for k in served)


def test_last_stage_fine_tuning_that_does_not_pay_leaves_the_backbone_as_it_was():
    from axx_backend.training.finetune import finetune_last_stages

    labels = torch.arange(48) % 2
    noise = torch.randint(0, 2, (48,), generator=torch.Generator().manual_seed(3)).float()  # unrelated to labels
    ensemble, _, cache = _resnet18_cache(labels, noise)
    member = ensemble.members[0]
    before = {k: v.clone() for k, v in member.backbone.state_dict().items()}
    pooled = cache.pooled[0].clone()
    settings = Settings(finetune_epochs=6, finetune_seconds=300, finetune_patience=2)
    result = finetune_last_stages(ensemble, cache, labels, torch.arange(36), torch.arange(36, 48), settings)
    assert not result["resnet18"]["kept"] and result["resnet18"]["finetune_epochs_run"] == 2  # early stopping
    assert all(torch.equal(member.backbone.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(cache.pooled[0], pooled)


def test_stage_fine_tuning_stops_after_patience_epochs_without_a_better_held_out_loss(monkeypatch):
    """The stopping rule on a scripted held-out loss: the epochs that improve reset the count."""
    from axx_backend.training import finetune

    labels = torch.arange(48) % 2
    ensemble, _, cache = _resnet18_cache(labels, labels.float())
    member = ensemble.members[0]
    tail = finetune.tail_of(member)
    args = (member, tail, cache.stage_inputs[0], labels, torch.arange(36), torch.arange(36, 48))

    def scripted(losses):
        sequence = iter(losses)
        monkeypatch.setattr(finetune, "held_out_loss", lambda *_: next(sequence))

    scripted([1.0, 0.9, 0.95, 0.8, 0.85, 0.86, 0.7, 0.6])  # frozen, then epochs 0-6
    result = finetune.finetune_member(*args, epochs=7, seconds=300, patience=2)
    assert (result["finetune_epochs_run"], result["finetune_best_epoch"], result["finetune_val_loss"]) == (5, 2, 0.8)
    scripted([1.0, 0.9, 0.95, 0.8, 0.85, 0.86, 0.7, 0.6])
    result = finetune.finetune_member(*args, epochs=7, seconds=300, patience=None)
    assert (result["finetune_epochs_run"], result["finetune_best_epoch"], result["finetune_val_loss"]) == (7, 6, 0.6)
    scripted([1.0, 1.1, 1.2, 0.5])  # nothing beats the frozen stage within the patience: it stays frozen
    result = finetune.finetune_member(*args, epochs=3, seconds=300, patience=2)
    assert (result["finetune_epochs_run"], result["finetune_best_epoch"]) == (2, -1)
    with pytest.raises(ValueError, match="finetune_patience"):
        Settings(finetune_patience=-1)
