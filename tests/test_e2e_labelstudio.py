"""End to end against a real Label Studio 1.23.2 (its own venv, see tests/ls_harness.py).

One run: start Label Studio while a small model trains on generated images (12 per class, 128 px,
`--preset offline --input-size 224`); create a project (Image + Choices Lesion/Healthy/Needs review +
BrushLabels Lesion + a TextArea for the explanation); import tasks as uploads, as URLs on a local
static server (allow-listed) and as local files; start `axx-backend serve` with a Personal Access Token;
connect it (POST /api/ml); "Retrieve predictions" (POST /api/dm/actions?id=retrieve_tasks_predictions);
then check through the API what Label Studio stored.

The review flag is not forced: a uniform grey image makes the members disagree, so it is flagged and is
the least confident task (no AXX_UNCERTAINTY_THRESHOLD override). The server and the reference Annotator
run with AXX_BATCH_SIZE=1 because the MC-dropout generator is seeded per batch: with batch 1 each image's
result does not depend on which images share its batch, so the masks can be compared bit for bit.

Set AXX_E2E_SCREENSHOTS=<dir> to also save the README screenshots there (needs node, playwright-core
and /usr/bin/chromium; see tests/ls_harness.py).
"""

from __future__ import annotations

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
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from axx_backend.images import load_image
from axx_backend.synthetic import make_dataset, make_image
from axx_backend.versions import ModelStore
from tests import ls_harness as h

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
        uploads: dict[str, bytes] = {}
        for i in range(5):
            uploads[f"lesion_u{i}.png"] = _png(make_image(rng, 160, True)[0])
        for i in range(3):
            uploads[f"healthy_u{i}.png"] = _png(make_image(rng, 160, False)[0])
        uploads["grey.png"] = _png(np.full((150, 170, 3), 128, np.uint8))
        uploads["corrupt.png"] = b"\x89PNG\r\n\x1a\n this is not really a png" * 10
        static = work / "static"
        static.mkdir()
        urls = {"lesion_url.png": make_image(rng, 144, True)[0], "healthy_url.png": make_image(rng, 144, False)[0]}
        for name, arr in urls.items():
            (static / name).write_bytes(_png(arr))
        local = work / "local"
        local.mkdir()
        (local / "lesion_local.png").write_bytes(_png(make_image(rng, 176, True)[0]))
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

            backend_env = {
                **E2E_ENV,
                "MODEL_DIR": str(models),
                "LABEL_STUDIO_URL": ls.url,
                "LABEL_STUDIO_API_KEY": pat,
                "AXX_ALLOWED_HOSTS": f"127.0.0.1:{st.port}",
                "WORKERS": "1",
                "THREADS": "4",
                "LOG_LEVEL": "INFO",
            }
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
                    "started": started, "static_url": st.url,
                }  # fmt: skip
    finally:
        ls.stop()
        print(f"e2e stack lived {time.monotonic() - started:.0f} s")


def _tasks(stack: dict[str, Any], query: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return stack["ls"].tasks(stack["project"], query)


def _predictions(stack: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    by_task: dict[int, list[dict[str, Any]]] = {}
    for p in stack["ls"].predictions(stack["project"]):
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
    from axx_backend.annotator import Annotator
    from axx_backend.settings import Settings

    env = {**os.environ, **E2E_ENV}  # the reference Annotator runs with the server's settings
    settings = Settings.from_env(env)
    store = ModelStore(stack["models"])
    annotator = Annotator.from_version(store.path(stack["version"]), settings, settings.explicit_from_env(env))
    predictions = _predictions(stack)
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


def test_sort_by_prediction_score_puts_the_flagged_task_first(stack: dict[str, Any]) -> None:
    ordered = _tasks(stack, {"ordering": ["tasks:predictions_score"]})
    predictions = _predictions(stack)
    grey = next(t for t in ordered if t["data"]["image"].endswith("grey.png"))
    for task in (ordered[0], grey):  # the least confident task, and the grey one, are flagged for review
        prediction = predictions[task["id"]][0]
        assert _by_type(prediction, "choices")[0]["value"]["choices"] == ["Needs review"], task["data"]
        assert _by_type(prediction, "brushlabels") == []
        notes = _by_type(prediction, "textarea")[0]["value"]["text"][0]
        assert notes.startswith("NEEDS REVIEW")
        assert _by_type(prediction, "choices")[0]["meta"]["axx"]["flagged"] is True
    scores = [t.get("predictions_score") for t in ordered]
    known = [s for s in scores if s is not None]
    assert known == sorted(known) and known[0] < 0.5, scores


def test_corrupt_image_gets_no_mask_and_the_rest_are_predicted(stack: dict[str, Any]) -> None:
    predictions = _predictions(stack)
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
        if any(r["type"] == "brushlabels" for r in _predictions(stack)[t["id"]][0]["result"])
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
