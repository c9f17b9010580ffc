"""benchmarks/decision_noise.py: its redrawn MC statistics reproduce the served decisions at the served seed."""

from pathlib import Path

import numpy as np

from axx_backend.core.data import iter_readable, read_folder_dataset
from axx_backend.core.settings import Settings
from axx_backend.core.versions import ModelStore
from axx_backend.engine.annotator import Annotator

from .scripts import load_benchmark

script = load_benchmark("decision_noise")


def test_redrawn_statistics_at_the_served_seed_decide_as_the_annotator_does(trained_model_dir, dataset_dir):
    annotator = Annotator.from_version(ModelStore(trained_model_dir).version_path(), Settings(), explicit=set())
    pooled, truth = script.pooled_features(annotator, Path(dataset_dir))
    samples, _ = read_folder_dataset(dataset_dir)
    images = [img for _, img in iter_readable(samples, [])]
    assert len(truth) == len(images) > 10
    served = [annotator.decide(annotator.forward([img]), 0) for img in images]
    s = annotator.settings
    stats = script.member_statistics(annotator, pooled, s.mc_samples, s.seed)
    labels, flagged = script.decisions(annotator, stats, annotator.weights)
    assert labels.tolist() == [d.label for d in served]
    assert flagged.tolist() == [d.flagged for d in served]
    other = script.member_statistics(annotator, pooled, s.mc_samples, s.seed + 1)
    assert not np.allclose(other[1][0], stats[1][0])  # another seed draws other masks


def test_the_script_reports_every_t_and_the_vote_rules(trained_model_dir, dataset_dir, capsys):
    assert script.main(["--model-dir", str(trained_model_dir), "--data", str(dataset_dir), "--samples", "4", "8",
                        "--seeds", "2", "--votes"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "T =    4, seeds 0-1" in out and "T =    8, seeds 0-1" in out
    assert "votes served" in out and "votes learned" in out and "members alone" in out
