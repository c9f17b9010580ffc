"""Counters for /metrics and /health, and their Prometheus exposition (prometheus-client).

`GET /metrics` answers JSON: the counters of the process that answers (each gunicorn worker keeps its own);
latency percentiles are over the last `window` requests of each endpoint. `GET /metrics?format=prometheus`
gives the same snapshot in Prometheus' text format, written by prometheus-client (`SnapshotCollector`).

With several gunicorn workers (`WORKERS` > 1) a scrape reaches one worker at a time, so per-process counters
would jump between scrapes. prometheus-client's multiprocess mode fixes that: with `PROMETHEUS_MULTIPROC_DIR`
set (`axx-backend serve` makes one when WORKERS > 1 and wipes it at start), every worker also records its
requests, errors, task outcomes, inference time and a latency histogram in that directory, and the Prometheus
answer sums them over all workers (`MultiProcessCollector`). The gauges (uptime, versions, queues) and the
latency window's quantiles remain those of the answering process.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

TASK_OUTCOMES = ("predicted", "failed", "skipped_budget", "skipped_transient", "invalid", "no_model")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 100.0)  # s; LS waits 100 s


def multiprocess_dir(env: dict[str, str] | None = None) -> str | None:
    """prometheus-client's multiprocess directory, when one is set (it must exist)."""
    path = (os.environ if env is None else env).get(MULTIPROC_ENV)
    return path if path and os.path.isdir(path) else None


class SharedCounters:
    """The counters every worker adds to prometheus-client's multiprocess files (not registered anywhere:
    `MultiProcessCollector` reads them back from the files, summed over the workers)."""

    def __init__(self) -> None:
        self.requests = PromCounter("axx_requests", "HTTP requests by path.", ["path"], registry=None)
        self.errors = PromCounter("axx_request_errors", "Failed HTTP requests by path.", ["path"], registry=None)
        self.tasks = PromCounter("axx_tasks", "Tasks answered by /predict, by outcome.", ["outcome"], registry=None)
        self.inference = PromCounter("axx_inference_seconds", "Seconds spent in model inference.", registry=None)
        self.latency = PromHistogram(
            "axx_request_duration_seconds", "Request latency by path.", ["path"], buckets=LATENCY_BUCKETS,
            registry=None,
        )  # fmt: skip

    def predict(self, summary: dict[str, Any]) -> None:
        for key in TASK_OUTCOMES:
            self.tasks.labels(key).inc(int(summary.get(key, 0)))
        self.inference.inc(float(summary.get("inference_seconds", 0.0)))


# The families `SharedCounters` sums over the workers: in multiprocess mode they come from the files.
SHARED_FAMILIES = frozenset({"axx_requests", "axx_request_errors", "axx_tasks", "axx_inference_seconds"})


class Metrics:
    def __init__(self, window: int = 2000, shared: SharedCounters | None = None) -> None:
        self.started = time.time()
        self.window = window
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()  # answers with a 5xx status, or errors counted by a handler
        self.latencies: dict[str, deque[float]] = {}
        self.tasks: Counter[str] = Counter()
        self.inference_seconds = 0.0
        self.predict_seconds = 0.0
        self.last_predict: dict[str, Any] = {}
        # Under PROMETHEUS_MULTIPROC_DIR the counts also go to the shared files (see the module's docstring).
        self.shared = shared if shared is not None else (SharedCounters() if multiprocess_dir() else None)

    def request(self, endpoint: str) -> None:
        with self._lock:
            self.requests[endpoint] += 1
        if self.shared is not None:
            self.shared.requests.labels(endpoint).inc()

    def error(self, endpoint: str) -> None:
        with self._lock:
            self.errors[endpoint] += 1
        if self.shared is not None:
            self.shared.errors.labels(endpoint).inc()

    def observe(self, endpoint: str, seconds: float) -> None:
        with self._lock:
            self.latencies.setdefault(endpoint, deque(maxlen=self.window)).append(seconds)
        if self.shared is not None:
            self.shared.latency.labels(endpoint).observe(seconds)

    def predict(self, summary: dict[str, Any]) -> None:
        if self.shared is not None:
            self.shared.predict(summary)
        with self._lock:
            for key in TASK_OUTCOMES:
                self.tasks[key] += int(summary.get(key, 0))
            self.inference_seconds += float(summary.get("inference_seconds", 0.0))
            self.predict_seconds += float(summary.get("seconds", 0.0))
            self.last_predict = dict(summary)

    def latency(self) -> dict[str, dict[str, float]]:
        with self._lock:
            samples = {k: np.asarray(v) for k, v in self.latencies.items() if v}
        return {
            endpoint: {
                "count": int(s.size),
                "p50": round(float(np.percentile(s, 50)), 6),
                "p95": round(float(np.percentile(s, 95)), 6),
                "p99": round(float(np.percentile(s, 99)), 6),
                "max": round(float(s.max()), 6),
            }
            for endpoint, s in samples.items()
        }

    def snapshot(self) -> dict[str, Any]:
        latency = self.latency()
        with self._lock:
            predicted = self.tasks["predicted"]
            return {
                "uptime_seconds": round(time.time() - self.started, 1),
                "requests": dict(self.requests),
                "errors": dict(self.errors),
                "latency_seconds": latency,
                "tasks": dict(self.tasks),
                "inference_seconds": round(self.inference_seconds, 3),
                "predict_seconds": round(self.predict_seconds, 3),
                "tasks_per_second": round(predicted / self.predict_seconds, 3) if self.predict_seconds else None,
                "last_predict": self.last_predict,
            }


def prometheus_text(snapshot: dict[str, Any], shared_dir: str | None = None) -> str:
    """The snapshot of `/metrics` (with `model_versions` and `jobs`) in Prometheus' text exposition format.

    `shared_dir` (default: `PROMETHEUS_MULTIPROC_DIR` when set) holds every worker's counters: those families
    are then summed over the workers instead of taken from this process's snapshot.
    """
    shared_dir = shared_dir or multiprocess_dir()
    registry = CollectorRegistry(auto_describe=False)
    if shared_dir:
        MultiProcessCollector(registry, path=shared_dir)
    registry.register(SnapshotCollector(snapshot, skip=SHARED_FAMILIES if shared_dir else frozenset()))
    return generate_latest(registry).decode()


class SnapshotCollector:
    """A prometheus-client collector over one `/metrics` snapshot (a dict), minus the families in `skip`."""

    def __init__(self, snapshot: dict[str, Any], skip: frozenset[str] = frozenset()) -> None:
        self.snapshot = snapshot
        self.skip = skip

    def collect(self) -> Iterator[Metric]:
        families = [*self._process(), *self._counters(), *self._state()]
        yield from (f for f in families if f.name not in self.skip)

    def _process(self) -> Iterator[Metric]:
        s = self.snapshot
        yield GaugeMetricFamily("axx_uptime_seconds", "Seconds since this process started.", s["uptime_seconds"])
        latency = Metric("axx_request_latency_seconds", "Request latency over the recent window (this process).",
                         "summary")  # fmt: skip
        for path, stats in s["latency_seconds"].items():
            for q in ("0.5", "0.95", "0.99"):
                latency.add_sample(latency.name, {"path": path, "quantile": q}, stats[f"p{int(float(q) * 100)}"])
        yield latency

    def _counters(self) -> Iterator[Metric]:
        s = self.snapshot
        yield _labelled(CounterMetricFamily, "axx_requests", "HTTP requests by path.", "path", s["requests"])
        yield _labelled(CounterMetricFamily, "axx_request_errors", "Failed HTTP requests by path.", "path",
                        s["errors"])  # fmt: skip
        yield _labelled(CounterMetricFamily, "axx_tasks", "Tasks answered by /predict, by outcome.", "outcome",
                        s["tasks"])  # fmt: skip
        yield CounterMetricFamily("axx_inference_seconds", "Seconds spent in model inference.",
                                  s["inference_seconds"])  # fmt: skip

    def _state(self) -> Iterator[Metric]:
        versions = GaugeMetricFamily(
            "axx_model_version_info", "The version serving each project (1).", labels=["project", "version"]
        )
        for project, version in self.snapshot.get("model_versions", {}).items():
            versions.add_metric([project, version], 1)
        yield versions
        queues = GaugeMetricFamily("axx_queue_jobs", "RQ jobs by queue and state.", labels=["queue", "state"])
        for queue, states in self.snapshot.get("jobs", {}).get("queues", {}).items():
            for state, n in states.items():
                queues.add_metric([queue, state], n)
        yield queues


def _labelled(kind: type, name: str, help_: str, label: str, values: dict[str, float]) -> Metric:
    family = kind(name, help_, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family
