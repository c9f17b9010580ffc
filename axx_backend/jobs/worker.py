"""`axx-backend worker`: one RQ worker process for the training and pre-annotation queues (`jobs.warm`)."""

from __future__ import annotations

import logging

from ..core.env import environ, get_int, get_str
from .queues import PREANNOTATE_QUEUE, QUEUES, TRAINING_QUEUE

log = logging.getLogger(__name__)


def run_worker(
    redis_url: str | None = None, burst: bool = False, queues: list[str] | None = None, threads: int | None = None
) -> None:
    """`axx-backend worker`: a `WarmWorker` on the training and pre-annotation queues, training first.

    Every job runs in a forked child (RQ's default), so a crash or an OOM kill costs that job only; a
    pre-annotation chunk finds its version already loaded by the worker (`jobs.warm`). SIGTERM is RQ's warm
    shutdown: the job in progress finishes, then the worker stops. `threads` (`AXX_WORKER_THREADS`): torch
    threads per job; default: the CPUs shared among the workers of this host.
    """
    from redis import Redis
    from rq import Queue

    url = redis_url or get_str(environ(), "REDIS_URL")
    if not url:
        raise ValueError("REDIS_URL is not set: the worker needs Redis (without it, the server trains in-process)")
    names = queues or list(QUEUES)
    unknown = sorted(set(names) - set(QUEUES))
    if unknown:
        raise ValueError(f"unknown queue(s) {unknown}: use {TRAINING_QUEUE} and/or {PREANNOTATE_QUEUE}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1 (got {threads})")
    threads = threads or get_int(environ(), "AXX_WORKER_THREADS", 0, minimum=0) or None
    # torch, the trainer, the annotator and the chunk code, imported once here: forked job processes inherit them
    import torch

    import axx_backend.engine.annotator  # noqa: F401
    import axx_backend.jobs.project  # noqa: F401

    from .warm import WarmWorker, usable_cpus

    torch.set_num_threads(1)  # before anything runs here: a horse forked after OpenMP started would hang

    redis = Redis.from_url(url)
    worker = WarmWorker([Queue(name, connection=redis) for name in names], connection=redis)
    worker.job_threads = threads
    log.info("worker %s on %s (torch threads per job: %s)", worker.name, ", ".join(names),
             threads or f"{usable_cpus()} CPUs / the workers of this host")  # fmt: skip
    worker.work(burst=burst, with_scheduler=False)
