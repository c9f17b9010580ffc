"""End to end against a real Label Studio 1.23.2 (its own venv, see tests/ls_harness.py).

One run: start Label Studio while a small model trains on generated images (12 per class, 128 px,
`--preset offline --input-size 224`); create a project (Image + Choices Lesion/Healthy/Needs review +
BrushLabels Lesion + a TextArea for the explanation); import tasks as uploads, as URLs on a local
static server (allow-listed) and as local files; start `axx-backend serve` with a Personal Access Token;
connect it (POST /api/ml); "Retrieve predictions" (POST /api/dm/actions?id=retrieve_tasks_predictions);
then check through the API what Label Studio stored.

The server trains on Redis: the fixture starts a real redis-server and a real `axx-backend worker`
(tests/redis_harness.py) with the server's environment. The learning loop (`learned`): annotations with
a choice and a brush mask (the generated ground truth, RLE by the SDK's mask2rle) go in through
`POST /api/tasks/{id}/annotations`; "Start training" (`POST /api/ml/{id}/train`, pressed twice) runs one
job on the worker; the new version is written under MODEL_DIR/<project id>/; `GET /api/ml/{id}` makes
Label Studio learn it; "Retrieve predictions" again, and the project's sort follows the new version.
While the worker trains, the same START_TRAINING -> new version path runs on a second project with a
second backend without Redis (training in a thread of the server). The learning tests come last in this
file: they add a second prediction per task and move the project's model_version.

`axx-backend preannotate` runs on projects of its own: over RQ with the fixture's worker and two more (one
stopped with SIGTERM and one SIGKILLed while each holds a chunk), then again (nothing posted twice), and
in-process on bad images.

The review flag is not forced (no AXX_UNCERTAINTY_THRESHOLD override): a uniform grey image makes the
members disagree, so it gets a low score and no mask, and any flagged task reads as one. The server
and the reference Annotator run with AXX_BATCH_SIZE=1 because the MC-dropout generator is seeded per batch:
with batch 1 each image's result does not depend on which images share its batch, so the masks can be
compared bit for bit.

Set AXX_E2E_SCREENSHOTS=<dir> to also save the README screenshots there (needs node, playwright-core
and /usr/bin/chromium; see tests/ls_harness.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from axx_backend.core.images import load_image
from axx_backend.core.synthetic import make_dataset, make_image
from axx_backend.core.versions import ModelStore
from axx_backend.jobs import QUEUE_NAME
from axx_backend.labelstudio.config import parse_config
from axx_backend.labelstudio.dataset import annotation_label_and_mask
from tests import ls_harness as h
from tests.redis_harness import RedisServer, Worker

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <Choices name="diagnosis" toName="image" choice="single" showInline="true">
    <Choice value="Lesion"/>
    <Choice value="Healthy"/>
    <Choice value="Needs review"/>
  </Choices>
  <BrushLabels name="lesion" toName="image">
    <Label value="Lesion" background="#ff2200"/>
  </BrushLabels>
  <Header value="Model explanation"/>
  <TextArea name="axx_notes" toName="image" rows="3" editable="true"/>
</View>"""

E2E_ENV = {"AXX_BATCH_SIZE": "1"}
# Training in the worker (and the in-process server) reads its settings from the environment: the same
# preset and input size as the base version; annotation webhooks only count (training on "Start training").
TRAIN_ENV = {"AXX_PRESET": "offline", "AXX_INPUT_SIZE": "224", "AXX_TRAIN_EVERY": "0"}
TRAINING_TIMEOUT = 420  # s for one training run on 2 loaded cores (about 1 min when idle)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    try:
        h.ls_venv()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    started = time.monotonic()
    work = tmp_path_factory.mktemp("e2e")
    ls = h.LabelStudio(work).start()  # migrations take ~1 min on a first start: train meanwhile
    cleanup = contextlib.ExitStack()  # the worker and redis-server, stopped before Label Studio
    try:
        env = {**os.environ, **E2E_ENV}
        make_dataset(work / "train", n_per_class=12, size=128, seed=0)
        models = work / "models"
        train = subprocess.Popen(
            [str(Path(h.PYTHON).parent / "axx-backend"), "train", str(work / "train"), "--model-dir", str(models),
             "--preset", "offline", "--input-size", "224"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip

        # task images: uploads, URL tasks (static server), one local file, a grey one, a corrupt one
        rng = np.random.default_rng(11)
        truth: dict[str, tuple[str, np.ndarray]] = {}  # file name -> (class, generated mask), for annotations

        def generate(name: str, size: int, positive: bool) -> np.ndarray:
            image, mask = make_image(rng, size, positive)
            truth[name] = ("Lesion" if positive else "Healthy", mask)
            return image

        uploads: dict[str, bytes] = {}
        for i in range(5):
            uploads[f"lesion_u{i}.png"] = _png(generate(f"lesion_u{i}.png", 160, True))
        for i in range(3):
            uploads[f"healthy_u{i}.png"] = _png(generate(f"healthy_u{i}.png", 160, False))
        uploads["grey.png"] = _png(np.full((150, 170, 3), 128, np.uint8))
        uploads["corrupt.png"] = b"\x89PNG\r\n\x1a\n this is not really a png" * 10
        static = work / "static"
        static.mkdir()
        urls = {"lesion_url.png": generate("lesion_url.png", 144, True)}
        urls["healthy_url.png"] = generate("healthy_url.png", 144, False)
        for name, arr in urls.items():
            (static / name).write_bytes(_png(arr))
        local = work / "local"
        local.mkdir()
        (local / "lesion_local.png").write_bytes(_png(generate("lesion_local.png", 176, True)))
        files = work / "uploads"
        files.mkdir()
        for name, data in uploads.items():
            (files / name).write_bytes(data)

        out, _ = train.communicate(timeout=900)  # ~40 s on 2 idle cores; generous for a loaded CI machine
        assert train.returncode == 0, f"axx-backend train failed:\n{out.decode(errors='replace')[-3000:]}"
        version = ModelStore(models).current()
        assert version, "training wrote no current version"

        ls.wait(timeout=180)
        pid = ls.create_project("AXX e2e", LABEL_CONFIG)
        ls.api("POST", f"/api/projects/{pid}/import", files=[
            (name, (name, (files / name).read_bytes(), "image/png")) for name in uploads
        ])  # fmt: skip
        with h.StaticServer(static) as st:
            ls.import_tasks(pid, [{"image": f"{st.url}/{name}"} for name in urls])
            storage = ls.api("POST", "/api/storages/localfiles", json={
                "project": pid, "path": str(local), "title": "local", "use_blob_urls": True,
                "regex_filter": r".*\.png",
            })  # fmt: skip
            ls.api("POST", f"/api/storages/localfiles/{storage['id']}/sync")
            pat = ls.create_personal_access_token()

            redis = RedisServer(work)
            cleanup.callback(redis.stop)
            backend_env = {
                **E2E_ENV,
                **TRAIN_ENV,
                "MODEL_DIR": str(models),
                "LABEL_STUDIO_URL": ls.url,
                "LABEL_STUDIO_API_KEY": pat,
                "AXX_ALLOWED_HOSTS": f"127.0.0.1:{st.port}",
                "REDIS_URL": redis.url,
                "WORKERS": "1",
                "THREADS": "4",
                "LOG_LEVEL": "INFO",
            }
            worker = Worker(redis.url, work / "worker.log", backend_env)  # the same environment as the server
            cleanup.callback(worker.stop)
            with h.backend_server(backend_env, work) as backend:
                ml = ls.api("POST", "/api/ml", json={"project": pid, "url": backend, "title": "AXX",
                                                     "is_interactive": False})  # fmt: skip
                t0 = time.monotonic()
                action = ls.api(
                    "POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={pid}",
                    json={"selectedItems": {"all": True, "excluded": []}}, timeout=200,
                )  # fmt: skip
                retrieve_seconds = time.monotonic() - t0
                # the backend PATCHes project.model_version in the background once LS has stored the predictions
                deadline = time.monotonic() + 60
                while ls.api("GET", f"/api/projects/{pid}")["model_version"] != version:
                    assert time.monotonic() < deadline, "project.model_version was not synced to the backend version"
                    time.sleep(0.5)
                health = requests.get(f"{backend}/health", timeout=10).json()
                metrics = requests.get(f"{backend}/metrics", timeout=10).json()
                versions = requests.get(f"{backend}/versions", json={"project": f"{pid}.0"}, timeout=10).json()
                yield {
                    "ls": ls, "project": pid, "version": version, "models": models, "work": work, "ml": ml,
                    "action": action, "retrieve_seconds": retrieve_seconds, "health": health, "metrics": metrics,
                    "versions": versions, "uploads": uploads, "static": static, "local": local, "backend": backend,
                    "started": started, "static_url": st.url, "truth": truth, "redis": redis, "worker": worker,
                    "backend_env": backend_env,
                }  # fmt: skip
    finally:
        cleanup.close()
        ls.stop()
        print(f"e2e stack lived {time.monotonic() - started:.0f} s")


def _tasks(stack: dict[str, Any], query: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return stack["ls"].tasks(stack["project"], query)


def _predictions(stack: dict[str, Any], version: str | None = None) -> dict[int, list[dict[str, Any]]]:
    """The project's stored predictions by task; only those of `version` when given."""
    by_task: dict[int, list[dict[str, Any]]] = {}
    for p in stack["ls"].predictions(stack["project"]):
        if version is None or p["model_version"] == version:
            by_task.setdefault(int(p["task"]), []).append(p)
    return by_task


def _image_bytes(stack: dict[str, Any], ref: str) -> bytes:
    name = ref.rsplit("/", 1)[-1]
    if ref.startswith("/data/upload/"):
        return next(data for key, data in stack["uploads"].items() if name.endswith(key))
    if "/data/local-files/" in ref:
        return (stack["local"] / name).read_bytes()
    return (stack["static"] / name).read_bytes()


def _by_type(prediction: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [r for r in prediction["result"] if r["type"] == kind]


def test_every_task_has_a_prediction_of_the_backend_version(stack: dict[str, Any]) -> None:
    tasks = _tasks(stack)
    assert len(tasks) == 13, [t["data"] for t in tasks]  # 10 uploads, 2 URLs, 1 local file
    refs = [t["data"]["image"] for t in tasks]
    assert sum(r.startswith("/data/upload/") for r in refs) == 10, refs
    assert sum("/data/local-files/?d=" in r for r in refs) == 1, refs  # LS may make it absolute (its --host)
    assert sum(r.startswith(stack["static_url"]) for r in refs) == 2, refs
    predictions = _predictions(stack)
    for t in tasks:
        assert len(predictions.get(t["id"], [])) == 1, f"task {t['id']} {t['data']}"
        assert predictions[t["id"]][0]["model_version"] == stack["version"]
    assert stack["ml"]["model_version"] == stack["version"]  # what /setup answered on connect
    li = LabelInterface(LABEL_CONFIG)
    for plist in predictions.values():
        stored = {"result": plist[0]["result"], "score": plist[0]["score"]}
        assert li.validate_prediction(stored, return_errors=True) == []
    assert stack["health"]["ready"] is True
    assert stack["health"]["label_studio"]["api_key"] == "pat"
    assert stack["versions"]["versions"] == [stack["version"]]
    assert stack["retrieve_seconds"] < 100
    print(f"retrieve predictions: {len(tasks)} tasks in {stack['retrieve_seconds']:.1f} s; metrics {stack['metrics']}")


def test_masks_and_choices_match_the_engine(stack: dict[str, Any]) -> None:
    from axx_backend.core.settings import Settings
    from axx_backend.engine.annotator import Annotator

    env = {**os.environ, **E2E_ENV}  # the reference Annotator runs with the server's settings
    settings = Settings.from_env(env)
    store = ModelStore(stack["models"])
    annotator = Annotator.from_version(store.path(stack["version"]), settings, settings.explicit_from_env(env))
    predictions = _predictions(stack, stack["version"])
    checked_masks = 0
    for task in _tasks(stack):
        ref = task["data"]["image"]
        if ref.endswith("corrupt.png"):
            continue
        image = load_image(_image_bytes(stack, ref))
        ann = annotator.annotate([image])[0]
        prediction = predictions[task["id"]][0]
        assert prediction["score"] == pytest.approx(ann.score, abs=1e-5), ref
        choice = _by_type(prediction, "choices")[0]["value"]["choices"]
        assert choice == (["Needs review"] if ann.flagged else [ann.label]), ref
        brushes = _by_type(prediction, "brushlabels")
        if ann.mask is None or not ann.mask.any():
            assert brushes == [], ref
            continue
        (brush,) = brushes
        assert brush["value"]["brushlabels"] == ["Lesion"]
        h_, w_ = brush["original_height"], brush["original_width"]
        assert (w_, h_) == image.size
        decoded = decode_rle(brush["value"]["rle"]).reshape(h_, w_, 4)[:, :, 3]
        np.testing.assert_array_equal(decoded > 0, ann.mask > 0, err_msg=ref)
        meta = brush["meta"]["axx"]
        assert len(meta["members"]) == len(ann.members) and meta["flagged"] is False
        checked_masks += 1
    assert checked_masks >= 2, "too few lesion masks to compare"


def test_sort_by_prediction_score_puts_uncertain_tasks_first(stack: dict[str, Any]) -> None:
    ordered = _tasks(stack, {"ordering": ["tasks:predictions_score"]})
    predictions = _predictions(stack, stack["version"])
    scores = [t.get("predictions_score") for t in ordered]
    known = [s for s in scores if s is not None]
    assert known == sorted(known) and known[0] < 0.5, scores
    for task in ordered:  # a flagged task reads as one: the review choice, no brush, the reason first
        prediction = predictions[task["id"]][0] if predictions.get(task["id"]) else None
        choices = _by_type(prediction, "choices") if prediction else []
        if not choices or not choices[0]["meta"]["axx"]["flagged"]:
            continue
        assert choices[0]["value"]["choices"] == ["Needs review"], task["data"]
        assert _by_type(prediction, "brushlabels") == []
        assert _by_type(prediction, "textarea")[0]["value"]["text"][0].startswith("NEEDS REVIEW")
    # A uniform grey image has nothing to find: the ensemble is unsure of it (so it sorts near the top), it draws
    # no mask, and it is never called a lesion. (Whether it is flagged depends on how many members are unsure:
    # with heads on the channels' top cells, all three lean to "Healthy", one of them unsure.)
    grey = next(t for t in ordered if t["data"]["image"].endswith("grey.png"))
    choice = _by_type(predictions[grey["id"]][0], "choices")[0]
    assert grey["predictions_score"] < 0.5 and _by_type(predictions[grey["id"]][0], "brushlabels") == []
    assert choice["value"]["choices"] != ["Lesion"], choice["meta"]["axx"]["members"]


def test_corrupt_image_gets_no_mask_and_the_rest_are_predicted(stack: dict[str, Any]) -> None:
    predictions = _predictions(stack, stack["version"])
    corrupt = [t for t in _tasks(stack) if t["data"]["image"].endswith("corrupt.png")]
    assert len(corrupt) == 1
    p = predictions[corrupt[0]["id"]][0]
    assert p["score"] is None
    assert _by_type(p, "brushlabels") == [] and _by_type(p, "choices") == []
    assert "cannot read image" in _by_type(p, "textarea")[0]["value"]["text"][0]
    others = [pl[0] for tid, pl in predictions.items() if tid != corrupt[0]["id"]]
    assert all(_by_type(q, "choices") for q in others)
    assert stack["metrics"]["tasks"]["failed"] == 1
    assert stack["metrics"]["tasks"]["predicted"] == 12


def test_screenshots(stack: dict[str, Any]) -> None:
    """Only with AXX_E2E_SCREENSHOTS=<dir>: the README pictures (Data Manager sorted, one task)."""
    out = os.environ.get("AXX_E2E_SCREENSHOTS")
    if not out:
        return
    ls, pid = stack["ls"], stack["project"]
    hidden = [
        "tasks:inner_id", "tasks:completed_at", "tasks:cancelled_annotations", "tasks:annotators",
        "tasks:annotations_results", "tasks:annotations_ids", "tasks:predictions_results",
        "tasks:storage_filename", "tasks:created_at", "tasks:updated_at", "tasks:updated_by", "tasks:avg_lead_time",
        "tasks:draft_exists", "tasks:total_annotations", "tasks:comments", "tasks:comment_authors",
        "tasks:unresolved_comment_count", "tasks:annotations_results_json", "tasks:predictions_results_json",
    ]  # fmt: skip
    view = ls.api("POST", "/api/dm/views", json={"project": pid, "data": {
        "title": "Least confident first", "ordering": ["tasks:predictions_score"],
        "hiddenColumns": {"explore": hidden, "labeling": hidden},
    }})  # fmt: skip
    ordered = _tasks(stack, {"ordering": ["tasks:predictions_score"]})
    lesion = next(
        t for t in ordered
        if any(r["type"] == "brushlabels" for r in _predictions(stack, stack["version"])[t["id"]][0]["result"])
        and "/data/upload/" in t["data"]["image"]
    )  # fmt: skip
    h.take_screenshots(ls, pid, int(view["id"]), int(lesion["id"]), Path(out), stack["work"])
    print(json.dumps({"view": view["id"], "task": lesion["id"]}))


def test_connect_errors_and_projects_without_a_model(stack: dict[str, Any]) -> None:
    """A config without BrushLabels is refused on connect with the reason; other classes get no predictions."""
    ls = stack["ls"]
    no_brush = LABEL_CONFIG.replace("BrushLabels", "PolygonLabels")
    pid = ls.create_project("no brush", no_brush)
    r = ls.session.post(f"{ls.url}/api/ml", json={"project": pid, "url": stack["backend"], "title": "AXX"}, timeout=60)
    assert r.status_code == 400 and "<BrushLabels>" in json.dumps(r.json()), r.text

    other = LABEL_CONFIG.replace('"Lesion"', '"Fire"').replace('"Healthy"', '"No fire"')
    pid = ls.create_project("other classes", other)
    ls.import_tasks(pid, [{"image": "/data/upload/1/none.png"}])
    ml = ls.api("POST", "/api/ml", json={"project": pid, "url": stack["backend"], "title": "AXX"})
    assert ml["model_version"] == "untrained"
    ls.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={pid}",
           json={"selectedItems": {"all": True, "excluded": []}})  # fmt: skip
    assert ls.predictions(pid) == []  # nothing stored: asked again once a version for these classes exists
    health = requests.get(f"{stack['backend']}/health", timeout=10).json()
    assert "do not match" in health["projects"][str(pid)]["reason"]


# --- pre-annotation of a whole project over RQ workers ----------------------------------------------------------
def _preannotate(stack: dict[str, Any], project: int, *args: str, env: dict[str, str] | None = None) -> Any:
    cmd = [str(Path(h.PYTHON).parent / "axx-backend"), "preannotate", "--project", str(project), "--json", *args]
    full_env = {**os.environ, **stack["backend_env"], **(env or {})}
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: Any, timeout: float = 600) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert out.strip(), f"no summary (exit {proc.returncode}):\n{err[-4000:]}"
    summary = json.loads(out.strip().splitlines()[-1])
    summary["exit"], summary["stderr"] = proc.returncode, err
    return summary


def _generated_url_tasks(stack: dict[str, Any], prefix: str, n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    tasks = []
    for i in range(n):
        image, _ = make_image(rng, 96, i % 2 == 0)
        name = f"{prefix}_{i:03d}.png"
        (stack["static"] / name).write_bytes(_png(image))
        tasks.append({"image": f"{stack['static_url']}/{name}"})
    return tasks


def test_preannotate_over_workers_loses_nothing_when_workers_stop_or_die(stack: dict[str, Any]) -> None:
    """40 tasks in chunks of 4 over RQ: the fixture's worker and two more. One gets SIGTERM while it holds a
    chunk (it must finish that chunk, then exit), the other SIGKILL (its chunk must be retried). Every task
    ends with exactly one prediction of the version; a second run posts nothing."""
    from redis import Redis
    from rq import Worker as RQWorker

    ls, work = stack["ls"], stack["work"]
    pid = ls.create_project("AXX preannotate", LABEL_CONFIG)
    ls.import_tasks(pid, _generated_url_tasks(stack, "pre", 40, seed=23))
    redis = Redis.from_url(stack["redis"].url)
    stopped = Worker(stack["redis"].url, work / "pre-stopped.log", stack["backend_env"])
    killed = Worker(stack["redis"].url, work / "pre-killed.log", stack["backend_env"])
    try:
        _wait_for("three workers", lambda: RQWorker.count(connection=redis) >= 3, 120)
        proc = _preannotate(stack, pid, "--chunk", "4", env={"AXX_HEARTBEAT_TTL": "6"})
        stopped_chunk = None
        deadline = time.monotonic() + 300
        while stopped_chunk is None or killed.proc.poll() is None:
            assert time.monotonic() < deadline and proc.poll() is None, "the new workers never took a chunk"
            for key in redis.scan_iter(f"axx:preannotate:{pid}:lease:*"):
                holder = int((redis.get(key) or b"::0").decode().split(":")[1])
                if stopped_chunk is None and holder in Worker.descendants(stopped.proc.pid):
                    stopped.proc.terminate()  # RQ's warm shutdown: finish the chunk, then exit
                    stopped_chunk = key.decode().rsplit(":", 1)[1]
                elif killed.proc.poll() is None and holder in Worker.descendants(killed.proc.pid):
                    killed.kill()  # like an OOM kill: the chunk's lease expires and the command retries it
            time.sleep(0.2)
        assert stopped.proc.wait(120) == 0
        summary = _finish(proc)
    finally:
        stopped.stop()
        killed.stop()
    assert summary["exit"] == 0, summary["stderr"][-4000:]
    assert summary["executor"] == "rq" and summary["to_predict"] == 40 and summary["chunks"] == 10
    assert summary["failed_chunks"] == [] and summary["without_prediction"] == 0
    assert summary["retried_chunks"] >= 1  # the killed worker's chunk
    run = json.loads(redis.hget(next(redis.scan_iter(f"axx:preannotate:{pid}:*:results")), stopped_chunk))
    assert run["attempt"] == 0  # the stopped worker finished its own chunk: no retry was needed
    predictions = ls.predictions(pid)
    per_task: dict[int, int] = {}
    for p in predictions:
        assert p["model_version"] == stack["version"]
        per_task[int(p["task"])] = per_task.get(int(p["task"]), 0) + 1
    assert sorted(per_task) == sorted(t["id"] for t in ls.tasks(pid)) and set(per_task.values()) == {1}
    assert ls.api("GET", f"/api/projects/{pid}")["model_version"] == stack["version"]

    again = _finish(_preannotate(stack, pid, "--chunk", "4"))
    assert again["exit"] == 0 and again["posted"] == 0 and again["to_predict"] == 0
    assert again["skipped_with_version"] == 40 and len(ls.predictions(pid)) == 40


def test_preannotate_in_process_fails_bad_images_only(stack: dict[str, Any]) -> None:
    """Without REDIS_URL the chunks run in the command; a corrupt and a missing image fail their own tasks
    (a prediction that says why) and the others are predicted."""
    ls = stack["ls"]
    pid = ls.create_project("AXX preannotate bad", LABEL_CONFIG)
    tasks = _generated_url_tasks(stack, "prebad", 3, seed=29)
    (stack["static"] / "prebad_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    tasks += [{"image": f"{stack['static_url']}/prebad_corrupt.png"}, {"image": f"{stack['static_url']}/gone.png"}]
    ls.import_tasks(pid, tasks)
    summary = _finish(_preannotate(stack, pid, "--chunk", "2", env={"REDIS_URL": ""}))
    assert summary["exit"] == 0, summary["stderr"][-4000:]
    assert summary["executor"] == "in-process" and summary["posted"] == 5 and summary["unusable_images"] == 2
    assert summary["without_prediction"] == 0 and len(summary["errors"]) == 2
    by_image = {t["data"]["image"].rsplit("/", 1)[-1]: t["id"] for t in ls.tasks(pid)}
    stored = {int(p["task"]): p for p in ls.predictions(pid)}
    assert len(stored) == 5
    for name, needle in (("prebad_corrupt.png", "cannot read image"), ("gone.png", "HTTP 404")):
        p = stored[by_image[name]]
        assert p["score"] is None and _by_type(p, "choices") == []
        assert needle in _by_type(p, "textarea")[0]["value"]["text"][0]
        assert needle in summary["errors"][str(by_image[name])]
    for i in range(3):
        assert _by_type(stored[by_image[f"prebad_{i:03d}.png"]], "choices"), i


# --- the learning loop (keep these last: they add a prediction per task and move project.model_version) -----------
# Which task images get an annotation, and whether it has the brush mask too: all 7 lesion images with their
# generated mask (5 stay in training after the validation split: enough for the seg head, docs/METHOD.md
# min_pixel_labels) and the 4 healthy ones with the choice alone. grey.png and corrupt.png stay unlabelled:
# pseudo-mask candidates, and an unreadable image the run must skip.
ANNOTATE = {
    **{f"lesion_u{i}.png": True for i in range(5)},
    "lesion_url.png": True,
    "lesion_local.png": True,
    **{f"healthy_u{i}.png": False for i in range(3)},
    "healthy_url.png": False,
}


def _file_of(stack: dict[str, Any], ref: str) -> str:
    """The generated file behind a task's image reference (uploads get a '<hash>-' prefix)."""
    last = ref.rsplit("/", 1)[-1]
    for name in (*stack["truth"], "grey.png", "corrupt.png"):
        if last == name or last.endswith("-" + name):
            return name
    raise AssertionError(f"unknown task image {ref}")


def _annotation_result(label: str, mask: np.ndarray | None) -> list[dict[str, Any]]:
    """What the labeling UI submits: the class choice, and the brush mask as Label Studio RLE."""
    result: list[dict[str, Any]] = [
        {"id": "axxc", "from_name": "diagnosis", "to_name": "image", "type": "choices",
         "value": {"choices": [label]}},
    ]  # fmt: skip
    if mask is not None:
        height, width = mask.shape
        rle = [int(v) for v in mask2rle(np.where(mask, 255, 0).astype(np.uint8))]
        result.append({
            "id": "axxb", "from_name": "lesion", "to_name": "image", "type": "brushlabels",
            "original_width": int(width), "original_height": int(height), "image_rotation": 0,
            "value": {"format": "rle", "rle": rle, "brushlabels": ["Lesion"]},
        })  # fmt: skip
    return result


def _annotate(stack: dict[str, Any], project: int, plan: dict[str, bool]) -> dict[int, str]:
    """POST one annotation per planned task; {task id: file name}."""
    ls = stack["ls"]
    done: dict[int, str] = {}
    for task in ls.tasks(project):
        name = _file_of(stack, task["data"]["image"])
        if name not in plan:
            continue
        label, mask = stack["truth"][name]
        assert mask.any() == (label == "Lesion")
        body = {"result": _annotation_result(label, mask if plan[name] else None), "lead_time": 2.0}
        created = ls.api("POST", f"/api/tasks/{task['id']}/annotations", json=body)
        assert created["task"] == task["id"] and len(created["result"]) == (2 if plan[name] else 1)
        done[int(task["id"])] = name
    assert sorted(done.values()) == sorted(plan), done
    return done


def _wait_for(what: str, check: Any, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {value!r})")
        time.sleep(interval)


def _get(url: str) -> Any:
    r = requests.get(url, timeout=15)
    r.raise_for_status()
    return r.json()


def _webhook_requests(backend: str) -> int:
    return int(_get(f"{backend}/metrics")["requests"].get("/webhook", 0))


def _wait_training(backend: str, project: int, log: Path) -> dict[str, Any]:
    """Poll the backend's GET /jobs until the project's run is over; its status."""

    def over() -> dict[str, Any] | None:
        status = _get(f"{backend}/jobs").get(str(project), {})
        return status if status.get("state") in ("finished", "failed") else None

    status = _wait_for(f"training of project {project}", over, TRAINING_TIMEOUT, interval=1.0)
    assert status["state"] == "finished", f"{status}\n{h.tail(log, 6000)}"
    return status


def _retrieve_predictions(ls: h.LabelStudio, project: int) -> float:
    t0 = time.monotonic()
    ls.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
           json={"selectedItems": {"all": True, "excluded": []}}, timeout=200)  # fmt: skip
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def learned(stack: dict[str, Any]) -> Any:
    """Annotate, press "Start training" twice, wait for the worker's version, let LS learn it, predict again.

    While the worker trains, a second backend without Redis trains a second project in a thread of its own
    process (START_TRAINING -> new version, in-process): the two runs overlap to keep the file short.
    """
    from redis import Redis
    from rq import Queue
    from rq.job import Job
    from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

    ls, pid, backend, ml_id = stack["ls"], stack["project"], stack["backend"], stack["ml"]["id"]
    rds = Redis.from_url(stack["redis"].url)
    t_start = time.monotonic()
    annotated = _annotate(stack, pid, ANNOTATE)
    # Each annotation sends ANNOTATION_CREATED to /webhook: counted in Redis, no run (AXX_TRAIN_EVERY=0).
    counter = f"axx:annotations:{pid}"
    _wait_for("annotation webhooks counted", lambda: int(rds.get(counter) or 0) >= len(annotated), 30)
    jobs_before = _get(f"{backend}/jobs")
    webhooks_before = _webhook_requests(backend)

    t_train = time.monotonic()
    ls.api("POST", f"/api/ml/{ml_id}/train")  # "Start training": LS sends START_TRAINING to /webhook
    ls.api("POST", f"/api/ml/{ml_id}/train")  # pressed again while the first run is queued or going
    pressed = _webhook_requests(backend) - webhooks_before

    inprocess = _train_without_redis(stack)  # meanwhile, on the worker: project `pid`

    status = _wait_training(backend, pid, stack["work"] / "worker.log")
    training_seconds = time.monotonic() - t_train
    queue = Queue(QUEUE_NAME, connection=rds)
    finished_ids = _wait_for(  # RQ files the job as finished just after the job function returned
        "the RQ job in the finished registry", lambda: FinishedJobRegistry(queue=queue).get_job_ids(), 30
    )
    rq_jobs = {
        "queued": queue.count,
        "started": StartedJobRegistry(queue=queue).count,
        "finished": finished_ids,
        "failed": FailedJobRegistry(queue=queue).count,
        "return_value": Job.fetch(finished_ids[0], connection=rds).return_value(),
    }
    health_after_training = _get(f"{backend}/health")

    new_version = status["version"]
    ml_after = ls.api("GET", f"/api/ml/{ml_id}")  # any view of the model: LS calls /setup, learns the version
    retrieve_seconds = _retrieve_predictions(ls, pid)
    # the backend PATCHes project.model_version in the background once LS has stored the new predictions
    _wait_for(
        "project.model_version moved to the new version",
        lambda: ls.api("GET", f"/api/projects/{pid}")["model_version"] == new_version,
        60,
    )
    versions = _get(f"{backend}/versions?project={pid}")
    print(
        f"learning loop: {len(annotated)} annotations, training on the worker {training_seconds:.0f} s "
        f"(in-process run of project {inprocess['project']}: {inprocess['seconds']:.0f} s, alongside), "
        f"retrieve predictions {retrieve_seconds:.1f} s, total {time.monotonic() - t_start:.0f} s"
    )
    yield {
        "annotated": annotated, "counter": int(rds.get(counter) or 0), "jobs_before": jobs_before,
        "pressed": pressed, "status": status, "rq_jobs": rq_jobs, "health": health_after_training,
        "version": new_version, "ml_after": ml_after, "retrieve_seconds": retrieve_seconds, "versions": versions,
        "inprocess": inprocess,
    }  # fmt: skip


def _train_without_redis(stack: dict[str, Any]) -> dict[str, Any]:
    """A second project on a second backend without REDIS_URL: "Start training" twice -> one run in a thread."""
    ls, uploads = stack["ls"], stack["uploads"]
    pid = ls.create_project("AXX in-process training", LABEL_CONFIG)
    names = ["lesion_u0.png", "lesion_u1.png", "healthy_u0.png", "healthy_u1.png", "grey.png"]
    ls.api("POST", f"/api/projects/{pid}/import", files=[(n, (n, uploads[n], "image/png")) for n in names])
    plan = {"lesion_u0.png": True, "lesion_u1.png": True, "healthy_u0.png": False, "healthy_u1.png": False}
    annotated = _annotate(stack, pid, plan)
    env = {**stack["backend_env"], "REDIS_URL": "", "AXX_PRELOAD": "0"}  # no Redis: the in-process thread
    with h.backend_server(env, stack["work"]) as backend:
        ml = ls.api("POST", "/api/ml", json={"project": pid, "url": backend, "title": "AXX in-process",
                                             "is_interactive": False})  # fmt: skip
        webhooks_before = _webhook_requests(backend)
        t0 = time.monotonic()
        ls.api("POST", f"/api/ml/{ml['id']}/train")
        ls.api("POST", f"/api/ml/{ml['id']}/train")
        pressed = _webhook_requests(backend) - webhooks_before
        log = stack["work"] / f"backend-{backend.rsplit(':', 1)[-1]}.log"
        status = _wait_training(backend, pid, log)
        seconds = time.monotonic() - t0
        ml_after = ls.api("GET", f"/api/ml/{ml['id']}")
        health = _get(f"{backend}/health")
    return {"project": pid, "annotated": annotated, "pressed": pressed, "status": status, "ml": ml,
            "ml_after": ml_after, "health": health, "seconds": seconds}  # fmt: skip


def test_start_training_runs_one_job_on_the_worker(stack: dict[str, Any], learned: dict[str, Any]) -> None:
    pid = str(stack["project"])
    assert learned["counter"] == len(ANNOTATE)  # every ANNOTATION_CREATED webhook arrived and was counted
    assert pid not in learned["jobs_before"]  # ... and none started a run
    assert learned["pressed"] == 2  # both presses reached /webhook (START_TRAINING)
    status = learned["status"]
    assert status["reason"] == "START_TRAINING" and status["progress"] == 1.0 and status["error"] is None
    # one run for two presses: one RQ job, run by the worker, nothing queued or left behind
    rq_jobs = learned["rq_jobs"]
    assert rq_jobs["finished"] == [status["job_id"]], rq_jobs
    assert (rq_jobs["queued"], rq_jobs["started"], rq_jobs["failed"]) == (0, 0, 0), rq_jobs
    assert rq_jobs["return_value"] == learned["version"]
    store = ModelStore(stack["models"] / pid)
    assert store.list_versions() == [learned["version"]]
    assert store.current() == learned["version"] != stack["version"]
    assert ModelStore(stack["models"]).list_versions() == [stack["version"]]  # the shared version is untouched
    training = learned["health"]["training"]
    assert training["backend"] == "rq" and training["projects"][pid]["state"] == "finished"


def test_new_version_is_trained_on_the_project_annotations(stack: dict[str, Any], learned: dict[str, Any]) -> None:
    ls, pid = stack["ls"], stack["project"]
    meta = ModelStore(stack["models"] / str(pid)).metadata(learned["version"])
    training = meta.training
    assert training.source == f"{ls.url} project {pid}"
    assert training.oracle_masks == sum(ANNOTATE.values()) == 7
    assert training.n_labelled == len(ANNOTATE)
    assert training.per_class == {"Lesion": 7, "Healthy": 4}
    assert training.n_images == len(stack["uploads"]) + 2  # 13 tasks, the corrupt one skipped
    (skipped,) = training.skipped
    corrupt = next(t for t in _tasks(stack) if t["data"]["image"].endswith("corrupt.png"))
    assert skipped.startswith(f"{corrupt['id']}: "), skipped
    assert set(meta.classes) == {"Lesion", "Healthy"} and meta.input_size == 224
    # what the run read back through the export API is what was submitted: the classes and the masks, bit for bit
    cfg = parse_config(LABEL_CONFIG)
    exported = ls.api("GET", f"/api/projects/{pid}/export", params={"exportType": "JSON", "download_all_tasks": "true"})
    assert len(exported) == 13
    for task in exported:
        name = _file_of(stack, task["data"]["image"])
        label, mask = annotation_label_and_mask(task, cfg)
        if name not in ANNOTATE:
            assert (label, mask) == (None, None), name
            continue
        assert label == stack["truth"][name][0], name
        if ANNOTATE[name]:
            assert mask is not None, name
            np.testing.assert_array_equal(mask, stack["truth"][name][1], err_msg=name)
        else:
            assert mask is None, name
    assert meta.mask_source in ("cam", "segments") and "pixels" in meta.metrics
    # one readable unlabelled task (grey.png), fewer than AXX_MIN_REVIEW_POOL's 50: the budget is spent out of fold
    assert meta.metrics["review_calibration"] == {"on": "labelled, out of fold", "images": training.n_labelled}
    print(f"new version {learned['version']}: masks from {meta.mask_source}; pixels {meta.metrics['pixels']}")
    # Label Studio learnt the new version from /setup, and the backend lists it for the project
    assert learned["ml_after"]["model_version"] == learned["version"]
    assert learned["versions"]["versions"] == [learned["version"]]


def test_every_task_gets_a_prediction_of_the_new_version(stack: dict[str, Any], learned: dict[str, Any]) -> None:
    tasks = _tasks(stack)
    new = _predictions(stack, learned["version"])
    old = _predictions(stack, stack["version"])
    assert learned["retrieve_seconds"] < 100
    li = LabelInterface(LABEL_CONFIG)
    for task in tasks:
        assert len(new.get(task["id"], [])) == 1, f"task {task['id']} {task['data']}: no new-version prediction"
        assert len(old.get(task["id"], [])) == 1, f"task {task['id']}: the base version's prediction is kept"
        p = new[task["id"]][0]
        assert li.validate_prediction({"result": p["result"], "score": p["score"]}, return_errors=True) == []
    assert stack["ls"].api("GET", f"/api/projects/{stack['project']}")["model_version"] == learned["version"]

    # every mask says where it comes from: the version's choice (seg head or CAM), in meta and explanation
    mask_source = ModelStore(stack["models"] / str(stack["project"])).metadata(learned["version"]).mask_source
    brushes = 0
    for plist in new.values():
        for region in _by_type(plist[0], "brushlabels"):
            source = region["meta"]["axx"]["mask_source"]
            assert (source == "segments") if mask_source == "segments" else source.startswith("cam:"), source
            assert f"px from {source}." in region["meta"]["text"][0]
            assert f"px from {source}." in _by_type(plist[0], "textarea")[0]["value"]["text"][0]
            brushes += 1
    assert brushes >= 2, "the new version drew (almost) no lesion masks"


def test_sort_by_prediction_score_uses_the_new_version(stack: dict[str, Any], learned: dict[str, Any]) -> None:
    new_scores = {tid: pl[0]["score"] for tid, pl in _predictions(stack, learned["version"]).items()}
    old_scores = {tid: pl[0]["score"] for tid, pl in _predictions(stack, stack["version"]).items()}
    ordered = _tasks(stack, {"ordering": ["tasks:predictions_score"]})
    assert len(ordered) == len(new_scores) == 13
    for task in ordered:  # the Data Manager's score is the new version's, not an average with the old one
        expected = new_scores[task["id"]]
        got = task.get("predictions_score")
        assert (got is None) if expected is None else got == pytest.approx(expected, abs=1e-6), (task["id"], got)
    known = [t["predictions_score"] for t in ordered if t.get("predictions_score") is not None]
    assert known == sorted(known)
    assert ordered[0]["predictions_score"] == pytest.approx(min(s for s in new_scores.values() if s is not None))
    # the check can tell the versions apart: their scores differ
    assert any(s is not None and abs(s - (old_scores[tid] or 0.0)) > 1e-3 for tid, s in new_scores.items()), (
        "the new version scores like the old one: the sort check cannot tell them apart"
    )


def test_start_training_without_redis_trains_in_the_server(stack: dict[str, Any], learned: dict[str, Any]) -> None:
    inprocess = learned["inprocess"]
    pid = str(inprocess["project"])
    assert inprocess["ml"]["model_version"] == stack["version"]  # the shared version served it until now
    status = inprocess["status"]
    assert inprocess["pressed"] == 2 and status["reason"] == "START_TRAINING"
    assert inprocess["health"]["training"]["backend"] == "thread"
    store = ModelStore(stack["models"] / pid)
    assert store.list_versions() == [status["version"]]  # two presses, one run
    assert store.current() == status["version"]
    training = store.metadata(status["version"]).training
    assert training.source == f"{stack['ls'].url} project {pid}"
    assert training.oracle_masks == 2 and training.per_class == {"Lesion": 2, "Healthy": 2}
    assert inprocess["ml_after"]["model_version"] == status["version"]
