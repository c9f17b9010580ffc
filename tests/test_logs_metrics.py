"""Structured logs and the /metrics numbers."""

from __future__ import annotations

import json
import logging

import pytest

from axx_backend.core.logs import JsonFormatter, configure_logging
from axx_backend.server.metrics import Metrics, prometheus_text


def test_json_log_lines_carry_the_task_id() -> None:
    record = logging.LogRecord("axx_backend.x", logging.WARNING, __file__, 1, "task %s: %s", (7, "bad image"), None)
    record.task_id, record.project = 7, "3"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "task 7: bad image" and entry["level"] == "WARNING"
    assert entry["task_id"] == 7 and entry["project"] == "3" and "model_version" not in entry
    assert entry["time"].endswith("Z")


def test_unknown_log_format_is_an_error() -> None:
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        configure_logging("INFO", "xml")


def test_latency_percentiles_over_the_window() -> None:
    metrics = Metrics(window=100)
    for ms in range(1, 201):  # only the last 100 (101..200 ms) stay in the window
        metrics.observe("/predict", ms / 1000)
    latency = metrics.snapshot()["latency_seconds"]["/predict"]
    assert latency["count"] == 100
    assert latency["p50"] == pytest.approx(0.1505) and latency["max"] == pytest.approx(0.2)
    assert latency["p95"] == pytest.approx(0.19505) and latency["p99"] == pytest.approx(0.19901)


def test_prometheus_text_has_every_family() -> None:
    metrics = Metrics()
    metrics.request("/predict")
    metrics.observe("/predict", 0.5)
    metrics.predict({"predicted": 3, "failed": 1, "seconds": 2.0, "inference_seconds": 1.5})
    snapshot = {
        **metrics.snapshot(),
        "model_versions": {"4": "v1"},
        "jobs": {"queues": {"axx-training": {"queued": 2, "started": 1, "failed": 0}}},
    }
    text = prometheus_text(snapshot)
    assert 'axx_requests_total{path="/predict"} 1' in text
    assert 'axx_request_latency_seconds{path="/predict",quantile="0.95"} 0.5' in text
    assert 'axx_tasks_total{outcome="predicted"} 3' in text and 'axx_tasks_total{outcome="failed"} 1' in text
    assert 'axx_model_version_info{project="4",version="v1"} 1' in text
    assert 'axx_queue_jobs{queue="axx-training",state="queued"} 2' in text
    for line in text.splitlines():
        assert line.startswith("#") or line.startswith("axx_"), line


def test_prometheus_multiprocess_mode_sums_the_workers(tmp_path) -> None:
    """Two forked "workers" count into PROMETHEUS_MULTIPROC_DIR; the Prometheus text sums them, while the JSON
    snapshot stays the answering process's. In a subprocess: prometheus-client reads the variable at import."""
    import os
    import subprocess
    import sys

    code = """
import multiprocessing

def worker(n):
    from axx_backend.server.metrics import Metrics
    metrics = Metrics()
    for _ in range(n):
        metrics.request("/predict")
        metrics.observe("/predict", 0.2)
    metrics.predict({"predicted": n, "inference_seconds": 0.5})

if __name__ == "__main__":
    for n in (3, 4):
        p = multiprocessing.get_context("fork").Process(target=worker, args=(n,))
        p.start()
        p.join()
        assert p.exitcode == 0
    from axx_backend.server.metrics import Metrics, prometheus_text
    metrics = Metrics()
    metrics.request("/metrics")
    print(prometheus_text({**metrics.snapshot(), "model_versions": {"4": "v1"}}))
"""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert 'axx_requests_total{path="/predict"} 7.0' in text and 'axx_requests_total{path="/metrics"} 1.0' in text
    assert 'axx_tasks_total{outcome="predicted"} 7.0' in text and "axx_inference_seconds_total 1.0" in text
    assert 'axx_request_duration_seconds_count{path="/predict"} 7.0' in text
    assert 'axx_request_duration_seconds_bucket{le="0.25",path="/predict"} 7.0' in text
    assert 'axx_model_version_info{project="4",version="v1"} 1.0' in text
    assert text.count("# TYPE axx_requests_total counter") == 1  # from the files only, not also the snapshot
    assert len(list(tmp_path.glob("counter_*.db"))) == 3  # the two workers and this process
