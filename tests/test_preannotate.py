"""The parts of `axx-backend preannotate` that need no Label Studio (the whole run is in test_e2e_labelstudio)."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from axx_backend.labelstudio.client import LabelStudioError
from axx_backend.preannotate import ChunkState, ProgressReport, RunSpec, prediction_versions, select_tasks
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


class StubClient:
    """Label Studio's task list and predictions, in memory; `refuse_after` makes the next bulk import store
    that many predictions, then fail (it is not one transaction)."""

    def __init__(self, task_ids: list[int], refuse_after: int | None = None) -> None:
        self.versions: dict[int, list[str]] = {t: [] for t in task_ids}
        self.refuse_after = refuse_after
        self.calls: list[tuple[str, list[int]]] = []

    def list_tasks(self, project: str, ids: list[int] | None = None) -> list[dict[str, Any]]:
        return [{"id": t, "data": {"image": f"/x/{t}.png"}, "predictions_model_versions": ",".join(v)}
                for t, v in self.versions.items() if ids is None or t in ids]  # fmt: skip

    def import_predictions(self, project: str, predictions: list[tuple[int, dict[str, Any]]]) -> int:
        self.calls.append(("bulk", [t for t, _ in predictions]))
        for n, (task, prediction) in enumerate(predictions):
            if self.refuse_after is not None and n == self.refuse_after:
                self.refuse_after = None
                raise LabelStudioError("POST /api/projects/1/import/predictions -> 400: task gone", 400)
            self.versions[task].append(prediction["model_version"])
        return len(predictions)

    def post_prediction(self, task: int, prediction: dict[str, Any]) -> None:
        self.calls.append(("one", [task]))
        self.versions[task].append(prediction["model_version"])


def _chunk(monkeypatch: pytest.MonkeyPatch, client: StubClient, task_ids: list[int], lease: Any = None) -> Any:
    """`predict_chunk` on the stub, with every image predicted except task 3's (unusable: a failed task)."""
    from axx_backend.labelstudio.predict import TaskPredictions
    from axx_backend.preannotate import chunk

    def predict(spec: Any, todo: list[dict[str, Any]], ls: Any, c: Any) -> TaskPredictions:
        out = TaskPredictions(results=[], outcomes=[])
        for i, task in enumerate(todo):
            out.results.append({"result": [], "score": 0.5, "model_version": spec.version})
            out.outcomes.append("failed" if task["id"] == 3 else "predicted")
            if task["id"] == 3:
                out.errors[i] = "cannot read image"
        return out

    monkeypatch.setattr(chunk, "_predict", predict)
    spec = RunSpec(project="1", run="r", version="v9", version_path="/m/v9", model_dir="/m", url="http://ls",
                   api_key="k", label_config="<View/>")  # fmt: skip
    ls = SimpleNamespace(client=lambda why: client)
    return chunk.predict_chunk(spec, task_ids, ls, lease)


def test_a_chunk_posts_its_predictions_in_bulk_and_only_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("axx_backend.preannotate.chunk.IMPORT_BATCH", 3)
    client = StubClient([1, 2, 3, 4, 5])
    client.versions[2] = ["v9"]  # posted by an earlier attempt of this chunk
    result = _chunk(monkeypatch, client, [1, 2, 3, 4, 5, 6])
    assert client.calls == [("bulk", [1, 3, 4]), ("bulk", [5])]  # one request per IMPORT_BATCH
    assert result["posted"] == 4 and result["already"] == 1 and result["gone"] == 1
    assert result["failed_images"] == 1 and result["errors"] == {"3": "cannot read image"}
    assert all(v == ["v9"] for v in client.versions.values())


def test_a_refused_bulk_import_posts_one_by_one_what_it_did_not_store(monkeypatch: pytest.MonkeyPatch) -> None:
    client = StubClient([1, 2, 3, 4], refuse_after=2)  # stores tasks 1 and 2, then fails
    result = _chunk(monkeypatch, client, [1, 2, 3, 4])
    assert client.calls == [("bulk", [1, 2, 3, 4]), ("one", [3]), ("one", [4])]
    assert result["posted"] == 4 and all(v == ["v9"] for v in client.versions.values())  # none twice


def test_a_chunk_that_lost_its_lease_posts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from axx_backend.preannotate import LeaseLost

    client = StubClient([1, 2])
    with pytest.raises(LeaseLost):
        _chunk(monkeypatch, client, [1, 2], lease=lambda: False)
    assert client.calls == [] and all(v == [] for v in client.versions.values())
