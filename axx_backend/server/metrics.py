"""Per-process counters for /metrics and /health (each gunicorn worker keeps its own).

`GET /metrics` answers JSON; `GET /metrics?format=prometheus` the same numbers in Prometheus' text format.
Latency percentiles are over the last `window` requests of each endpoint.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any

import numpy as np

TASK_OUTCOMES = ("predicted", "failed", "skipped_budget", "skipped_transient", "invalid", "no_model")


class Metrics:
    def __init__(self, window: int = 2000) -> None:
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

    def request(self, endpoint: str) -> None:
        with self._lock:
            self.requests[endpoint] += 1

    def error(self, endpoint: str) -> None:
        with self._lock:
            self.errors[endpoint] += 1

    def observe(self, endpoint: str, seconds: float) -> None:
        with self._lock:
            self.latencies.setdefault(endpoint, deque(maxlen=self.window)).append(seconds)

    def predict(self, summary: dict[str, Any]) -> None:
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


def prometheus_text(snapshot: dict[str, Any]) -> str:
    """The snapshot of `/metrics` (with `model_versions` and `jobs`) in Prometheus' text exposition format."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, Any], float]]) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        for labels, value in samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{text}}} {value}" if text else f"{name} {value}")

    metric("axx_uptime_seconds", "gauge", "Seconds since this process started.", [({}, snapshot["uptime_seconds"])])
    metric("axx_requests_total", "counter", "HTTP requests by path.",
           [({"path": k}, v) for k, v in snapshot["requests"].items()])  # fmt: skip
    metric("axx_request_errors_total", "counter", "Failed HTTP requests by path.",
           [({"path": k}, v) for k, v in snapshot["errors"].items()])  # fmt: skip
    metric("axx_request_latency_seconds", "summary", "Request latency over the recent window.",
           [({"path": k, "quantile": q}, s[f"p{int(float(q) * 100)}"])
            for k, s in snapshot["latency_seconds"].items() for q in ("0.5", "0.95", "0.99")])  # fmt: skip
    metric("axx_tasks_total", "counter", "Tasks answered by /predict, by outcome.",
           [({"outcome": k}, v) for k, v in snapshot["tasks"].items()])  # fmt: skip
    metric("axx_inference_seconds_total", "counter", "Seconds spent in model inference.",
           [({}, snapshot["inference_seconds"])])  # fmt: skip
    metric("axx_model_version_info", "gauge", "The version serving each project (1).",
           [({"project": p, "version": v}, 1) for p, v in snapshot.get("model_versions", {}).items()])  # fmt: skip
    queues = snapshot.get("jobs", {}).get("queues", {})
    metric("axx_queue_jobs", "gauge", "RQ jobs by queue and state.",
           [({"queue": q, "state": s}, n) for q, states in queues.items() for s, n in states.items()])  # fmt: skip
    return "\n".join(lines) + "\n"


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
