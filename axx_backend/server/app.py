"""The thin web layer: Label Studio's ML backend protocol (docs/LABEL_STUDIO.md) routed to `AxxModel`.

Endpoints: GET /health, POST /setup, POST /predict, POST /webhook, GET /versions, GET /jobs, GET /metrics
(and the legacy POST /train, which Label Studio sends when its START_TRAINING webhook flag is off).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, g, jsonify, request

from ..core.env import environ, get_int
from ..labelstudio.config import ConfigError
from .metrics import prometheus_text
from .model import AxxModel, Runtime, get_runtime, project_id_of

log = logging.getLogger(__name__)

# Label Studio sends a whole selection of tasks in one /predict (their data, not their images): 64 MiB is
# thousands of tasks. Larger bodies are refused (413) before they are read.
MAX_BODY_BYTES = 64 * 1024 * 1024  # AXX_MAX_REQUEST_BYTES


class BadBody(ValueError):
    """The request body is not what the endpoint needs: a 400 that says what is wrong."""


def _status_line(code: int, message: str) -> str:
    """`400 <message>`: Label Studio shows only requests' "400 Client Error: <reason> for url" to the user,
    not the body, so the reason phrase carries the message (ASCII, one line, bounded)."""
    reason = re.sub(r"[^\x20-\x7e]", "?", " ".join(message.split()))[:300]
    return f"{code} {reason or 'Error'}"


def error_response(code: int, message: str) -> Response:
    response = jsonify({"status": "error", "error": message})
    response.status = _status_line(code, message)
    return response


def _basic_auth_ok(expected: tuple[str, str]) -> bool:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return hmac.compare_digest(user, expected[0]) & hmac.compare_digest(password, expected[1])


def _body() -> dict[str, Any]:
    data = request.get_json(silent=True)
    return data if isinstance(data, dict) else {}


def _json_object() -> dict[str, Any]:
    """The body as a JSON object, or BadBody (invalid JSON, another JSON type, no body)."""
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise BadBody("the body must be a JSON object")
    return data


def _config_text(body: dict[str, Any], *keys: str) -> str | None:
    """The labeling config (the first of `keys` present): a string of XML, or BadBody."""
    key = next((k for k in keys if body.get(k) not in (None, "")), None)
    if key is None:
        return None
    if not isinstance(body[key], str):
        raise BadBody(f"'{key}' must be a string (the labeling config XML), not a JSON {type(body[key]).__name__}")
    return str(body[key])


def _project(value: Any) -> Any:
    """Label Studio's project ("<id>.<timestamp>", an id, or an object with an `id`), checked: the id names a
    folder of MODEL_DIR, so it must be a number."""
    if not isinstance(value, dict) and value in (None, ""):
        return value
    raw = value.get("id") if isinstance(value, dict) else value
    text = str(raw).strip() if isinstance(raw, (int, str)) and not isinstance(raw, bool) else ""
    project_id = text if isinstance(value, dict) else project_id_of(text)
    if not project_id or not re.fullmatch(r"[0-9]+", project_id):
        raise BadBody("'project' must be a Label Studio project id (a number, or \"<id>.<timestamp>\")")
    return value


def create_app(runtime: Runtime | Callable[[], Runtime] | None = None) -> Flask:
    """The Flask app; `runtime` is made lazily per process unless given (tests pass one)."""
    get: Callable[[], Runtime]
    if runtime is None:
        get = get_runtime
    elif isinstance(runtime, Runtime):
        get = lambda: runtime  # noqa: E731
    else:
        get = runtime
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    max_body = get_int(environ(None), "AXX_MAX_REQUEST_BYTES", MAX_BODY_BYTES, minimum=1)
    app.config["MAX_CONTENT_LENGTH"] = max_body

    _request_hooks(app, get)
    _error_handlers(app, get, max_body)
    _protocol_routes(app, get)
    _operations_routes(app, get)
    return app


def _request_hooks(app: Flask, get: Callable[[], Runtime]) -> None:
    """Basic authentication and per-path request metrics."""

    @app.before_request
    def _auth() -> Response | None:
        rt = get()
        g.started = time.perf_counter()
        rt.metrics.request(request.path)
        expected = rt.settings.basic_auth
        if expected and not _basic_auth_ok(expected):
            response = error_response(401, "basic authentication required (BASIC_AUTH_USER/BASIC_AUTH_PASS)")
            response.headers["WWW-Authenticate"] = 'Basic realm="axx-backend"'
            return response
        return None

    @app.after_request
    def _observe(response: Response) -> Response:
        rt = get()
        if "started" in g:
            rt.metrics.observe(request.path, time.perf_counter() - g.started)
        if response.status_code >= 500:
            rt.metrics.error(request.path)
        return response


def _error_handlers(app: Flask, get: Callable[[], Runtime], max_body: int) -> None:
    """Input errors are 400/413 with a message; anything else a logged 500."""

    @app.errorhandler(ConfigError)
    def _config_error(exc: ConfigError) -> Response:
        get().metrics.error(request.path)
        log.warning("%s: %s", request.path, exc)
        return error_response(400, f"labeling config not supported: {exc}")

    @app.errorhandler(BadBody)
    def _bad_body(exc: BadBody) -> Response:
        log.warning("%s: %s", request.path, exc)
        return error_response(400, str(exc))

    @app.errorhandler(413)
    def _too_large(exc: Exception) -> Response:
        return error_response(413, f"the request body is over the {max_body} byte limit (AXX_MAX_REQUEST_BYTES)")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        from werkzeug.exceptions import HTTPException

        if isinstance(exc, HTTPException):
            return error_response(exc.code or 500, exc.description or exc.name)
        log.exception("%s failed", request.path)
        return error_response(500, f"{type(exc).__name__}: {exc}")


def _protocol_routes(app: Flask, get: Callable[[], Runtime]) -> None:
    """The ML backend protocol Label Studio calls (docs/LABEL_STUDIO.md), and the training jobs' status."""

    @app.get("/")
    @app.get("/health")
    def health() -> Response:
        return jsonify(get().health())

    @app.post("/setup")
    def setup() -> Response:
        body = _body()
        model = AxxModel(get(), _project(body.get("project")), _config_text(body, "schema", "label_config"))
        return jsonify(model.setup())

    @app.post("/predict")
    def predict() -> Response:
        body = _json_object()
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            return error_response(400, "the body needs a 'tasks' list")
        params = body.get("params") or {}
        model = AxxModel(get(), _project(body.get("project")), _config_text(body, "label_config"))
        return jsonify(model.predict(tasks, context=params.get("context") if isinstance(params, dict) else None))

    @app.post("/webhook")
    def webhook() -> Response:
        body = _body()
        event = str(body.get("action") or "")
        project = _project(body.get("project"))
        config = _config_text(project, "label_config") if isinstance(project, dict) else None
        model = AxxModel(get(), project.get("id") if isinstance(project, dict) else project, config)
        return jsonify(model.fit(event, body))

    @app.post("/train")
    def train() -> Response:
        body = _body()
        model = AxxModel(get(), _project(body.get("project")), _config_text(body, "label_config"))
        return jsonify(model.fit("START_TRAINING", body))

    @app.route("/versions", methods=["GET", "POST"])
    def versions() -> Response:
        body = _body()  # LS sends GET with a JSON body {"project": "1.123"}
        project = _project(body.get("project") or request.args.get("project"))
        model = AxxModel(get(), project)
        return jsonify({"versions": get().registry.versions(model.project_id)})

    @app.get("/jobs")
    def jobs() -> Response:
        return jsonify(get().jobs_status())


def _operations_routes(app: Flask, get: Callable[[], Runtime]) -> None:
    """What operators read: metrics."""

    @app.get("/metrics")
    def metrics() -> Response:
        """Requests, latency, predictions, jobs and model versions (JSON, or `?format=prometheus`)."""
        rt = get()
        snapshot = {
            **rt.metrics.snapshot(),
            "model_versions": rt.model_versions(),
            "loaded_versions": rt.registry.loaded(),
            "jobs": rt.jobs_overview(),
        }
        if request.args.get("format") == "prometheus":
            return Response(prometheus_text(snapshot), mimetype="text/plain; version=0.0.4")
        return jsonify(snapshot)
