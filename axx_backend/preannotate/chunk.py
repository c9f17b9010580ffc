"""One chunk of a pre-annotation run: predict its tasks with the code of `/predict`, post the predictions.

On a worker (`rq_chunk_entry`) the chunk holds a lease in Redis while it runs (`jobs.lease`, the heartbeat
training runs use too) and checks it before each request that posts, so a chunk taken over by a new attempt
stops posting. Right before predicting, the chunk re-reads its tasks: a retried or resumed chunk posts only what
is missing. Predictions go to Label Studio in bulk, `IMPORT_BATCH` per request. The worker loads the run's
version before it forks the chunk's process (`preload_version`, `jobs.warm`): chunks do not load it again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..jobs.lease import Lease
from ..jobs.warm import preload_with
from ..labelstudio.client import LabelStudioClient, LabelStudioError, prediction_versions
from ..labelstudio.config import ConfigCache
from ..labelstudio.predict import TaskPredictions, predict_tasks
from ..labelstudio.settings import LabelStudioSettings
from .plan import RunSpec, registry_for, run_keys

log = logging.getLogger(__name__)

RESULTS_TTL = 7 * 86400  # s: how long a run's chunk results stay in Redis
IMPORT_BATCH = 100  # predictions per bulk import request


class ChunkIncomplete(RuntimeError):
    """Some tasks of a chunk could not be predicted for now (image unreachable): retry the chunk."""


class LeaseLost(RuntimeError):
    """Another attempt took this chunk over (this one stalled past its lease): stop posting."""


def chunk_settings(spec: RunSpec, env: dict[str, str] | None = None) -> LabelStudioSettings:
    """This process's Label Studio settings (the server's environment), on the run's Label Studio."""
    ls = LabelStudioSettings.from_env(env)
    return ls.replace(url=spec.url, api_key=spec.api_key or ls.api_key)


def predict_chunk(
    spec: RunSpec,
    task_ids: list[int],
    ls: LabelStudioSettings | None = None,
    holds_lease: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Predict and post the tasks of `task_ids` that have no prediction of the version yet."""
    ls = ls or chunk_settings(spec)
    client = ls.client("a chunk reads its tasks and posts predictions through the API")
    current = client.list_tasks(spec.project, ids=task_ids)  # fresh: a retry must not post twice
    todo = [t for t in current if spec.version not in prediction_versions(t)]
    result: dict[str, Any] = {
        "tasks": len(task_ids),
        "already": len(current) - len(todo),
        "gone": len(task_ids) - len(current),  # deleted from the project since the listing
        "posted": 0,
        "failed_images": 0,
        "errors": {},
    }
    if todo:
        out = _predict(spec, todo, ls, client)
        _post(client, spec, todo, out, result, holds_lease, task_ids)
        transient = out.counts["skipped_transient"]
        if transient:
            raise ChunkIncomplete(
                f"{transient} of {len(todo)} tasks not predicted (image unreachable for now; "
                f"{result['posted']} posted): {dict(list(result['errors'].items())[:3])}"
            )
    log.info(
        "project %s: chunk of %d tasks: %d posted (%d images unusable), %d had one, %d gone",
        spec.project, len(task_ids), result["posted"], result["failed_images"], result["already"], result["gone"],
        extra={"project": spec.project, "model_version": spec.version},
    )  # fmt: skip
    return result


def _predict(
    spec: RunSpec, todo: list[dict[str, Any]], ls: LabelStudioSettings, client: LabelStudioClient
) -> TaskPredictions:
    cfg = ConfigCache(ls.config).get(spec.label_config)
    model = registry_for(spec.model_dir).get(Path(spec.version_path))
    return predict_tasks(
        todo, cfg, model.annotator, spec.version, ls.fetcher(client), lock=model.lock,
        fetch_workers=ls.fetch_workers, project=spec.project, score_by=ls.score,
    )  # fmt: skip


def _post(
    client: LabelStudioClient,
    spec: RunSpec,
    todo: list[dict[str, Any]],
    out: TaskPredictions,
    result: dict[str, Any],
    holds_lease: Callable[[], bool] | None,
    task_ids: list[int],
) -> None:
    """Store the predictions (a task without one is asked again later) while the lease is ours: in bulk, up
    to `IMPORT_BATCH` per request; one by one for what a refused bulk request did not store."""
    ready: list[tuple[int, dict[str, Any], bool]] = []  # (task id, prediction, its image was unusable)
    for i, (task, prediction) in enumerate(zip(todo, out.results, strict=True)):
        if i in out.errors:
            result["errors"][str(task["id"])] = out.errors[i]
        if prediction:
            ready.append((int(task["id"]), prediction, out.outcomes[i] == "failed"))
    for start in range(0, len(ready), IMPORT_BATCH):
        batch = ready[start : start + IMPORT_BATCH]
        _check_lease(holds_lease, task_ids)
        try:
            client.import_predictions(spec.project, [(task, prediction) for task, prediction, _ in batch])
        except LabelStudioError as exc:
            log.warning("project %s: bulk import of %d predictions refused (%s): posting them one by one",
                        spec.project, len(batch), exc)  # fmt: skip
            _post_each(client, spec, batch, holds_lease, task_ids)
        result["posted"] += len(batch)
        result["failed_images"] += sum(failed for _, _, failed in batch)


def _post_each(
    client: LabelStudioClient,
    spec: RunSpec,
    batch: list[tuple[int, dict[str, Any], bool]],
    holds_lease: Callable[[], bool] | None,
    task_ids: list[int],
) -> None:
    """`POST /api/predictions` for each task of a refused bulk request that has no prediction of the version
    (the bulk import is not one transaction: part of it may be stored)."""
    stored = client.list_tasks(spec.project, ids=[task for task, _, _ in batch])
    have = {int(t["id"]) for t in stored if spec.version in prediction_versions(t)}
    for task, prediction, _ in batch:
        if task not in have:
            _check_lease(holds_lease, task_ids)
            client.post_prediction(task, prediction)


def _check_lease(holds_lease: Callable[[], bool] | None, task_ids: list[int]) -> None:
    if holds_lease is not None and not holds_lease():
        raise LeaseLost(f"chunk of tasks {task_ids[0]}..{task_ids[-1]}: lease lost, another attempt posts")


def preload_version(spec_json: dict[str, Any], *_: Any) -> None:
    """In the worker, before it forks the chunk's work horse (`jobs.warm.WarmWorker`): the run's version into
    this process's cache, where the horse and the next chunks find it (a no-op once it is there)."""
    registry_for(spec_json["model_dir"]).get(Path(spec_json["version_path"]))


@preload_with(preload_version)
def rq_chunk_entry(spec_json: dict[str, Any], index: int, task_ids: list[int], attempt: int) -> dict[str, Any]:
    """What an RQ worker runs for one chunk: the lease, then `predict_chunk`, then the result in Redis."""
    from rq import get_current_job

    # The API key is not in the job (Redis and RQ's logs would show it): the worker has its own, as the server does.
    ls = LabelStudioSettings.from_env()
    if not ls.api_key:
        raise RuntimeError("this worker has no LABEL_STUDIO_API_KEY: give workers the server's environment")
    spec = RunSpec(**{**spec_json, "api_key": ls.api_key})
    job = get_current_job()
    if job is None:
        raise RuntimeError("rq_chunk_entry runs inside an RQ job")
    redis = job.connection
    keys = run_keys(spec.project, spec.run, index)
    skip = _skip_reason(redis, keys, spec, index)
    if skip:
        return {"skipped": skip}
    lease = Lease(redis, keys["lease"], f"{socket.gethostname()}:{os.getpid()}:{attempt}:{uuid.uuid4().hex[:8]}",
                  spec.lease_seconds)  # fmt: skip
    # A killed attempt's lease outlives it by up to a lease period: wait for it rather than give up.
    if not lease.acquire(wait=2 * spec.lease_seconds + 5):
        return {"skipped": "another attempt holds the chunk"}
    with lease.heartbeat(f"{spec.run}-{index}"):
        result = predict_chunk(spec, task_ids, ls.replace(url=spec.url), lease.held)
        redis.hset(keys["results"], str(index), json.dumps({**result, "attempt": attempt}))
        redis.expire(keys["results"], RESULTS_TTL)
        return result


def _skip_reason(redis: Any, keys: dict[str, str], spec: RunSpec, index: int) -> str | None:
    """Why this chunk need not run: its run is over or superseded, or another attempt finished it."""
    if (redis.get(keys["active"]) or b"").decode() != spec.run:
        log.info("project %s: run %s is over or superseded: chunk %d skipped", spec.project, spec.run, index)
        return "run over"
    if redis.hexists(keys["results"], str(index)):
        return "already done"
    return None
