"""`axx-backend preannotate`: predictions for a whole Label Studio project, in chunks, over RQ workers.

Label Studio's "Retrieve predictions" is one synchronous request with a 100 s timeout; a project of
50,000 images needs this path instead. The command pins the version serving the project, lists the
project's tasks through the API, and enqueues one RQ job per chunk of task ids on the `axx-preannotate`
queue. Every `axx-backend worker` sharing the Redis and the model directory takes chunks; each predicts
its chunk with the same code as `/predict` and posts the predictions (`POST /api/predictions`, with the
pinned version). Without `REDIS_URL` the chunks run in this process.

Nothing is lost or posted twice:
- a task that already has a prediction of the version is skipped (by the listing, and again by the chunk
  right before it predicts, so a retried or resumed chunk posts only what is missing);
- a chunk holds a lease in Redis while it runs (refreshed by a heartbeat, checked before each post); the
  command re-enqueues a chunk whose job failed or whose lease expired (worker killed), up to `retries`
  times, then reports it with its task ids and last error;
- one run per project at a time; a new run after a crash waits for the old run's leases to end.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .jobs.queues import PREANNOTATE_QUEUE
from .labelstudio.client import LabelStudioClient, ModelVersionSync
from .labelstudio.config import ConfigCache, ProjectConfig
from .labelstudio.images import ImageFetcher
from .labelstudio.predict import predict_tasks

log = logging.getLogger(__name__)

QUEUE_NAME = PREANNOTATE_QUEUE
TASK_FIELDS = "id,data,predictions_model_versions"


@dataclass(frozen=True)
class RunSpec:
    """What every chunk of one run needs (JSON-able: it travels in the RQ job)."""

    project: str
    run: str
    version: str
    version_path: str
    model_dir: str
    url: str
    api_key: str
    label_config: str
    lease_seconds: int = 60


@dataclass
class ChunkState:
    index: int
    task_ids: list[int]
    attempt: int = 0
    job_id: str | None = None
    enqueued: float = 0.0
    state: str = "queued"  # queued | done | failed
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)


class ChunkIncomplete(RuntimeError):
    """Some tasks of a chunk could not be predicted for now (image unreachable): retry the chunk."""


class LeaseLost(RuntimeError):
    """Another attempt took this chunk over (this one stalled past its lease): stop posting."""


# --- Label Studio side -------------------------------------------------------------------------------------------
def list_tasks(
    client: LabelStudioClient, project: str, ids: list[int] | None = None, page_size: int = 500
) -> list[dict[str, Any]]:
    """The project's tasks (id, data, versions of their predictions), page by page; only `ids` when given."""
    params: dict[str, Any] = {"project": project, "page_size": page_size, "fields": "all", "include": TASK_FIELDS}
    if ids is not None:
        params["query"] = json.dumps({"selectedItems": {"all": False, "included": list(ids)}})
    tasks: list[dict[str, Any]] = []
    page = 1
    while True:
        r = client.request("GET", "/api/tasks", params={**params, "page": page})
        if r.status_code == 404 and page > 1:  # "Invalid page": past the last one
            break
        if r.status_code >= 400:
            raise RuntimeError(f"GET /api/tasks?project={project} -> {r.status_code}: {r.text[:300]}")
        body = r.json()
        batch = body["tasks"] if isinstance(body, dict) else body
        tasks.extend(batch)
        total = body.get("total") if isinstance(body, dict) else None
        # `total` when Label Studio gives it (it may cap page_size below ours), else a short page ends the list
        if not batch or (len(tasks) >= total if total is not None else len(batch) < page_size):
            break
        page += 1
    return tasks


def prediction_versions(task: dict[str, Any]) -> set[str]:
    """Label Studio lists a task's prediction versions as one comma-separated string."""
    raw = task.get("predictions_model_versions") or ""
    if isinstance(raw, list):
        return {str(v) for v in raw if v}
    return {v.strip() for v in str(raw).split(",") if v.strip()}


def select_tasks(
    tasks: list[dict[str, Any]], version: str, only_missing: bool = False
) -> tuple[list[int], dict[str, int]]:
    """Ids to predict, and how many were skipped: having a prediction of `version` (always), or of any
    version (`only_missing`)."""
    todo, skipped = [], {"has_version": 0, "has_other_version": 0}
    for task in tasks:
        versions = prediction_versions(task)
        if version in versions:
            skipped["has_version"] += 1
        elif only_missing and versions:
            skipped["has_other_version"] += 1
        else:
            todo.append(int(task["id"]))
    return todo, skipped


def post_prediction(client: LabelStudioClient, task_id: int, prediction: dict[str, Any]) -> None:
    body = {k: prediction[k] for k in ("result", "score", "model_version") if k in prediction}
    client.json("POST", "/api/predictions", json={"task": task_id, **body})


# --- one chunk (a worker, or this process) ---------------------------------------------------------------------
_registries: dict[str, Any] = {}  # model dir -> ModelRegistry: an in-process run loads its version once
_registries_lock = threading.Lock()


def _registry(model_dir: str) -> Any:
    """The server's per-process cache of loaded versions (`server.registry.ModelRegistry`), one per model dir."""
    from .core.settings import Settings
    from .engine.registry import ModelRegistry

    with _registries_lock:
        if model_dir not in _registries:
            _registries[model_dir] = ModelRegistry(model_dir, Settings.from_env())
        return _registries[model_dir]


def predict_chunk(spec: RunSpec, task_ids: list[int], holds_lease: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Predict and post the tasks of `task_ids` that have no prediction of the version yet."""
    from .server.settings import ServerSettings

    settings = ServerSettings.from_env()
    client = LabelStudioClient(spec.url, spec.api_key)
    cfg: ProjectConfig = ConfigCache(settings.config).get(spec.label_config)
    fetcher = ImageFetcher(spec.url, client.auth, settings.allowed_hosts, settings.limits)
    current = list_tasks(client, spec.project, ids=task_ids)  # fresh: a retry must not post twice
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
        model = _registry(spec.model_dir).get(Path(spec.version_path))
        out = predict_tasks(
            todo, cfg, model.annotator, spec.version, fetcher, lock=model.lock, fetch_workers=settings.fetch_workers,
            project=spec.project,
        )  # fmt: skip
        for i, (task, prediction) in enumerate(zip(todo, out.results, strict=True)):
            if i in out.errors:
                result["errors"][str(task["id"])] = out.errors[i]
            if not prediction:
                continue
            if holds_lease is not None and not holds_lease():
                raise LeaseLost(f"chunk of tasks {task_ids[0]}..{task_ids[-1]}: lease lost, another attempt posts")
            post_prediction(client, int(task["id"]), prediction)
            result["posted"] += 1
            result["failed_images"] += out.outcomes[i] == "failed"
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


# --- Redis bookkeeping -------------------------------------------------------------------------------------------
def _keys(project: str, run: str | None = None, index: int | None = None) -> dict[str, str]:
    base = f"axx:preannotate:{project}"
    keys = {"active": f"{base}:active", "leases": f"{base}:lease:*"}
    if run is not None:
        keys["results"] = f"{base}:{run}:results"
        if index is not None:
            keys["lease"] = f"{base}:lease:{run}:{index}"
    return keys


# Refresh or release a lease only while it is still ours.
_REFRESH = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def rq_chunk_entry(spec_json: dict[str, Any], index: int, task_ids: list[int], attempt: int) -> dict[str, Any]:
    """What an RQ worker runs for one chunk: the lease, then `predict_chunk`, then the result in Redis."""
    from rq import get_current_job

    # The API key is not in the job (Redis and RQ's logs would show it): the worker has its own, as the server does.
    api_key = os.environ.get("LABEL_STUDIO_API_KEY", "")
    if not api_key:
        raise RuntimeError("this worker has no LABEL_STUDIO_API_KEY: give workers the server's environment")
    spec = RunSpec(**{**spec_json, "api_key": api_key})
    job = get_current_job()
    if job is None:
        raise RuntimeError("rq_chunk_entry runs inside an RQ job")
    redis = job.connection
    keys = _keys(spec.project, spec.run, index)
    if (redis.get(keys["active"]) or b"").decode() != spec.run:
        log.info("project %s: run %s is over or superseded: chunk %d skipped", spec.project, spec.run, index)
        return {"skipped": "run over"}
    if redis.hexists(keys["results"], str(index)):
        return {"skipped": "already done"}
    token = f"{socket.gethostname()}:{os.getpid()}:{attempt}:{uuid.uuid4().hex[:8]}"
    # A killed attempt's lease outlives it by up to a lease period: wait for it rather than give up.
    deadline = time.monotonic() + 2 * spec.lease_seconds + 5
    while not redis.set(keys["lease"], token, nx=True, ex=spec.lease_seconds):
        if time.monotonic() > deadline:
            return {"skipped": "another attempt holds the chunk"}
        time.sleep(1.0)
    refresh, release = redis.register_script(_REFRESH), redis.register_script(_RELEASE)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(spec.lease_seconds / 4):
            refresh(keys=[keys["lease"]], args=[token, spec.lease_seconds])

    beating = threading.Thread(target=heartbeat, name=f"lease-{spec.run}-{index}", daemon=True)
    beating.start()
    try:
        result = predict_chunk(spec, task_ids, lambda: (redis.get(keys["lease"]) or b"").decode() == token)
        redis.hset(keys["results"], str(index), json.dumps({**result, "attempt": attempt}))
        redis.expire(keys["results"], 7 * 86400)
        return result
    finally:
        stop.set()
        release(keys=[keys["lease"]], args=[token])


# --- the command ----------------------------------------------------------------------------------------------
class ProgressReport:
    """A tqdm bar on a terminal; otherwise a log line every `every` seconds (counts and ETA)."""

    def __init__(self, total: int, every: float = 10.0, desc: str = "preannotate") -> None:
        self.total, self.every, self.done = total, every, 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="task", desc=desc)

    def update(self, done: int, **counts: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.done)
            self.bar.set_postfix(counts, refresh=False)
        self.done = done
        now = time.monotonic()
        if self.bar is None and (now - self.last >= self.every or done >= self.total):
            self.last = now
            rate = done / (now - self.start) if now > self.start else 0.0
            eta = f"{(self.total - done) / rate:.0f} s" if rate > 0 else "?"
            extra = ", ".join(f"{k} {v}" for k, v in counts.items())
            log.info("preannotate: %d/%d tasks (%s), %.1f tasks/s, ETA %s", done, self.total, extra, rate, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plan_run(
    project: str,
    model_dir: str | os.PathLike[str],
    url: str,
    api_key: str,
    lease_seconds: int = 60,
) -> tuple[RunSpec, LabelStudioClient]:
    """Pin the version serving the project (as `/predict` would choose it); errors say why there is none."""
    from .server.settings import ServerSettings

    settings = ServerSettings.from_env()
    client = LabelStudioClient(url, api_key)
    info = client.get_project(project)
    cfg = ConfigCache(settings.config).get(info["label_config"])
    resolved = _registry(str(model_dir)).resolve(str(project), cfg.class_mismatch)
    if not resolved.ready:
        raise RuntimeError(f"project {project}: no model version to pre-annotate with: {resolved.reason}")
    assert resolved.path is not None and resolved.version is not None
    spec = RunSpec(
        project=str(project), run=uuid.uuid4().hex[:12], version=resolved.version, version_path=str(resolved.path),
        model_dir=str(model_dir), url=url, api_key=api_key, label_config=info["label_config"],
        lease_seconds=int(lease_seconds),
    )  # fmt: skip
    return spec, client


def preannotate(
    project: str,
    model_dir: str | os.PathLike[str],
    url: str,
    api_key: str,
    *,
    chunk: int = 32,
    only_missing: bool = False,
    redis_url: str | None = None,
    retries: int = 2,
    lease_seconds: int = 60,
    sync_model_version: bool = True,
) -> dict[str, Any]:
    """Pre-annotate the project; returns a summary (also of what failed). Blocks until every chunk ended."""
    if chunk < 1:
        raise ValueError(f"--chunk must be at least 1 (got {chunk})")
    started = time.monotonic()
    spec, client = plan_run(project, model_dir, url, api_key, lease_seconds)
    runner = _RQRunner(spec, redis_url) if redis_url else None
    try:
        if runner is not None:
            runner.claim()
        tasks = list_tasks(client, spec.project)
        todo, skipped = select_tasks(tasks, spec.version, only_missing)
        chunks = [ChunkState(i, todo[s : s + chunk]) for i, s in enumerate(range(0, len(todo), chunk))]
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
                _run_in_process(spec, chunks, retries, report)
        finally:
            report.close()
    finally:
        if runner is not None:
            runner.release()

    after = list_tasks(client, spec.project)
    done = [c for c in chunks if c.state == "done"]
    failed = [c for c in chunks if c.state != "done"]
    # Counted from Label Studio, not from the chunks: a killed attempt may have posted part of its chunk.
    with_version = {int(t["id"]) for t in after if spec.version in prediction_versions(t)}
    missing = sorted(set(todo) - with_version)  # of the tasks this run set out to predict
    posted = len(todo) - len(missing)
    seconds = time.monotonic() - started
    summary: dict[str, Any] = {
        "project": spec.project,
        "model_version": spec.version,
        "executor": "rq" if runner else "in-process",
        "tasks": len(tasks),
        "to_predict": len(todo),
        "skipped_with_version": skipped["has_version"],
        "skipped_other_version": skipped["has_other_version"],
        "chunks": len(chunks),
        "posted": posted,
        "unusable_images": sum(int(c.result.get("failed_images", 0)) for c in done),
        "retried_chunks": sum(c.attempt > 0 for c in chunks),
        "failed_chunks": [{"chunk": c.index, "task_ids": c.task_ids, "error": c.error} for c in failed],
        "errors": {k: v for c in chunks for k, v in c.result.get("errors", {}).items()},
        "without_prediction": len(missing),
        "without_prediction_ids": missing[:100],
        "seconds": round(seconds, 1),
        "tasks_per_second": round(posted / seconds, 2) if seconds > 0 else None,
    }
    if sync_model_version and with_version:
        summary["project_model_version"] = ModelVersionSync(client).sync_now(spec.project, spec.version, (0, 1, 2, 4))
    return summary


def _attempt_again(c: ChunkState, error: str, retries: int) -> bool:
    """Record a failed attempt; True when the chunk gets another one."""
    c.error = error
    if c.attempt >= retries:
        c.state = "failed"
        log.error("chunk %d (tasks %s..%s) failed after %d attempts: %s", c.index, c.task_ids[0], c.task_ids[-1],
                  c.attempt + 1, error)  # fmt: skip
        return False
    c.attempt += 1
    log.warning("chunk %d: attempt %d failed (%s): retrying", c.index, c.attempt, error)
    return True


def _progress(chunks: list[ChunkState], report: ProgressReport) -> None:
    finished = [c for c in chunks if c.state != "queued"]
    report.update(
        sum(len(c.task_ids) for c in finished),
        posted=sum(int(c.result.get("posted", 0)) for c in finished),
        failed_chunks=sum(c.state == "failed" for c in chunks),
        retries=sum(c.attempt for c in chunks),
    )


def _run_in_process(spec: RunSpec, chunks: list[ChunkState], retries: int, report: ProgressReport) -> None:
    for c in chunks:
        while c.state == "queued":
            try:
                c.result = predict_chunk(spec, c.task_ids)
                c.state = "done"
            except Exception as exc:
                if _attempt_again(c, f"{type(exc).__name__}: {exc}", retries):
                    time.sleep(min(30.0, 2.0**c.attempt))
        _progress(chunks, report)


class _RQRunner:
    """Enqueue the chunks, watch them, re-enqueue failed or lost ones."""

    def __init__(self, spec: RunSpec, redis_url: str, poll: float = 0.5) -> None:
        from redis import Redis
        from rq import Queue

        self.spec = spec
        self.redis = Redis.from_url(redis_url)
        self.queue = Queue(QUEUE_NAME, connection=self.redis)
        self.keys = _keys(spec.project, spec.run)
        self.poll = poll
        self._claimed = False
        self._warned_no_worker = False

    def claim(self, wait: float | None = None) -> None:
        """Become the project's one active run; wait for leases of an earlier, crashed run to end."""
        ttl = self.spec.lease_seconds
        if not self.redis.set(self.keys["active"], self.spec.run, nx=True, ex=ttl):
            other = (self.redis.get(self.keys["active"]) or b"?").decode()
            left = self.redis.ttl(self.keys["active"])
            raise RuntimeError(
                f"project {self.spec.project}: pre-annotation run {other} is in progress (its monitor is alive); "
                f"wait for it, or retry in {max(left, 1)} s if it crashed"
            )
        self._claimed = True
        deadline = time.monotonic() + (wait if wait is not None else 2 * ttl + 10)
        while list(self.redis.scan_iter(self.keys["leases"])):
            if time.monotonic() > deadline:
                raise RuntimeError(f"project {self.spec.project}: chunks of an earlier run still hold leases")
            log.info("project %s: waiting for chunks of an earlier run to finish", self.spec.project)
            self.redis.expire(self.keys["active"], ttl)
            time.sleep(min(5.0, ttl / 4))

    def release(self) -> None:
        if self._claimed:
            self.redis.eval(_RELEASE, 1, self.keys["active"], self.spec.run)
            self._claimed = False

    def _lease_alive(self, index: int) -> bool:
        return bool(self.redis.exists(_keys(self.spec.project, self.spec.run, index)["lease"]))

    def _enqueue(self, c: ChunkState) -> None:
        c.job_id = f"axx-pre-{self.spec.run}-{c.index}-a{c.attempt}"
        self.queue.enqueue(
            rq_chunk_entry, {**asdict(self.spec), "api_key": ""}, c.index, c.task_ids, c.attempt, job_id=c.job_id,
            job_timeout=max(600, 60 * len(c.task_ids)), result_ttl=86400, failure_ttl=7 * 86400,
            description=f"preannotate project {self.spec.project} chunk {c.index} ({len(c.task_ids)} tasks, "
            f"attempt {c.attempt + 1})",
        )  # fmt: skip
        c.enqueued = time.monotonic()

    def run(self, chunks: list[ChunkState], retries: int, report: ProgressReport) -> None:
        from rq import Worker
        from rq.job import Job, JobStatus

        for c in chunks:
            self._enqueue(c)
        pending = {c.index: c for c in chunks}
        while pending:
            time.sleep(self.poll)
            self.redis.expire(self.keys["active"], self.spec.lease_seconds)
            # Jobs and leases first, results last: a chunk that ends in between is seen as done, not as lost.
            waiting = list(pending.values())
            jobs = Job.fetch_many([c.job_id for c in waiting], connection=self.redis)
            leases = [self._lease_alive(c.index) for c in waiting]
            results = self.redis.hgetall(self.keys["results"])
            for c, job, lease_alive in zip(waiting, jobs, leases, strict=True):
                raw = results.get(str(c.index).encode())
                if raw is not None:
                    c.result, c.state = json.loads(raw), "done"
                    del pending[c.index]
                    continue
                status = job.get_status(refresh=False) if job is not None else None
                error = None
                if job is None:
                    error = "the job disappeared from Redis"
                elif status == JobStatus.FAILED:
                    error = _last_line(job)
                elif status == JobStatus.FINISHED and not lease_alive:
                    error = "the job ended without a result"  # it had found another attempt's lease, now gone
                elif status == JobStatus.STARTED and not lease_alive and job.started_at is not None:
                    if time.time() - job.started_at.timestamp() > self.spec.lease_seconds:
                        error = "the worker stopped while predicting (killed or lost)"
                if error is None:
                    continue
                if _attempt_again(c, error, retries):
                    self._enqueue(c)
                else:
                    del pending[c.index]
            if not self._warned_no_worker and time.monotonic() - min(c.enqueued for c in chunks) > 10:
                if not any(QUEUE_NAME in w.queue_names() for w in Worker.all(connection=self.redis)):
                    log.warning("no worker listens on %s: start `axx-backend worker` (same REDIS_URL)", QUEUE_NAME)
                self._warned_no_worker = True
            _progress(chunks, report)


def _last_line(job: Any) -> str:
    try:
        result = job.latest_result()
        text = (result.exc_string if result is not None else None) or ""
    except Exception:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "the job failed"
