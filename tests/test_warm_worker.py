"""Warm workers (`jobs.warm.WarmWorker`): a real redis-server and a real `axx-backend worker` run the jobs of
tests/warm_jobs.py. What a job's preload hook loads in the worker reaches every forked job without being
loaded again; a new version is loaded when a job pins it; a job that raises or is killed loses its own
process only; the real version cache of pre-annotation chunks is shared the same way and stays bounded.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from axx_backend.core.versions import ModelStore

from .redis_harness import RedisServer, Worker

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def run_jobs(redis_url: str, log: Path, calls: list[tuple[Any, tuple[Any, ...]]], env: dict[str, str] | None = None):
    """Enqueue `calls` on the pre-annotation queue, run one worker until they ended; (jobs, worker pid, log)."""
    from redis import Redis
    from rq import Queue

    queue = Queue("axx-preannotate", connection=Redis.from_url(redis_url))
    jobs = [queue.enqueue(func, *args, job_timeout=300) for func, args in calls]
    worker = Worker(redis_url, log, {"PYTHONPATH": str(REPO), "LOG_LEVEL": "DEBUG", **(env or {})})
    try:
        deadline = time.monotonic() + 300
        while not all(job.get_status(refresh=True) in ("finished", "failed") for job in jobs):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            assert worker.proc.poll() is None, f"the worker died:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        alive = worker.proc.poll() is None
    finally:
        worker.stop()
    return jobs, worker.proc.pid, alive


def test_a_preloaded_cache_serves_every_job_and_survives_jobs_that_fail_or_die(redis_server, tmp_path):
    from tests.warm_jobs import probe

    calls = [
        (probe, ("v1",)),
        (probe, ("v1",)),  # the second chunk: no reload
        (probe, ("v1", "raise")),  # clears and corrupts its own copy of the cache, then fails
        (probe, ("v1", "kill")),  # SIGKILLs its own process
        (probe, ("v1",)),
        (probe, ("v2",)),  # a new version: loaded once, next to the first
        (probe, ("v2", "bad-preload")),  # a failing preload: the job still runs
    ]
    jobs, worker_pid, alive = run_jobs(redis_server.url, tmp_path / "worker.log", calls, {"AXX_WORKER_THREADS": "1"})
    assert alive, "a failing or dying job must not take the worker down"
    statuses = [job.get_status() for job in jobs]
    assert statuses == ["finished", "finished", "failed", "failed", "finished", "finished", "finished"]
    first, second, _, _, after_crashes, new_version, after_bad_preload = (
        job.return_value() if job.get_status() == "finished" else None for job in jobs
    )
    for seen in (first, second, after_crashes, new_version, after_bad_preload):
        assert seen["pid"] != worker_pid  # every job ran in its own forked process ...
        assert seen["cache"]["v1"] == {"loaded_in": worker_pid, "weights": [1.0, 2.0, 3.0]}  # ... on the worker's load
        assert seen["threads"] == 1
    assert len({seen["pid"] for seen in (first, second, after_crashes)}) == 3
    assert first["loads"] == second["loads"] == after_crashes["loads"] == ["v1"]  # loaded once, never again
    assert new_version["loads"] == after_bad_preload["loads"] == ["v1", "v2"]
    assert new_version["cache"]["v2"]["loaded_in"] == worker_pid
    assert "Work-horse terminated unexpectedly" in (jobs[3].latest_result().exc_string or "")
    assert "the preload hook fails" in (tmp_path / "worker.log").read_text()


def test_chunks_share_the_worker_s_version_and_follow_a_new_current(redis_server, tmp_path, trained_model_dir):
    """The real cache of pre-annotation chunks: the worker loads the pinned version before forking; a
    version pinned after `current` moved is loaded next; with AXX_MAX_LOADED_VERSIONS=1 the old one goes.
    Each job runs one inference on 2 threads in its horse (it would hang if the worker had started OpenMP)."""
    from axx_backend.preannotate.plan import registry_for
    from tests.warm_jobs import probe_model

    models = tmp_path / "models"
    shutil.copytree(trained_model_dir, models, symlinks=True)
    store = ModelStore(models)
    first = store.current()
    second = "v29990101-000000-copy"
    shutil.copytree(models / first, models / second)

    def pinned() -> dict[str, Any]:  # what `plan_run` puts in a chunk's spec: the version serving now
        resolved = registry_for(str(models)).resolve(None)
        return {"model_dir": str(models), "version_path": str(resolved.path)}

    spec_first = pinned()
    os.remove(models / "current")
    os.symlink(second, models / "current")  # a newer version becomes current (as `train` switches it)
    spec_second = pinned()
    assert Path(spec_second["version_path"]).name == second

    calls = [(probe_model, (spec_first,)), (probe_model, (spec_first,)), (probe_model, (spec_second,))]
    env = {"AXX_WORKER_THREADS": "2", "AXX_MAX_LOADED_VERSIONS": "1", "MODEL_DIR": str(models)}
    jobs, worker_pid, alive = run_jobs(redis_server.url, tmp_path / "worker.log", calls, env)
    assert alive and [job.get_status() for job in jobs] == ["finished"] * 3, (tmp_path / "worker.log").read_text()
    a, b, c = (job.return_value() for job in jobs)
    assert a["found_loaded"] == b["found_loaded"] == [first]  # loaded by the worker, found by both chunks
    assert c["found_loaded"] == [second]  # the new current, and only it (one version kept)
    assert a["threads"] == b["threads"] == c["threads"] == 2
    assert len({a["pid"], b["pid"], c["pid"], worker_pid}) == 4
    log = (tmp_path / "worker.log").read_text()
    loads = [line for line in log.splitlines() if "axx_backend.engine.registry: loaded version" in line]
    assert len(loads) == 2 and all(f"[{worker_pid}]" in line for line in loads), loads  # in the worker, once each
    assert "unloaded" in log
