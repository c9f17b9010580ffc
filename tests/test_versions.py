"""Atomic versions: a failed write changes nothing, a partial directory is never loaded."""

import json
import os

import pytest

from axx_backend.core.version_meta import MemberSpec, VersionMeta, load_version
from axx_backend.core.versions import ModelStore, VersionError


def fill_with(meta):
    def fill(tmp):
        (tmp / "heads.safetensors").write_bytes(b"weights")
        return meta

    return fill


def test_write_version_creates_complete_directory_and_moves_current(tmp_path):
    store = ModelStore(tmp_path)
    assert store.current() is None and store.list_versions() == []
    v1 = store.write_version(fill_with(VersionMeta(classes=("a", "b"), members=())), name="v1")
    assert store.current() == "v1"
    assert json.loads((tmp_path / "v1" / "version.json").read_text())["version"] == "v1"
    v2 = store.write_version(fill_with(VersionMeta(classes=("a", "b"), members=())), name="v2")
    assert (v1, v2) == ("v1", "v2")
    assert store.current() == "v2"
    assert os.readlink(tmp_path / "current") == "v2"  # relative: the directory can move
    assert store.list_versions() == ["v1", "v2"]
    store.set_current("v1")
    assert store.current() == "v1"


def test_version_path_is_the_named_or_current_version(tmp_path):
    store = ModelStore(tmp_path)
    assert store.version_path() is None
    store.write_version(fill_with(VersionMeta(classes=("a", "b"), members=())), name="v1")
    store.write_version(fill_with(VersionMeta(classes=("a", "b"), members=())), name="v2")
    assert store.version_path() == tmp_path / "v2"
    assert store.version_path("v1") == tmp_path / "v1"
    with pytest.raises(VersionError):
        store.version_path("v3")


def test_failed_write_leaves_store_untouched(tmp_path):
    store = ModelStore(tmp_path)
    store.write_version(fill_with(VersionMeta(classes=(), members=())), name="good")

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
    store.write_version(fill_with(VersionMeta(classes=(), members=())), name="good")
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


def test_the_typed_format_round_trips_and_reads_a_format_1_version(tmp_path):
    meta = VersionMeta(
        classes=("Healthy", "Lesion"),
        members=(MemberSpec("resnet50", "pip:imgsim", "ab" * 8, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0)),),
        negative_classes=("Healthy",),
        pooling="top10",
    )
    store = ModelStore(tmp_path)
    name = store.write_version(fill_with(meta), name="v1")
    loaded = store.metadata(name)
    assert loaded.version == "v1" and loaded.created and loaded.format == 2 and loaded.pooling == "top10"
    assert loaded.members[0].mean == (0.1, 0.2, 0.3) and loaded.negative_classes == ("Healthy",)
    assert loaded == load_version(tmp_path / "v1")
    # The first releases wrote an untyped dict without format, val_keys or member weights.
    old = {
        "classes": ["a", "b"],
        "members": [{"name": "resnet50", "source": "pip:imgsim", "fingerprint": "f" * 16, "temperature": 2.0}],
        "thresholds": {"uncertainty_threshold": 0.3, "mask_fusion": "intersection", "not_a_field": 1},
        "training": {"source": "folder", "skipped": ["x: unreadable"]},
        "version": "v0",
    }
    (tmp_path / "v0").mkdir()
    (tmp_path / "v0" / "version.json").write_text(json.dumps(old))
    legacy = load_version(tmp_path / "v0")
    assert legacy.format == 1 and legacy.members[0].weight == 1.0 and legacy.members[0].temperature == 2.0
    assert legacy.thresholds.mask_fusion == "intersection" and legacy.thresholds.fusion_thresholds == {}
    assert legacy.training.skipped == ("x: unreadable",) and legacy.training.val_keys == ()
    assert legacy.negative_classes is None and not legacy.cam_calibrated
    assert legacy.pooling == "avg"  # versions before the pooling setting: their heads read the global average


def test_a_version_json_that_is_not_a_version_is_refused_with_its_path(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "version.json").write_text("{not json")
    with pytest.raises(VersionError, match="version.json is not valid JSON"):
        load_version(tmp_path / "v")
    (tmp_path / "v" / "version.json").write_text('{"preset": "paper"}')
    with pytest.raises(VersionError, match="no classes or members"):
        load_version(tmp_path / "v")
