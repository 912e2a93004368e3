"""worker.kernels.cpu' build bookkeeping (the kernels themselves: tests/worker/test_lora.py,
test_paged_attention.py): a lock left by a killed build is removed, a live one is kept."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from worker.kernels import cpu as cpu_kernels


def test_a_stale_build_lock_is_removed_and_a_live_one_kept(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / cpu_kernels.NAME / "lock"
    lock.parent.mkdir()
    lock.touch()
    cpu_kernels._drop_stale_lock()
    assert lock.exists(), "a build may hold it right now"
    old = time.time() - cpu_kernels.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    cpu_kernels._drop_stale_lock()
    assert not lock.exists()
    cpu_kernels._drop_stale_lock()  # nothing there: nothing to do


def test_the_build_is_named_after_this_checkout() -> None:
    assert cpu_kernels.NAME.startswith("edgelora_cpu_kernels_")
    assert cpu_kernels.NAME.isidentifier(), "it names the Python module too"
