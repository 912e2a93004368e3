"""Start-up checks of device code against its reference: a kernel or captured graph that fails
to build, or disagrees on this device, is logged and left unused, never served."""

from __future__ import annotations

import logging
from collections.abc import Callable


def agrees(log: logging.Logger, what: str, fallback: str, error: Callable[[], float],
           tolerance: float) -> bool:
    """Whether error() (the largest gap from the reference) runs and is within tolerance;
    else logs why `what` is unused and that the worker goes on with `fallback`."""
    try:
        gap = error()
    except Exception as exc:  # no compiler for this GPU, out of memory, an uncapturable op, ...
        log.warning("%s unusable, %s: %s", what, fallback, exc)
        return False
    if not gap <= tolerance:  # NaN included
        log.warning("%s off by %.3g (> %g), %s", what, gap, tolerance, fallback)
        return False
    return True
