"""glibc malloc settings around loading a model, so that its temporaries leave no resident memory.

Loading reads every tensor into a temporary, converts or quantizes it and keeps the result. glibc
raises its mmap threshold to the size of each large block freed (up to 32 MiB), so after the
first few tensors both the temporaries and the weights kept come from the one heap, interleaved;
the freed temporaries then sit between live weights where the heap cannot shrink. Measured on
the 1B shape at 8 bits (a Q8_0 GGUF, 1180 MiB of weights): 1604 to 2063 MiB resident after
start-up depending on what else ran first (an import before the load was enough to move it by
460 MiB); with a fixed threshold during the load, 1604 every time.

So while loading, every block over 128 KiB is a mapping of its own, returned to the OS when
freed; afterwards the thresholds are fixed where glibc's own adjustment ends (32 MiB, trim at
64 MiB), so steps reuse their temporaries from the heap as before. Elsewhere (musl, macOS) a
no-op.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
LOADING_MMAP_THRESHOLD = 128 << 10  # glibc's starting value
SERVING_MMAP_THRESHOLD = 32 << 20   # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
SERVING_TRIM_THRESHOLD = 2 * SERVING_MMAP_THRESHOLD  # what the dynamic adjustment pairs with it


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def loading() -> Iterator[None]:
    """Run a model's load inside: its temporaries go back to the OS as they are freed."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, LOADING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, SERVING_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, SERVING_TRIM_THRESHOLD)
        libc.malloc_trim(0)
