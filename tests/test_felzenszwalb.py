"""The multi-scale Felzenszwalb segmentation against scikit-image's `felzenszwalb`, the independent reference:
the same labels, pixel for pixel, on photographs scikit-image ships (RGB and grey, odd sizes, the scales and
minimum sizes the refinement uses and extreme ones) and on images full of tied edges.

Ours sorts the edges stably (tied edges keep their position, on every CPU); scikit-image sorts them with NumPy's
default sort, whose order of tied edges depends on the CPU's sort kernel. So scikit-image runs here with its
sort made stable (`stable_scikit_image`): the same algorithm, tied edges in the same order."""

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import skimage.segmentation._felzenszwalb_cy as scikit_image_felzenszwalb
from PIL import Image
from skimage import data
from skimage.segmentation import felzenszwalb

from axx_backend.engine.felzenszwalb import edges, felzenszwalb_scales, smoothed, sort_stably
from axx_backend.engine.refine import REFERENCE_SIDE, SuperpixelSpec, segment_image


class _NumPyWithStableSort(types.ModuleType):
    """NumPy as scikit-image's felzenszwalb module calls it, with `argsort` stable."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def argsort(a, *args, **kwargs):
        return np.argsort(a, kind="stable")


@pytest.fixture(autouse=True)
def stable_scikit_image(monkeypatch):
    monkeypatch.setattr(scikit_image_felzenszwalb, "np", _NumPyWithStableSort("numpy"))


def test_the_reference_is_scikit_image_with_a_stable_sort(monkeypatch):
    """The patch reaches the sort scikit-image calls (else the tie test below would compare nothing new), and on
    an image without tied edges scikit-image cuts the same with either sort."""
    sorted_lengths = []
    counting = _NumPyWithStableSort("numpy")
    counting.argsort = lambda a, *args, **kwargs: sorted_lengths.append(len(a)) or np.argsort(a, kind="stable")
    image = np.random.default_rng(2).random((20, 24, 3))  # float pixels: no two edges cost the same
    monkeypatch.setattr(scikit_image_felzenszwalb, "np", counting)
    stable = felzenszwalb(image, scale=50.0, sigma=0.0, min_size=3)
    assert sorted_lengths == [20 * 23 + 19 * 24 + 2 * 19 * 23]  # every edge, sorted once
    monkeypatch.setattr(scikit_image_felzenszwalb, "np", np)
    assert np.array_equal(felzenszwalb(image, scale=50.0, sigma=0.0, min_size=3), stable)
    assert np.array_equal(felzenszwalb_scales(image, [50.0], 0.0, 3)[0], stable)


@pytest.mark.parametrize(
    "costs",
    [
        np.random.default_rng(0).random(50_000),
        np.random.default_rng(1).integers(0, 40, 50_000) / 7.0,  # mostly ties, exact zeros among them
        np.concatenate(
            [
                np.random.default_rng(2).random(300) * 1e-300,
                np.random.default_rng(3).random(300) * 1e300,
                np.zeros(7),
                [np.finfo(float).tiny, 5e-324, np.finfo(float).max, -0.0, 0.0],
            ]
        ),
        np.array([2.5]),
        np.array([], dtype=np.float64),
    ],
    ids=["distinct", "ties", "extremes", "one", "none"],
)
def test_sort_stably_is_numpys_stable_argsort(costs):
    order, sorted_costs = sort_stably(costs)
    assert np.array_equal(order, np.argsort(costs, kind="stable"))
    assert np.array_equal(sorted_costs, costs[order])


def test_sort_stably_refuses_what_it_cannot_sort():
    for costs in (np.array([1.0, -0.5]), np.array([1.0, np.nan]), np.array([np.inf])):
        with pytest.raises(ValueError, match="non-negative finite costs"):
            sort_stably(costs)


def _photo(name: str, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(getattr(data, name)()).resize(size, Image.BILINEAR))


@pytest.mark.parametrize(
    ("name", "size", "sigma", "min_size"),
    [
        ("astronaut", (320, 320), 0.8, 30),
        ("coffee", (241, 173), 0.8, 30),  # not square, odd sides
        ("chelsea", (160, 96), 0.5, 4),
        ("camera", (200, 150), 1.2, 50),  # grey [H, W]
    ],
)
def test_every_scale_equals_scikit_image(name, size, sigma, min_size):
    image = _photo(name, size)
    scales = (1.0, 200.0, 400.0, 800.0, 5000.0)
    ours = felzenszwalb_scales(image, scales, sigma, min_size)
    for scale, labels in zip(scales, ours, strict=True):
        expected = felzenszwalb(
            image, scale=scale, sigma=sigma, min_size=min_size, channel_axis=-1 if image.ndim == 3 else None
        )
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(labels, expected, err_msg=f"{name} scale {scale}")
    assert ours[0].max() > ours[-1].max()  # (a real test: the scales do cut differently)


def test_ties_fall_as_in_scikit_image():
    """Flat patches and a checkerboard: most edges cost exactly the same, so the order of tied edges decides."""
    rng = np.random.default_rng(0)
    image = np.repeat(np.repeat(rng.integers(0, 4, size=(12, 12, 3)) * 60, 5, 0), 5, 1).astype(np.uint8)
    image[::2, ::2] = 255
    for scale in (10.0, 300.0):
        expected = felzenszwalb(image, scale=scale, sigma=0.0, min_size=3)
        np.testing.assert_array_equal(felzenszwalb_scales(image, [scale], 0.0, 3)[0], expected)


def test_the_refinement_cuts_what_scikit_image_cuts_at_its_scales():
    image = _photo("astronaut", (REFERENCE_SIDE, REFERENCE_SIDE))
    spec = SuperpixelSpec()
    for scale, labels in zip(spec.scales, segment_image(image, spec), strict=True):
        np.testing.assert_array_equal(
            labels, felzenszwalb(image, scale=scale, sigma=spec.sigma, min_size=spec.min_size)
        )


@pytest.mark.parametrize("shape", [(37, 23, 3), (2, 2, 3), (19, 31, 1)])
def test_edges_are_numpys_bit_for_bit(shape):
    """The compiled edge costs against the NumPy formulation scikit-image uses: equal to the last bit, or tied
    edges would sort differently; each edge's pixel pair is the two neighbours its cost measures."""
    image = smoothed(np.random.default_rng(1).integers(0, 256, size=shape).astype(np.uint8), 0.8)
    height, width = shape[:2]

    def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sqrt(np.sum((a - b) * (a - b), axis=-1))

    blocks = [
        distance(image[:, 1:], image[:, : width - 1]),  # right
        distance(image[1:], image[: height - 1]),  # down
        distance(image[1:, 1:], image[: height - 1, : width - 1]),  # down-right
        distance(image[1:, : width - 1], image[: height - 1, 1:]),  # up-right
    ]
    expected = np.hstack([block.ravel() for block in blocks])
    ours, pairs = edges(image)
    assert ours.dtype == np.float64
    assert np.array_equal(ours, expected)
    pixels = image.reshape(height * width, -1)
    assert pairs.shape == (len(expected), 2) and np.all(pairs >= 0) and np.all(pairs < height * width)
    rows, cols = np.divmod(pairs, width)
    assert np.all(np.abs(rows[:, 0] - rows[:, 1]) <= 1) and np.all(np.abs(cols[:, 0] - cols[:, 1]) <= 1)
    assert np.array_equal(distance(pixels[pairs[:, 0]], pixels[pairs[:, 1]]), expected)


def test_an_image_too_small_to_have_edges_is_refused():
    with pytest.raises(ValueError, match="at least 2 x 2"):
        felzenszwalb_scales(np.zeros((1, 9, 3), np.uint8), [100.0])


def test_regions_work_where_numba_has_nowhere_to_cache(tmp_path):
    """A read-only install without a home: numba cannot cache, so the merge compiles in the process instead of
    failing on import (which would fail every refined prediction)."""
    script = (
        "import numba.core.caching as caching\n"
        "caching.CacheImpl._locator_classes = []  # no writable cache location anywhere\n"
        "import numpy as np\n"
        "from skimage.segmentation import felzenszwalb\n"
        "from axx_backend.engine.felzenszwalb import felzenszwalb_scales\n"
        "image = np.random.default_rng(0).random((24, 24, 3))  # no tied edges: scikit-image's sort as it is\n"
        "ours = felzenszwalb_scales(image, [50.0], 0.5, 5)[0]\n"
        "assert np.array_equal(ours, felzenszwalb(image, scale=50.0, sigma=0.5, min_size=5))\n"
        "print('regions', ours.max() + 1)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("regions ")
