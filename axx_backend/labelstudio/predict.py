"""Predictions for a list of Label Studio tasks: one code path for `/predict` and for `axx-backend preannotate`.

Images download in a small thread pool ahead of inference; inference runs in batches under the model's
lock (one inference at a time per process). The answer keeps Label Studio's contract: exactly one entry
per task, in order, each a prediction dict or `[]` when there is nothing to store yet (image temporarily
unreachable, time budget spent). Anything wrong with one task (its shape, its URL, the download, the
decoding, the model on that image) gives that task a prediction without regions that says why, and never
costs the other tasks anything.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from ..core.images import Decoded, restore_full_size
from ..core.memory import return_freed_memory
from .config import ProjectConfig
from .images import ImageFetcher, ImageFetchError
from .results import build_prediction, failed_prediction

log = logging.getLogger(__name__)

COUNT_KEYS = ("predicted", "failed", "skipped_budget", "skipped_transient", "invalid")


@dataclass
class TaskPredictions:
    """What `predict_tasks` made: one entry per task, and how each task went."""

    results: list[Any]
    outcomes: list[str]  # per task: one of COUNT_KEYS
    errors: dict[int, str] = field(default_factory=dict)  # task index -> why it has no usable prediction
    inference_seconds: float = 0.0
    stopped: bool = False  # the time budget ran out before every task was answered

    @property
    def counts(self) -> dict[str, int]:
        return {key: self.outcomes.count(key) for key in COUNT_KEYS}


def image_ref(task: Any, cfg: ProjectConfig) -> str:
    """The task's image reference; `ImageFetchError` (about this task only) when the task has none."""
    if not isinstance(task, dict):
        raise ImageFetchError(f"the task is a JSON {type(task).__name__}, not an object")
    data = task.get("data")
    if not isinstance(data, dict):
        raise ImageFetchError(f"the task's data is a JSON {type(data).__name__}, not an object")
    ref = data.get(cfg.image_key)
    if not isinstance(ref, str) or not ref.strip():
        raise ImageFetchError(f"the task has no image URL in data.{cfg.image_key}")
    return ref


def task_id(task: Any) -> Any:
    return task.get("id") if isinstance(task, dict) else None


def task_log(task: Any, project: str | None, version: str | None) -> dict[str, Any]:
    """`extra` for a log record about one task (the JSON log format shows these as fields)."""
    return {"task_id": task_id(task), "project": project, "model_version": version}


def predict_tasks(
    tasks: list[Any],
    cfg: ProjectConfig,
    annotator: Any,
    version: str,
    fetcher: ImageFetcher,
    *,
    lock: threading.Lock | None = None,
    fetch_workers: int = 4,
    time_budget: float | None = None,
    project: str | None = None,
    score_by: str = "confidence",
) -> TaskPredictions:
    """Predict every task; stop early (leaving `[]`) only when `time_budget` seconds would be exceeded.
    `score_by`: what each prediction's score carries (AXX_SCORE, `results.task_score`)."""
    run = _PredictRun(tasks, cfg, annotator, version, lock or threading.Lock(), time_budget, project)
    run.score_by = score_by
    try:
        run.go(fetcher, fetch_workers)
    finally:
        return_freed_memory()  # the decoded images and full-size masks of this call are gone: give them back
    return run.out


class _PredictRun:
    """One call of `predict_tasks`: downloads ahead, batches, the time budget, and each task's outcome."""

    def __init__(
        self,
        tasks: list[Any],
        cfg: ProjectConfig,
        annotator: Any,
        version: str,
        lock: threading.Lock,
        time_budget: float | None,
        project: str | None,
    ) -> None:
        self.tasks, self.cfg, self.annotator, self.version = tasks, cfg, annotator, version
        self.lock, self.project = lock, project
        self.deadline = time.monotonic() + time_budget if time_budget is not None else float("inf")
        self.out = TaskPredictions(results=[[] for _ in tasks], outcomes=["skipped_budget"] * len(tasks))
        self.per_image: float | None = None  # measured seconds per image, to stop before the budget runs out
        self.batch_size = max(1, int(getattr(getattr(annotator, "settings", None), "batch_size", 1)))
        self.score_by = "confidence"

    # --- downloads ---------------------------------------------------------------------------------------------
    def go(self, fetcher: ImageFetcher, fetch_workers: int) -> None:
        n = len(self.tasks)
        window = max(self.batch_size * 2, fetch_workers)  # downloads in flight ahead of inference
        pool = ThreadPoolExecutor(max(1, fetch_workers), thread_name_prefix="fetch")
        futures: dict[int, Future[Decoded]] = {}
        batch: list[tuple[int, Decoded]] = []
        try:
            for i in range(n):
                for j in range(len(futures) + i, min(n, i + window)):
                    futures[j] = pool.submit(self._decode, fetcher, self.tasks[j])
                image = self._wait(i, futures.pop(i))
                if image is _STOP:
                    return
                if image is not None:
                    batch.append((i, image))
                if len(batch) == self.batch_size:
                    if not self._run_batch(batch):
                        return
                    batch = []
            if batch:
                self._run_batch(batch)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _decode(self, fetcher: ImageFetcher, task: Any) -> Decoded:
        return fetcher.decode(image_ref(task, self.cfg))

    def _wait(self, i: int, future: Future[Decoded]) -> Any:
        """Task i's image; None when the task failed (recorded); _STOP when the time budget ran out."""
        try:
            return future.result(timeout=max(0.01, min(self.deadline - time.monotonic(), 1e6)))
        except FutureTimeout:
            self.out.stopped = True
            return _STOP
        except ImageFetchError as exc:
            self._fetch_failed(i, str(exc), exc.transient)
        except Exception as exc:  # untrusted input must not take the request down: this task fails alone
            log.exception("task %s: reading the image failed", task_id(self.tasks[i]))
            self._fetch_failed(i, f"image could not be read: {type(exc).__name__}: {exc}", transient=False)
        return None

    def _fetch_failed(self, i: int, reason: str, transient: bool) -> None:
        task = self.tasks[i]
        extra = task_log(task, self.project, self.version)
        if transient:
            log.warning("task %s: image not read, will be asked again: %s", task_id(task), reason, extra=extra)
            self.out.outcomes[i], self.out.errors[i] = "skipped_transient", reason
        else:
            log.warning("task %s: image cannot be used: %s", task_id(task), reason, extra=extra)
            self._fail(i, "failed", reason)

    # --- inference ---------------------------------------------------------------------------------------------
    def _run_batch(self, batch: list[tuple[int, Decoded]]) -> bool:
        """Annotate one batch; False (and `stopped`) when the time budget does not allow it."""
        expected = (self.per_image or 0.0) * len(batch)
        remaining = self.deadline - time.monotonic()
        if expected > remaining or not self.lock.acquire(timeout=min(max(0.0, remaining - expected), 1e6)):
            self.out.stopped = True
            return False
        try:
            t0 = time.perf_counter()
            annotations = annotate_each_on_error(self.annotator, [decoded.image for _, decoded in batch])
            took = time.perf_counter() - t0
        finally:
            self.lock.release()
        self.out.inference_seconds += took
        rate = took / len(batch)
        self.per_image = rate if self.per_image is None else 0.5 * self.per_image + 0.5 * rate
        for (i, decoded), ann in zip(batch, annotations, strict=True):
            self._record(i, decoded, ann)
        return True

    def _record(self, i: int, decoded: Decoded, ann: Any) -> None:
        if isinstance(ann, Exception):  # this image broke the model; the others of the batch are fine
            self._fail(i, "failed", f"prediction failed: {type(ann).__name__}: {ann}", log_error=True)
            return
        full = restore_full_size(ann, decoded.full_size)
        prediction = build_prediction(full, self.cfg, self.version, self.score_by)
        problems = self.cfg.validate(prediction)
        if problems:  # LS would store wrong names silently: refuse and say why
            self._fail(i, "invalid", f"prediction does not fit the labeling config: {problems}", log_error=True)
            return
        self.out.results[i] = prediction
        self.out.outcomes[i] = "predicted"

    def _fail(self, i: int, outcome: str, reason: str, log_error: bool = False) -> None:
        """Task i gets no usable prediction; a "failed" task gets one without regions that says why."""
        task = self.tasks[i]
        if log_error:
            log.error("task %s: %s", task_id(task), reason, extra=task_log(task, self.project, self.version))
        self.out.outcomes[i], self.out.errors[i] = outcome, reason
        if outcome == "failed":
            self.out.results[i] = failed_prediction(self.cfg, self.version, reason)


_STOP = object()  # _PredictRun._wait: the time budget ran out


def annotate_each_on_error(annotator: Any, images: list[Any]) -> list[Any]:
    """Annotations of a batch; if the batch fails, each image alone, so one bad image costs only its own task."""
    try:
        return list(annotator.annotate(images))
    except Exception as exc:
        if len(images) == 1:
            return [exc]
        log.warning("a batch of %d images failed (%s): retrying one by one", len(images), exc)
    out: list[Any] = []
    for image in images:
        try:
            out.extend(annotator.annotate([image]))
        except Exception as exc:
            out.append(exc)
    return out
