"""The parts of `axx-backend preannotate` that need no Label Studio (the whole run is in test_e2e_labelstudio)."""

from __future__ import annotations

import logging

import pytest

from axx_backend.preannotate import ChunkState, ProgressReport, prediction_versions, select_tasks
from axx_backend.preannotate.runner import attempt_again as _attempt_again


def test_prediction_versions_parses_label_studio_comma_lists() -> None:
    assert prediction_versions({"predictions_model_versions": "v2,v1"}) == {"v1", "v2"}
    assert prediction_versions({"predictions_model_versions": " v3 , "}) == {"v3"}
    assert prediction_versions({"predictions_model_versions": ""}) == set()
    assert prediction_versions({}) == set()
    assert prediction_versions({"predictions_model_versions": ["a", None, "b"]}) == {"a", "b"}


def test_select_tasks_never_repredicts_the_version_and_only_missing_skips_any_prediction() -> None:
    tasks = [
        {"id": 1, "predictions_model_versions": "v2"},
        {"id": 2, "predictions_model_versions": "v1"},
        {"id": 3, "predictions_model_versions": ""},
        {"id": 4, "predictions_model_versions": "v1,v2"},
    ]
    assert select_tasks(tasks, "v2") == ([2, 3], {"has_version": 2, "has_other_version": 0})
    assert select_tasks(tasks, "v2", only_missing=True) == ([3], {"has_version": 2, "has_other_version": 1})
    assert select_tasks(tasks, "v3") == ([1, 2, 3, 4], {"has_version": 0, "has_other_version": 0})


def test_a_chunk_is_retried_then_reported() -> None:
    chunk = ChunkState(0, [5, 6])
    assert _attempt_again(chunk, "boom 1", retries=2) and chunk.attempt == 1 and chunk.state == "queued"
    assert _attempt_again(chunk, "boom 2", retries=2) and chunk.attempt == 2
    assert not _attempt_again(chunk, "boom 3", retries=2)
    assert chunk.state == "failed" and chunk.error == "boom 3"


def test_progress_without_a_terminal_logs_counts_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    report = ProgressReport(total=10, every=0.0)
    with caplog.at_level(logging.INFO, logger="axx_backend.preannotate"):
        report.update(4, posted=4)
        report.update(10, posted=9)
    report.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("preannotate: 4/10 tasks (posted 4)") and "ETA" in lines[0]
    assert lines[1].startswith("preannotate: 10/10 tasks (posted 9)") and lines[1].endswith("ETA 0 s")
