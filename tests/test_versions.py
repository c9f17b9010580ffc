"""Atomic versions: a failed write changes nothing, a partial directory is never loaded."""

import json
import os

import pytest

from axx_backend.core.versions import ModelStore, VersionError


def fill_with(meta):
    def fill(tmp):
        (tmp / "heads.safetensors").write_bytes(b"weights")
        return meta

    return fill


def test_write_version_creates_complete_directory_and_moves_current(tmp_path):
    store = ModelStore(tmp_path)
    assert store.current() is None and store.list_versions() == []
    v1 = store.write_version(fill_with({"classes": ["a", "b"]}), name="v1")
    assert store.current() == "v1"
    assert json.loads((tmp_path / "v1" / "version.json").read_text())["version"] == "v1"
    v2 = store.write_version(fill_with({"classes": ["a", "b"]}), name="v2")
    assert (v1, v2) == ("v1", "v2")
    assert store.current() == "v2"
    assert os.readlink(tmp_path / "current") == "v2"  # relative: the directory can move
    assert store.list_versions() == ["v1", "v2"]
    store.set_current("v1")
    assert store.current() == "v1"


def test_failed_write_leaves_store_untouched(tmp_path):
    store = ModelStore(tmp_path)
    store.write_version(fill_with({}), name="good")

    def broken(tmp):
        (tmp / "heads.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        store.write_version(broken, name="bad")
    assert store.current() == "good"
    assert store.list_versions() == ["good"]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_partial_directories_are_ignored(tmp_path):
    store = ModelStore(tmp_path)
    store.write_version(fill_with({}), name="good")
    (tmp_path / ".tmp-crashed-1234").mkdir()
    (tmp_path / "no-metadata").mkdir()  # e.g. copied by hand, version.json missing
    assert store.list_versions() == ["good"]
    with pytest.raises(VersionError):
        store.set_current("no-metadata")
    with pytest.raises(VersionError):
        store.path(".tmp-crashed-1234")
    assert store.current() == "good"


def test_current_pointing_at_incomplete_version_reads_as_none(tmp_path):
    store = ModelStore(tmp_path)
    (tmp_path / "half").mkdir(parents=True)
    os.symlink("half", tmp_path / "current")
    assert store.current() is None
