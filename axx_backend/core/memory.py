"""Giving freed memory back to the operating system after a request.

glibc keeps the memory a thread freed in that thread's arena; after a /predict that decoded large images in
the fetch threads, a long-lived server would otherwise hold hundreds of MB it no longer uses.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None


def return_freed_memory() -> None:
    """Release the free memory at the top of the heaps and in the arenas (glibc's `malloc_trim(0)`)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
