"""Background work on RQ (or in-process): training runs per project, the worker, and the leases both use.

- `queues`: the queue names, in one place.
- `lease`: one Redis lease with a heartbeat, held by a training run and by a pre-annotation chunk.
- `training`: `InProcessJobs` (a thread per project) and `RQJobs` (Redis), `rq_entry` (what a worker runs).
- `project`: `train_project`, the training job itself (a dataset folder or a Label Studio project).
- `warm`: `WarmWorker`, RQ's forking worker that preloads what a job needs (`preload_with`) before the fork.
- `worker`: `run_worker`, `axx-backend worker`.

RQ stores a job's function by import path: `axx_backend.jobs.rq_entry` (the path of jobs queued before the
split) stays importable, as are the names below.
"""

from .lease import HEARTBEAT_TTL, Lease
from .queues import PREANNOTATE_QUEUE, QUEUES, TRAINING_QUEUE
from .training import JOB_TIMEOUT, QUEUE_NAME, InProcessJobs, RQJobs, make_jobs, rq_entry
from .worker import run_worker

__all__ = [
    "HEARTBEAT_TTL",
    "JOB_TIMEOUT",
    "PREANNOTATE_QUEUE",
    "QUEUES",
    "QUEUE_NAME",
    "TRAINING_QUEUE",
    "InProcessJobs",
    "Lease",
    "RQJobs",
    "make_jobs",
    "rq_entry",
    "run_worker",
]
