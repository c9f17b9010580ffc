"""Peak memory on large images (issue 12), everything on 127.0.0.1:

1. `axx-backend annotate` on a folder with one 10000x10000 grey PNG: the peak RSS of that process;
2. `axx-backend serve` after `--requests` /predict calls of `--tasks` tasks, each a 4096x4096 JPEG served from
   127.0.0.1: the worker's peak RSS (VmHWM) and what it still holds afterwards (VmRSS).

    .venv/bin/python benchmarks/memory_peak.py --model-dir MODEL_DIR --work runs/memory [--tasks 8 --requests 5]

MODEL_DIR holds any trained version (`make demo`, or `axx-backend train ... --preset offline`). Prints one JSON
object; sizes in MB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import ls_harness as h  # noqa: E402  (the static file server and the wait for /health)


def make_images(work: Path) -> tuple[Path, Path]:
    folder, static = work / "big", work / "static"
    folder.mkdir(parents=True, exist_ok=True)
    static.mkdir(parents=True, exist_ok=True)
    side = np.arange(10_000)
    grey = ((side // 97 % 2).astype(np.uint8)[None, :] ^ (side // 89 % 2).astype(np.uint8)[:, None]) * 60 + 90
    grey[3000:5000, 4000:6500] = 230  # uint8 throughout: this process stays far below annotate's peak
    Image.fromarray(grey, "L").save(folder / "grey10k.png")
    del grey
    rgb = np.random.default_rng(0).integers(0, 255, (4096, 4096, 3), dtype=np.uint8)
    rgb[1000:2000, 1000:2500] = [220, 30, 30]
    Image.fromarray(rgb).save(static / "j4096.jpg", quality=90)
    return folder, static


def annotate_peak_mb(folder: Path, out: Path, model_dir: str) -> float:
    """The annotate process's own peak RSS (Linux counts the parent's peak in too: this one stays small)."""
    cmd = [sys.executable, "-m", "axx_backend", "annotate", str(folder), "--out", str(out), "--model-dir", model_dir]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"annotate failed ({proc.returncode})")
    return usage.ru_maxrss / 1024


def server_rss_mb(static: Path, model_dir: str, tasks: int, requests: int, port: int) -> dict[str, float]:
    files = h.StaticServer(static)
    image = f"{files.url}/j4096.jpg"
    env = {**os.environ, "MODEL_DIR": model_dir, "AXX_ALLOWED_HOSTS": f"127.0.0.1:{files.port}",
           "HF_HUB_OFFLINE": "1", "AXX_SYNC_MODEL_VERSION": "false", "LOG_LEVEL": "WARNING"}  # fmt: skip
    cmd = [sys.executable, "-m", "axx_backend", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        h.wait_http(base + "/health", 120, proc=server)
        from axx_backend.core.synthetic import LABEL_CONFIG

        body = {"tasks": [{"id": i, "data": {"image": image}} for i in range(tasks)], "project": "1.1",
                "label_config": LABEL_CONFIG}  # fmt: skip
        data = json.dumps(body).encode()
        for _ in range(requests):
            req = urllib.request.Request(base + "/predict", data, {"Content-Type": "application/json"})
            results = json.loads(urllib.request.urlopen(req, timeout=600).read())["results"]
            assert all(r and r["result"] for r in results), results
        time.sleep(2)
        (worker,) = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True).stdout.split()
        status = dict(line.split(":", 1) for line in Path(f"/proc/{worker}/status").read_text().splitlines())
        return {key: int(status[key].split()[0]) / 1024 for key in ("VmHWM", "VmRSS")}
    finally:
        server.terminate()
        server.wait(30)
        files.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/memory"))
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--port", type=int, default=9197)
    args = parser.parse_args()
    folder, static = make_images(args.work)
    annotate = annotate_peak_mb(folder, args.work / "annotated", args.model_dir)
    server = server_rss_mb(static, args.model_dir, args.tasks, args.requests, args.port)
    print(json.dumps({
        "annotate_10000px_png_peak_mb": round(annotate),
        "server_peak_mb": round(server["VmHWM"]), "server_held_mb": round(server["VmRSS"]),
        "tasks_per_request": args.tasks, "requests": args.requests,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
