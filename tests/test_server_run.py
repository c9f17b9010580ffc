"""`serve()` runs gunicorn with the app: health, basic auth and the worker/thread settings."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import requests

from axx_backend.server.run import gunicorn_options
from axx_backend.server.settings import ServerSettings
from tests import ls_harness as h


def test_gunicorn_options_follow_workers_threads_and_budget() -> None:
    s = ServerSettings.from_env({"WORKERS": "2", "THREADS": "3", "AXX_PREDICT_TIME_BUDGET": "90", "LOG_LEVEL": "debug"})
    opts = gunicorn_options("127.0.0.1", 9999, s)
    assert opts["bind"] == "127.0.0.1:9999" and opts["workers"] == 2 and opts["threads"] == 3
    assert opts["worker_class"] == "gthread" and opts["timeout"] >= 150 and opts["loglevel"] == "debug"
    assert opts["preload_app"] is False  # each worker loads its models after the fork


def test_serve_answers_health_with_basic_auth(tmp_path: Path) -> None:
    env = {
        "MODEL_DIR": str(tmp_path / "models"),
        "BASIC_AUTH_USER": "ls",
        "BASIC_AUTH_PASS": "pw",
        "THREADS": "2",
        "LABEL_STUDIO_URL": "",
        "LABEL_STUDIO_API_KEY": "",
    }
    os.environ.pop("AXX_E2E_SHOW_LOGS", None)
    with h.backend_server(env, tmp_path, timeout=120, auth=("ls", "pw")) as url:
        assert requests.get(f"{url}/health", timeout=10).status_code == 401
        token = base64.b64encode(b"ls:pw").decode()
        health = requests.get(f"{url}/health", headers={"Authorization": f"Basic {token}"}, timeout=10).json()
        assert health["status"] == "UP" and health["ready"] is False
        assert any("LABEL_STUDIO_URL" in p for p in health["problems"])


def test_two_workers_sum_their_counters_in_the_prometheus_answer(tmp_path: Path) -> None:
    """WORKERS=2 with PROMETHEUS_MULTIPROC_DIR: whichever worker answers, the Prometheus text counts the
    requests both served (prometheus-client's multiprocess mode)."""
    shared = tmp_path / "prometheus"
    env = {"MODEL_DIR": str(tmp_path / "models"), "WORKERS": "2", "THREADS": "2", "LABEL_STUDIO_URL": "",
           "LABEL_STUDIO_API_KEY": "", "PROMETHEUS_MULTIPROC_DIR": str(shared)}  # fmt: skip
    with h.backend_server(env, tmp_path, timeout=180) as url:
        # The server is up when one worker answers; the other may still be importing torch on a busy machine
        # (a CI run saw the first worker take all of 300 back-to-back requests), so keep asking for a while.
        sent, deadline = 0, time.monotonic() + 120
        while sent < 10 or (time.monotonic() < deadline and len(list(shared.glob("counter_*.db"))) < 2):
            assert requests.get(f"{url}/versions", timeout=30).status_code == 200
            sent += 1
            time.sleep(0.02)
        assert len(list(shared.glob("counter_*.db"))) == 2, "one worker answered every request"
        text = requests.get(f"{url}/metrics?format=prometheus", timeout=30).text
    assert f'axx_requests_total{{path="/versions"}} {float(sent)}' in text
    assert f'axx_request_duration_seconds_count{{path="/versions"}} {float(sent)}' in text
