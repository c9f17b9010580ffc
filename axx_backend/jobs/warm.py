"""`WarmWorker`: RQ's forking worker that keeps what jobs load (a model version) between jobs.

RQ's `Worker` forks a work horse for every job, and whatever the horse loads dies with it: a pre-annotation
chunk paid for loading its version (and for its first inference) in every chunk. `WarmWorker` adds one step:
before it forks the horse of a job, it runs the job function's preload hook (`preload_with`) in the worker
process itself. A chunk's hook loads the version its run pinned into the worker's model cache
(`preannotate.plan.registry_for`: keyed by version directory, at most `AXX_MAX_LOADED_VERSIONS` versions,
least recently used first out), so the horse finds the model in memory, shared copy-on-write with the worker
(inference never writes the weights). A run on a new `current` pins a new directory, which its first chunk
loads, and the oldest version is dropped: a worker never serves a stale version.

Isolation is RQ's: every job runs in its own forked process, so an exception, a crash or an OOM kill costs
that job only, and the worker's cache is untouched (nothing a horse does reaches the worker's memory).

Threads. GNU OpenMP (torch's CPU thread pool on Linux) does not survive fork: a horse forked from a process
whose OpenMP pool has started hangs at its first parallel operation. So the worker keeps torch at one thread
(loading a version then runs no parallel region), and each horse sets its own thread count before its job
starts: `job_threads`, or by default the CPUs this worker may use divided by the workers registered from this
host. Two workers on two cores thus run one thread each rather than four threads on two cores: OpenMP threads
that wait for a core spin, and such chunks ran several times slower.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

from rq import Worker
from rq.worker import WorkerStatus

log = logging.getLogger(__name__)

PRELOAD_ATTRIBUTE = "axx_preload"
F = TypeVar("F", bound=Callable[..., Any])


def preload_with(hook: Callable[..., Any]) -> Callable[[F], F]:
    """Mark a job function: a `WarmWorker` calls `hook(*job.args, **job.kwargs)` in its own process before
    it forks the job's work horse, so what the hook loads is inherited by this horse and the next ones.
    The hook must not start torch threads (the worker runs at one) and should return at once when its work
    is already done; its errors are logged and the job runs anyway (and meets them itself)."""

    def mark(func: F) -> F:
        setattr(func, PRELOAD_ATTRIBUTE, hook)
        return func

    return mark


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class WarmWorker(Worker):
    """RQ's forking worker that preloads what a job needs before the fork (see the module docstring)."""

    job_threads: int | None = None  # torch threads of each work horse; None: this worker's share of the CPUs

    def execute_job(self, job: Any, queue: Any) -> None:
        """RQ's `Worker.execute_job` with the preload between the bookkeeping and the fork. The worker is
        busy from `prepare_execution` on, so a SIGTERM during a preload is RQ's warm shutdown: the job still
        runs, then the worker stops."""
        execution = self.prepare_execution(job)
        self.preload(job)
        self._threads_for_horse = self.horse_threads()
        self.fork_work_horse(job, queue)
        self.monitor_work_horse(job, queue, execution)
        self.set_state(WorkerStatus.IDLE)

    def preload(self, job: Any) -> None:
        try:
            hook = getattr(job.func, PRELOAD_ATTRIBUTE, None)
        except Exception:  # the function cannot be imported: the horse fails the job and says why
            return
        if hook is None:
            return
        start = time.perf_counter()
        try:
            hook(*job.args, **job.kwargs)
        except Exception as exc:
            log.warning("worker %s: preloading for job %s failed (the job will load itself): %s: %s",
                        self.name, job.id, type(exc).__name__, exc)  # fmt: skip
            return
        log.debug("worker %s: preload for job %s took %.2f s", self.name, job.id, time.perf_counter() - start)

    def horse_threads(self) -> int:
        """`job_threads`, else this worker's share of the CPUs: usable CPUs / workers on this host."""
        if self.job_threads:
            return self.job_threads
        host = socket.gethostname()
        try:
            here = sum(1 for w in type(self).all(connection=self.connection) if w.hostname == host)
        except Exception:
            here = 1
        return max(1, usable_cpus() // max(1, here))

    def main_work_horse(self, job: Any, queue: Any) -> None:
        """In the forked horse: its torch threads, then RQ's job execution."""
        import torch

        torch.set_num_threads(getattr(self, "_threads_for_horse", None) or usable_cpus())
        super().main_work_horse(job, queue)
