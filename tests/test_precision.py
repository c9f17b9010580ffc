"""AXX_PRECISION: `auto` picks bf16 only where the hardware has it; bf16 backbones feed fp32 heads and statistics."""

import numpy as np
import pytest
import torch

from axx_backend.core.settings import Settings
from axx_backend.engine.annotator import Annotator
from axx_backend.engine.ensemble import Ensemble, resolve_precision


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"), [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")]
)
def test_auto_precision_follows_the_cpu(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    # an explicit choice is kept whatever the CPU
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        Settings(precision="fp16").validate()


def test_bf16_backbones_give_fp32_outputs_close_to_fp32():
    torch.manual_seed(0)
    ensemble = Ensemble.build(["mobilenetv2_100"], ["a", "b"], weights="random")
    images = torch.rand(2, 3, 96, 96)
    outputs = {}
    for precision in ("fp32", "bf16"):
        generator = torch.Generator().manual_seed(0)
        outputs[precision] = ensemble.forward_mc(images, 8, generator, precision)[0]
    full, half = outputs["fp32"], outputs["bf16"]
    # the heads, the MC statistics and the CAMs read fp32 tensors in both cases
    assert half.features.dtype == half.logits.dtype == half.mc_probs.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa (rounding 2^-9 per operation, grown through ~50 layers): the features are
    # near the fp32 reference in relative L2 norm, but not equal
    error = (half.features - full.features).norm() / full.features.norm()
    assert 0 < error < 0.1
    assert torch.allclose(half.mc_probs, full.mc_probs, atol=0.02)


def test_annotator_resolves_auto_once(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    ensemble = Ensemble.build(["mobilenetv2_100"], ["a", "b"], weights="random")
    assert Annotator(ensemble, Settings(device="cpu")).precision == "fp32"
    assert Annotator(ensemble, Settings(device="cpu", precision="bf16")).precision == "bf16"


def test_bf16_serving_casts_the_weights_once_and_matches_autocast_bit_for_bit():
    """`prepare(bf16_weights=True)` casts what autocast would cast on every call (convolutions, linear layers),
    once: the outputs must equal autocast over the fp32 weights exactly; the heads and norms stay fp32."""
    import copy

    from torch import nn

    torch.manual_seed(0)
    reference = Ensemble.build(["mobilenetv2_100"], ["a", "b"], weights="random").prepare(torch.device("cpu"))
    served = copy.deepcopy(reference).prepare(torch.device("cpu"), bf16_weights=True)
    backbone = served.members[0].backbone
    convs = [m for m in backbone.modules() if type(m) is nn.Conv2d]
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    assert convs[0].weight.is_contiguous(memory_format=torch.channels_last)  # the layout prepare gave is kept
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert served.members[0].head.fc.weight.dtype == torch.float32
    assert served.casts_weights and not reference.casts_weights

    images = torch.rand(2, 3, 96, 96)
    (want,) = reference.forward_mc(images, 8, torch.Generator().manual_seed(0), "bf16")
    (got,) = served.forward_mc(images, 8, torch.Generator().manual_seed(0), "bf16")
    assert torch.equal(got.features, want.features)
    assert torch.equal(got.mc_probs, want.mc_probs)
    with pytest.raises(ValueError, match="bf16"):  # its weights are bf16 now: fp32 would silently be neither
        served.forward_mc(images, 8, precision="fp32")


def test_a_bf16_annotator_serves_from_cast_weights_unless_grad_cam_makes_the_cams():
    import numpy as np
    from PIL import Image

    def build() -> Ensemble:
        return Ensemble.build(["mobilenetv2_100"], ["a", "b"], weights="random")

    assert not Annotator(build(), Settings(device="cpu", precision="fp32")).ensemble.casts_weights
    assert Annotator(build(), Settings(device="cpu", precision="bf16")).ensemble.casts_weights
    # grad-cam's autograd pass runs the members in fp32: their weights stay fp32, and a mask is still made
    settings = Settings(device="cpu", precision="bf16", cam_method="xgradcam", input_size=96)
    settings = settings.replace(uncertainty_threshold=1.01)  # nobody uncertain: the image takes the mask path
    annotator = Annotator(build(), settings)
    assert not annotator.ensemble.casts_weights
    image = Image.fromarray((np.random.default_rng(0).random((96, 96, 3)) * 255).astype(np.uint8))
    (annotation,) = annotator.annotate([image])
    assert annotation.mask is not None and annotation.mask_source.startswith("cam:")


def test_near_a_decision_is_where_a_small_move_changes_the_label_or_the_flag():
    from axx_backend.engine.uncertainty import decide, near_a_decision

    sure0, sure1 = [0.9, 0.1], [0.1, 0.9]

    def near(probs, entropy, margin=0.05):
        return near_a_decision([np.array(p) for p in probs], entropy, 0.5, 2, None, margin)

    # member 0 sits 0.03 under the threshold: uncertain, it would make two uncertain members, a flag
    assert near([sure0, sure0, sure0], [0.47, 0.9, 0.1])
    # the same member beside two sure ones: one uncertain member at most, and its vote agrees either way
    assert not near([sure0, sure0, sure0], [0.47, 0.1, 0.1])
    # ... even when it votes for the other class: the two sure members keep the majority
    assert not near([sure1, sure0, sure0], [0.47, 0.1, 0.1])
    # a sure member whose two classes are 0.04 apart: swapping them swaps the majority
    assert near([[0.52, 0.48], sure0, sure1], [0.1, 0.1, 0.1])
    assert not near([[0.7, 0.3], sure0, sure1], [0.1, 0.1, 0.1])
    # nothing is near without a margin, and outside it
    assert not near([sure0, sure0, sure0], [0.47, 0.9, 0.1], margin=0.0)
    assert not near([sure0, sure0, sure0], [0.47, 0.9, 0.1], margin=0.03)
    # the answer agrees with trying the moves by hand on decide
    moved = decide([np.array(sure0)] * 3, [0.51, 0.9, 0.1], 0.5, 2)
    assert moved.flagged and not decide([np.array(sure0)] * 3, [0.47, 0.9, 0.1], 0.5, 2).flagged


def test_near_a_small_threshold_only_entropies_within_a_factor_of_it_can_cross():
    """A version sure of all its training images calibrates a tiny review threshold; bf16 moves such small
    entropies by a share of themselves, so the 0.05 margin alone would call every sure image near (all of them
    run again in fp32: bf16 serving slower than fp32)."""
    from axx_backend.engine.uncertainty import ENTROPY_REACH, near_a_decision

    sure = [np.array([0.999, 0.001])] * 3
    t = 0.003

    def near(entropy, threshold=t):
        return near_a_decision(sure, entropy, threshold, 2, None, 0.05)

    one_uncertain = [1.0, 0.0]  # a second uncertain member would flag
    assert near([t * 1.5, *one_uncertain])
    assert near([t / 1.5, *one_uncertain])
    assert near([t * ENTROPY_REACH * 0.95, *one_uncertain])
    assert near([t / ENTROPY_REACH / 0.95, *one_uncertain])
    # inside the margin (0.05) of t, but out of bf16's reach
    assert not near([t * ENTROPY_REACH * 1.05, *one_uncertain])
    assert not near([t / ENTROPY_REACH / 1.05, *one_uncertain])
    # from a threshold of 0.05 / (ENTROPY_REACH - 1) the margin is the narrower bound: the reach changes nothing
    for threshold in (0.1, 0.5, 0.9):
        assert near([threshold + 0.049, 1.0, 0.0], threshold)
        assert near([threshold - 0.049, 1.0, 0.0], threshold)
        assert not near([threshold - 0.051, 1.0, 0.0], threshold)


def test_bf16_runs_the_images_near_a_decision_again_in_fp32():
    """The served bf16 annotator's rechecked images carry what a fp32 annotator computes for them (statistics,
    maps, the segment head's levels, so decisions and masks), the others what bf16 alone computes; the images
    rechecked are those bf16 alone puts near the review threshold."""
    import copy

    import numpy as np
    from PIL import Image

    from axx_backend.engine.uncertainty import near_a_decision

    torch.manual_seed(0)
    ensemble = Ensemble.build(["mobilenetv2_100"], ["a", "b"], weights="random")
    with torch.no_grad():  # sharper heads: entropies spread over [0, 1], and bf16 moves some by 0.01-0.15
        ensemble.members[0].head.fc.weight.mul_(30)
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)) for _ in range(8)]
    settings = Settings(device="cpu", input_size=64, mc_samples=8, min_uncertain_to_flag=1)
    fp32 = Annotator(copy.deepcopy(ensemble), settings.replace(precision="fp32"))
    plain = Annotator(
        copy.deepcopy(ensemble), settings.replace(precision="bf16", precision_recheck=0.0, precision_recheck_mask=0.0)
    )
    assert plain.recheck_ensemble is None
    want, alone = (a.forward(images, levels=True) for a in (fp32, plain))  # (the statistics ignore the threshold)
    # the review threshold halfway between fp32's and bf16's entropy of the image bf16 moves most: bf16 alone
    # decides that image's flag differently whatever this CPU's bf16 kernels round, and it lies within the margin
    moved = (want.stats[0].entropy - alone.stats[0].entropy).abs()
    b = int(moved.argmax())
    assert moved[b] > 1e-3
    threshold = float(want.stats[0].entropy[b] + alone.stats[0].entropy[b]) / 2
    margin = float(moved[b]) / 2 + 0.01
    for annotator in (fp32, plain):
        annotator.settings = annotator.settings.replace(uncertainty_threshold=threshold)
    served = Annotator(
        copy.deepcopy(ensemble),
        settings.replace(precision="bf16", precision_recheck=margin, uncertainty_threshold=threshold),
    )
    assert served.ensemble.casts_weights and not served.recheck_ensemble.casts_weights
    got = served.forward(images, levels=True)
    rule = (threshold, 1, None, margin)
    expected = [i for i in range(len(images)) if near_a_decision(alone.member_probs(i), alone.member_entropy(i), *rule)]
    assert 0 < len(expected) < len(images)
    assert got.rechecked == expected and served.rechecked == len(expected)
    others = torch.tensor([i for i in range(len(images)) if i not in expected])
    # the recheck runs one image per pass: compared with fp32 passes of one image each, as fp32 of a batch of
    # eight may pick other kernels and round differently (seen: 1.8e-5 in a level map of this test; one image
    # at a time they agree bit for bit here, the tolerance is for other CPUs' kernels)
    close = {"rtol": 1e-4, "atol": 1e-5}
    for b in expected:
        one = fp32.forward([images[b]], levels=True)
        torch.testing.assert_close(got.stats[0].entropy[b], one.stats[0].entropy[0], **close)
        torch.testing.assert_close(got.stats[0].mean_probs[b], one.stats[0].mean_probs[0], **close)
        torch.testing.assert_close(got.outputs[0].features[b], one.outputs[0].features[0], **close)
        for mine, theirs in zip(got.outputs[0].levels, one.outputs[0].levels, strict=True):
            torch.testing.assert_close(mine[b], theirs[0], **close)
    assert torch.equal(got.stats[0].entropy[others], alone.stats[0].entropy[others])
    assert torch.equal(got.outputs[0].features[others], alone.outputs[0].features[others])

    flags = {name: [a.decide(f, i).flagged for i in range(len(images))] for name, a, f in
             (("fp32", fp32, want), ("plain", plain, alone), ("served", served, got))}  # fmt: skip
    assert flags["served"] == flags["fp32"] != flags["plain"]  # bf16 alone flips image b's flag; the recheck does not

    # a caller that holds both ensembles already (training's timing) serves the same from them without a copy
    shared = Annotator(plain.ensemble, served.settings, recheck_twin=fp32.ensemble)
    assert shared.recheck_ensemble is fp32.ensemble
    again = shared.forward(images, levels=True)
    assert again.rechecked == expected
    torch.testing.assert_close(again.stats[0].entropy, got.stats[0].entropy, rtol=0, atol=0)


def test_training_measures_bf16_on_the_annotator_serving_loads(tmp_path):
    """`served_build` (training's bf16 step) gives, for the version about to be written, the annotator
    `Annotator.from_version` loads once it is written: the version's thresholds and recorded choices over the
    training settings (here a refinement and CAM weights the settings do not ask for), its member weights, negative
    classes and input size, and the same statistics and masks bit for bit."""
    import types

    from PIL import Image

    from axx_backend.core.version_meta import MaskConfig, MemberSpec, Thresholds, VersionMeta
    from axx_backend.training.trainer import served_build, write

    torch.manual_seed(0)
    classes = ("background", "thing")
    ensemble = Ensemble.build(["mobilenetv2_100", "tf_efficientnet_lite0"], list(classes), weights="random")
    temperatures, weights = (1.3, 0.8), (0.7, 1.2)
    for member, t in zip(ensemble.members, temperatures, strict=True):
        member.temperature.fill_(t)
    specs = tuple(
        MemberSpec(m.name, finetuned=True, mean=tuple(m.weight_info.mean), std=tuple(m.weight_info.std),
                   temperature=t, weight=w)
        for m, t, w in zip(ensemble.members, temperatures, weights, strict=True)
    )  # fmt: skip
    meta = VersionMeta(
        classes=classes,
        members=specs,
        negative_classes=("background",),
        input_size=64,
        mc_samples=4,
        masks=MaskConfig("contrastive", "superpixels", (60.0, 120.0)),
        thresholds=Thresholds(uncertainty_threshold=0.37, cam_threshold=0.41, mask_fusion="votes:1", precision="fp32"),
    )
    # training's settings, other than the version in everything it records or calibrates
    settings = Settings(
        device="cpu", input_size=96, mc_samples=4, negative_pattern="^$", refine="none", cam_weights="class"
    )
    served, folded = served_build(meta, ensemble, None, settings)
    built = served("fp32", folded)

    version = write(tmp_path, ensemble, types.SimpleNamespace(segment_head=None), meta)
    loaded = Annotator.from_version(tmp_path / version, settings, explicit=set())
    untimed = {"precision_recheck": 0.0, "precision_recheck_mask": 0.0}  # the build checks nothing again itself
    assert built.settings == loaded.settings.replace(**untimed)
    assert built.refines and built.settings.cam_weights == "contrastive" and built.settings.cam_threshold == 0.41
    assert built.settings.superpixel_scales == (60.0, 120.0) and built.settings.uncertainty_threshold == 0.37
    assert (built.weights, built.negative, built.input_size) == (loaded.weights, loaded.negative, loaded.input_size)
    assert built.weights == list(weights) and built.negative == {"background"} and built.input_size == 64
    assert built.mask_source == loaded.mask_source == "cam"

    rng = np.random.default_rng(1)
    images = [Image.fromarray((rng.random((80, 80, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    mine, theirs = built.forward(images), loaded.forward(images)
    for a, b in zip(mine.stats, theirs.stats, strict=True):
        assert torch.equal(a.entropy, b.entropy) and torch.equal(a.mean_probs, b.mean_probs)
    for a, b in zip(built.conclude(mine), loaded.conclude(theirs), strict=True):
        assert a.label == b.label and a.flagged == b.flagged
        assert (a.mask is None) == (b.mask is None) and (a.mask is None or np.array_equal(a.mask, b.mask))


def test_worst_iou_within_is_the_worst_flip_of_the_pixels_near_the_threshold():
    """Checked against trying every mask that differs only where the score is within the margin."""
    import itertools

    from axx_backend.engine.masks import iou, worst_iou_within

    rng = np.random.default_rng(0)
    for _ in range(20):
        score = rng.random((3, 4)).astype(np.float32)
        threshold, margin = float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.05, 0.2))
        mask = score > threshold
        unsure = np.flatnonzero(np.abs(score - threshold) < margin)
        worst = 1.0
        for flips in itertools.product([False, True], repeat=len(unsure)):
            other = mask.copy().ravel()
            other[unsure] = np.where(flips, ~other[unsure], other[unsure])
            worst = min(worst, iou(other.reshape(mask.shape), mask))
        assert worst_iou_within(score, threshold, margin) == pytest.approx(worst)
    # nothing near the threshold: the mask cannot move
    assert worst_iou_within(np.array([[0.0, 1.0]]), 0.5, 0.1) == 1.0
    # an empty mask with pixels near the threshold can become a mask: IoU 0
    assert worst_iou_within(np.array([[0.45, 0.0]]), 0.5, 0.1) == 0.0


def test_bf16_concludes_the_masks_it_could_move_far_from_an_fp32_pass():
    """Images whose bf16 score map sits so near the mask threshold that a move by less than the margin could
    leave the mask under `precision_recheck_iou` against fp32's are concluded again from an fp32 pass (their
    masks are fp32's); the other masks are bf16's own."""
    import copy

    from PIL import Image

    from axx_backend.engine.masks import iou, worst_iou_within

    torch.manual_seed(0)
    ensemble = Ensemble.build(["mobilenetv2_100"], ["a", "b"], weights="random")
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)) for _ in range(8)]
    # nobody uncertain and one member: every image takes the mask path, and no decision is near the edge
    settings = Settings(device="cpu", input_size=64, mc_samples=4, uncertainty_threshold=1.01)
    settings = settings.replace(negative_pattern="^$", precision_recheck_mask=0.005)
    fp32 = Annotator(copy.deepcopy(ensemble), settings.replace(precision="fp32"))
    plain = Annotator(
        copy.deepcopy(ensemble), settings.replace(precision="bf16", precision_recheck=0.0, precision_recheck_mask=0.0)
    )
    want, alone = (a.forward(images) for a in (fp32, plain))
    assert not want.rechecked and not alone.rechecked

    def score(annotator, fwd, b):
        decision = annotator.decide(fwd, b)
        return annotator.mask_score(fwd, b, decision.label, decision.agreeing)[:2]

    # the floor between the images' worst cases: some masks are on the edge, some not, whatever the CPU rounds
    worst = [worst_iou_within(*score(plain, alone, b), 0.005) for b in range(len(images))]
    floor = float(np.median(worst))
    edge = [b for b in range(len(images)) if worst[b] < floor]
    assert 0 < len(edge) < len(images)
    served = Annotator(copy.deepcopy(ensemble), settings.replace(precision="bf16", precision_recheck_iou=floor))
    got = served.annotate(images)
    assert served.rechecked_masks == served.rechecked == len(edge)
    wanted, alone_masks = fp32.conclude(want), plain.conclude(alone)
    for b, annotation in enumerate(got):
        reference = wanted[b] if b in edge else alone_masks[b]
        assert annotation.mask is not None and reference.mask is not None
        assert iou(annotation.mask, reference.mask) > 0.99  # fp32 of a smaller batch may round a last bit
        if b not in edge:
            assert np.array_equal(annotation.mask, reference.mask)


def test_the_recheck_margin_is_the_narrowest_tried_that_calls_every_decision_bf16_changed_near():
    """Training widens the bf16 recheck margin until every image whose decision bf16 changed on its calibration
    images is near a decision in bf16; images no margin tried reaches do not widen it."""
    from axx_backend.engine.uncertainty import near_a_decision
    from axx_backend.training.recheck_margin import MARGINS, MemberView, Rule, changed_by_bf16, margin_for

    rule = Rule(threshold=0.5, min_uncertain=2, weights=None)
    sure = [np.array([0.98, 0.02])] * 3

    def view(h0):  # member 1 uncertain: member 0 crossing the threshold flags the image
        return MemberView(sure, [h0, 0.9, 0.05])

    fp32 = [view(0.43), view(0.40), view(0.10), view(0.30)]
    bf16 = [view(0.58), view(0.62), view(0.95), view(0.32)]  # moved by 0.15, 0.22, 0.85 across; the last not
    changed = changed_by_bf16(fp32, bf16, rule)
    assert changed == bf16[:3]

    def needed(v):  # the narrowest margin tried that reaches v, by trying them all
        return next((m for m in MARGINS if near_a_decision(v.probs, v.entropy, 0.5, 2, None, m)), None)

    assert [needed(v) for v in changed] == [0.1, 0.15, None]  # 0.08 and 0.12 from the threshold; 0.45: too far
    assert margin_for(changed[:1], rule, 0.05) == (0.1, 0)
    assert margin_for(changed, rule, 0.05) == (0.15, 1)
    assert margin_for([], rule, 0.05) == (0.05, 0)
    assert margin_for(changed[:1], rule, 0.12) == (0.12, 0)  # never under the setting it starts from


def test_the_recheck_margin_covers_the_largest_entropy_move_bf16_made_near_the_review_threshold():
    """A changed decision is rare; the moves that make them show on every image: the margin also widens to cover
    the largest move of an entropy within the widest margin tried of the threshold (in either precision)."""
    from axx_backend.engine.uncertainty import MCStats
    from axx_backend.training.recheck_margin import MARGINS, Rule, covering, largest_move_near, measure_margin, views

    def stats(entropies):  # one member's statistics of three images, all sure of class 0
        h = torch.tensor(entropies)
        probs = torch.tensor([[0.98, 0.02]] * len(entropies))
        return MCStats(probs, h, torch.zeros_like(h), torch.zeros_like(h))

    t = 0.5
    # member 0: moves of 0.12 (near t) and 0.25 (0.5 and 0.25 from t: never within 0.2); member 1 sure
    fp32 = [stats([0.45, 0.0, 0.2]), stats([0.0, 0.0, 0.0]), stats([0.1, 0.1, 0.1])]
    bf16 = [stats([0.33, 0.25, 0.21]), stats([0.0, 0.0, 0.0]), stats([0.1, 0.1, 0.1])]
    assert largest_move_near(views(fp32), views(bf16), t) == pytest.approx(0.12)
    assert largest_move_near(views(fp32), views(bf16), 0.3) == pytest.approx(0.25)  # near 0.3 in bf16
    assert largest_move_near(views(fp32), views(bf16), 0.95) == 0.0  # none within 0.2
    margin, seen = measure_margin([(fp32, bf16)], Rule(t, 2, None), 0.05)
    assert seen["changed"] == 0 and margin == 0.15 and seen["largest_move"] == pytest.approx(0.12)
    assert covering(0.0, 0.05) == 0.05 and covering(0.05, 0.05) == 0.05 and covering(0.051, 0.05) == 0.075
    assert covering(0.9, 0.05) == MARGINS[-1] and covering(0.01, 0.12) == 0.12


def _score_pair(move: float, rng: np.random.Generator, threshold: float = 0.5):
    """A 32x32 score map whose pixels sit 0.02-0.045 from `threshold` (a sure square inside), and the same map
    with those pixels moved away from it by up to `move` (the largest exactly `move`): none crosses."""
    from axx_backend.training.recheck_margin import MaskPair

    fp32 = threshold + rng.uniform(0.02, 0.045, (32, 32)) * np.where(rng.random((32, 32)) < 0.5, 1, -1)
    fp32[8:24, 8:24] = 0.95
    shift = np.zeros_like(fp32)
    near = np.abs(fp32 - threshold) < 0.05
    shift[near] = rng.uniform(0, move, near.sum())
    shift.flat[np.flatnonzero(near)[0]] = move
    bf16 = fp32 + shift * np.sign(fp32 - threshold)  # away from the threshold: no pixel crosses
    return MaskPair(fp32.astype(np.float32), bf16.astype(np.float32), threshold)


def test_the_mask_margin_covers_the_largest_score_move_of_nine_images_in_ten():
    """The mask margin is the narrowest tried under which the largest move near the threshold of at least 90 % of
    the masked images lies (for them the served test `worst_iou_within` is exact); images with no pixel near the
    threshold do not count, and the margin is never under the setting it starts from."""
    from axx_backend.training.recheck_margin import MASK_MARGINS, MaskPair, largest_score_move, mask_margin

    rng = np.random.default_rng(0)
    moves = [0.004, 0.006, 0.008, 0.009, 0.012, 0.013, 0.014, 0.018, 0.019, 0.025, 0.04]
    pairs = [_score_pair(m, rng) for m in moves]
    assert [largest_score_move(p) for p in pairs] == pytest.approx(moves, abs=1e-6)
    far = MaskPair(np.full((8, 8), 0.9, np.float32), np.full((8, 8), 0.8, np.float32), 0.5)  # nothing near 0.5
    assert largest_score_move(far) is None

    def by_hand(found, floor):  # the narrowest margin tried with a share of at least 0.9 of the moves within it
        tried = sorted({floor, *(m for m in MASK_MARGINS if m > floor)})
        return next(m for m in tried if sum(x <= m + 1e-9 for x in found) >= 0.9 * len(found))

    margin, seen = mask_margin([*pairs, far], 0.01, 0.9)
    assert margin == by_hand(moves, 0.01) == 0.03  # 10 of 11 within 0.03, 9 of 11 within 0.02
    assert seen["masked"] == 12 and seen["near"] == 11 and seen["under_floor"] == 0
    assert seen["largest_move"] == pytest.approx(0.04, abs=1e-6)
    assert mask_margin(pairs[:10], 0.01, 0.9)[0] == by_hand(moves[:10], 0.01) == 0.02  # 9 of 10 within 0.02
    assert mask_margin(pairs[:7], 0.01, 0.9)[0] == by_hand(moves[:7], 0.01) == 0.015  # 4 of 7 within 0.01
    assert mask_margin(pairs[:4], 0.01, 0.9)[0] == 0.01
    assert mask_margin(pairs[:4], 0.02, 0.9)[0] == 0.02  # never under the setting
    assert mask_margin([], 0.01, 0.9)[0] == 0.01


def test_the_mask_margin_widens_to_reach_a_mask_bf16_left_under_the_floor():
    """A mask bf16 moved under the IoU floor against fp32's widens the margin to the narrowest tried at which the
    served test sends it to fp32 (`worst_iou_within` on bf16's map, tried margin by margin), whatever the moves
    of the other images; one no margin tried reaches is counted and widens nothing."""
    from axx_backend.engine.masks import iou, worst_iou_within
    from axx_backend.training.recheck_margin import MASK_MARGINS, MaskPair, mask_margin

    rng = np.random.default_rng(1)
    calm = [_score_pair(0.005, rng) for _ in range(9)]
    # a region of 0.25 of the map whose score sits 0.02-0.025 over the threshold in bf16 and under it in fp32
    fp32 = np.full((16, 16), 0.1, np.float32)
    fp32[:8, :8] = 0.9
    fp32[8:, :8] = 0.48
    bf16 = fp32.copy()
    bf16[8:, :8] = 0.5 + np.linspace(0.02, 0.025, 64).reshape(8, 8)
    crossed = MaskPair(fp32, bf16, 0.5)
    assert iou(fp32 > 0.5, bf16 > 0.5) == pytest.approx(0.5)
    reach = next(m for m in MASK_MARGINS if worst_iou_within(bf16, 0.5, m) < 0.9)
    assert reach == 0.03
    margin, seen = mask_margin([*calm, crossed], 0.01, 0.9)
    assert margin == reach and seen["under_floor"] == 1 and seen["missed"] == 0
    # moved so far from the threshold in bf16 that no margin tried sees it: counted, no wider margin
    far = MaskPair(fp32, np.where(fp32 == 0.48, 0.7, fp32).astype(np.float32), 0.5)
    margin, seen = mask_margin([*calm, far], 0.01, 0.9)
    assert margin == 0.01 and seen["under_floor"] == 1 and seen["missed"] == 1


def test_the_served_time_ratio_weighs_load_that_comes_midway_on_both_precisions(monkeypatch):
    """A job that starts halfway through the timing and triples every pass's cost from then on: the two annotators
    take turns, so the ratio stays their own (1 : 2), where timing one after the other would put the load on the
    second alone (1 : 5). Time is a virtual clock that each pass advances by its cost."""
    import types

    from axx_backend.training import recheck_margin

    clock = [0.0]

    class Timed:
        def __init__(self, cost_per_image: float) -> None:
            self.cost, self.settings, self.passes = cost_per_image, types.SimpleNamespace(batch_size=4), 0

        def annotate(self, images: list) -> None:
            load = 3.0 if clock[0] >= 0.6 else 1.0
            clock[0] += self.cost * len(images) * load
            self.passes += 1

    monkeypatch.setattr(recheck_margin, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    images = torch.zeros(32, 3, 8, 8, dtype=torch.uint8)
    # a warm-up batch each (0.04 + 0.08), then eight pairs of batches of 4 (0.04 + 0.08 each without the load): the
    # load starts at 0.6, with pair 5; one after the other the first would take 0.32 and the second 1.6
    bf16, fp32 = Timed(0.01), Timed(0.02)
    ratio = recheck_margin.served_time_ratio(bf16, fp32, images)
    assert bf16.passes == fp32.passes == 9
    assert ratio == pytest.approx(0.5, abs=0.05)
