"""Model versions on disk, written atomically.

Layout of a model directory:

    DIR/<version>/version.json      preset, members, classes, thresholds, metrics (written last)
    DIR/<version>/heads.safetensors  the MC-dropout heads (and later fine-tuned weights)
    DIR/current -> <version>         a relative symlink, replaced atomically

A version is built in `DIR/.tmp-<version>-<random>/` and renamed into place only when
complete, so a killed job leaves at most a `.tmp-*` directory that is never loaded.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .version_meta import VERSION_FILE, VersionError, VersionMeta, load_version, save_version

__all__ = ["CURRENT", "VERSION_FILE", "ModelStore", "VersionError", "new_version_name"]

CURRENT = "current"


def new_version_name() -> str:
    return time.strftime("v%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


class ModelStore:
    """The versions of one model directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def write_version(
        self, fill: Callable[[Path], VersionMeta], name: str | None = None, make_current: bool = True
    ) -> str:
        """Create a version: `fill(tmp_dir)` writes its files and returns its `VersionMeta`.

        The metadata is written last as `version.json`, the directory renamed into place,
        and `current` moved to it. Any exception leaves the store as it was.
        """
        name = name or new_version_name()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{name}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            meta = fill(tmp)
            created = meta.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            meta = dataclasses.replace(meta, version=name, created=created)
            for path in tmp.rglob("*"):
                if path.is_file():
                    _fsync_file(path)
            save_version(tmp, meta)
            _fsync_dir(tmp)
            os.rename(tmp, self.root / name)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if make_current:
            self.set_current(name)
        return name

    def set_current(self, name: str) -> None:
        if not self.is_complete(name):
            raise VersionError(f"{self.root / name} is not a complete version")
        link = self.root / f".current-{secrets.token_hex(4)}"
        os.symlink(name, link)
        os.replace(link, self.root / CURRENT)
        _fsync_dir(self.root)

    def current(self) -> str | None:
        """The name of the current version, or None when there is none yet."""
        link = self.root / CURRENT
        if not link.is_symlink() and not link.exists():
            return None
        name = os.readlink(link) if link.is_symlink() else link.read_text().strip()
        name = Path(name).name
        return name if self.is_complete(name) else None

    def version_path(self, version: str | None = None) -> Path | None:
        """The folder of `version` (default: the current one); None when there is no current version."""
        name = version or self.current()
        return None if name is None else self.path(name)

    def is_complete(self, name: str) -> bool:
        return not name.startswith(".") and (self.root / name / VERSION_FILE).is_file()

    def list_versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        names = [p.name for p in self.root.iterdir() if p.is_dir() and not p.is_symlink() and self.is_complete(p.name)]
        return sorted(names)

    def path(self, name: str) -> Path:
        if not self.is_complete(name):
            raise VersionError(f"no complete version {name!r} in {self.root}")
        return self.root / name

    def metadata(self, name: str) -> VersionMeta:
        return load_version(self.path(name))


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
