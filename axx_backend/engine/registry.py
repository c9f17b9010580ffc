"""Which model version serves a project, and the loaded models (once per process, shared by requests).

A project is served by `MODEL_DIR/<project id>/current` when that exists, else by `MODEL_DIR/current`
when its classes match the project's Choices. Resolving reads only `version.json` (cached by mtime),
so /setup stays cheap; the model itself loads lazily on first use, keyed by the version directory
(a new `current` is a new directory, so a new version is picked up without a restart).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..core.settings import Settings
from ..core.version_meta import VERSION_FILE, VersionError, VersionMeta, load_version
from ..core.versions import ModelStore

if TYPE_CHECKING:
    from .annotator import Annotator

log = logging.getLogger(__name__)

ClassCheck = Callable[[tuple[str, ...]], str | None]


@dataclass(frozen=True)
class Resolved:
    """The version serving a project, or why there is none."""

    version: str | None
    path: Path | None
    classes: tuple[str, ...] = ()
    reason: str | None = None  # set when `version` is None

    @property
    def ready(self) -> bool:
        return self.path is not None


def __getattr__(name: str) -> Any:
    """`registry.Annotator` still names the class (imported on first use: resolving needs no torch)."""
    if name == "Annotator":
        from .annotator import Annotator

        return Annotator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class LoadedModel:
    """An Annotator with its own lock: one inference at a time per process (2 cores gain nothing from two)."""

    def __init__(self, annotator: Annotator, path: Path, seconds: float) -> None:
        self.annotator = annotator
        self.path = path
        self.load_seconds = seconds
        self.lock = threading.Lock()


class ModelRegistry:
    def __init__(self, model_dir: str | os.PathLike[str], settings: Settings, max_loaded: int = 2) -> None:
        self.root = Path(model_dir)
        self.settings = settings
        self.max_loaded = max_loaded
        self._meta: dict[Path, tuple[float, VersionMeta]] = {}
        self._models: OrderedDict[Path, LoadedModel] = OrderedDict()
        self._loading: dict[Path, threading.Lock] = {}
        self._lock = threading.Lock()
        self.load_errors: dict[str, str] = {}

    # --- resolving (cheap) ---------------------------------------------------------------------------------------
    def store_for(self, project_id: str | None) -> tuple[ModelStore, bool]:
        """The project's own store when it has a current version, else the shared one; (store, is_project's)."""
        if project_id and project_id.isdigit():
            project_store = ModelStore(self.root / project_id)
            if project_store.current() is not None:
                return project_store, True
        return ModelStore(self.root), False

    def metadata(self, path: Path) -> VersionMeta:
        mtime = (path / VERSION_FILE).stat().st_mtime
        with self._lock:
            hit = self._meta.get(path)
        if hit is not None and hit[0] == mtime:
            return hit[1]
        meta = load_version(path)
        with self._lock:
            self._meta[path] = (mtime, meta)
        return meta

    def resolve(self, project_id: str | None, class_mismatch: ClassCheck | None = None) -> Resolved:
        """`class_mismatch(classes)`: why a version with these classes cannot serve the project, or None
        (Label Studio's `ProjectConfig.class_mismatch`); None: any classes do."""
        store, own = self.store_for(project_id)
        name = store.current()
        where = f"{store.root}/current"
        if name is None:
            return Resolved(
                None,
                None,
                reason=f"no trained version in {self.root} (nor {self.root}/<project id>): predictions stay empty "
                "until `axx-backend train` writes one",
            )
        try:
            path = store.path(name).resolve()
            meta = self.metadata(path)
        except (OSError, VersionError) as exc:
            return Resolved(None, None, reason=f"{where}: {exc}")
        version = meta.version or name
        classes = meta.classes
        if class_mismatch is not None:
            mismatch = class_mismatch(classes)
            if mismatch:
                hint = "" if own else f"; train a version for this project into {self.root}/{project_id or '<id>'}/"
                return Resolved(None, None, classes, reason=f"{where} ({version}): {mismatch}{hint}")
        return Resolved(version, path, classes)

    def versions(self, project_id: str | None) -> list[str]:
        store, _ = self.store_for(project_id)
        return store.list_versions()

    # --- loading (lazy, once per version directory) ------------------------------------------------------------
    def get(self, path: Path) -> LoadedModel:
        path = Path(path).resolve()
        with self._lock:
            model = self._models.get(path)
            if model is not None:
                self._models.move_to_end(path)
                return model
            loading = self._loading.setdefault(path, threading.Lock())
        with loading:  # the first thread loads, the others wait for it instead of loading again
            with self._lock:
                model = self._models.get(path)
            if model is not None:
                return model
            from .annotator import Annotator  # torch: imported by the first load, not by resolving

            start = time.perf_counter()
            try:
                annotator = Annotator.from_version(path, self.settings)
            except Exception as exc:
                with self._lock:
                    self.load_errors[path.name] = f"{type(exc).__name__}: {exc}"
                    self._loading.pop(path, None)
                raise
            model = LoadedModel(annotator, path, time.perf_counter() - start)
            log.info("loaded version %s from %s in %.1f s", annotator.version, path, model.load_seconds)
            with self._lock:
                self._models[path] = model
                self._loading.pop(path, None)
                self.load_errors.pop(path.name, None)
                while len(self._models) > self.max_loaded:
                    old, _ = self._models.popitem(last=False)
                    log.info("unloaded %s (AXX_MAX_LOADED_VERSIONS=%d)", old, self.max_loaded)
            return model

    def warm(self, path: Path) -> None:
        """Load `path` in a background thread unless it is loaded or loading (never blocks the caller)."""
        path = Path(path).resolve()
        with self._lock:
            if path in self._models or path in self._loading:
                return
        threading.Thread(target=self._warm, args=(path,), name="model-preload", daemon=True).start()

    def _warm(self, path: Path) -> None:
        try:
            model = self.get(path)
            with model.lock:  # one tiny inference: the first call of a process pays for kernel setup (seconds)
                start = time.perf_counter()
                model.annotator.annotate([Image.new("RGB", (64, 64), (128, 128, 128))])
                log.info("warmed up %s in %.1f s", path.name, time.perf_counter() - start)
        except Exception:
            log.exception("preloading %s failed", path)

    def loaded(self) -> dict[str, Any]:
        with self._lock:
            return {m.annotator.version or p.name: {"path": str(p), "load_seconds": round(m.load_seconds, 2)}
                    for p, m in self._models.items()}  # fmt: skip
