"""The folder form of the review loop: `axx-backend select DATASET_DIR` and `axx-backend label-check DATASET_DIR`
with the session's small version (tests/conftest.py)."""

import json
import shutil

from axx_backend.core.synthetic import NEGATIVE, POSITIVE
from tests.conftest import run_cli


def test_select_picks_k_positives_without_a_mask_and_caches_their_profiles(tmp_path, dataset_dir, trained_model_dir):
    data = tmp_path / "data"
    shutil.copytree(dataset_dir, data)
    masked = sorted((data / "masks" / POSITIVE).iterdir())
    for mask in masked[4:]:  # 4 positives keep their mask: not candidates, but the first centres of `diverse`
        mask.unlink()
    args = ["select", data, "--model-dir", trained_model_dir, "-k", "3", "--json"]
    first = json.loads(run_cli(*args).stdout)
    second = json.loads(run_cli(*args).stdout)
    n_images = len(list((data / "images").rglob("*.png")))
    positives = len(list((data / "images" / POSITIVE).iterdir()))
    assert first["candidates"] == positives - 4  # the negative class gets no mask; masked images are done
    assert first["anchors"] == 4
    assert first["computed"] == n_images and second["cached"] == n_images and second["computed"] == 0
    keys = [p["key"] for p in first["selected"]]
    assert keys == [p["key"] for p in second["selected"]] and len(set(keys)) == 3
    with_mask = {f"{POSITIVE}/{m.stem}" for m in masked[:4]}
    assert all(k.startswith(f"{POSITIVE}/") and k.rsplit(".", 1)[0] not in with_mask for k in keys)
    assert [p["rank"] for p in first["selected"]] == [1, 2, 3]


def test_label_check_puts_a_flipped_label_first(tmp_path, dataset_dir, trained_model_dir):
    data = tmp_path / "data"
    shutil.copytree(dataset_dir / "images", data / "images")  # labels only
    flipped = sorted((data / "images" / POSITIVE).iterdir())[0]
    flipped.rename(data / "images" / NEGATIVE / flipped.name)
    out = json.loads(run_cli("label-check", data, "--model-dir", trained_model_dir, "--json").stdout)
    assert out["checked_classes"] == len(list((data / "images").rglob("*.png")))
    top = out["suspects"][0]
    assert top["key"] == f"{NEGATIVE}/{flipped.name}", out["suspects"]
    assert top["reasons"] == [f"class {NEGATIVE}: ensemble says {POSITIVE}"]
