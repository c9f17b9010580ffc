"""`axx-backend preannotate`: the run from start to summary."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ..labelstudio.client import LabelStudioClient, ModelVersionSync, prediction_versions
from ..labelstudio.settings import LabelStudioSettings
from .plan import ChunkState, RunSpec, plan_run, select_tasks, split_chunks
from .progress import ProgressReport
from .runner import QUEUE_NAME, RQRunner, run_in_process

log = logging.getLogger(__name__)


def preannotate(
    project: str,
    model_dir: str | os.PathLike[str],
    ls: LabelStudioSettings,
    *,
    chunk: int = 32,
    only_missing: bool = False,
    redis_url: str | None = None,
    retries: int = 2,
    lease_seconds: int = 60,
    sync_model_version: bool | None = None,
) -> dict[str, Any]:
    """Pre-annotate the project; returns a summary (also of what failed). Blocks until every chunk ended.

    `ls` is the Label Studio to talk to and how to read its labeling config (the server's settings);
    `sync_model_version` (default: `ls.sync_model_version`) sets the project's model_version at the end.
    """
    if chunk < 1:
        raise ValueError(f"--chunk must be at least 1 (got {chunk})")
    started = time.monotonic()
    spec, client = plan_run(project, model_dir, ls, lease_seconds)
    runner = RQRunner(spec, redis_url) if redis_url else None
    try:
        if runner is not None:
            runner.claim()
        tasks = client.list_tasks(spec.project)
        todo, skipped = select_tasks(tasks, spec.version, only_missing)
        chunks = split_chunks(todo, chunk)
        log.info(
            "project %s: %d tasks, %d to predict with %s in %d chunks of %d (%s); %d have a prediction of it%s",
            spec.project, len(tasks), len(todo), spec.version, len(chunks), chunk,
            f"RQ queue {QUEUE_NAME}" if runner else "in this process", skipped["has_version"],
            f", {skipped['has_other_version']} of another version (--only-missing)" if only_missing else "",
        )  # fmt: skip
        report = ProgressReport(len(todo))
        try:
            if runner is not None:
                runner.run(chunks, retries, report)
            else:
                run_in_process(spec, chunks, retries, report, ls)
        finally:
            report.close()
    finally:
        if runner is not None:
            runner.release()
    summary = summarise(spec, client, tasks, todo, skipped, chunks, started)
    summary["executor"] = "rq" if runner else "in-process"
    sync = ls.sync_model_version if sync_model_version is None else sync_model_version
    if sync and summary["posted"] + summary["skipped_with_version"]:  # the version has predictions to point at
        summary["project_model_version"] = ModelVersionSync(client).sync_now(spec.project, spec.version, (0, 1, 2, 4))
    if ls.review_views:  # AXX_REVIEW_VIEWS: the review tabs show the new predictions
        from ..jobs.review import refresh_after

        summary["review_views"] = refresh_after(spec.project, spec.version_path, ls, "preannotate")
    return summary


def summarise(
    spec: RunSpec,
    client: LabelStudioClient,
    tasks: list[dict[str, Any]],
    todo: list[int],
    skipped: dict[str, int],
    chunks: list[ChunkState],
    started: float,
) -> dict[str, Any]:
    """What the run did, counted from Label Studio, not from the chunks (a killed attempt may have posted part
    of its chunk)."""
    after = client.list_tasks(spec.project)
    with_version = {int(t["id"]) for t in after if spec.version in prediction_versions(t)}
    missing = sorted(set(todo) - with_version)  # of the tasks this run set out to predict
    posted = len(todo) - len(missing)
    done = [c for c in chunks if c.state == "done"]
    seconds = time.monotonic() - started
    return {
        "project": spec.project,
        "model_version": spec.version,
        "tasks": len(tasks),
        "to_predict": len(todo),
        "skipped_with_version": skipped["has_version"],
        "skipped_other_version": skipped["has_other_version"],
        "chunks": len(chunks),
        "posted": posted,
        "unusable_images": sum(int(c.result.get("failed_images", 0)) for c in done),
        "retried_chunks": sum(c.attempt > 0 for c in chunks),
        "failed_chunks": [
            {"chunk": c.index, "task_ids": c.task_ids, "error": c.error} for c in chunks if c.state != "done"
        ],
        "errors": {k: v for c in chunks for k, v in c.result.get("errors", {}).items()},
        "without_prediction": len(missing),
        "without_prediction_ids": missing[:100],
        "seconds": round(seconds, 1),
        "tasks_per_second": round(posted / seconds, 2) if seconds > 0 else None,
    }
