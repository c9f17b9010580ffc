"""benchmarks/make_photo_dataset.py: how a stamp is composited (`paste`, and `natural` with the paste's cues taken
away), on a hand-made stamp and background (the Debian photo packages are not needed)."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import make_photo_dataset as photo  # noqa: E402
from make_dataset import Stamp  # noqa: E402

SIZE = 96


@pytest.fixture(scope="module")
def stamp(tmp_path_factory) -> Stamp:
    """A reddish disc on transparency (hard alpha edge), 60 px wide."""
    yy, xx = np.mgrid[:60, :60]
    inside = (yy - 29.5) ** 2 + (xx - 29.5) ** 2 <= 28**2
    rgba = np.zeros((60, 60, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 60 + yy // 2, 40
    rgba[..., 3] = np.where(inside, 255, 0)
    path = tmp_path_factory.mktemp("stamps") / "disc.png"
    Image.fromarray(rgba).save(path)
    return Stamp(path, "animals")


@pytest.fixture(scope="module")
def background() -> np.ndarray:
    """A bluish gradient with texture."""
    rng = np.random.default_rng(3)
    ramp = np.linspace(0.2, 0.7, SIZE, dtype=np.float32)
    red, green = np.broadcast_to(ramp[None, :] * 0.5, (SIZE, SIZE)), np.broadcast_to(ramp[:, None] * 0.8, (SIZE, SIZE))
    image = np.stack([red, green, np.full((SIZE, SIZE), 0.8)], -1)
    return np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1).astype(np.float32)


def _paste(stamp, background, composite, seed=7):
    return photo.paste_stamp(np.random.default_rng(seed), background, stamp, composite)


def test_paste_is_the_plain_alpha_composite(stamp, background):
    image, mask, record = _paste(stamp, background, "paste")
    x, y, w, h = record["box"]
    # Rebuild it independently from the record: the cut-out resized as recorded, flipped, jittered, composited.
    cutout = Image.open(stamp.path).convert("RGBA")
    cutout = cutout.crop(cutout.getchannel("A").getbbox()).resize((w, h), Image.LANCZOS)
    if record["flip"]:
        cutout = cutout.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(cutout, np.float64) / 255
    alpha = arr[..., 3:]
    rgb = np.clip(arr[..., :3] * np.array(record["gain"]), 0, 1)
    expected = background.astype(np.float64).copy()
    expected[y : y + h, x : x + w] = alpha * rgb + (1 - alpha) * expected[y : y + h, x : x + w]
    np.testing.assert_allclose(image, expected, atol=2e-3)  # the record's gains are rounded to 3 decimals
    assert mask.sum() == (alpha[..., 0] > 0.5).sum() and mask[y : y + h, x : x + w].any()
    assert "feather" not in record


def test_natural_keeps_the_geometry_the_mask_and_the_far_background(stamp, background):
    pasted, mask, rec_paste = _paste(stamp, background, "paste")
    natural, mask_natural, rec_natural = _paste(stamp, background, "natural")
    np.testing.assert_array_equal(mask, mask_natural)  # the ground truth is the unfeathered alpha
    for key in ("box", "flip", "gain", "area"):
        assert rec_paste[key] == rec_natural[key]
    assert photo.FEATHER_SIGMA[0] <= rec_natural["feather"] <= photo.FEATHER_SIGMA[1]

    # Far from the stamp (beyond 4 sigma of the widest feather) the background is untouched.
    x, y, w, h = rec_paste["box"]
    far = np.ones((SIZE, SIZE), bool)
    margin = int(np.ceil(4 * photo.FEATHER_SIGMA[1]))
    far[max(0, y - margin) : y + h + margin, max(0, x - margin) : x + w + margin] = False
    np.testing.assert_array_equal(natural[far], background[far])


def test_the_feather_spreads_the_outline_and_nothing_else(stamp, background, monkeypatch):
    natural, mask, record = _paste(stamp, background, "natural")
    monkeypatch.setattr(photo, "feathered", lambda alpha, sigma: alpha)
    hard, _, _ = _paste(stamp, background, "natural")
    # Neighbours on either side of the outline differ less with the feather ...
    assert boundary_step(natural, mask) < 0.7 * boundary_step(hard, mask)
    # ... and the images differ only near the outline (a Gaussian's 4 sigma, plus the resized alpha's own ramp).
    from scipy.ndimage import distance_transform_edt

    distance = np.minimum(distance_transform_edt(mask), distance_transform_edt(~mask))
    changed = np.abs(natural - hard).max(-1) > 1e-4
    assert changed.any() and distance[changed].max() <= 4 * record["feather"] + 2


def boundary_step(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean colour difference (L1) between 4-neighbours on either side of the mask's outline."""
    down = np.abs(image[1:] - image[:-1]).sum(-1)[mask[1:] != mask[:-1]]
    right = np.abs(image[:, 1:] - image[:, :-1]).sum(-1)[mask[:, 1:] != mask[:, :-1]]
    return float(np.concatenate([down, right]).mean())


def test_natural_moves_the_colour_cast_not_the_brightness(stamp, background):
    pasted, mask, _ = _paste(stamp, background, "paste")
    natural, _, _ = _paste(stamp, background, "natural")
    core = mask & np.roll(mask, 4, 0) & np.roll(mask, -4, 0) & np.roll(mask, 4, 1) & np.roll(mask, -4, 1)
    before, after, scene = pasted[core].mean(0), natural[core].mean(0), background[~mask].mean(0)
    assert abs(after.mean() - before.mean()) < 0.03  # brightness kept (the gains are normalised)
    # The red stamp on a blue scene: its chromaticity moves towards the scene's, by about HARMONISE of the way in log.
    moved = log_chroma(after) - log_chroma(before)
    wanted = log_chroma(scene) - log_chroma(before)
    assert np.all(np.sign(moved) == np.sign(wanted))
    assert 0.2 < float(np.dot(moved, wanted) / np.dot(wanted, wanted)) < 0.8


def log_chroma(colour: np.ndarray) -> np.ndarray:
    return np.log(colour / colour.mean())


def test_sensor_noise_and_quality_are_drawn_within_their_ranges(background):
    for seed in range(5):
        noisy, quality, sigma = photo.sensor(np.random.default_rng(seed), background)
        assert photo.JPEG_QUALITY[0] <= quality <= photo.JPEG_QUALITY[1]
        assert photo.NOISE_SIGMA[0] <= sigma <= photo.NOISE_SIGMA[1]
        interior = (background > 0.15) & (background < 0.85)  # away from clipping, the added noise's spread is sigma
        assert np.std(noisy[interior] - background[interior]) == pytest.approx(sigma, rel=0.1)
