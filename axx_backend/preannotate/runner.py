"""Running the chunks of a pre-annotation run: on RQ workers (`RQRunner`) or in this process.

`RQRunner` makes the run the project's one active run, enqueues one job per chunk on the pre-annotation
queue, watches jobs, leases and results, and re-enqueues a chunk whose job failed or whose worker died (its
lease expired), up to `retries` times; then the chunk is reported with its task ids and last error.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from typing import Any

from ..jobs.lease import RELEASE
from ..jobs.queues import PREANNOTATE_QUEUE
from ..labelstudio.settings import LabelStudioSettings
from .chunk import predict_chunk, rq_chunk_entry
from .plan import ChunkState, RunSpec, run_keys
from .progress import ProgressReport, report_chunks

log = logging.getLogger(__name__)

QUEUE_NAME = PREANNOTATE_QUEUE


def attempt_again(c: ChunkState, error: str, retries: int) -> bool:
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


def run_in_process(
    spec: RunSpec, chunks: list[ChunkState], retries: int, report: ProgressReport, ls: LabelStudioSettings
) -> None:
    """One chunk after the other in this process (no Redis), with the same retries."""
    for c in chunks:
        while c.state == "queued":
            try:
                c.result = predict_chunk(spec, c.task_ids, ls)
                c.state = "done"
            except Exception as exc:
                if attempt_again(c, f"{type(exc).__name__}: {exc}", retries):
                    time.sleep(min(30.0, 2.0**c.attempt))
        report_chunks(chunks, report)


class RQRunner:
    """Enqueue the chunks, watch them, re-enqueue failed or lost ones."""

    def __init__(self, spec: RunSpec, redis_url: str, poll: float = 0.5) -> None:
        from redis import Redis
        from rq import Queue

        self.spec = spec
        self.redis = Redis.from_url(redis_url)
        self.queue = Queue(QUEUE_NAME, connection=self.redis)
        self.keys = run_keys(spec.project, spec.run)
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
            self.redis.eval(RELEASE, 1, self.keys["active"], self.spec.run)
            self._claimed = False

    def run(self, chunks: list[ChunkState], retries: int, report: ProgressReport) -> None:
        """Block until every chunk is done or failed for good."""
        for c in chunks:
            self._enqueue(c)
        pending = {c.index: c for c in chunks}
        while pending:
            time.sleep(self.poll)
            self.redis.expire(self.keys["active"], self.spec.lease_seconds)  # the monitor is alive
            for c in self._look(list(pending.values()), retries):
                del pending[c.index]
            self._warn_without_worker(chunks)
            report_chunks(chunks, report)

    def _enqueue(self, c: ChunkState) -> None:
        c.job_id = f"axx-pre-{self.spec.run}-{c.index}-a{c.attempt}"
        self.queue.enqueue(
            rq_chunk_entry, {**asdict(self.spec), "api_key": ""}, c.index, c.task_ids, c.attempt, job_id=c.job_id,
            job_timeout=max(600, 60 * len(c.task_ids)), result_ttl=86400, failure_ttl=7 * 86400,
            description=f"preannotate project {self.spec.project} chunk {c.index} ({len(c.task_ids)} tasks, "
            f"attempt {c.attempt + 1})",
        )  # fmt: skip
        c.enqueued = time.monotonic()

    def _look(self, waiting: list[ChunkState], retries: int) -> list[ChunkState]:
        """One look at the waiting chunks: record results, retry lost chunks; the chunks that ended."""
        from rq.job import Job

        # Jobs and leases first, results last: a chunk that ends in between is seen as done, not as lost.
        jobs = Job.fetch_many([c.job_id for c in waiting], connection=self.redis)
        leases = [self._lease_alive(c.index) for c in waiting]
        results = self.redis.hgetall(self.keys["results"])
        ended = []
        for c, job, lease_alive in zip(waiting, jobs, leases, strict=True):
            raw = results.get(str(c.index).encode())
            if raw is not None:
                c.result, c.state = json.loads(raw), "done"
                ended.append(c)
                continue
            error = chunk_error(job, lease_alive, self.spec.lease_seconds)
            if error is None:
                continue
            if attempt_again(c, error, retries):
                self._enqueue(c)
            else:
                ended.append(c)
        return ended

    def _lease_alive(self, index: int) -> bool:
        return bool(self.redis.exists(run_keys(self.spec.project, self.spec.run, index)["lease"]))

    def _warn_without_worker(self, chunks: list[ChunkState]) -> None:
        from rq import Worker

        if self._warned_no_worker or time.monotonic() - min(c.enqueued for c in chunks) <= 10:
            return
        if not any(QUEUE_NAME in w.queue_names() for w in Worker.all(connection=self.redis)):
            log.warning("no worker listens on %s: start `axx-backend worker` (same REDIS_URL)", QUEUE_NAME)
        self._warned_no_worker = True


def chunk_error(job: Any, lease_alive: bool, lease_seconds: int) -> str | None:
    """Why a chunk without a result is lost (its job failed or vanished, its worker died), or None while it
    may still finish."""
    from rq.job import JobStatus

    if job is None:
        return "the job disappeared from Redis"
    status = job.get_status(refresh=False)
    if status == JobStatus.FAILED:
        return last_line(job)
    if status == JobStatus.FINISHED and not lease_alive:
        return "the job ended without a result"  # it had found another attempt's lease, now gone
    if status == JobStatus.STARTED and not lease_alive and job.started_at is not None:
        if time.time() - job.started_at.timestamp() > lease_seconds:
            return "the worker stopped while predicting (killed or lost)"
    return None


def last_line(job: Any) -> str:
    """The last line of a failed job's traceback (the exception)."""
    try:
        result = job.latest_result()
        text = (result.exc_string if result is not None else None) or ""
    except Exception:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "the job failed"
