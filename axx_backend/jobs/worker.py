"""`axx-backend worker`: one RQ worker process for the training and pre-annotation queues."""

from __future__ import annotations

import logging

from ..core.env import environ, get_str
from .queues import PREANNOTATE_QUEUE, QUEUES, TRAINING_QUEUE

log = logging.getLogger(__name__)


def run_worker(redis_url: str | None = None, burst: bool = False, queues: list[str] | None = None) -> None:
    """`axx-backend worker`: an RQ worker on the training and pre-annotation queues, training first.

    Every job runs in a forked child (RQ's default), so a crash or an OOM kill costs that job only.
    SIGTERM is RQ's warm shutdown: the job in progress finishes, then the worker stops.
    """
    from redis import Redis
    from rq import Queue, Worker

    url = redis_url or get_str(environ(), "REDIS_URL")
    if not url:
        raise ValueError("REDIS_URL is not set: the worker needs Redis (without it, the server trains in-process)")
    names = queues or list(QUEUES)
    unknown = sorted(set(names) - set(QUEUES))
    if unknown:
        raise ValueError(f"unknown queue(s) {unknown}: use {TRAINING_QUEUE} and/or {PREANNOTATE_QUEUE}")
    # torch, the trainer and the annotator, imported once here: forked job processes inherit them
    import axx_backend.engine.annotator  # noqa: F401
    import axx_backend.jobs.project  # noqa: F401

    redis = Redis.from_url(url)
    worker = Worker([Queue(name, connection=redis) for name in names], connection=redis)
    log.info("worker %s on %s", worker.name, ", ".join(names))
    worker.work(burst=burst, with_scheduler=False)
