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


def test_weight_prefetch_is_told_or_chosen_by_cpu_and_changes_no_result(monkeypatch) -> None:
    import torch

    from tests.conftest import built_cpu_kernels
    from worker.kernels.quantized_weights import Int4Linear, Int8Linear

    for told in ("0", "1"):
        monkeypatch.setenv("EDGELORA_WEIGHT_PREFETCH", told)
        assert cpu_kernels.prefetch_weights() is (told == "1")
    monkeypatch.delenv("EDGELORA_WEIGHT_PREFETCH")
    intel = "GenuineIntel" in Path("/proc/cpuinfo").read_text()
    assert cpu_kernels.prefetch_weights() is not intel
    built = built_cpu_kernels()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 256, generator=g).to(torch.bfloat16)
    for layer in (Int4Linear(torch.randn(64, 256, generator=g)),
                  Int8Linear(torch.randn(64, 256, generator=g))):
        results = []
        for on in (True, False):
            built.set_weight_prefetch(on)
            results.append(layer.kernel_step(built, x))
        built.set_weight_prefetch(cpu_kernels.prefetch_weights())
        assert torch.equal(*results)
