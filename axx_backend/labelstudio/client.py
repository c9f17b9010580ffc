"""Talking to the Label Studio API: the API key, and keeping the project's model_version in step.

Label Studio 1.23 has two kinds of API key (docs/LABEL_STUDIO.md, section 6): a legacy token, sent as
`Authorization: Token <key>`, and a Personal Access Token, a JWT *refresh* token that must be
exchanged at `POST /api/token/refresh/` for a 5-minute access token sent as `Bearer <access>`.
`ApiKeyAuth` tells them apart by shape and caches the access token until shortly before it expires.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import requests

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds


class LabelStudioError(RuntimeError):
    """A Label Studio API call failed; `status` is the HTTP status (0 when there was no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The payload of a JWT (unverified: only to learn its type and expiry), or None when it is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def base_url(url: str) -> str:
    return url.rstrip("/")


class ApiKeyAuth:
    """The Authorization header for one Label Studio and one API key (legacy token or PAT)."""

    def __init__(
        self,
        url: str,
        api_key: str,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        refresh_margin: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = base_url(url)
        self.api_key = api_key.strip()
        self.timeout = timeout
        self.refresh_margin = refresh_margin
        self.clock = clock
        claims = jwt_claims(self.api_key)
        # A PAT is a JWT refresh token; anything else is treated as a legacy token.
        self.kind = "pat" if claims is not None and claims.get("token_type", "refresh") == "refresh" else "legacy"
        self._access: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()
        self.refreshes = 0  # how many times the PAT was exchanged (tests, /metrics)

    def headers(self, force_refresh: bool = False) -> dict[str, str]:
        if self.kind == "legacy":
            return {"Authorization": f"Token {self.api_key}"}
        return {"Authorization": f"Bearer {self.access_token(force_refresh)}"}

    def invalidate(self) -> None:
        with self._lock:
            self._access, self._expires = None, 0.0

    def access_token(self, force_refresh: bool = False) -> str:
        with self._lock:  # one refresh at a time; the other threads reuse its result
            if not force_refresh and self._access and self.clock() < self._expires - self.refresh_margin:
                return self._access
            try:
                refresh = {"refresh": self.api_key}
                r = requests.post(f"{self.url}/api/token/refresh/", json=refresh, timeout=self.timeout)
            except requests.RequestException as exc:
                raise LabelStudioError(f"cannot reach {self.url} to refresh the API key: {exc}") from exc
            if r.status_code != 200:
                raise LabelStudioError(
                    f"Label Studio refused the Personal Access Token in LABEL_STUDIO_API_KEY "
                    f"(POST /api/token/refresh/ -> {r.status_code}: {r.text[:200]})",
                    r.status_code,
                )
            access = str(r.json().get("access", ""))
            if not access:
                raise LabelStudioError("POST /api/token/refresh/ answered no access token", r.status_code)
            exp = (jwt_claims(access) or {}).get("exp")
            self._access = access
            self._expires = float(exp) if isinstance(exp, (int, float)) else self.clock() + 300.0
            self.refreshes += 1
            return access


class PerThreadSession:
    """One `requests.Session` per thread: sessions are not thread-safe, and the server's threads share clients."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session


class LabelStudioClient:
    """A small Label Studio API client (requests; one session per thread)."""

    def __init__(self, url: str, api_key: str, timeout: tuple[float, float] = DEFAULT_TIMEOUT) -> None:
        self.url = base_url(url)
        self.auth = ApiKeyAuth(self.url, api_key, timeout)
        self.timeout = timeout
        self._sessions = PerThreadSession()

    @property
    def session(self) -> requests.Session:
        return self._sessions.get()

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One API call with the key; a PAT's access token is refreshed once on 401."""
        kwargs.setdefault("timeout", self.timeout)
        url = path if path.startswith("http") else f"{self.url}{path}"
        for attempt in (0, 1):
            headers = {**kwargs.pop("headers", {}), **self.auth.headers(force_refresh=attempt == 1)}
            try:
                r = self.session.request(method, url, headers=headers, **kwargs)
            except requests.RequestException as exc:
                raise LabelStudioError(f"{method} {path}: {exc}") from exc
            if r.status_code == 401 and self.auth.kind == "pat" and attempt == 0:
                continue
            return r
        return r

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.request(method, path, **kwargs)
        if r.status_code >= 400:
            raise LabelStudioError(f"{method} {path} -> {r.status_code}: {r.text[:300]}", r.status_code)
        return r.json() if r.content else None

    def get_project(self, project_id: int | str) -> dict[str, Any]:
        return dict(self.json("GET", f"/api/projects/{project_id}"))

    def set_model_version(self, project_id: int | str, version: str) -> None:
        """PATCH the project's model_version (LS refuses with 400 until a prediction of `version` is stored)."""
        self.json("PATCH", f"/api/projects/{project_id}", json={"model_version": version})

    def export_tasks(self, project_id: int | str) -> list[dict[str, Any]]:
        """Every task of the project with its annotations (the JSON export: START_TRAINING carries none)."""
        params = {"exportType": "JSON", "download_all_tasks": "true"}
        return list(self.json("GET", f"/api/projects/{project_id}/export", params=params))

    def list_tasks(
        self,
        project_id: int | str,
        ids: list[int] | None = None,
        page_size: int = 500,
        include: str | None = None,
        raw_data: bool = False,
    ) -> list[dict[str, Any]]:
        """The project's tasks (`include`: id, data, versions of their predictions), page by page; only `ids`
        when given. `raw_data`: the task data as stored (storage URLs not turned into proxy URLs), what a write
        of the task's data must start from."""
        params: dict[str, Any] = {"project": project_id, "page_size": page_size, "fields": "all"}
        params["include"] = include or TASK_FIELDS
        if raw_data:
            params["resolve_uri"] = "false"
        if ids is not None:
            params["query"] = json.dumps({"selectedItems": {"all": False, "included": list(ids)}})
        tasks: list[dict[str, Any]] = []
        for page in itertools.count(1):
            r = self.request("GET", "/api/tasks", params={**params, "page": page})
            if r.status_code == 404 and page > 1:  # "Invalid page": past the last one
                break
            if r.status_code >= 400:
                raise LabelStudioError(f"GET /api/tasks?project={project_id} -> {r.status_code}: {r.text[:300]}")
            batch, total = _task_page(r.json())
            tasks.extend(batch)
            # `total` when Label Studio gives it (it may cap page_size below ours), else a short page ends the list
            if not batch or (len(tasks) >= total if total is not None else len(batch) < page_size):
                break
        return tasks

    def post_prediction(self, task_id: int, prediction: dict[str, Any]) -> None:
        """Store one prediction (`result`, `score`, `model_version`) on a task."""
        self.json("POST", "/api/predictions", json=_prediction_body(task_id, prediction))

    def import_predictions(self, project_id: int | str, predictions: Sequence[tuple[int, dict[str, Any]]]) -> int:
        """Store many predictions, `(task id, prediction)`, in one request; how many Label Studio created.

        `POST /api/projects/<id>/import/predictions` (docs/LABEL_STUDIO.md, section 7) costs Label Studio a
        fraction of one `POST /api/predictions` per task. It is not one transaction: after an error, some may
        have been stored."""
        body = [_prediction_body(task_id, prediction) for task_id, prediction in predictions]
        answer = self.json("POST", f"/api/projects/{project_id}/import/predictions", json=body)
        return int(answer.get("created", len(body))) if isinstance(answer, dict) else len(body)


TASK_FIELDS = "id,data,predictions_model_versions"  # what `list_tasks` asks for


def _prediction_body(task_id: int, prediction: dict[str, Any]) -> dict[str, Any]:
    return {"task": int(task_id), **{k: prediction[k] for k in ("result", "score", "model_version") if k in prediction}}


def _task_page(body: Any) -> tuple[list[dict[str, Any]], int | None]:
    """One page of GET /api/tasks: {"tasks": [...], "total": n} (or a bare list from older versions)."""
    if isinstance(body, dict):
        return list(body["tasks"]), body.get("total")
    return list(body), None


def prediction_versions(task: dict[str, Any]) -> set[str]:
    """Label Studio lists a task's prediction versions as one comma-separated string."""
    raw = task.get("predictions_model_versions") or ""
    if isinstance(raw, list):
        return {str(v) for v in raw if v}
    return {v.strip() for v in str(raw).split(",") if v.strip()}


class ModelVersionSync:
    """Keeps `project.model_version` equal to the version the backend serves, in the background.

    Label Studio averages the prediction score (the Data Manager's sort and filter) only over predictions
    whose model_version equals the project's. Connecting resets it to the backend's title, and the PATCH
    is refused until predictions of the version are stored, which happens only after the /predict answer
    (docs/LABEL_STUDIO.md, section 5).
    So: wait a moment, check, PATCH, and retry with backoff while Label Studio answers 400. Never blocks.
    """

    def __init__(
        self,
        client: LabelStudioClient | None,
        delays: Sequence[float] = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0),
        recheck_after: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.delays = tuple(delays)
        self.recheck_after = recheck_after
        self.sleep = sleep
        self._pending: set[tuple[str, str]] = set()
        self._more: dict[tuple[str, str], list[float]] = {}
        self._done: dict[tuple[str, str], float] = {}
        self._tried: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self.results: dict[tuple[str, str], str] = {}  # last outcome per (project, version), for /health

    def schedule(self, project_id: str | None, version: str | None, attempts: int | None = None) -> bool:
        """Start a background sync; True when a new one started.

        `attempts=None` (after a /predict answer: predictions are about to be stored) always makes sure a
        loop runs with the full backoff. A limited number of attempts (from /setup, called very often) is
        skipped while a sync runs, or when one succeeded or gave up within `recheck_after` seconds.
        """
        if self.client is None or not project_id or not version:
            return False
        key = (str(project_id), version)
        now = time.monotonic()
        with self._lock:
            if key in self._pending:
                if attempts is None:
                    self._more[key] = list(self.delays)  # the running loop keeps trying with the full backoff
                return False
            if now - self._done.get(key, -1e9) < self.recheck_after:
                return False
            if attempts is not None and now - self._tried.get(key, -1e9) < self.recheck_after:
                return False
            self._pending.add(key)
            self._tried[key] = now
        delays = list(self.delays if attempts is None else self.delays[:attempts])
        threading.Thread(target=self._run, args=(key, delays), name=f"model-version-sync-{key[0]}", daemon=True).start()
        return True

    def sync_now(self, project_id: str, version: str, delays: Sequence[float] | None = None) -> str:
        """The same loop in the calling thread (tests, CLI); returns the outcome."""
        key = (str(project_id), version)
        with self._lock:
            self._pending.add(key)
        self._run(key, list(self.delays if delays is None else delays))
        return self.results[key]

    def _attempt(self, key: tuple[str, str]) -> tuple[str, bool]:
        """One check-and-PATCH; (outcome, worth retrying)."""
        project_id, version = key
        assert self.client is not None
        try:
            current = self.client.get_project(project_id).get("model_version")
            if current == version:
                return "in sync", False
            self.client.set_model_version(project_id, version)
            log.info("project %s: model_version %r -> %r", project_id, current, version)
            return f"set (was {current!r})", False
        except LabelStudioError as exc:
            if exc.status != 400:  # 400 = no stored prediction of this version yet: worth retrying
                log.warning("project %s: cannot set model_version to %r: %s", project_id, version, exc)
                return f"failed: {exc}", False
            log.debug("project %s: model_version %r refused for now: %s", project_id, version, exc)
            return f"failed: {exc}", True

    def _run(self, key: tuple[str, str], delays: list[float]) -> None:
        outcome = "not tried"
        try:
            while True:
                retry = False
                for delay in delays:
                    self.sleep(delay)  # first wait: let Label Studio store the predictions of the /predict answer
                    outcome, retry = self._attempt(key)
                    if not retry:
                        break
                with self._lock:
                    more = self._more.pop(key, None)
                if not retry or not more:
                    break
                delays = more
            if retry:
                log.info("project %s: model_version %r still refused after retries", *key)
        finally:
            with self._lock:
                self._pending.discard(key)
                self._more.pop(key, None)
                self.results[key] = outcome
                if outcome.startswith(("set", "in sync")):
                    self._done[key] = time.monotonic()
