"""Predictions for a list of Label Studio tasks: one code path for `/predict` and for `axx-backend preannotate`.

Images download in a small thread pool ahead of inference; inference runs in batches under the model's
lock (one inference at a time per process). The answer keeps Label Studio's contract: exactly one entry
per task, in order, each a prediction dict or `[]` when there is nothing to store yet (image temporarily
unreachable, time budget spent). An image that cannot be used gets a prediction that says why, so it
fails its own task only.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

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


def image_ref(task: dict[str, Any], cfg: ProjectConfig) -> str:
    ref = (task.get("data") or {}).get(cfg.image_key)
    return ref if isinstance(ref, str) else ""  # "" -> ImageFetcher says "the task has no image URL"


def task_log(task: dict[str, Any], project: str | None, version: str | None) -> dict[str, Any]:
    """`extra` for a log record about one task (the JSON log format shows these as fields)."""
    return {"task_id": task.get("id"), "project": project, "model_version": version}


def predict_tasks(
    tasks: list[dict[str, Any]],
    cfg: ProjectConfig,
    annotator: Any,
    version: str,
    fetcher: ImageFetcher,
    *,
    lock: threading.Lock | None = None,
    fetch_workers: int = 4,
    time_budget: float | None = None,
    project: str | None = None,
) -> TaskPredictions:
    """Predict every task; stop early (leaving `[]`) only when `time_budget` seconds would be exceeded."""
    start = time.monotonic()
    deadline = start + time_budget if time_budget is not None else float("inf")
    lock = lock or threading.Lock()
    n = len(tasks)
    out = TaskPredictions(results=[[] for _ in tasks], outcomes=["skipped_budget"] * n)
    per_image: float | None = None  # measured seconds per image, to stop before the budget runs out
    batch_size = max(1, int(getattr(getattr(annotator, "settings", None), "batch_size", 1)))
    window = max(batch_size * 2, fetch_workers)  # downloads in flight ahead of inference

    def run_batch(batch: list[tuple[int, Image.Image]]) -> bool:
        """Annotate one batch; False when the time budget does not allow it."""
        nonlocal per_image
        expected = (per_image or 0.0) * len(batch)
        remaining = deadline - time.monotonic()
        if expected > remaining or not lock.acquire(timeout=min(max(0.0, remaining - expected), 1e6)):
            return False
        try:
            t0 = time.perf_counter()
            annotations = annotate_each_on_error(annotator, [img for _, img in batch])
            took = time.perf_counter() - t0
        finally:
            lock.release()
        out.inference_seconds += took
        rate = took / len(batch)
        per_image = rate if per_image is None else 0.5 * per_image + 0.5 * rate
        for (i, _), ann in zip(batch, annotations, strict=True):
            task = tasks[i]
            if isinstance(ann, Exception):  # this image broke the model; the others of the batch are fine
                reason = f"prediction failed: {type(ann).__name__}: {ann}"
                log.error("task %s: %s", task.get("id"), reason, extra=task_log(task, project, version))
                out.outcomes[i], out.errors[i] = "failed", reason
                out.results[i] = failed_prediction(cfg, version, reason)
                continue
            prediction = build_prediction(ann, cfg, version)
            problems = cfg.validate(prediction)
            if problems:  # LS would store wrong names silently: refuse and say why
                reason = f"prediction does not fit the labeling config: {problems}"
                log.error("task %s: %s", task.get("id"), reason, extra=task_log(task, project, version))
                out.outcomes[i], out.errors[i] = "invalid", reason
                continue
            out.results[i] = prediction
            out.outcomes[i] = "predicted"
        return True

    pool = ThreadPoolExecutor(max(1, fetch_workers), thread_name_prefix="fetch")
    futures: dict[int, Future[Image.Image]] = {}
    submitted = 0
    try:
        batch: list[tuple[int, Image.Image]] = []
        for i in range(n):
            while submitted < min(n, i + window):
                futures[submitted] = pool.submit(fetcher.load, image_ref(tasks[submitted], cfg))
                submitted += 1
            try:
                image = futures.pop(i).result(timeout=max(0.01, min(deadline - time.monotonic(), 1e6)))
            except FutureTimeout:
                out.stopped = True
                break
            except ImageFetchError as exc:
                extra = task_log(tasks[i], project, version)
                if exc.transient:
                    log.warning(
                        "task %s: image not read, will be asked again: %s", tasks[i].get("id"), exc, extra=extra
                    )
                    out.outcomes[i], out.errors[i] = "skipped_transient", str(exc)
                else:
                    log.warning("task %s: image cannot be used: %s", tasks[i].get("id"), exc, extra=extra)
                    out.outcomes[i], out.errors[i] = "failed", str(exc)
                    out.results[i] = failed_prediction(cfg, version, str(exc))
                continue
            batch.append((i, image))
            if len(batch) == batch_size:
                if not run_batch(batch):
                    out.stopped = True
                    break
                batch = []
        else:
            if batch and not run_batch(batch):
                out.stopped = True
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return out


def annotate_each_on_error(annotator: Any, images: list[Image.Image]) -> list[Any]:
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
