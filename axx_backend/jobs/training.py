"""Background training jobs: RQ on Redis when `REDIS_URL` is set, a thread otherwise.

One training run per project at a time: a request while a run of the project is queued or
going is coalesced into it (a queued run reads the project's data when it starts, so it
trains on the latest annotations). Annotations that arrive during a run are counted towards
the next trigger.

The job function is `axx_backend.jobs.project.train_project(project, payload, progress)`;
it writes a new version atomically, so a failed or killed job leaves `current` untouched.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from ..core.env import environ, get_int, get_str
from .lease import HEARTBEAT_TTL, Lease
from .queues import QUEUES, TRAINING_QUEUE

log = logging.getLogger(__name__)

QUEUE_NAME = TRAINING_QUEUE  # the training queue (name kept for callers)
JOB_TIMEOUT = get_int(environ(), "AXX_JOB_TIMEOUT", 6 * 3600, minimum=1)  # s: RQ's limit for one training run

Progress = Callable[[str, float], None]
JobFunction = Callable[[str, dict[str, Any], Progress], str]


def default_job(project: str, payload: dict[str, Any], progress: Progress) -> str:
    from .project import train_project

    return train_project(project, payload, progress)


class InProcessJobs:
    """The embedded default: one background thread per running project."""

    def __init__(self, job: JobFunction = default_job) -> None:
        self.job = job
        self._lock = threading.Lock()
        self._status: dict[str, dict[str, Any]] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._counts: dict[str, int] = {}

    @property
    def kind(self) -> str:
        return "thread"

    def submit(self, project: str, payload: dict[str, Any], reason: str = "") -> dict[str, Any]:
        with self._lock:
            thread = self._threads.get(project)
            if thread is not None and thread.is_alive():
                return {"status": "coalesced", "project": project, "state": self._status[project]["state"]}
            self._status[project] = _new_status(project, reason)
            thread = threading.Thread(target=self._run, args=(project, payload), name=f"train-{project}", daemon=True)
            self._threads[project] = thread
            thread.start()
            return {"status": "queued", "project": project}

    def _run(self, project: str, payload: dict[str, Any]) -> None:
        try:
            _execute(self.job, project, payload, self._status[project].update)
        except Exception:
            pass  # recorded in the status by _execute; the serving version is untouched

    def status(self, project: str | None = None) -> dict[str, Any]:
        with self._lock:
            if project is not None:
                return dict(self._status.get(project, {"project": project, "state": "idle"}))
            return {p: dict(s) for p, s in self._status.items()}

    def count_annotation(self, project: str) -> int:
        with self._lock:
            self._counts[project] = self._counts.get(project, 0) + 1
            return self._counts[project]

    def wait(self, project: str, timeout: float = 600) -> dict[str, Any]:
        """Block until the project's runs are over (tests, CLI)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            thread = self._threads.get(project)
            if thread is None or not thread.is_alive():
                return self.status(project)
            thread.join(0.2)
        raise TimeoutError(f"training of project {project} still running after {timeout} s")


# Atomic submit: join a queued or running run of the project, or claim the queued slot.
_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'queued' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'running' end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 'claimed'
"""


class RQJobs:
    """Jobs on an RQ queue; status in Redis hashes so every server process sees it."""

    def __init__(self, redis: str | Any) -> None:
        from redis import Redis
        from rq import Queue

        self.redis = Redis.from_url(redis) if isinstance(redis, str) else redis
        self.queue = Queue(QUEUE_NAME, connection=self.redis)
        self._submit = self.redis.register_script(_SUBMIT)

    @property
    def kind(self) -> str:
        return "rq"

    def submit(self, project: str, payload: dict[str, Any], reason: str = "") -> dict[str, Any]:
        keys = _keys(project)
        outcome = self._submit(keys=[keys["queued"], keys["running"]], args=[reason or "requested", JOB_TIMEOUT])
        if outcome.decode() != "claimed":
            return {"status": "coalesced", "project": project, "state": outcome.decode()}
        return self._enqueue(project, payload, reason)

    def _enqueue(self, project: str, payload: dict[str, Any], reason: str) -> dict[str, Any]:
        key = _keys(project)["status"]
        self.redis.delete(key)
        self.redis.hset(key, mapping={k: json.dumps(v) for k, v in _new_status(project, reason).items()})
        job = self.queue.enqueue(
            rq_entry,
            project,
            payload,
            job_timeout=JOB_TIMEOUT,
            result_ttl=86400,
            failure_ttl=86400,
            description=f"train project {project} ({reason or 'requested'})",  # not the payload: it holds the API key
        )
        self.redis.hset(key, "job_id", json.dumps(job.id))
        return {"status": "queued", "project": project, "job_id": job.id}

    def queues(self) -> dict[str, dict[str, int]]:
        """Jobs waiting, running and failed on the training and pre-annotation queues (for /metrics)."""
        from rq import Queue

        out = {}
        for name in QUEUES:
            queue = Queue(name, connection=self.redis)
            out[name] = {
                "queued": queue.count,
                "started": queue.started_job_registry.count,
                "failed": queue.failed_job_registry.count,
            }
        return out

    def count_annotation(self, project: str) -> int:
        """Annotations seen for the project, across every server process."""
        return int(self.redis.incr(f"axx:annotations:{project}"))

    def status(self, project: str | None = None) -> dict[str, Any]:
        if project is None:
            projects = [k.decode().split(":")[2] for k in self.redis.scan_iter("axx:training:*:status")]
            return {p: self.status(p) for p in sorted(projects)}
        keys = _keys(project)
        raw = self.redis.hgetall(keys["status"])
        if not raw:
            return {"project": project, "state": "idle"}
        status = {k.decode(): json.loads(v) for k, v in raw.items()}
        if status.get("state") == "running" and not self.redis.exists(keys["running"]):
            # The worker stopped heart-beating: killed or lost. Its version was never made current.
            status["state"] = "failed"
            status["error"] = status.get("error") or "the worker stopped while training (killed or lost)"
        return status


def rq_entry(project: str, payload: dict[str, Any]) -> str:
    """What an RQ worker runs: the training job, holding the project's `running` lease while it runs."""
    from redis import Redis
    from rq import get_current_job

    job = get_current_job()
    redis: Redis = job.connection if job is not None else Redis.from_url(get_str(environ(), "REDIS_URL") or "")
    keys = _keys(project)
    redis.delete(keys["queued"])
    lease = Lease(redis, keys["running"], job.id if job else "local", HEARTBEAT_TTL)
    lease.take()  # RQJobs.submit lets one run of a project be queued or running at a time

    def update(changes: dict[str, Any]) -> None:
        redis.hset(keys["status"], mapping={k: json.dumps(v) for k, v in changes.items()})

    with lease.heartbeat(f"train-{project}"):  # expires soon after a killed worker stops refreshing it
        return _execute(default_job, project, payload, update)


def _execute(job: JobFunction, project: str, payload: dict[str, Any], update: Callable[[dict[str, Any]], None]) -> str:
    """Run one training job, recording state, progress and the last error."""
    update({"state": "running", "started": _now(), "progress": 0.0, "stage": "starting", "error": None})

    def progress(stage: str, fraction: float) -> None:
        update({"stage": stage, "progress": round(float(fraction), 4), "updated": _now()})

    log.info("training project %s: started", project)
    try:
        version = job(project, payload, progress)
    except Exception as exc:
        log.error("training project %s failed: %s", project, exc)
        log.debug("%s", traceback.format_exc())
        update({"state": "failed", "error": f"{type(exc).__name__}: {exc}", "finished": _now()})
        raise
    finished: dict[str, Any] = {"state": "finished", "version": version, "progress": 1.0, "stage": "done"}
    if payload.get("model_dir"):  # a run that wrote a version: its label check goes into the report
        from .project import training_report

        finished["label_check"] = training_report(payload, project, version)
    update({**finished, "finished": _now()})
    log.info("training project %s: finished, version %s", project, version)
    return version


def _keys(project: str) -> dict[str, str]:
    base = f"axx:training:{project}"
    return {k: f"{base}:{k}" for k in ("status", "queued", "running")}


def _new_status(project: str, reason: str) -> dict[str, Any]:
    return {"project": project, "state": "queued", "reason": reason, "queued": _now(), "progress": 0.0, "error": None}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def make_jobs(redis_url: str | None = None) -> InProcessJobs | RQJobs:
    """RQ when `REDIS_URL` is set, else the in-process default."""
    url = redis_url if redis_url is not None else get_str(environ(), "REDIS_URL")
    if url:
        return RQJobs(url)
    return InProcessJobs()
