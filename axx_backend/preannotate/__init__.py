"""`axx-backend preannotate`: predictions for a whole Label Studio project, in chunks, over RQ workers.

Label Studio's "Retrieve predictions" is one synchronous request with a 100 s timeout (docs/LABEL_STUDIO.md);
a project of 50,000 images needs this path instead. The command pins the version serving the project, lists
the project's tasks through the API, and enqueues one RQ job per chunk of task ids on the `axx-preannotate`
queue. Every `axx-backend worker` sharing the Redis and the model directory takes chunks; each predicts its
chunk with the same code as `/predict` and posts the predictions (`POST /api/predictions`, with the pinned
version). Without `REDIS_URL` the chunks run in this process.

Nothing is lost or posted twice:
- a task that already has a prediction of the version is skipped (by the listing, and again by the chunk
  right before it predicts, so a retried or resumed chunk posts only what is missing);
- a chunk holds a lease in Redis while it runs (`jobs.lease`: refreshed by a heartbeat, checked before each
  post); the command re-enqueues a chunk whose job failed or whose lease expired (worker killed), up to
  `retries` times, then reports it with its task ids and last error;
- one run per project at a time; a new run after a crash waits for the old run's leases to end.

Modules: `plan` (the pinned version, the tasks, the chunks), `chunk` (one chunk, and what a worker runs),
`runner` (RQ and in-process), `progress` (bar or log lines), `command` (`preannotate()`, the summary).
RQ stores a chunk's function by import path: `axx_backend.preannotate.rq_chunk_entry` stays importable.
"""

from ..labelstudio.client import prediction_versions
from .chunk import ChunkIncomplete, LeaseLost, predict_chunk, rq_chunk_entry
from .command import preannotate
from .plan import ChunkState, RunSpec, plan_run, select_tasks
from .progress import ProgressReport
from .runner import QUEUE_NAME, RQRunner, attempt_again, run_in_process

__all__ = [
    "QUEUE_NAME",
    "ChunkIncomplete",
    "ChunkState",
    "LeaseLost",
    "ProgressReport",
    "RQRunner",
    "RunSpec",
    "attempt_again",
    "plan_run",
    "predict_chunk",
    "prediction_versions",
    "preannotate",
    "rq_chunk_entry",
    "run_in_process",
    "select_tasks",
]
