"""Training jobs on a real Redis with a real RQ worker, and the in-process default."""

import time

import pytest

from axx_backend.core.versions import ModelStore
from axx_backend.jobs import InProcessJobs, Lease, RQJobs

from .redis_harness import RedisServer, Worker


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def folder_payload(dataset_dir, model_dir):
    return {
        "source": "folder",
        "dataset_dir": str(dataset_dir),
        "model_dir": str(model_dir),
        "settings": {"preset": "offline", "input_size": 160},
    }


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def test_rq_job_runs_on_the_worker_and_two_quick_requests_give_one_run(redis_server, tmp_path, dataset_dir):
    jobs = RQJobs(redis_server.url)
    model_dir = tmp_path / "models" / "7"
    first = jobs.submit("7", folder_payload(dataset_dir, model_dir), "START_TRAINING")
    second = jobs.submit("7", folder_payload(dataset_dir, model_dir), "START_TRAINING")
    assert first["status"] == "queued"
    assert second["status"] == "coalesced"
    worker = Worker(redis_server.url, tmp_path / "worker.log")
    try:
        status = wait_for(lambda: (s := jobs.status("7"))["state"] in ("finished", "failed") and s, 300, "the job")
        assert status["state"] == "finished", status
        store = ModelStore(model_dir)
        assert store.list_versions() == [status["version"]]
        assert store.current() == status["version"]
        # A request after the run starts a new one, which makes a second version current.
        assert jobs.submit("7", folder_payload(dataset_dir, model_dir))["status"] == "queued"
        wait_for(lambda: len(store.list_versions()) == 2 and jobs.status("7")["state"] == "finished", 300, "run 2")
        assert store.current() == max(store.list_versions())
    finally:
        worker.stop()


def test_killing_the_worker_mid_job_leaves_current_untouched(redis_server, tmp_path, dataset_dir):
    jobs = RQJobs(redis_server.url)
    model_dir = tmp_path / "models" / "9"
    env = {"AXX_HEARTBEAT_TTL": "4"}
    worker = Worker(redis_server.url, tmp_path / "worker.log", env)
    try:
        jobs.submit("9", folder_payload(dataset_dir, model_dir))
        wait_for(lambda: jobs.status("9")["state"] == "finished", 300, "the first version")
        store = ModelStore(model_dir)
        before = store.current()
        assert before is not None

        jobs.submit("9", folder_payload(dataset_dir, model_dir))
        wait_for(lambda: jobs.status("9").get("stage") == "features", 120, "the second run to start")
        worker.kill()
        assert store.current() == before
        assert store.list_versions() == [before]
        # The dead worker's run is reported failed once its heartbeat expires, and the project is free again.
        status = wait_for(lambda: (s := jobs.status("9"))["state"] == "failed" and s, 30, "the failure")
        assert "worker" in status["error"]
    finally:
        worker.stop()

    replacement = Worker(redis_server.url, tmp_path / "worker2.log", env)
    try:
        assert jobs.submit("9", folder_payload(dataset_dir, model_dir))["status"] == "queued"
        wait_for(lambda: jobs.status("9")["state"] == "finished", 300, "the retry")
        assert len(ModelStore(model_dir).list_versions()) == 2
        assert ModelStore(model_dir).current() != before
    finally:
        replacement.stop()


def test_in_process_jobs_coalesce_and_record_failures(tmp_path, dataset_dir):
    jobs = InProcessJobs()
    model_dir = tmp_path / "models" / "3"
    assert jobs.submit("3", folder_payload(dataset_dir, model_dir))["status"] == "queued"
    assert jobs.submit("3", folder_payload(dataset_dir, model_dir))["status"] == "coalesced"
    status = jobs.wait("3", timeout=300)
    assert status["state"] == "finished"
    assert ModelStore(model_dir).list_versions() == [status["version"]]
    check = status["label_check"]  # the run's label check, in the /jobs report
    assert check["version"] == status["version"] and check["checked_classes"] > 0

    bad = folder_payload(tmp_path / "missing", model_dir)
    assert jobs.submit("3", bad)["status"] == "queued"
    status = jobs.wait("3", timeout=60)
    assert status["state"] == "failed" and "images/" in status["error"]
    assert ModelStore(model_dir).current() == ModelStore(model_dir).list_versions()[0]


def test_a_lease_lives_while_its_heartbeat_runs_and_only_its_holder_ends_it(redis_server):
    from redis import Redis

    redis = Redis.from_url(redis_server.url)
    mine, theirs = Lease(redis, "axx:test:lease", "mine", ttl=2), Lease(redis, "axx:test:lease", "theirs", ttl=2)
    assert mine.acquire() and not theirs.acquire(wait=0.5, poll=0.1)
    with mine.heartbeat("test"):
        time.sleep(3)  # past the TTL: only the heartbeat keeps it
        assert mine.held() and not theirs.held()
    assert not redis.exists("axx:test:lease")  # released at the end of the block
    mine.take()
    theirs.take()  # taken over (the first holder stalled past its TTL)
    assert not mine.refresh()
    mine.release()
    assert theirs.held()
