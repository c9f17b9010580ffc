"""The web layer and AxxModel with a stand-in annotator (no torch): routing, version choice, order,
failures, time budget, auth, webhooks. The real model runs in tests/test_e2e_labelstudio.py."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from axx_backend.core.annotation import Annotation, MemberResult
from axx_backend.core.settings import Settings
from axx_backend.core.synthetic import LABEL_CONFIG
from axx_backend.core.version_meta import VersionMeta
from axx_backend.core.versions import ModelStore
from axx_backend.engine.registry import LoadedModel, ModelRegistry
from axx_backend.server.app import create_app
from axx_backend.server.model import UNTRAINED, Runtime, project_id_of
from tests.ls_harness import StaticServer

CONFIG = LABEL_CONFIG  # Image + Choices Lesion/Healthy/Needs review + BrushLabels Lesion


class FakeAnnotator:
    """Red pixels are the lesion; an image with no red is Healthy; a grey image is flagged."""

    def __init__(self, version: str, delay: float = 0.0) -> None:
        self.version = version
        self.classes = ["Healthy", "Lesion"]
        self.settings = Settings(batch_size=2)
        self.delay = delay
        self.calls: list[int] = []
        self.sizes: list[tuple[int, int]] = []

    def annotate(self, images: list[Image.Image]) -> list[Annotation]:
        self.calls.append(len(images))
        self.sizes.extend(img.size for img in images)
        time.sleep(self.delay * len(images))
        out = []
        if any(np.asarray(img)[0, 0].tolist() == [0, 0, 255] for img in images):
            raise ValueError("blue images break this model")
        for img in images:
            arr = np.asarray(img).astype(int)
            red = (arr[..., 0] > 150) & (arr[..., 1] < 100)
            grey = bool((arr.max(axis=2) - arr.min(axis=2)).max() == 0)
            label = "Lesion" if red.any() else "Healthy"
            score = 0.05 if grey else 0.9
            members = [MemberResult("m1", [0.1, 0.9], label, 0.1, 0.0, 0.0, grey, not grey)]
            probs = {"Healthy": 0.1, "Lesion": 0.9} if red.any() else {"Healthy": 0.9, "Lesion": 0.1}
            out.append(
                Annotation(
                    label=label,
                    probs=probs,
                    score=score,
                    class_score=0.9,
                    flagged=grey,
                    reason="uncertain" if grey else "agree",
                    members=members,
                    width=img.width,
                    height=img.height,
                    mask=red.astype(np.uint8) if red.any() and not grey else None,
                    mask_source="cam:mean",
                )  # fmt: skip
            )
        return out


def write_version(root: Path, classes: list[str]) -> str:
    return ModelStore(root).write_version(lambda _tmp: VersionMeta(classes=tuple(classes), members=()))


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def images(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "static"
    root.mkdir()
    lesion = np.zeros((24, 32, 3), np.uint8)
    lesion[5:10, 8:20] = [220, 20, 20]
    (root / "lesion.png").write_bytes(png(lesion))
    (root / "healthy.png").write_bytes(png(np.full((24, 32, 3), [20, 120, 40], np.uint8)))
    (root / "grey.png").write_bytes(png(np.full((24, 32, 3), 128, np.uint8)))
    (root / "corrupt.png").write_bytes(b"not an image")
    (root / "blue.png").write_bytes(png(np.full((24, 32, 3), [0, 0, 255], np.uint8)))
    with StaticServer(root) as server:
        yield server.url, root


def make_runtime(model_dir: Path, static_url: str | None = None, **env: str) -> tuple[Runtime, dict[Path, Any]]:
    full = {"MODEL_DIR": str(model_dir), "AXX_SYNC_MODEL_VERSION": "false", **env}
    if static_url:
        full["AXX_ALLOWED_HOSTS"] = static_url
    rt = Runtime.from_env(full)
    fakes: dict[Path, Any] = {}

    def fake_get(path: Path) -> LoadedModel:  # stands in for the torch load
        path = Path(path).resolve()
        if path not in fakes:
            fakes[path] = LoadedModel(FakeAnnotator(path.name, float(env.get("FAKE_DELAY", 0))), path, 0.0)  # type: ignore[arg-type]
        return fakes[path]

    rt.registry.get = fake_get  # type: ignore[method-assign]
    rt.registry.warm = lambda path: None  # type: ignore[method-assign]
    return rt, fakes


def predict_body(tasks: list[dict[str, Any]], project: str = "1.1795318780") -> dict[str, Any]:
    return {"tasks": tasks, "project": project, "label_config": CONFIG, "params": {"login": None, "context": None}}


def test_project_id_parsing() -> None:
    assert project_id_of("1.1795318780") == "1"
    assert project_id_of(12) == "12" and project_id_of(None) is None and project_id_of("") is None


def test_no_version_yet_gives_empty_predictions_and_health_says_so(tmp_path: Path) -> None:
    rt, _ = make_runtime(tmp_path / "models")
    client = create_app(rt).test_client()
    health = client.get("/health").get_json()
    assert health["status"] == "UP" and health["ready"] is False and "no trained version" in health["message"]
    assert client.post("/setup", json={"project": "1.1", "schema": CONFIG}).get_json() == {"model_version": UNTRAINED}
    r = client.post("/predict", json=predict_body([{"id": 1, "data": {"image": "/x.png"}}] * 3)).get_json()
    assert r["results"] == [[], [], []]  # one entry per task; LS stores nothing and asks again later
    assert client.get("/health").get_json()["projects"]["1"]["ready"] is False


def test_setup_names_the_missing_tag_in_the_status_line(tmp_path: Path) -> None:
    rt, _ = make_runtime(tmp_path)
    client = create_app(rt).test_client()
    r = client.post("/setup", json={"project": "1.1", "schema": CONFIG.replace("BrushLabels", "PolygonLabels")})
    assert r.status_code == 400
    assert "<BrushLabels>" in r.status and "<BrushLabels>" in r.get_json()["error"]  # LS shows only the reason
    r = client.post("/predict", json={**predict_body([]), "label_config": CONFIG.replace("Choices", "Labels")})
    assert r.status_code == 400 and "<Choices>" in r.get_json()["error"]


def test_which_version_serves_a_project(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shared = write_version(models, ["Healthy", "Lesion"])
    own = write_version(models / "7", ["Lesion", "Healthy"])
    other_classes = write_version(models / "8", ["Cat", "Dog"])
    rt, _ = make_runtime(models)
    client = create_app(rt).test_client()

    def setup(project: str, schema: str = CONFIG) -> str:
        return client.post("/setup", json={"project": project, "schema": schema}).get_json()["model_version"]

    assert setup("1.123") == shared
    assert setup("7.123") == own  # MODEL_DIR/<project id>/current wins
    assert setup("8.123") == UNTRAINED  # its own version, but for other classes
    mismatch = CONFIG.replace('<Choice value="Healthy"/>', '<Choice value="Normal"/>')
    assert setup("2.1", mismatch) == UNTRAINED  # shared classes do not match the Choices
    health = client.get("/health").get_json()
    assert "do not match" in health["projects"]["2"]["reason"]
    assert health["projects"]["7"]["model_version"] == own
    assert other_classes not in json.dumps(client.get("/versions", json={"project": "7.1"}).get_json())
    assert client.get("/versions", json={"project": "1.1"}).get_json() == {"versions": [shared]}
    # a new shared version is picked up without a restart
    newer = write_version(models, ["Healthy", "Lesion"])
    assert setup("1.123") == newer != shared


def test_predict_one_result_per_task_in_order(tmp_path: Path, images: tuple[str, Path]) -> None:
    url, _ = images
    models = tmp_path / "models"
    version = write_version(models, ["Healthy", "Lesion"])
    rt, fakes = make_runtime(models, url)
    client = create_app(rt).test_client()
    tasks = [
        {"id": 1, "data": {"image": f"{url}/lesion.png"}},
        {"id": 2, "data": {"image": f"{url}/corrupt.png"}},
        {"id": 3, "data": {"image": "http://not-allowed.example/x.png"}},
        {"id": 4, "data": {"image": f"{url}/healthy.png"}},
        {"id": 5, "data": {"other": "no image key"}},
        {"id": 6, "data": {"image": f"{url}/grey.png"}},
        {"id": 7, "data": {"image": f"{url}/missing.png"}},
        {"id": 8, "data": {"image": f"{url}/lesion.png"}},
    ]
    r = client.post("/predict", json=predict_body(tasks))
    assert r.status_code == 200
    results = r.get_json()["results"]
    assert len(results) == len(tasks)
    lesion, corrupt, blocked, healthy, nokey, grey, missing, lesion2 = results
    for p in (lesion, healthy, grey, lesion2):
        assert p["model_version"] == version
    assert [x["value"]["choices"] for x in lesion["result"] if x["type"] == "choices"] == [["Lesion"]]
    (brush,) = [x for x in lesion["result"] if x["type"] == "brushlabels"]
    decoded = decode_rle(brush["value"]["rle"]).reshape(24, 32, 4)[:, :, 3]
    assert decoded[5:10, 8:20].all() and decoded.sum() == 5 * 12 * 255
    assert [x["value"]["choices"] for x in healthy["result"]] == [["Healthy"]]
    assert [x["value"]["choices"] for x in grey["result"]] == [["Needs review"]] and grey["score"] == 0.05
    for failed, needle in ((corrupt, "cannot read image"), (nokey, "no image URL"), (missing, "HTTP 404")):
        assert failed["result"] == [] and failed["score"] is None and needle in failed["meta"]["error"]
    # issue 12: an allow-list refusal is about the task's URL: a prediction that says why (it was [] = "ask again")
    assert blocked["result"] == [] and "host not allowed" in blocked["meta"]["error"]
    (fake,) = fakes.values()
    assert fake.annotator.calls == [2, 2]  # batches of Settings.batch_size, in task order
    m = client.get("/metrics").get_json()
    assert m["tasks"]["predicted"] == 4 and m["tasks"]["failed"] == 4 and m["tasks"]["skipped_transient"] == 0
    assert m["latency_seconds"]["/predict"]["count"] == 1 and m["latency_seconds"]["/predict"]["p50"] > 0
    assert m["model_versions"]["*"] == version and m["jobs"]["backend"] == "thread"
    text = client.get("/metrics?format=prometheus").get_data(as_text=True)
    assert 'axx_tasks_total{outcome="predicted"} 4' in text
    assert f'axx_model_version_info{{project="*",version="{version}"}} 1' in text


def test_time_budget_answers_what_it_can(tmp_path: Path, images: tuple[str, Path]) -> None:
    url, _ = images
    models = tmp_path / "models"
    write_version(models, ["Healthy", "Lesion"])
    rt, _ = make_runtime(models, url, AXX_PREDICT_TIME_BUDGET="1.0", FAKE_DELAY="0.2")
    client = create_app(rt).test_client()
    tasks = [{"id": i, "data": {"image": f"{url}/lesion.png"}} for i in range(20)]
    t0 = time.monotonic()
    results = client.post("/predict", json=predict_body(tasks)).get_json()["results"]
    took = time.monotonic() - t0
    assert len(results) == 20
    done = [isinstance(r, dict) for r in results]
    assert 2 <= sum(done) < 20 and done == sorted(done, reverse=True)  # a prefix is answered, the rest is []
    assert took < 2.5
    assert client.get("/metrics").get_json()["tasks"]["skipped_budget"] == 20 - sum(done)


def test_sync_is_scheduled_after_predictions(tmp_path: Path, images: tuple[str, Path]) -> None:
    url, _ = images
    models = tmp_path / "models"
    version = write_version(models, ["Healthy", "Lesion"])
    rt, _ = make_runtime(models, url)
    calls: list[tuple[Any, ...]] = []
    rt.sync.schedule = lambda *a, **k: calls.append(a) or True  # type: ignore[method-assign]
    client = create_app(rt).test_client()
    client.post("/setup", json={"project": "3.99", "schema": CONFIG})
    client.post("/predict", json=predict_body([{"id": 1, "data": {"image": f"{url}/lesion.png"}}], "3.99"))
    assert calls == [("3", version), ("3", version)]


def test_webhook_answers_at_once_and_queues_training(tmp_path: Path) -> None:
    # Label Studio on a closed port: the queued job runs for real in its thread and fails fast.
    rt, _ = make_runtime(
        tmp_path, LABEL_STUDIO_URL="http://127.0.0.1:9", LABEL_STUDIO_API_KEY="k" * 40, AXX_TRAIN_EVERY="2"
    )
    client = create_app(rt).test_client()
    project = {"id": 1, "label_config": CONFIG, "title": "p"}

    def post(action: str) -> dict[str, Any]:
        t0 = time.monotonic()
        r = client.post("/webhook", json={"action": action, "project": project, "annotation": {"id": 1}})
        assert r.status_code == 200 and time.monotonic() - t0 < 0.5
        body = r.get_json()
        assert body["event"] == action
        return body

    assert post("PROJECT_UPDATED")["status"] == "ignored"
    assert post("TASKS_CREATED")["status"] == "ignored"
    first = post("ANNOTATION_CREATED")
    assert (first["status"], first["annotations"]) == ("counted", 1)
    assert post("ANNOTATION_UPDATED")["status"] == "queued"  # the 2nd annotation with AXX_TRAIN_EVERY=2
    status = rt.jobs.wait("1", timeout=60)
    assert status["state"] == "failed" and "Connection refused" in status["error"]
    assert client.get("/health").get_json()["training"]["projects"]["1"]["state"] == "failed"
    assert client.get("/jobs").get_json()["1"]["state"] == "failed"
    assert post("START_TRAINING")["status"] == "queued"  # the project is free again after a failed run
    rt.jobs.wait("1", timeout=60)
    assert list(tmp_path.iterdir()) == []  # failed runs leave no version behind


def test_training_without_label_studio_credentials_says_what_to_set(tmp_path: Path) -> None:
    rt, _ = make_runtime(tmp_path)
    client = create_app(rt).test_client()
    body = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 4}}).get_json()
    assert body["status"] == "error" and "LABEL_STUDIO_URL" in body["reason"]
    assert client.post("/train", json={"project": "4.1"}).get_json()["status"] == "error"


def test_basic_auth(tmp_path: Path) -> None:
    rt, _ = make_runtime(tmp_path, BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="s3cret")
    client = create_app(rt).test_client()
    assert client.get("/health").status_code == 401
    bad = base64.b64encode(b"ls:wrong").decode()
    assert client.get("/health", headers={"Authorization": f"Basic {bad}"}).status_code == 401
    good = base64.b64encode(b"ls:s3cret").decode()
    assert client.get("/health", headers={"Authorization": f"Basic {good}"}).status_code == 200
    assert client.post("/setup", json={}, headers={"Authorization": f"Basic {good}"}).status_code == 400


def test_setup_is_cheap_and_loads_nothing(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_version(models, ["Healthy", "Lesion"])
    rt = Runtime.from_env({"MODEL_DIR": str(models), "AXX_PRELOAD": "false", "AXX_SYNC_MODEL_VERSION": "false"})
    client = create_app(rt).test_client()
    t0 = time.monotonic()
    for _ in range(50):
        assert client.post("/setup", json={"project": "1.1", "schema": CONFIG}).status_code == 200
    assert (time.monotonic() - t0) / 50 < 0.05
    assert rt.registry.loaded() == {}


def test_registry_loads_each_version_once_across_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    write_version(models, ["Healthy", "Lesion"])
    loads: list[Path] = []

    def slow_load(path: Path, settings: Settings) -> FakeAnnotator:
        loads.append(path)
        time.sleep(0.3)
        return FakeAnnotator(path.name)

    monkeypatch.setattr("axx_backend.engine.registry.Annotator.from_version", slow_load)
    registry = ModelRegistry(models, Settings(), max_loaded=1)
    path = models / ModelStore(models).current()  # type: ignore[operator]
    got: list[Any] = []
    threads = [threading.Thread(target=lambda: got.append(registry.get(path))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len({id(m) for m in got}) == 1
    second = write_version(models, ["Healthy", "Lesion"])
    registry.get(models / second)
    assert list(registry.loaded()) == [second]  # max_loaded=1: the old one was let go


def test_an_image_that_breaks_the_model_fails_alone(tmp_path: Path, images: tuple[str, Path]) -> None:
    url, _ = images
    models = tmp_path / "models"
    write_version(models, ["Healthy", "Lesion"])
    rt, _ = make_runtime(models, url)
    client = create_app(rt).test_client()
    tasks = [{"id": i, "data": {"image": f"{url}/{name}.png"}} for i, name in enumerate(["lesion", "blue", "healthy"])]
    r = client.post("/predict", json=predict_body(tasks))
    assert r.status_code == 200
    lesion, blue, healthy = r.get_json()["results"]
    assert lesion["result"] and healthy["result"]
    assert blue["result"] == [] and "blue images break this model" in blue["meta"]["error"]


# --- issue 12: untrusted input ---------------------------------------------------------------------------------------
def test_bad_tasks_fail_alone_and_the_good_ones_are_predicted(
    tmp_path: Path, images: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, root = images
    port = url.rsplit(":", 1)[1]
    big = np.full((3000, 4096, 3), [20, 120, 40], np.uint8)
    big[300:900, 400:1600] = [220, 20, 20]
    Image.fromarray(big).save(root / "big.jpg", quality=90)
    models = tmp_path / "models"
    write_version(models, ["Healthy", "Lesion"])
    # a wildcard allow-list, Label Studio on a closed port; the static server is allowed by address; big.jpg is
    # predicted reduced, its mask comes back at full size
    ls = {"LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "k" * 40}
    rt, fakes = make_runtime(models, AXX_ALLOWED_HOSTS=f"*,127.0.0.1:{port}", **ls)
    connects: list[Any] = []
    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", lambda s, a: connects.append(a) or real_connect(s, a))
    client = create_app(rt).test_client()
    good = {"id": 1, "data": {"image": f"{url}/lesion.png"}}
    bad: list[tuple[Any, str]] = [
        ("a string", "not an object"),
        (None, "not an object"),
        ({"id": 3, "data": "a string"}, "data is a JSON str"),
        ({"id": 4, "data": None}, "data is a JSON NoneType"),
        ({"id": 5, "data": {"image": 12}}, "no image URL"),
        ({"id": 6, "data": {"image": "http://127.0.0.1:65536/x.png"}}, "invalid port"),
        ({"id": 7, "data": {"image": "http://127.0.0.1:-1/x.png"}}, "invalid port"),
        ({"id": 8, "data": {"image": "http://[::1/x.png"}}, "invalid IPv6"),
        ({"id": 9, "data": {"image": "http://user:s3cret@127.0.0.1/x.png"}}, "user name or password"),
        ({"id": 10, "data": {"image": "/data/upload/1/../../../api/projects/"}}, "only /data/upload/"),
        ({"id": 11, "data": {"image": "http://127.0.0.1:9/api/projects/1/export"}}, "only /data/upload/"),
        ({"id": 12, "data": {"image": "http://169.254.169.254/latest/meta-data/"}}, "link-local"),
        ({"id": 13, "data": {"image": "http://10.0.0.1/x.png"}}, "private"),
        ({"id": 14, "data": {"image": "http://224.0.0.1/x.png"}}, "multicast"),
        ({"id": 15, "data": {"image": "http://127.0.0.1:6379/"}}, "loopback"),
        ({"id": 16, "data": {"image": f"{url}/" + "a" * 5000}}, "over the 4096 limit"),
        ({"id": 17, "data": {"image": "file:///etc/passwd"}}, "file:// URLs"),
        ({"id": 18, "data": {"image": f"{url}/corrupt.png"}}, "cannot read image"),
    ]
    tasks = [good] + [task for task, _ in bad] + [{"id": 99, "data": {"image": f"{url}/big.jpg"}}, good]
    r = client.post("/predict", json=predict_body(tasks))
    assert r.status_code == 200
    results = r.get_json()["results"]
    assert len(results) == len(tasks)
    first, *failed, big_result, last = results
    for prediction in (first, last):
        assert [x["value"]["choices"] for x in prediction["result"] if x["type"] == "choices"] == [["Lesion"]]
    for prediction, (_, needle) in zip(failed, bad, strict=True):
        assert prediction["result"] == [] and needle in prediction["meta"]["error"], (needle, prediction)
        assert "s3cret" not in json.dumps(prediction)
    (brush,) = [x for x in big_result["result"] if x["type"] == "brushlabels"]
    assert (brush["original_width"], brush["original_height"]) == (4096, 3000)
    mask = decode_rle(brush["value"]["rle"]).reshape(3000, 4096, 4)[:, :, 3] > 0
    assert mask[320:880, 420:1580].all() and not mask[1000:, :].any() and not mask[:, 1700:].any()
    (fake,) = fakes.values()
    assert max(max(size) for size in fake.annotator.sizes) < 2048  # the model saw the reduced image
    assert {a for a in connects} <= {("127.0.0.1", int(port))}  # nothing else was connected to
    assert client.get("/metrics").get_json()["tasks"]["failed"] == len(bad)


def test_malformed_bodies_are_a_400_that_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AXX_MAX_REQUEST_BYTES", "20000")
    rt, _ = make_runtime(tmp_path)
    client = create_app(rt).test_client()
    cases = [
        (client.post("/predict", data=b"{not json", content_type="application/json"), "JSON object"),
        (client.post("/predict", json=["a", "list"]), "JSON object"),
        (client.post("/predict", json={"tasks": "nope"}), "'tasks' list"),
        (client.post("/predict", json={**predict_body([]), "label_config": 12}), "'label_config' must be a string"),
        (client.post("/predict", json={**predict_body([]), "label_config": {"x": 1}}), "must be a string"),
        (client.post("/setup", json={"project": "1.1", "schema": ["x"]}), "'schema' must be a string"),
        (client.post("/predict", json=predict_body([], project="../../etc.1")), "project id"),
        (client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": "../x"}}), "project id"),
        (client.post("/train", json={"project": {"id": [1]}}), "project id"),
    ]
    for r, needle in cases:
        assert r.status_code == 400 and needle in r.get_json()["error"], (needle, r.get_json())
    r = client.post("/predict", json=predict_body([{"id": i, "data": {"image": "/x.png"}} for i in range(1000)]))
    assert r.status_code == 413 and "20000 byte limit" in r.get_json()["error"]
    assert client.get("/metrics").get_json()["errors"].get("/predict", 0) == 0  # no 500 among them
