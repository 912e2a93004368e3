"""The adapter set a side-by-side benchmark gives both servers: PEFT directories with stable names.

Random r=8 adapters (all 7 projection modules, like bench/multi_lora.py makes them) are written
once per (count, rank, seed) under ~/.cache/edgelora/bench/adapters/ and reused, so their GGUF
conversions are cache hits on the next run; the demo adapters (adapters/demo/*) can go first.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO / "adapters" / "demo"


@dataclass(frozen=True)
class BenchAdapter:
    name: str    # the id ours registers it under; llama.cpp knows it by its position
    path: Path   # PEFT directory
    rank: int


def bench_cache() -> Path:
    return Path.home() / ".cache" / "edgelora" / "bench"


def demo_adapters() -> list[BenchAdapter]:
    import json

    found = []
    for path in sorted(DEMO_DIR.iterdir()) if DEMO_DIR.is_dir() else []:
        config = path / "adapter_config.json"
        if config.is_file():
            found.append(BenchAdapter(path.name, path, int(json.loads(config.read_text())["r"])))
    return found


def random_adapters(base_dir: Path, count: int, rank: int = 8, seed: int = 0,
                    root: Path | None = None) -> list[BenchAdapter]:
    """count seeded random PEFT adapters for the checkpoint in base_dir (written once, in a
    folder named after the checkpoint: another model's shapes get their own)."""
    from bench.random_weights import write_random_adapter

    root = Path(root) if root else bench_cache() / "adapters" / base_dir.name / \
        f"r{rank}-seed{seed}"
    found = []
    for i in range(count):
        name = f"adapter-{i:02d}"
        target = root / name
        if not (target / "adapter_config.json").is_file():
            partial = root / f"{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            # same scale as bench/multi_lora.py: visible but not degenerate outputs
            write_random_adapter(partial, base_dir, rank=rank, alpha=2.0 * rank,
                                 seed=seed * 1000 + i, std=0.05)
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
        found.append(BenchAdapter(name, target, rank))
    return found


def adapter_set(base_dir: Path, count: int, include_demo: bool = False, rank: int = 8,
                seed: int = 0) -> list[BenchAdapter]:
    """count adapters: the demo ones first when include_demo, random r=rank ones for the rest."""
    chosen = demo_adapters()[:count] if include_demo else []
    return chosen + random_adapters(base_dir, count - len(chosen), rank, seed)
