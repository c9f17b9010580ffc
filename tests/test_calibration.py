"""Calibration on the validation split: temperature and the uncertainty threshold."""

import numpy as np
import pytest
import torch

from axx_backend.training.calibration import calibrate_uncertainty_threshold, fit_temperature, risk_coverage

from .head_only import HeadOnlyMember

RIGHT, WRONG = np.array([0.95, 0.05]), np.array([0.4, 0.6])


def members(probs_per_image, entropies_per_image):
    """[image][member] -> per-member arrays, as the trainer passes them."""
    probs = [np.array([img[m] for img in probs_per_image]) for m in range(3)]
    entropy = [np.array([img[m] for img in entropies_per_image]) for m in range(3)]
    return probs, entropy


def test_without_errors_the_threshold_spends_the_budget_where_it_can_and_else_keeps_the_default():
    # Members 2 and 3 are equally unsure of every image: flagging any image flags at least 70 % of them,
    # over the budget: nothing can be flagged and the default stays.
    probs, entropy = members([[RIGHT] * 3] * 10, [[0.01 * i, 0.02, 0.03] for i in range(10)])
    assert calibrate_uncertainty_threshold(probs, entropy, np.zeros(10), 0.2, 2, default=0.5) == 0.5
    # Two members as unsure as each other, image by image: the two most uncertain images (20 %) are flagged,
    # even though they are right (the flag rate on new images holds the budget).
    probs, entropy = members([[RIGHT] * 3] * 10, [[0.01 * i, 0.01 * i, 0.0] for i in range(10)])
    threshold = calibrate_uncertainty_threshold(probs, entropy, np.zeros(10), 0.2, 2, default=0.5)
    assert 0.07 <= threshold < 0.08


def test_the_threshold_flags_the_uncertain_errors_within_the_budget():
    # Nine right and confident images; one wrong image where two members are fairly uncertain.
    imgs = [[RIGHT] * 3] * 9 + [[WRONG, WRONG, RIGHT]]
    ents = [[0.1, 0.12, 0.08]] * 9 + [[0.3, 0.35, 0.1]]
    probs, entropy = members(imgs, ents)
    labels = np.zeros(10)
    threshold = calibrate_uncertainty_threshold(probs, entropy, labels, 0.2, 2, default=0.5)
    assert 0.12 <= threshold < 0.35  # flags the wrong image (two uncertain, or no majority), not the right ones
    # With no budget, nothing may be flagged: the threshold must keep all ten unflagged.
    assert calibrate_uncertainty_threshold(probs, entropy, labels, 0.0, 2, default=0.5) >= 0.35


def test_fit_temperature_recovers_the_scale_of_overconfident_logits():
    torch.manual_seed(0)
    true_logits = torch.randn(4000, 3) * 1.5
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    t = fit_temperature(true_logits * 3.0, labels)  # logits three times too sharp
    assert t == pytest.approx(3.0, rel=0.1)


def test_fit_temperature_stays_moderate_on_a_tiny_separable_split():
    logits = torch.tensor([[4.0, -4.0], [-5.0, 5.0], [3.0, -3.0]])
    t = fit_temperature(logits, torch.tensor([0, 1, 0]))
    assert 0.2 < t < 1.0  # sharpened, but not driven to the bound by three images


def test_risk_coverage_is_accuracy_of_the_most_confident_share():
    correct = np.array([1, 1, 0, 1, 0, 0, 1, 1, 1, 0])
    conf = np.linspace(1.0, 0.1, 10)  # already sorted, most confident first
    points = {p["coverage"]: p["accuracy"] for p in risk_coverage(correct, conf)}
    assert points[0.2] == 1.0 and points[0.3] == pytest.approx(2 / 3) and points[1.0] == 0.6


def test_weights_decide_between_confident_members_that_disagree():
    from axx_backend.engine.uncertainty import decide

    a, b = np.array([0.9, 0.1]), np.array([0.2, 0.8])
    probs, entropy = [a, b, b], [0.1, 0.1, 0.1]
    assert decide(probs, entropy, 0.5).label == 1  # the plain majority
    heavy = decide(probs, entropy, 0.5, weights=[0.8, 0.1, 0.1])
    assert heavy.label == 0 and heavy.agreeing == [0] and not heavy.flagged
    tie = decide([a, b], [0.1, 0.1], 0.5, weights=[0.5, 0.5])
    assert tie.flagged and "no majority" in tie.reason


def test_member_weights_give_a_member_no_better_than_chance_little_say():
    from axx_backend.training.heads import member_weights, stratified_folds

    torch.manual_seed(0)
    labels = torch.randint(0, 2, (400,))
    good = torch.nn.functional.one_hot(labels, 2).float() * 3 - 1.5 + 0.5 * torch.randn(400, 2)
    noise = torch.randn(400, 2)
    weights = member_weights([good, good.clone(), noise], labels)
    assert sum(weights) == pytest.approx(1.0) and weights[2] <= 0.1 and weights[0] + weights[1] >= 0.9
    # Equal members keep equal weights (a tie goes to equal weights).
    assert member_weights([good, good.clone()], labels) == [0.5, 0.5]
    folds = stratified_folds(np.array([0] * 10 + [1] * 4), 5, seed=0)
    assert folds.max() == 3  # a class of 4 allows 4 folds, each holding one of its items
    assert all(np.bincount(folds[10:]) == 1) and sorted(np.bincount(folds[:10])) == [2, 2, 3, 3]


def test_a_backbone_fine_tuned_on_the_train_split_is_calibrated_on_the_held_out_split_only():
    from types import SimpleNamespace

    from axx_backend.core.settings import Settings
    from axx_backend.engine.ensemble import MCDropoutHead
    from axx_backend.training.features import FeatureCache
    from axx_backend.training.heads import Split, train_member_heads

    torch.manual_seed(0)
    labels = torch.arange(60) % 2
    pooled = torch.nn.functional.one_hot(labels, 2).float() * 2 + torch.randn(60, 2)
    members = [
        HeadOnlyMember(name=f"m{i}", head=MCDropoutHead(2, 2, 0.3), temperature=torch.ones(())) for i in range(2)
    ]
    ensemble = SimpleNamespace(members=members, classes=["a", "b"])
    cache = FeatureCache(samples=[], pooled=[pooled, pooled.clone()])
    split = Split(labels, train=torch.arange(45), val=torch.arange(45, 60))
    settings = Settings(preset="offline", epochs=20)
    tuned = train_member_heads(ensemble, cache, split, settings, backbone_saw_train=True)
    assert tuned.calibration.index == list(range(45, 60))
    assert all(len(h) == 15 for h in tuned.calibration.entropy) and all(len(p) == 15 for p in tuned.calibration.probs)
    frozen = train_member_heads(ensemble, cache, split, settings)
    assert frozen.calibration.index == list(range(60)) and all(len(h) == 60 for h in frozen.calibration.entropy)


def test_stages_fine_tuned_again_without_each_fold_calibrate_every_labelled_image():
    """With `refits`, each fold's heads train and predict on the features of a stage that never saw that fold:
    here the final features give the labels away (as a stage fine-tuned on them would) and the refitted ones are
    noise, so out-of-fold accuracy must fall to chance, over every labelled image, not the held-out split."""
    from types import SimpleNamespace

    from axx_backend.core.settings import Settings
    from axx_backend.engine.ensemble import MCDropoutHead
    from axx_backend.training.features import FeatureCache
    from axx_backend.training.heads import CrossFit, Split, train_member_heads

    torch.manual_seed(0)
    labels = torch.arange(90) % 2
    leaked = torch.nn.functional.one_hot(labels, 2).float() * 5
    member = HeadOnlyMember(name="m", head=MCDropoutHead(2, 2, 0.3), temperature=torch.ones(()))
    ensemble = SimpleNamespace(members=[member], classes=["a", "b"])
    cache = FeatureCache(samples=[], pooled=[leaked])
    split = Split(labels, train=torch.arange(70), val=torch.arange(70, 90))
    settings = Settings(preset="offline", epochs=20)
    folds = np.arange(90) % 3
    refits = CrossFit(torch.arange(90), folds, {0: [torch.randn(90, 2) for _ in range(3)]})
    heads = train_member_heads(ensemble, cache, split, settings, backbone_saw_train=True, refits=refits)
    assert heads.calibration.index == list(range(90))
    assert heads.metrics["m"]["oof_accuracy"] < 0.7
    held_out = train_member_heads(ensemble, cache, split, settings, backbone_saw_train=True)
    assert held_out.calibration.index == list(range(70, 90)) and held_out.metrics["m"]["oof_accuracy"] == 1.0
    with pytest.raises(ValueError, match="other rows"):
        train_member_heads(ensemble, cache, split, settings, True, CrossFit(torch.arange(80), folds[:80]))


def test_members_vote_equally_unless_learned_weights_are_asked_for():
    """`member_weights=equal` (default) serves the paper's plain majority and records what the held-out log-loss
    would have chosen; `learned` serves that choice (a member of pure noise gets little say)."""
    from types import SimpleNamespace

    from axx_backend.core.settings import Settings
    from axx_backend.engine.ensemble import MCDropoutHead
    from axx_backend.training.features import FeatureCache
    from axx_backend.training.heads import Split, train_member_heads

    torch.manual_seed(0)
    labels = torch.arange(80) % 2
    good = torch.nn.functional.one_hot(labels, 2).float() * 2 + torch.randn(80, 2)
    noise = torch.randn(80, 2)
    split = Split(labels, train=torch.arange(60), val=torch.arange(60, 80))
    served = {}
    for rule in ("equal", "learned"):
        members = [
            HeadOnlyMember(name=f"m{i}", head=MCDropoutHead(2, 2, 0.3), temperature=torch.ones(())) for i in range(3)
        ]
        ensemble = SimpleNamespace(members=members, classes=["a", "b"])
        cache = FeatureCache(samples=[], pooled=[good, good.clone(), noise])
        heads = train_member_heads(ensemble, cache, split, Settings(preset="offline", epochs=30, member_weights=rule))
        learned = [heads.metrics[f"m{i}"]["learned_weight"] for i in range(3)]
        assert learned[2] <= 0.1 and sum(learned) == pytest.approx(1.0)
        assert [heads.metrics[f"m{i}"]["weight"] for i in range(3)] == heads.weights
        served[rule] = (heads.weights, learned)
    assert served["equal"][0] == [pytest.approx(1 / 3, abs=1e-4)] * 3
    assert served["learned"][0] == served["learned"][1]


def test_the_threshold_spends_the_budget_even_where_the_errors_are_sure_ones():
    # Eight right images; two wrong ones on which every member is sure; the two most uncertain images are right.
    # Flagging them lowers selective accuracy here (8/8 unflagged-right becomes 6/8), yet new images are flagged
    # at the rate flagged here, so the budget is spent (a threshold of 1.0 flagged 3.5 % of new photographs).
    imgs = [[RIGHT] * 3] * 8 + [[WRONG] * 3] * 2
    ents = [[0.1, 0.1, 0.1]] * 6 + [[0.6, 0.7, 0.1], [0.65, 0.75, 0.1]] + [[0.05, 0.05, 0.05]] * 2
    probs, entropy = members(imgs, ents)
    labels = np.zeros(10)
    threshold = calibrate_uncertainty_threshold(probs, entropy, labels, 0.2, 2, default=0.5)
    assert 0.1 <= threshold < 0.6  # both uncertain right images flagged, no other


def test_a_flagged_image_is_most_likely_what_most_members_say_not_what_the_surest_says():
    from axx_backend.engine.uncertainty import decide

    unsure_a, sure_b = np.array([0.6, 0.4]), np.array([0.01, 0.99])
    flagged = decide([unsure_a, unsure_a, sure_b], [0.9, 0.9, 0.05], 0.5)
    assert flagged.flagged and flagged.label == 0  # the mean (0.40 / 0.60) would say class 1
    split = decide([np.array([0.6, 0.3, 0.1]), np.array([0.2, 0.5, 0.3]), np.array([0.1, 0.2, 0.7])], [0.9] * 3, 0.5)
    assert split.flagged and split.label == 2  # one vote each: the tie goes to the ensemble mean (0.30 / 0.33 / 0.37)


@pytest.mark.parametrize("k", [2, 3])
def test_the_refit_folds_follow_the_setting(k):
    """`refit_folds` sets how many stages are fine-tuned again for calibration: k folds, each class in every
    fold's training part; fewer than 2 is refused (no image would be out of fold)."""
    from axx_backend.core.settings import Settings
    from axx_backend.training.features import FeatureCache
    from axx_backend.training.heads import Split
    from axx_backend.training.trainer import refit_folds

    labels = torch.arange(60) % 2
    cache = FeatureCache(samples=[], pooled=[torch.randn(60, 4)])
    split = Split(labels, train=torch.arange(45), val=torch.arange(45, 60))
    cross_fit = refit_folds(cache, split, Settings(preset="offline", refit_folds=k))
    assert sorted(set(cross_fit.folds.tolist())) == list(range(k))
    assert len(list(cross_fit.rests())) == k
    for rest in cross_fit.rests():
        assert set(labels[rest].tolist()) == {0, 1} and len(rest) == 60 * (k - 1) // k
    with pytest.raises(ValueError, match="refit_folds"):
        Settings(refit_folds=1)


def test_without_labels_the_threshold_flags_the_most_images_the_budget_allows():
    """Unlabelled calibration images (a project's tasks still to annotate): the budget alone decides. Reference,
    written out here: where every member votes the same class, an image is flagged exactly when its second
    most uncertain member is above the threshold, so the most a budget of 20 % allows is the 10 images of 50
    whose second-largest entropy is largest."""
    rng = np.random.default_rng(0)
    entropies = rng.uniform(0.0, 1.0, size=(50, 3))
    probs, entropy = members([[RIGHT] * 3] * 50, entropies.tolist())
    threshold = calibrate_uncertainty_threshold(probs, entropy, None, 0.2, 2, default=0.5)
    second = np.sort(entropies, axis=1)[:, -2]
    assert int((second > threshold).sum()) == 10
    assert np.sort(second)[-11] <= threshold < np.sort(second)[-10]


def test_a_pool_of_unlabelled_images_holds_the_flag_budget_where_out_of_fold_cannot():
    """The unlabelled images show new objects the members are less sure of than of the labelled ones (here:
    weaker features). Calibrated out of fold, the threshold flags far more than the budget of them; spent on
    them (`review_calibration=auto`, the default), it flags what the budget allows, and the version records it."""
    from types import SimpleNamespace

    from axx_backend.core.settings import Settings
    from axx_backend.engine.ensemble import MCDropoutHead
    from axx_backend.training.calibration import flag_rate
    from axx_backend.training.features import FeatureCache
    from axx_backend.training.heads import Split, train_member_heads
    from axx_backend.training.trainer import calibrate_review, review_pool

    torch.manual_seed(0)
    n_labelled, n_pool = 80, 60
    classes = torch.arange(n_labelled + n_pool) % 2
    signal = torch.cat([torch.full((n_labelled, 1), 3.0), torch.full((n_pool, 1), 0.8)])  # new objects: weaker
    pooled = torch.nn.functional.one_hot(classes, 2).float() * signal + torch.randn(len(classes), 2)
    labels = torch.cat([classes[:n_labelled], torch.full((n_pool,), -1)])
    members = [
        HeadOnlyMember(name=f"m{i}", head=MCDropoutHead(2, 2, 0.3), temperature=torch.ones(())) for i in range(3)
    ]
    ensemble = SimpleNamespace(members=members, classes=["a", "b"])
    cache = FeatureCache(samples=[], pooled=[pooled + 0.3 * torch.randn_like(pooled) for _ in members])
    split = Split(labels, train=torch.arange(60), val=torch.arange(60, n_labelled))
    settings = Settings(preset="offline", epochs=20)
    heads = train_member_heads(ensemble, cache, split, settings)
    pool = review_pool(ensemble, cache, split, settings)
    assert pool is not None and pool.index == list(range(n_labelled, n_labelled + n_pool))

    def pool_rate(thresholds):
        return flag_rate(pool.probs, pool.entropy, thresholds["uncertainty_threshold"], 2, heads.weights)[0]

    out_of_fold, oof_metrics = calibrate_review(heads, split, settings)
    assert oof_metrics["review_calibration"] == {"on": "labelled, out of fold", "images": n_labelled}
    assert pool_rate(out_of_fold) > 0.35  # the shift the pool corrects
    spent, metrics = calibrate_review(heads, split, settings, pool)
    assert 0.2 - 2 / n_pool <= pool_rate(spent) <= 0.2
    assert metrics["review_calibration"] == {
        "on": "unlabelled",
        "images": n_pool,
        "flagged_rate": pool_rate(spent),
        "out_of_fold_threshold": out_of_fold["uncertainty_threshold"],  # recorded: the shift, for the team to see
        "out_of_fold_flagged_rate": pool_rate(out_of_fold),
    }
    # fewer unlabelled images than `min_review_pool`, or `labelled`: out of fold, as before
    assert review_pool(ensemble, cache, split, settings.replace(min_review_pool=n_pool + 1)) is None
    assert review_pool(ensemble, cache, split, settings.replace(review_calibration="labelled")) is None


def test_training_reads_at_most_max_unlabelled_of_the_bare_images_and_every_other():
    from axx_backend.core.data import Sample
    from axx_backend.core.settings import Settings
    from axx_backend.training.trainer import capped_unlabelled

    samples = [Sample(f"l{i}", "a") for i in range(5)] + [Sample(f"u{i}", None) for i in range(20)]
    samples.append(Sample("brush-only", None, mask=np.ones((2, 2))))  # a drawn mask, no class: always kept
    kept = capped_unlabelled(samples, Settings(max_unlabelled=7))
    keys = [s.key for s in kept]
    assert keys[:5] == [f"l{i}" for i in range(5)] and "brush-only" in keys
    assert sum(k.startswith("u") for k in keys) == 7 and keys == [s.key for s in samples if s.key in set(keys)]
    assert capped_unlabelled(samples, Settings(max_unlabelled=7)) == kept  # seeded
    assert capped_unlabelled(samples, Settings(max_unlabelled=20)) == samples


def test_the_pixel_set_takes_labelled_images_first_and_unlabelled_ones_only_into_the_room_left():
    from axx_backend.core.data import Sample
    from axx_backend.core.settings import Settings
    from axx_backend.training.trainer import pixel_keys

    labelled = [Sample(f"l{i}", "a" if i % 2 else "b") for i in range(10)]
    unlabelled = [Sample(f"u{i}", None) for i in range(30)]
    masked = [Sample("m0", "a", mask=np.ones((2, 2))), Sample("brush-only", None, mask=np.ones((2, 2)))]
    samples = unlabelled[:15] + labelled + masked + unlabelled[15:]  # unlabelled before and after the labelled

    few = pixel_keys(samples, Settings(max_pseudo_masks=6))
    assert {"m0", "brush-only"} <= few and len(few) == 8 and all(k[0] in "lm" or k == "brush-only" for k in few)
    room = pixel_keys(samples, Settings(max_pseudo_masks=15))
    assert {s.key for s in labelled + masked} <= room
    assert sum(k.startswith("u") for k in room) == 5
    assert pixel_keys(samples, Settings(max_pseudo_masks=15)) == room  # seeded
    # without unlabelled images: the random share of the labelled ones the pixel set always drew
    alone = labelled + masked
    drawn = np.random.default_rng(0).permutation([s.key for s in labelled])[:6].tolist()
    assert pixel_keys(alone, Settings(max_pseudo_masks=6, seed=0)) == {"m0", "brush-only", *drawn}
    # image labels only and masks from the CAM: no pixel set at all
    assert pixel_keys(labelled + unlabelled, Settings(labels_only_masks="cam")) == set()
