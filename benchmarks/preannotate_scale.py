"""Pre-annotate a generated 1,000-task project end to end: real Label Studio, Redis and two RQ workers (loopback).

Starts Label Studio 1.23.2 (its venv: `$AXX_LS_VENV`, see tests/ls_harness.py), a static file server with
`--tasks` generated images imported as URL tasks, redis-server and two `axx-backend worker` processes; trains a
first version (`axx-backend train`, offline members); then runs the README's command

    axx-backend preannotate --project ID --chunk 32

With `--kill-at F` (default 0.3) one worker is SIGKILLed once a fraction F of the tasks has predictions, and a
fresh worker takes its place (a lost machine). Then it checks through the API that every task has exactly one
prediction of the version (none lost, none duplicated), runs the command again (it must post nothing), and
prints a table row for the README. With `--compare-annotate` (default on) it then runs `axx-backend annotate` on
the same image files with the same version on the same machine (one process, all cores) and prints the two
throughputs and their ratio (use `--kill-at 0` for a like-for-like comparison).

    .venv/bin/python benchmarks/preannotate_scale.py --work runs/scale --tasks 1000
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
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from axx_backend.core.synthetic import LABEL_CONFIG, make_dataset, make_image  # noqa: E402
from axx_backend.core.versions import ModelStore  # noqa: E402
from tests import ls_harness as h  # noqa: E402
from tests.redis_harness import RedisServer, Worker  # noqa: E402

CLI = str(Path(sys.executable).parent / "axx-backend")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/scale"))
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128, help="generated image side (px)")
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-at", type=float, default=0.3, help="kill a worker at this fraction (0: never)")
    parser.add_argument(
        "--compare-annotate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="afterwards, time `axx-backend annotate` on the same images and version (default on)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    (work / "static").mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    ls = h.LabelStudio(work).start()
    redis = RedisServer(work)
    workers: list[Worker] = []
    try:
        models = work / "models"
        dataset = make_dataset(work / "dataset", n_per_class=12, size=128, seed=0)
        print("training the version ...", flush=True)
        subprocess.run([CLI, "train", str(dataset), "--model-dir", str(models), "--preset", "offline",
                        "--input-size", "224"], check=True, env=env, stdout=subprocess.DEVNULL)  # fmt: skip
        version = ModelStore(models).current()
        rng = np.random.default_rng(7)
        for i in range(args.tasks):
            buf = io.BytesIO()
            Image.fromarray(make_image(rng, args.size, i % 2 == 0)[0]).save(buf, format="PNG")
            (work / "static" / f"s{i:05d}.png").write_bytes(buf.getvalue())
        ls.wait(300)
        with h.StaticServer(work / "static") as static:
            pid = ls.create_project("AXX scale", LABEL_CONFIG)
            ls.import_tasks(pid, [{"image": f"{static.url}/s{i:05d}.png"} for i in range(args.tasks)])
            run_env = {
                "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token, "MODEL_DIR": str(models),
                "REDIS_URL": redis.url, "AXX_ALLOWED_HOSTS": f"127.0.0.1:{static.port}", "LOG_LEVEL": "INFO",
                "AXX_HEARTBEAT_TTL": "20",
            }  # fmt: skip
            workers = [Worker(redis.url, work / f"worker{i}.log", run_env) for i in range(args.workers)]
            killed = threading.Event()

            def kill_one_when_due() -> None:
                while args.kill_at > 0 and not killed.is_set():
                    time.sleep(2)
                    done = ls.api("GET", "/api/tasks", params={"project": pid, "page_size": 1, "include": "id"})[
                        "total_predictions"
                    ]  # a count, not the predictions themselves
                    if done >= args.kill_at * args.tasks:
                        workers[0].kill()
                        workers.append(Worker(redis.url, work / "worker-replacement.log", run_env))
                        print(f"killed worker 0 at {done} predictions; started a replacement", flush=True)
                        killed.set()

            killer = threading.Thread(target=kill_one_when_due, daemon=True)
            killer.start()
            cmd = [CLI, "preannotate", "--project", str(pid), "--chunk", str(args.chunk), "--json"]
            t0 = time.monotonic()
            first = subprocess.run(cmd, env={**env, **run_env}, capture_output=True, text=True, timeout=7200)
            seconds = time.monotonic() - t0
            killed.set()
            sys.stderr.write(first.stderr[-3000:])
            summary = json.loads(first.stdout.strip().splitlines()[-1])
            predictions = ls.predictions(pid)
            per_task = Counter(int(p["task"]) for p in predictions)
            task_ids = [t["id"] for t in ls.tasks(pid)]
            again = subprocess.run(cmd, env={**env, **run_env}, capture_output=True, text=True, timeout=600)
            second = json.loads(again.stdout.strip().splitlines()[-1])
            after = len(ls.predictions(pid))
    finally:
        for w in workers:
            w.stop()
        redis.stop()
        ls.stop()

    annotate = time_annotate(work, models, env) if args.compare_annotate else None
    result = {
        "tasks": args.tasks,
        "workers": args.workers,
        "chunk": args.chunk,
        "version": version,
        "exit_code": first.returncode,
        "seconds": round(seconds, 1),
        "tasks_per_second": round(args.tasks / seconds, 2),
        "killed_a_worker": args.kill_at > 0,
        "retried_chunks": summary["retried_chunks"],
        "failed_chunks": len(summary["failed_chunks"]),
        "predictions": len(predictions),
        "tasks_with_exactly_one": sum(per_task.get(t) == 1 for t in task_ids),
        "tasks_without": sum(t not in per_task for t in task_ids),
        "tasks_with_more_than_one": sum(n > 1 for n in per_task.values()),
        "wrong_version": sum(p["model_version"] != version for p in predictions),
        "second_run_posted": second["posted"],
        "predictions_after_second_run": after,
    }
    if annotate is not None:
        result["annotate_seconds"] = round(annotate, 1)
        result["annotate_images_per_second"] = round(args.tasks / annotate, 2)
        result["preannotate_vs_annotate"] = round(annotate / seconds, 3)
    print(json.dumps(result, indent=2))
    print(
        "\n| tasks | workers | chunk | worker killed | wall time | tasks/s | retried chunks | predictions | "
        "exactly one per task | lost | duplicated | second run posted |\n" + "|---" * 12 + "|"
    )
    print(
        f"| {args.tasks} | {args.workers} | {args.chunk} | {'yes' if args.kill_at > 0 else 'no'} | "
        f"{result['seconds']:.0f} s | {result['tasks_per_second']} | {result['retried_chunks']} | "
        f"{result['predictions']} | {result['tasks_with_exactly_one']} | {result['tasks_without']} | "
        f"{result['tasks_with_more_than_one']} | {result['second_run_posted']} |"
    )
    if annotate is not None:
        print(
            f"\nannotate on the same {args.tasks} images: {annotate:.0f} s, {result['annotate_images_per_second']} "
            f"images/s; preannotate / annotate throughput {result['preannotate_vs_annotate']:.2f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    ok = (
        first.returncode == 0
        and result["tasks_with_exactly_one"] == args.tasks
        and result["wrong_version"] == 0
        and second["posted"] == 0
        and after == args.tasks
    )
    print("OK: none lost, none duplicated" if ok else "NOT OK", flush=True)
    return 0 if ok else 1


def time_annotate(work: Path, models: Path, env: dict[str, str]) -> float:
    """Seconds `axx-backend annotate` takes on the task images (the folder the static server served)."""
    out = work / "annotated"
    cmd = [CLI, "annotate", str(work / "static"), "--out", str(out), "--model-dir", str(models)]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t0


if __name__ == "__main__":
    sys.exit(main())
