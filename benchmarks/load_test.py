"""Load test (loopback only, bounded): concurrent /predict calls while a training job runs and the version switches.

Everything runs on 127.0.0.1 in a work directory: a generated data set and a first version (`axx-backend train`),
a static file server with the task images, redis-server, one `axx-backend worker`, and `axx-backend serve`
(the README's native commands). `--clients` threads post /predict (each `--tasks` URL tasks) in a loop; after
`--warmup` seconds a real training job goes to the worker through RQ (the same queue and code the /webhook
uses, on the generated folder), which writes a new version and switches `current`. The clients go on until the
server has answered with the new version for `--after` seconds (or `--timeout` is reached).

Reports latency percentiles per phase (before the job, during training, after the switch), errors (HTTP status
other than 200, a wrong number of results, or a task without prediction; target 0), and the version seen by
each request: the switch must happen without a failed request.

    .venv/bin/python benchmarks/load_test.py --work runs/load --clients 4 --json runs/load/result.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from axx_backend.core.synthetic import LABEL_CONFIG, make_dataset, make_image  # noqa: E402
from axx_backend.core.versions import ModelStore  # noqa: E402
from axx_backend.jobs import RQJobs  # noqa: E402
from tests import ls_harness as h  # noqa: E402  (process helpers: free ports, waiting, stopping)
from tests.redis_harness import RedisServer, Worker  # noqa: E402

CLI = str(Path(sys.executable).parent / "axx-backend")


def percentiles(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    a = np.asarray(values)
    return {
        "n": int(a.size),
        "p50": round(float(np.percentile(a, 50)), 3),
        "p95": round(float(np.percentile(a, 95)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "max": round(float(a.max()), 3),
    }


def client_loop(url: str, tasks: list[dict[str, Any]], stop: threading.Event, out: list[dict[str, Any]]) -> None:
    session = requests.Session()
    i = 0
    while not stop.is_set():
        batch = [tasks[(i + k) % len(tasks)] for k in range(len(tasks))]
        i += 1
        body = {"tasks": batch, "project": "1.0", "label_config": LABEL_CONFIG, "params": {"context": None}}
        t0 = time.time()
        record: dict[str, Any] = {"start": t0}
        try:
            r = session.post(f"{url}/predict", json=body, timeout=120)
            record["status"] = r.status_code
            if r.status_code == 200:
                answer = r.json()
                results = answer.get("results", [])
                record["version"] = answer.get("model_version")
                record["ok"] = len(results) == len(batch) and all(isinstance(x, dict) and x for x in results)
            else:
                record["ok"] = False
                record["error"] = r.text[:200]
        except requests.RequestException as exc:
            record.update(status=0, ok=False, error=f"{type(exc).__name__}: {exc}")
        record["latency"] = time.time() - t0
        out.append(record)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/load"))
    parser.add_argument("--clients", type=int, default=4, help="concurrent /predict callers")
    parser.add_argument("--tasks", type=int, default=2, help="tasks per /predict request")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of load before the training job")
    parser.add_argument("--after", type=float, default=20.0, help="seconds of load after the switch")
    parser.add_argument("--timeout", type=float, default=900.0, help="bound on the whole loaded phase")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args()

    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    (work / "static").mkdir(parents=True)
    models = work / "models"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    dataset = make_dataset(work / "dataset", n_per_class=12, size=128, seed=0)
    train_cmd = [CLI, "train", str(dataset), "--model-dir", str(models), "--preset", "offline", "--input-size", "224"]
    print("training the first version ...", flush=True)
    subprocess.run(train_cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    first = ModelStore(models).current()

    rng = np.random.default_rng(3)
    for i in range(max(8, args.tasks)):
        buf = io.BytesIO()
        Image.fromarray(make_image(rng, 128, i % 2 == 0)[0]).save(buf, format="PNG")
        (work / "static" / f"t{i}.png").write_bytes(buf.getvalue())

    stop = threading.Event()
    records: list[dict[str, Any]] = []
    redis = RedisServer(work)
    worker = None
    try:
        with h.StaticServer(work / "static") as static:
            server_env = {
                "MODEL_DIR": str(models), "REDIS_URL": redis.url, "AXX_ALLOWED_HOSTS": f"127.0.0.1:{static.port}",
                "AXX_PRESET": "offline", "AXX_INPUT_SIZE": "224", "WORKERS": "1", "THREADS": str(args.clients + 2),
                "LOG_LEVEL": "WARNING",
            }  # fmt: skip
            worker = Worker(redis.url, work / "worker.log", server_env)
            tasks = [{"id": i + 1, "data": {"image": f"{static.url}/t{i}.png"}} for i in range(args.tasks)]
            with h.backend_server(server_env, work) as url:
                requests.post(f"{url}/predict", json={"tasks": tasks[:1], "project": "1.0",
                                                      "label_config": LABEL_CONFIG}, timeout=300)  # fmt: skip
                print(f"server {url} serves {first}; {args.clients} clients x {args.tasks} tasks", flush=True)
                threads = [
                    threading.Thread(target=client_loop, args=(url, tasks, stop, records), daemon=True)
                    for _ in range(args.clients)
                ]
                t_start = time.time()
                for t in threads:
                    t.start()
                time.sleep(args.warmup)
                t_job = time.time()
                payload = {"source": "folder", "dataset_dir": str(dataset), "model_dir": str(models)}
                submitted = RQJobs(redis.url).submit("load-test", payload, reason="load test")
                print(f"training job {submitted}", flush=True)
                deadline = t_start + args.timeout
                t_switch = None
                while time.time() < deadline:
                    time.sleep(0.5)
                    if t_switch is None:
                        new = [r for r in list(records) if r.get("version") not in (None, first)]
                        if new:
                            t_switch = min(r["start"] for r in new)
                            print(f"switch seen {t_switch - t_job:.1f} s after the job was queued", flush=True)
                    elif time.time() > t_switch + args.after:
                        break
                stop.set()
                for t in threads:
                    t.join(150)
                status = RQJobs(redis.url).status("load-test")
    finally:
        stop.set()
        if worker is not None:
            worker.stop()
        redis.stop()

    second = ModelStore(models).current()
    finished = status.get("finished")
    phases = {
        "before the job": [r for r in records if r["start"] < t_job],
        "while training": [r for r in records if r["start"] >= t_job and (t_switch is None or r["start"] < t_switch)],
        "after the switch": [r for r in records if t_switch is not None and r["start"] >= t_switch],
    }
    errors = [r for r in records if not r.get("ok")]
    # Requests overlap, so the switch is a short window, not an instant: after it, nobody gets the old version.
    stale = [r for r in records if t_switch is not None and r["start"] > t_switch + 1.0 and r.get("version") == first]
    result = {
        "clients": args.clients,
        "tasks_per_request": args.tasks,
        "requests": len(records),
        "errors": len(errors),
        "error_examples": errors[:3],
        "first_version": first,
        "new_version": second if second != first else None,
        "training_state": status.get("state"),
        "training_finished": finished,
        "switch_after_job_seconds": round(t_switch - t_job, 1) if t_switch else None,
        "versions_seen": sorted({str(r.get("version")) for r in records}),
        "old_version_after_switch": len(stale),
        "phases": {
            name: {**percentiles([r["latency"] for r in rs]), "errors": sum(not r.get("ok") for r in rs)}
            for name, rs in phases.items()
        },  # fmt: skip
        "all": percentiles([r["latency"] for r in records]),
    }
    print(json.dumps(result, indent=2))
    print("\n| phase | requests | errors | p50 (s) | p95 (s) | p99 (s) | max (s) |\n|---|---|---|---|---|---|---|")
    for name, p in {**result["phases"], "all": {**result["all"], "errors": len(errors)}}.items():
        if p.get("n"):
            print(f"| {name} | {p['n']} | {p['errors']} | {p['p50']} | {p['p95']} | {p['p99']} | {p['max']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    ok = not errors and result["new_version"] is not None and t_switch is not None and not stale
    print("OK: no failed request; the new version served from the switch on" if ok else "NOT OK", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
