"""Felzenszwalb and Huttenlocher's graph segmentation at several scales from one sorted edge list.

scikit-image's `felzenszwalb` smooths the image, weighs and sorts its 8-connected edges again for every
scale, and its merge finds roots without compressing paths; only the merge depends on the scale. Here the
smoothing, weighing and sorting run once (scikit-image's smoothing; the edge weights compiled, equal to NumPy's
bit for bit), and the merge runs per scale in compiled code (numba) with path halving. Three scales of a
320 x 320 photograph took 184 ms one after another and ~120 ms in three threads with scikit-image, and take
33 ms here (README, "Speed").

The edges are sorted stably (a compiled radix sort: tied edges keep their position). scikit-image calls NumPy's
default sort, which leaves tied edges in whatever order the CPU's sort kernel makes: an AVX-512 CPU orders them
otherwise than one without, so the same image could be cut differently from machine to machine (and on AMD EPYC
the AVX-512 kernel took 26-48 ms for the 407,682 edges of a 320 x 320 image, where NumPy's scalar sort took 10 ms).
The result is scikit-image's, label for label, when its sort is made stable too (tests/test_felzenszwalb.py
compares them on photographs and on images full of ties); on an image without tied edges it is scikit-image's
as it stands.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from numba import njit


def compiled(function: Callable[..., Any]) -> Callable[..., Any]:
    """numba's compiled `function`, releasing the GIL, cached on disk where numba finds a writable place (next to
    this file, NUMBA_CACHE_DIR, the user's cache); without one (a read-only install, no home), compiled anew
    in each process rather than failing on import."""
    try:
        return njit(nogil=True, cache=True)(function)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(nogil=True)(function)


def smoothed(image: np.ndarray, sigma: float) -> np.ndarray:
    """The image as scikit-image's felzenszwalb smooths it: float64 in 0..1, Gaussian per channel."""
    from skimage.filters import gaussian
    from skimage.util import img_as_float64

    image = np.atleast_3d(image)
    return gaussian(img_as_float64(image), sigma=[sigma, sigma, 0], mode="reflect", channel_axis=-1)


def edges(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8-connected edges of a smoothed image [H, W, C] in scikit-image's order (right, down, down-right,
    up-right neighbours, each block row-major): their colour distances [m] (float64, NumPy's values bit for bit:
    the squares summed channel by channel, as NumPy sums them) and their pixel pairs [m, 2] (flat indices)."""
    return _edges(np.ascontiguousarray(image, dtype=np.float64))


@compiled
def _edges(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    height, width, channels = image.shape
    # per block: the other pixel's row and column step, and the columns [start, width - stop) of the first pixel
    blocks = ((0, 1, 0, 1), (1, 0, 0, 0), (1, 1, 0, 1), (1, -1, 1, 0))
    m = height * (width - 1) + (height - 1) * width + 2 * (height - 1) * (width - 1)
    costs, pairs = np.empty(m), np.empty((m, 2), dtype=np.int64)
    k = 0
    for dr, dc, start, stop in blocks:
        for r in range(height - dr):
            for c in range(start, width - stop):
                total = 0.0
                for channel in range(channels):
                    d = image[r + dr, c + dc, channel] - image[r, c, channel]
                    total += d * d
                costs[k] = np.sqrt(total)
                pairs[k, 0], pairs[k, 1] = (r + dr) * width + c + dc, r * width + c
                k += 1
    return costs, pairs


def sort_stably(costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.argsort(costs, kind="stable")` of non-negative finite float64 costs (tied costs keep their order) and
    the costs in that order, by a least-significant-digit radix sort of their bits (for such numbers the bits
    order like the values): O(n), the same order on every machine. The order is int32 where it fits (it halves
    what each pass moves)."""
    costs = np.ascontiguousarray(costs, dtype=np.float64)
    if costs.size and not (costs.min() >= 0.0 and np.isfinite(costs.max())):
        raise ValueError("stable sorting takes non-negative finite costs only")
    start = np.arange(costs.size, dtype=np.int32 if costs.size < 2**31 else np.int64)
    order, keys = _radix_sort((costs + 0.0).view(np.uint64), start)  # (+ 0.0: -0.0's sign bit would sort it last)
    return order, keys.view(np.float64)


RADIX_BITS = 8  # 256 buckets: every pass's counts fit in the L1 cache (8 passes, 11-13 ms for 407,682 edges)
RADIX_PASSES = 64 // RADIX_BITS


@compiled
def _radix_sort(keys: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """`order` permuted as a stable sort permutes `keys`, and the sorted keys (both arrays are reused)."""
    n = keys.size
    buckets = 1 << RADIX_BITS
    mask = np.uint64(buckets - 1)
    counts = np.zeros((RADIX_PASSES, buckets), dtype=np.int64)
    for i in range(n):  # every pass's digit counts in one read
        for p in range(RADIX_PASSES):
            counts[p, (keys[i] >> np.uint64(p * RADIX_BITS)) & mask] += 1
    sorted_keys, spare_keys = keys, np.empty_like(keys)
    current, spare = order, np.empty_like(order)
    for p in range(RADIX_PASSES):
        if counts[p].max() == n:  # every key has this digit: the pass would change nothing
            continue
        start = 0
        for d in range(buckets):
            start, counts[p, d] = start + counts[p, d], start
        shift = np.uint64(p * RADIX_BITS)
        for i in range(n):  # in order, so equal digits keep the order of the pass before: stable
            d = (sorted_keys[i] >> shift) & mask
            spare[counts[p, d]], spare_keys[counts[p, d]] = current[i], sorted_keys[i]
            counts[p, d] += 1
        current, spare = spare, current
        sorted_keys, spare_keys = spare_keys, sorted_keys
    return current, sorted_keys


@compiled
def _root(parent: np.ndarray, node: int) -> int:  # pragma: no cover - compiled
    while parent[node] != node:
        parent[node] = parent[parent[node]]  # path halving: the partition is unchanged, the trees stay shallow
        node = parent[node]
    return node


@compiled
def _merge(pairs: np.ndarray, costs: np.ndarray, n: int, scale: float, min_size: int) -> np.ndarray:  # pragma: no cover
    """Labels 0..k-1 of the n pixels, numbered by each region's first pixel, as scikit-image numbers them.

    A region's root is its smallest pixel (scikit-image's `join_trees`); its inner cost is compared in
    float32, as scikit-image declares it."""
    parent = np.arange(n)
    size = np.ones(n, dtype=np.int64)
    inner = np.zeros(n)
    for e in range(costs.size):
        a, b = _root(parent, pairs[e, 0]), _root(parent, pairs[e, 1])
        if a == b:
            continue
        limit = min(np.float32(inner[a] + scale / size[a]), np.float32(inner[b] + scale / size[b]))
        if costs[e] < limit:
            low, high = min(a, b), max(a, b)
            parent[high] = low
            size[low] = size[a] + size[b]
            inner[low] = costs[e]
    for e in range(costs.size):  # regions under min_size join their neighbour across the cheapest edge left
        a, b = _root(parent, pairs[e, 0]), _root(parent, pairs[e, 1])
        if a != b and (size[a] < min_size or size[b] < min_size):
            low, high = min(a, b), max(a, b)
            parent[high] = low
            size[low] = size[a] + size[b]
    labels = np.empty(n, dtype=np.int64)
    count = 0
    for i in range(n):  # a root precedes every pixel of its region, so its label is set first
        root = _root(parent, i)
        if root == i:
            labels[i] = count
            count += 1
        else:
            labels[i] = labels[root]
    return labels


def felzenszwalb_scales(
    image: np.ndarray, scales: Sequence[float], sigma: float = 0.8, min_size: int = 20
) -> list[np.ndarray]:
    """`skimage.segmentation.felzenszwalb(image, scale, sigma, min_size)` for every scale in `scales`: region
    labels [H, W] (int64, 0..n-1) of an image [H, W] or [H, W, C]."""
    if image.ndim not in (2, 3) or min(image.shape[:2]) < 2:
        raise ValueError(f"expected an image [H, W] or [H, W, C] of at least 2 x 2 pixels, got {image.shape}")
    height, width = image.shape[:2]
    costs, pairs = edges(smoothed(image, sigma))
    order, costs = sort_stably(costs)
    pairs = np.take(pairs, order, axis=0)  # (take: ~9x faster than pairs[order] here)

    def cut(scale: float) -> np.ndarray:
        return _merge(pairs, costs, height * width, float(scale) / 255.0, int(min_size)).reshape(height, width)

    # The merges release the GIL: no more threads than cores (4 threads on 2 cores took 17 ms for four merges,
    # 2 threads 15 ms). A pool per call, so that a forked worker never inherits a dead one.
    workers = min(len(scales), os.cpu_count() or 1)
    if workers < 2:
        return [cut(scale) for scale in scales]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(cut, scales))
