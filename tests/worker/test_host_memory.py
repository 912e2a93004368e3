"""The load-time malloc policy: temporaries freed during a load leave no resident memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import resident_anon_mib
from worker import host_memory

pytestmark = pytest.mark.skipif(host_memory._glibc() is None or not Path("/proc/self").exists(),
                                reason="glibc's malloc on Linux")


def load_like(steps: int) -> list[torch.Tensor]:
    """What a checkpoint load does: a large temporary per tensor, a smaller result kept."""
    kept = []
    for i in range(steps):
        temporary = torch.full((4 << 20,), float(i))  # 16 MiB of float32, freed each step
        kept.append(temporary[: 1 << 20].to(torch.int8))  # 1 MiB kept
        del temporary
    return kept


def test_a_load_keeps_only_what_it_returns() -> None:
    before = resident_anon_mib()
    with host_memory.loading():
        kept = load_like(24)
    grown = resident_anon_mib() - before
    assert len(kept) == 24 and kept[-1][0].item() == 23
    assert grown < 24 + 6, grown  # 24 MiB kept (without loading(): ~51 MiB)


# Run in a fresh process: whether a block is mapped also depends on the free space the heap
# already holds, which earlier tests leave behind.
PROBE = """
import ctypes, json, sys, torch
from worker import host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]
libc = host_memory._glibc()
libc.mallinfo2.restype = MallInfo2
def mapped_by(allocate):
    before = libc.mallinfo2().hblks
    block = allocate()
    return libc.mallinfo2().hblks - before

out = {}
try:
    with host_memory.loading():
        out["loading"] = mapped_by(lambda: torch.empty(1 << 20))  # 4 MiB
        if sys.argv[1] == "fail":
            raise RuntimeError("the checkpoint was bad")
except RuntimeError:
    pass
out["serving"] = mapped_by(lambda: torch.empty(1 << 20))
print(json.dumps(out))
"""


@pytest.mark.parametrize("load", ["ok", "fail"])
def test_large_blocks_are_mapped_while_loading_and_from_the_heap_after(load: str) -> None:
    """A step's temporary after the load (even a failed one) comes from the heap and is
    reused, not mapped and unmapped, page-faulting, on every step."""
    if not hasattr(host_memory._glibc(), "mallinfo2"):
        pytest.skip("glibc older than 2.33")
    probe = subprocess.run([sys.executable, "-c", PROBE, load], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[2], check=True)
    assert json.loads(probe.stdout) == {"loading": 1, "serving": 0}
