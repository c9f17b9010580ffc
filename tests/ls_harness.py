"""Run a real Label Studio, a static file server and `axx-backend serve` on 127.0.0.1 for tests.

Label Studio lives in its own venv (`$AXX_LS_VENV`, default /work/cache/ls-venv) because it pins
versions the ML stack must not share. Everything binds to 127.0.0.1 on free ports, keeps its data
in a temporary directory, and is killed by process group on teardown.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

LS_VERSION = "1.23.2"
DEFAULT_LS_VENV = "/work/cache/ls-venv"
DEFAULT_PLAYWRIGHT_CORE = "/work/cache/pw/node_modules/playwright-core"  # `npm install playwright-core` there
REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def ls_install_hint(venv: Path) -> str:
    return f"python3 -m venv {venv} && {venv}/bin/pip install label-studio=={LS_VERSION}"


def ls_venv() -> Path:
    """The Label Studio venv; a missing one is an error with the command that creates it (never a skip)."""
    venv = Path(os.environ.get("AXX_LS_VENV", DEFAULT_LS_VENV))
    if not (venv / "bin" / "label-studio").is_file():
        raise RuntimeError(
            f"Label Studio {LS_VERSION} is not installed at {venv} (set AXX_LS_VENV to another venv). "
            f"Install it with:\n    {ls_install_hint(venv)}"
        )
    return venv


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    auth: tuple[str, str] | None = None,
) -> None:
    """Poll `url` until it answers 200; fail early when the process died, with the end of its log."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}\n{tail(log)}")
        try:
            r = requests.get(url, timeout=5, auth=auth)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout:.0f} s (last: {last})\n{tail(log)}")


def tail(path: Path | None, n: int = 4000) -> str:
    if path is None or not path.is_file():
        return ""
    text = path.read_text(errors="replace")
    return text[-n:]


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class LabelStudio:
    """A Label Studio server in a temporary data directory, with an admin user and a legacy token."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.venv = ls_venv()
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.username = "admin@example.com"
        self.password = "axx-test-password-1"
        self.token = "axxlegacytoken0123456789abcdef01234567"  # fixed legacy token, only valid in this temp instance
        self.log = self.workdir / "label-studio.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {self.token}"

    def env(self) -> dict[str, str]:
        data = self.workdir / "ls-data"
        data.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
        env.update(
            LABEL_STUDIO_BASE_DATA_DIR=str(data),
            XDG_CONFIG_HOME=str(data),
            XDG_DATA_HOME=str(data),
            XDG_CACHE_HOME=str(data),
            SENTRY_DSN="",
            FRONTEND_SENTRY_DSN="",
            COLLECT_ANALYTICS="false",
            LATEST_VERSION_CHECK="false",
            USE_DEFAULT_BANNED_SUBNETS="false",  # else LS refuses an ML backend on 127.0.0.1 (403)
            LOCAL_FILES_SERVING_ENABLED="true",
            LOCAL_FILES_DOCUMENT_ROOT=str(self.workdir),
            PYTHONUNBUFFERED="1",
        )
        env.pop("VIRTUAL_ENV", None)
        return env

    def start(self) -> LabelStudio:
        """Start without waiting; call `wait()` before use (first start runs migrations, 30-60 s)."""
        cmd = [
            str(self.venv / "bin" / "label-studio"), "start", "--no-browser",
            "--internal-host", "127.0.0.1", "--host", self.url, "--port", str(self.port),
            "--username", self.username, "--password", self.password,
            "--user-token", self.token, "--enable-legacy-api-token",
        ]  # fmt: skip
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=self.workdir, env=self.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def wait(self, timeout: float = 150.0) -> None:
        wait_http(f"{self.url}/health", timeout, self.proc, self.log)
        # /health answers before the user/token exist on a first start: wait for the API to accept the token.
        deadline = time.monotonic() + 60
        while True:
            r = self.session.get(f"{self.url}/api/projects", timeout=10)
            if r.status_code == 200:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Label Studio API refuses the token: {r.status_code} {r.text[:300]}")
            time.sleep(1)

    def stop(self) -> None:
        stop_process(self.proc)

    # --- API helpers -------------------------------------------------------------------------------------------
    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", 120)
        r = self.session.request(method, f"{self.url}{path}", **kwargs)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path} -> {r.status_code}: {r.text[:1000]}")
        return r.json() if r.content else None

    def create_project(self, title: str, label_config: str) -> int:
        return int(self.api("POST", "/api/projects", json={"title": title, "label_config": label_config})["id"])

    def upload_files(self, project: int, files: list[Path]) -> Any:
        handles = [("file", (p.name, p.read_bytes(), "image/png")) for p in files]
        return self.api("POST", f"/api/projects/{project}/import", files=handles)

    def import_tasks(self, project: int, tasks: list[dict[str, Any]]) -> Any:
        return self.api("POST", f"/api/projects/{project}/import", json=tasks)

    def tasks(self, project: int, query: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"project": project, "page_size": 1000, "fields": "all"}
        if query:
            params["query"] = json.dumps(query)
        data = self.api("GET", "/api/tasks", params=params)
        return data["tasks"] if isinstance(data, dict) else data

    def predictions(self, project: int) -> list[dict[str, Any]]:
        return self.api("GET", "/api/predictions", params={"project": project})

    def create_personal_access_token(self) -> str:
        """Turn on PATs for the organisation and create one for the admin (a JWT refresh token)."""
        self.api("POST", "/api/jwt/settings", json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": True})
        return str(self.api("POST", "/api/token/")["token"])


class LocalHTTPServer:
    """An HTTP server on 127.0.0.1 (the only address tests talk to) serving `handler` from a daemon thread."""

    def __init__(self, handler: Callable[..., http.server.BaseHTTPRequestHandler]) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> LocalHTTPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StaticServer(LocalHTTPServer):
    """A threaded static file server on 127.0.0.1 for URL tasks."""

    def __init__(self, root: Path) -> None:
        super().__init__(functools.partial(_QuietHandler, directory=str(root)))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass

    def end_headers(self) -> None:
        # the Label Studio editor loads images with crossorigin="anonymous": without CORS the browser drops them
        self.send_header("Access-Control-Allow-Origin", "*")
        super().end_headers()


def backend_command(host: str, port: int) -> list[str]:
    """`axx-backend serve` when the CLI has it, else the same function called directly."""
    cli = Path(PYTHON).parent / "axx-backend"
    if cli.is_file():
        probe = subprocess.run([str(cli), "serve", "--help"], capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            return [str(cli), "serve", "--host", host, "--port", str(port)]
    code = f"from axx_backend.server.run import serve; serve({host!r}, {port})"
    return [PYTHON, "-c", code]


@contextmanager
def backend_server(
    env_extra: dict[str, str], workdir: Path, timeout: float = 120.0, auth: tuple[str, str] | None = None
) -> Iterator[str]:
    """`axx-backend serve` on a free port; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / f"backend-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env_extra}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            backend_command("127.0.0.1", port), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_http(f"{url}/health", timeout, proc, log, auth)
        yield url
    finally:
        stop_process(proc)
        if os.environ.get("AXX_E2E_SHOW_LOGS"):
            print(tail(log, 20000))


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)


# --- screenshots (optional: headless Chromium driven by playwright-core from npm) ---------------------------------
SCREENSHOT_JS = r"""
const path = require('path');
const { chromium } = require(process.env.PLAYWRIGHT_CORE || 'playwright-core');
(async () => {
  const [url, user, password, project, view, task, outDir] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync'],
  });
  const context = await browser.newContext({ viewport: { width: 1500, height: 900 }, deviceScaleFactor: 1 });
  const page = await context.newPage();
  await page.goto(`${url}/user/login/`);
  await page.fill('input[name=email]', user);
  await page.fill('input[name=password]', password);
  await Promise.all([page.waitForNavigation(), page.click('button[type=submit], input[type=submit]')]);
  // Data Manager, in the view sorted by prediction score (ascending: least confident first)
  await page.goto(`${url}/projects/${project}/data?tab=${view}`);
  await page.waitForSelector('.dm-table-row, [class*=table-row], [class*=grid]', { timeout: 60000 });
  await page.waitForTimeout(4000);
  await page.screenshot({ path: path.join(outDir, 'labelstudio_datamanager.png') });
  // One task with its pre-annotation (brush mask + choice) in the labeling view
  await page.setViewportSize({ width: 1500, height: 1150 });  // tall enough for the explanation TextArea
  await page.goto(`${url}/projects/${project}/data?tab=${view}&task=${task}`);
  await page.waitForSelector('canvas', { timeout: 60000 });
  await page.waitForTimeout(5000);
  try {  // select the brush region: its details panel shows the prediction's meta text
    const region = page.locator('[class*=outliner-item], [class*=region-item], [class*=treeitem]').first();
    await region.click({ timeout: 5000 });
    await page.waitForTimeout(1500);
  } catch (e) { console.error('region not selected:', e.message); }
  await page.screenshot({ path: path.join(outDir, 'labelstudio_task.png') });
  await browser.close();
})().catch((e) => { console.error(e); process.exit(1); });
"""


def take_screenshots(ls: LabelStudio, project: int, view: int, task: int, out_dir: Path, workdir: Path) -> None:
    """Log in with headless Chromium and save the Data Manager and a task page (needs node + playwright-core)."""
    script = workdir / "screenshot.cjs"
    script.write_text(SCREENSHOT_JS)
    env = {**os.environ, "PLAYWRIGHT_CORE": os.environ.get("AXX_PLAYWRIGHT_CORE", DEFAULT_PLAYWRIGHT_CORE)}
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["node", str(script), ls.url, ls.username, ls.password, str(project), str(view), str(task), str(out_dir)],
        check=True, env=env, timeout=180,
    )  # fmt: skip
