"""`simulate-al`: the oracle protocol (what is revealed when), its outputs, and one real retraining."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from axx_backend.core.settings import Settings
from axx_backend.core.synthetic import make_dataset
from axx_backend.core.versions import ModelStore
from axx_backend.engine.annotator import Annotator
from axx_backend.evaluation.commands import register
from axx_backend.evaluation.simulate import load_pool_and_test, select, simulate_al
from axx_backend.training import Sample, read_folder_dataset
from axx_backend.training.profiles import profile_samples


@pytest.fixture(scope="module")
def split_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("al")
    make_dataset(root / "train", n_per_class=5, size=128, seed=11)
    make_dataset(root / "test", n_per_class=3, size=128, seed=12)
    return root


class RecordingTrain:
    """Stands in for training: records what it is given and returns an already trained version."""

    def __init__(self, version):
        self.version = version
        self.calls = []

    def __call__(self, samples, classes, model_dir, settings):
        self.calls.append([s for s in samples])
        return self.version


def test_the_oracle_reveals_k_new_masks_per_round_and_nothing_else(split_dataset, trained_model_dir, tmp_path):
    store = ModelStore(trained_model_dir)
    train = RecordingTrain(store.current())
    rows = simulate_al(split_dataset, trained_model_dir, tmp_path, rounds=2, per_round=3, train_fn=train, seed=5)
    pool, _ = read_folder_dataset(split_dataset / "train")
    with_masks = {s.key for s in pool if s.has_mask}  # the 5 lesion images
    revealed_per_round = [{s.key for s in call if s.has_mask} for call in train.calls]
    # Round 0 has image labels only; then 3 new masks per round, until the 5 pool masks run out.
    assert [len(r) for r in revealed_per_round] == [0, 3, 5]
    for before, after in zip(revealed_per_round, revealed_per_round[1:], strict=False):
        assert before < after <= with_masks
    for call in train.calls:
        assert len(call) == len(pool)  # every pool image keeps its image label
        assert all(s.label is not None for s in call)
        # a revealed sample carries exactly its own ground-truth mask
        for s in call:
            if s.has_mask:
                assert s.mask_path == split_dataset / "train" / "masks" / (s.key.rsplit(".", 1)[0] + ".png")
    assert [row["n_oracle"] for row in rows] == [0, 3, 5]
    assert [len(row["selected"].split(";")) for row in rows[:2]] == [3, 2]
    with open(tmp_path / "al_random.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["n_oracle"]) for r in table] == [0, 3, 5]
    for r in table:
        assert 0.0 <= float(r["iou_served"]) <= 1.0
        assert int(r["n_test_masks"]) >= 1
    # The same version every round: the served IoU cannot move; the oracle-calibrated CAM threshold may.
    assert len({r["iou_served"] for r in table}) == 1
    # Without thresholds of its own, the version's CAM rules are re-thresholded on the revealed masks.
    assert "oracle" not in table[0]["threshold_source"]
    if not store.metadata(store.current()).thresholds.fusion_thresholds:
        assert table[1]["threshold_source"] == "3 oracle masks"
    png = Image.open(tmp_path / "al_random.png")
    assert png.size[0] > 300


def test_random_selection_is_seeded():
    pool = [Sample(f"Lesion/{i}.png", "Lesion") for i in range(12)]

    def keys(seed):
        return [s.key for s in select("random", pool, 4, np.random.default_rng(seed))]

    assert keys(1) == keys(1)
    assert keys(1) != keys(2)
    assert len(set(keys(3))) == 4
    assert select("random", pool[:3], 4, np.random.default_rng(0)) == pool[:3]  # fewer left than asked


def test_entropy_and_bald_pick_the_highest_scores(split_dataset, trained_model_dir):
    store = ModelStore(trained_model_dir)
    annotator = Annotator.from_version(store.path(store.current()), Settings(), explicit=set())
    pool, _ = read_folder_dataset(split_dataset / "train")
    candidates = [s for s in pool if s.has_mask]
    profiles = profile_samples(lambda: annotator, candidates).profiles
    scores = {strategy: {p.key: getattr(p, strategy) for p in profiles} for strategy in ("entropy", "bald")}
    for strategy, table in scores.items():
        assert len(table) == len(candidates)
        chosen = select(strategy, candidates, 3, np.random.default_rng(0), annotator)
        assert [s.key for s in chosen] == sorted(table, key=lambda k: -table[k])[:3]


def test_a_folder_without_train_and_test_is_split_stratified(tmp_path):
    root = make_dataset(tmp_path / "flat", n_per_class=10, size=64, seed=0)
    pool, test, classes = load_pool_and_test(root, 0.3, seed=0)
    assert classes == ["Healthy", "Lesion"]
    assert not {s.key for s in pool} & {s.key for s in test}
    assert len(pool) + len(test) == 20
    assert sorted(s.label for s in test) == ["Healthy"] * 3 + ["Lesion"] * 3


def test_a_schedule_must_increase(split_dataset, trained_model_dir, tmp_path):
    train = RecordingTrain("never")
    for bad in ([5, 5], [0, 3], [4, 2]):
        with pytest.raises(ValueError, match="schedule"):
            simulate_al(split_dataset, trained_model_dir, tmp_path, 1, 1, train_fn=train, schedule=bad)
    assert train.calls == []


def test_a_pool_without_masks_is_a_clear_error(tmp_path, trained_model_dir):
    make_dataset(tmp_path / "d" / "train", n_per_class=3, size=64, seed=0, masks=False)
    make_dataset(tmp_path / "d" / "test", n_per_class=3, size=64, seed=1)
    with pytest.raises(ValueError, match="nothing to reveal"):
        simulate_al(tmp_path / "d", trained_model_dir, tmp_path / "o", 1, 2, train_fn=RecordingTrain("x"))


def test_simulate_al_command_retrains_with_the_revealed_masks(split_dataset, tmp_path, capsys):
    """One real round trip through training: round 0 from labels, round 1 with 5 oracle masks."""
    import argparse

    parser = argparse.ArgumentParser(prog="axx-backend")
    register(parser.add_subparsers(dest="command", required=True))
    models = tmp_path / "models"
    args = parser.parse_args(
        [
            "simulate-al",
            str(split_dataset),
            "--model-dir",
            str(models),
            "--schedule",
            "5",
            "--preset",
            "offline",
            "--input-size",
            "128",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rounds"] == 2
    store = ModelStore(models)
    versions = store.list_versions()
    assert len(versions) == 2
    oracle = sorted(store.metadata(v).training.oracle_masks for v in versions)
    assert oracle == [0, 5]
    with open(summary["csv"]) as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["n_oracle"]) for r in table] == [0, 5]
    assert all(0.0 <= float(r["iou_served"]) <= 1.0 for r in table)
