"""Per-process counters for /metrics and /health (each gunicorn worker keeps its own)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any


class Metrics:
    def __init__(self) -> None:
        self.started = time.time()
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.tasks: Counter[str] = Counter()  # predicted / failed / skipped_budget / skipped_transient / no_model
        self.inference_seconds = 0.0
        self.predict_seconds = 0.0
        self.last_predict: dict[str, Any] = {}

    def request(self, endpoint: str) -> None:
        with self._lock:
            self.requests[endpoint] += 1

    def error(self, endpoint: str) -> None:
        with self._lock:
            self.errors[endpoint] += 1

    def predict(self, summary: dict[str, Any]) -> None:
        with self._lock:
            for key in ("predicted", "failed", "skipped_budget", "skipped_transient", "invalid", "no_model"):
                self.tasks[key] += int(summary.get(key, 0))
            self.inference_seconds += float(summary.get("inference_seconds", 0.0))
            self.predict_seconds += float(summary.get("seconds", 0.0))
            self.last_predict = dict(summary)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            predicted = self.tasks["predicted"]
            return {
                "uptime_seconds": round(time.time() - self.started, 1),
                "requests": dict(self.requests),
                "errors": dict(self.errors),
                "tasks": dict(self.tasks),
                "inference_seconds": round(self.inference_seconds, 3),
                "predict_seconds": round(self.predict_seconds, 3),
                "tasks_per_second": round(predicted / self.predict_seconds, 3) if self.predict_seconds else None,
                "last_predict": self.last_predict,
            }
