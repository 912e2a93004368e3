"""Tests for worker.adapter_memory: registry validation, background prefetch, refcounted device
slots with LRU eviction of idle slots, the host LRU cache, counters and tiers."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.adapter_format import WEIGHTS_FILE, AdapterSpec, read_adapter_spec
from common.errors import Aborted, EdgeLoraError, InvalidArgument, NotFound, Unavailable
from tests.conftest import write_random_adapter
from worker import adapter_memory
from worker.adapter_memory import AdapterMemory
from worker.loader import read_model_config
from worker.lora import PROJECTIONS, LoraSlots, module_shapes

MAX_RANK = 16
DEADLINE_S = 20.0

MakeAdapter = Callable[..., AdapterSpec]
MakeMemory = Callable[..., AdapterMemory]


@pytest.fixture
def make_adapter(tmp_path: Path, tiny_model_dir: Path) -> MakeAdapter:
    """Writes a random PEFT adapter for the tiny model and reads its spec."""
    seeds = iter(range(1000))

    def make(adapter_id: str, rank: int = 4, alpha: float = 8.0,
             modules: tuple[str, ...] = ("q_proj", "v_proj", "down_proj")) -> AdapterSpec:
        path = write_random_adapter(tmp_path / adapter_id, tiny_model_dir, rank, alpha, modules,
                                    seed=next(seeds))
        return read_adapter_spec(adapter_id, path)

    return make


@pytest.fixture
def make_memory(tiny_model_dir: Path) -> Iterator[MakeMemory]:
    cfg = read_model_config(tiny_model_dir)
    made: list[AdapterMemory] = []

    def make(num_slots: int = 2, host_capacity: int = 4, dtype: torch.dtype = torch.float32,
             **kwargs: int) -> AdapterMemory:
        slots = LoraSlots(cfg, num_slots, MAX_RANK, torch.device("cpu"), dtype)
        memory = AdapterMemory(slots, host_capacity, module_shapes(cfg), cfg.num_layers, **kwargs)
        made.append(memory)
        return memory

    yield make
    for memory in made:
        memory.close()


def wait_until(condition: Callable[[], bool], what: str, memory: AdapterMemory) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: tiers={describe(memory)}")
        time.sleep(0.002)


def describe(memory: AdapterMemory) -> dict[str, object]:
    return {"tiers": {s.adapter_id: t for s, t in memory.snapshot()},
            "errors": dict(memory._errors), "refcount": memory.table.refcount,
            "slot_to_adapter": memory.table.adapter, "stats": memory.stats}


def acquire(memory: AdapterMemory, adapter_id: str) -> int:
    """The scheduler's way: poll can_acquire (loads in the background), then acquire."""
    wait_until(lambda: memory.can_acquire(adapter_id), f"can_acquire({adapter_id!r})", memory)
    return memory.acquire(adapter_id)


def wait_for_error(memory: AdapterMemory, adapter_id: str) -> str:
    memory.prefetch(adapter_id)

    def failed() -> bool:
        assert not memory.can_acquire(adapter_id), f"{adapter_id} loaded: {describe(memory)}"
        return memory.error(adapter_id) is not None

    wait_until(failed, f"a load error of {adapter_id!r}", memory)
    error = memory.error(adapter_id)
    assert isinstance(error, InvalidArgument), error
    return str(error)


def assert_counters(stats, **expected: int) -> None:
    """assert_counters(memory.stats.device, hits=1, misses=2): names every mismatch."""
    actual = {name: getattr(stats, name) for name in expected}
    assert actual == expected, f"counters {actual} != expected {expected} ({stats})"


def assert_tiers(memory: AdapterMemory, **expected: str) -> None:
    actual = {adapter_id: memory.tier(adapter_id) for adapter_id in expected}
    assert actual == expected, f"tiers {actual} != expected {expected}: {describe(memory)}"


def assert_slot_holds(memory: AdapterMemory, slot: int, spec: AdapterSpec) -> None:
    """The slot's tensors are the file's A and B * lora_alpha / r, zero elsewhere."""
    raw = load_file(str(Path(spec.path) / WEIGHTS_FILE))
    scaling = spec.lora_alpha / spec.rank
    r = spec.rank
    assert memory.slots.ranks[slot] == r, (memory.slots.ranks, slot, r)
    for layer in range(len(memory.slots.layers)):
        for proj, subs in PROJECTIONS.items():
            for sub in subs:
                a, b = memory.slots.read(slot, layer, sub)
                kind = "mlp" if proj in ("gate_up_proj", "down_proj") else "self_attn"
                key = f"base_model.model.model.layers.{layer}.{kind}.{sub}"
                where = f"slot {slot} layer {layer} {sub} of {spec.adapter_id}"
                if sub in spec.target_modules:
                    a_ref = raw[f"{key}.lora_A.weight"]
                    b_ref = raw[f"{key}.lora_B.weight"] * scaling
                    assert torch.equal(a[:r], a_ref), f"{where}: A differs"
                    torch.testing.assert_close(b[:, :r], b_ref, rtol=1e-6, atol=0,
                                               msg=lambda m, w=where: f"{w}: B: {m}")
                else:
                    assert not a[:r].any() and not b.any(), f"{where}: not 0"
                assert not a[r:].any(), f"{where}: A padding not zero"
                assert not b[:, r:].any(), f"{where}: B padding not zero"


def corrupt_data(spec: AdapterSpec) -> None:
    """Keeps a valid header (register passes) but puts a NaN into the data (load fails)."""
    file = Path(spec.path) / WEIGHTS_FILE
    tensors = load_file(str(file))
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, str(file))


# --- register ------------------------------------------------------------------------------


def test_register_rejects_rank_above_max(make_memory: MakeMemory,
                                         make_adapter: MakeAdapter) -> None:
    memory = make_memory()
    with pytest.raises(InvalidArgument, match="--max-lora-rank") as info:
        memory.register(make_adapter("big", rank=MAX_RANK * 2))
    assert f"rank {MAX_RANK * 2}" in str(info.value) and "'big'" in str(info.value), info.value
    assert isinstance(memory.error("big"), NotFound)


def test_register_accepts_max_rank(make_memory: MakeMemory, make_adapter: MakeAdapter) -> None:
    memory = make_memory()
    spec = make_adapter("max", rank=MAX_RANK)
    memory.register(spec)
    assert_slot_holds(memory, acquire(memory, "max"), spec)


def test_register_rejects_adapter_for_another_base(tmp_path: Path, tiny_model_dir: Path,
                                                   make_memory: MakeMemory) -> None:
    other = tmp_path / "other-base"  # write_random_adapter only reads config.json
    other.mkdir()
    hf = json.loads((tiny_model_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**hf, "hidden_size": 32, "head_dim": 8}))
    path = write_random_adapter(tmp_path / "wrong", other, rank=4, modules=("o_proj",))
    memory = make_memory()
    with pytest.raises(InvalidArgument, match=r"layers\.0\.self_attn\.o_proj\.lora_A\.weight "
                                              r"has shape \[4, 32\], this base model needs "
                                              r"\[4, 64\]"):
        memory.register(read_adapter_spec("wrong", path))
    assert memory.registry == {}


def test_register_rejects_missing_weights_file(make_memory: MakeMemory,
                                               make_adapter: MakeAdapter) -> None:
    spec = make_adapter("gone")
    (Path(spec.path) / WEIGHTS_FILE).unlink()
    memory = make_memory()
    with pytest.raises(InvalidArgument, match=WEIGHTS_FILE):
        memory.register(spec)
    assert "gone" not in memory.registry


def test_corrupt_header_fails_at_register_only_for_that_adapter(
        make_memory: MakeMemory, make_adapter: MakeAdapter) -> None:
    memory = make_memory()
    good, bad = make_adapter("good"), make_adapter("bad")
    memory.register(good)
    file = Path(bad.path) / WEIGHTS_FILE
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(InvalidArgument, match="not a readable safetensors file"):
        memory.register(bad)
    assert_slot_holds(memory, acquire(memory, "good"), good)
    assert isinstance(memory.error("bad"), NotFound)


@pytest.mark.parametrize("damage", ["nan", "truncated"])
def test_corrupt_data_fails_at_load_only_for_that_adapter(
        make_memory: MakeMemory, make_adapter: MakeAdapter, damage: str) -> None:
    memory = make_memory()
    good, bad = make_adapter("good"), make_adapter("bad")
    memory.register(good)
    memory.register(bad)
    file = Path(bad.path) / WEIGHTS_FILE
    if damage == "nan":
        corrupt_data(bad)
    else:  # changed on disk after register
        file.write_bytes(file.read_bytes()[:-8])
    message = wait_for_error(memory, "bad")
    assert "'bad'" in message, message
    assert not memory.can_acquire("bad")
    assert_tiers(memory, bad="disk")
    assert memory.error("good") is None
    assert_slot_holds(memory, acquire(memory, "good"), good)


def test_reregister_after_failed_load_clears_the_error(make_memory: MakeMemory,
                                                       make_adapter: MakeAdapter,
                                                       tiny_model_dir: Path) -> None:
    memory = make_memory()
    spec = make_adapter("flaky")
    memory.register(spec)
    corrupt_data(spec)
    wait_for_error(memory, "flaky")
    memory.prefetch("flaky")  # a failed adapter is not retried behind the caller's back
    assert memory.error("flaky") is not None
    write_random_adapter(Path(spec.path), tiny_model_dir, 4, 8.0, spec.target_modules, seed=5)
    memory.register(spec)
    assert memory.error("flaky") is None
    assert_slot_holds(memory, acquire(memory, "flaky"), spec)


# --- prefetch and acquire ------------------------------------------------------------------


def test_prefetch_loads_in_the_background(make_memory: MakeMemory, make_adapter: MakeAdapter,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    memory = make_memory()
    memory.register(make_adapter("a"))
    gate, threads = threading.Event(), []
    real = adapter_memory.read_adapter_weights

    def slow_read(*args, **kwargs):
        threads.append(threading.current_thread())
        assert gate.wait(DEADLINE_S), "the test never opened the gate"
        return real(*args, **kwargs)

    monkeypatch.setattr(adapter_memory, "read_adapter_weights", slow_read)
    memory.prefetch("a")  # returns at once although the read is blocked
    memory.prefetch("a")  # already under way: no second load
    assert not memory.can_acquire("a")
    assert_tiers(memory, a="disk")
    gate.set()
    wait_until(lambda: memory.can_acquire("a"), "the background load", memory)
    assert_tiers(memory, a="host")
    assert len(threads) == 1 and threads[0] is not threading.current_thread(), threads
    assert_counters(memory.stats.host, loads=1, hits=0, misses=0)
    assert memory.stats.host.mean_load_ms > 0


def test_prefetch_of_unknown_or_cached_adapter_does_nothing(make_memory: MakeMemory,
                                                            make_adapter: MakeAdapter) -> None:
    memory = make_memory()
    memory.prefetch("nobody")
    memory.register(make_adapter("a"))
    acquire(memory, "a")
    memory.prefetch("a")
    assert memory._loading == {}
    assert_counters(memory.stats.host, loads=1)


def test_acquire_writes_the_weights_into_a_slot(make_memory: MakeMemory,
                                                make_adapter: MakeAdapter) -> None:
    memory = make_memory(num_slots=3)
    specs = [make_adapter("r1", rank=1, modules=("o_proj",)),
             make_adapter("r8", rank=8, alpha=32.0, modules=("q_proj", "k_proj", "up_proj")),
             make_adapter("r16", rank=16, alpha=4.0, modules=("gate_proj", "down_proj"))]
    for spec in specs:
        memory.register(spec)
    taken = [acquire(memory, spec.adapter_id) for spec in specs]
    assert sorted(taken) == [1, 2, 3], taken
    for slot, spec in zip(taken, specs, strict=True):
        assert_slot_holds(memory, slot, spec)
    assert_tiers(memory, r1="device", r8="device", r16="device")


def test_register_loaded_serves_weights_without_a_file(make_memory: MakeMemory,
                                                      make_adapter: MakeAdapter) -> None:
    memory = make_memory()
    spec = make_adapter("mem", rank=4)
    weights = adapter_memory.read_adapter_weights(spec, memory.shapes, memory.num_layers)
    (Path(spec.path) / WEIGHTS_FILE).unlink()  # nothing on disk to fall back on
    memory.register_loaded(spec, weights)
    assert_tiers(memory, mem="host")
    slot = memory.acquire("mem")  # no load, no wait: already in the host tier
    for (layer, module), (a, b) in weights.items():
        got_a, got_b = memory.slots.read(slot, layer, module)
        assert torch.equal(got_a[:4], a) and torch.equal(got_b[:, :4], b), (layer, module)
    assert memory.stats.host.loads == 0 and memory.stats.device.loads == 1
    with pytest.raises(InvalidArgument, match="--max-lora-rank"):
        big = make_adapter("big", rank=MAX_RANK * 2)
        memory.register_loaded(big, {})


def test_acquire_before_can_acquire_raises(make_memory: MakeMemory,
                                           make_adapter: MakeAdapter) -> None:
    """Without a host copy, acquire cannot tell a caller that skipped can_acquire from one whose
    adapter was replaced meanwhile: either way this request fails, never the engine step."""
    memory = make_memory()
    memory.register(make_adapter("a"))
    with pytest.raises(Unavailable, match="'a' was replaced or left host memory"):
        memory.acquire("a")
    assert_counters(memory.stats.device, misses=0, loads=0)
    acquire(memory, "a")  # the failed acquire started the load


def test_acquire_with_every_slot_pinned_is_a_programming_error(
        make_memory: MakeMemory, make_adapter: MakeAdapter) -> None:
    memory = make_memory(num_slots=1)
    for name in "ab":
        memory.register(make_adapter(name))
    memory.release(acquire(memory, "b"))
    acquire(memory, "a")  # evicts b to the host tier and pins the only slot
    assert_tiers(memory, a="device", b="host")
    with pytest.raises(RuntimeError, match=r"before can_acquire.*no idle slot"):
        memory.acquire("b")


def test_same_adapter_twice_shares_the_slot(make_memory: MakeMemory,
                                            make_adapter: MakeAdapter) -> None:
    memory = make_memory()
    memory.register(make_adapter("a"))
    first = acquire(memory, "a")
    second = acquire(memory, "a")
    assert first == second and memory.table.refcount[first] == 2, describe(memory)
    assert_counters(memory.stats.device, hits=1, misses=1, loads=1)
    assert memory.summary()["num_device_slots_in_use"] == 1
    memory.release(first)
    assert memory.table.refcount[first] == 1 and first not in memory.table.idle()
    memory.release(first)
    assert memory.table.refcount[first] == 0 and first in memory.table.idle()
    with pytest.raises(AssertionError, match="released more often"):
        memory.release(first)


def test_referenced_slots_are_never_evicted(make_memory: MakeMemory,
                                            make_adapter: MakeAdapter) -> None:
    memory = make_memory(num_slots=2)
    specs = {name: make_adapter(name) for name in "abc"}
    for spec in specs.values():
        memory.register(spec)
    wait_until(lambda: memory.can_acquire("c"), "c loaded", memory)  # in host memory
    slot_a, slot_b = acquire(memory, "a"), acquire(memory, "b")
    for _ in range(3):
        assert not memory.can_acquire("c"), describe(memory)
    assert memory.has_no_idle_slot()
    assert_tiers(memory, a="device", b="device", c="host")
    memory.release(slot_a)
    assert memory.can_acquire("c")
    slot_c = memory.acquire("c")
    assert slot_c == slot_a, (slot_a, slot_b, slot_c)
    assert_counters(memory.stats.device, evictions=1, misses=3, hits=0, loads=3)
    assert_tiers(memory, a="host", b="device", c="device")
    assert_slot_holds(memory, slot_b, specs["b"])
    assert_slot_holds(memory, slot_c, specs["c"])


def test_least_recently_released_idle_slot_is_evicted_first(make_memory: MakeMemory,
                                                            make_adapter: MakeAdapter) -> None:
    memory = make_memory(num_slots=3, host_capacity=8)
    for name in "abcde":
        memory.register(make_adapter(name))
    slots = {name: acquire(memory, name) for name in "abc"}
    for name in "bca":  # b is released first: least recently used
        memory.release(slots[name])
    assert acquire(memory, "d") == slots["b"]
    assert_tiers(memory, a="device", b="host", c="device", d="device")
    memory.release(acquire(memory, "c"))  # a hit refreshes c: now a is the oldest idle slot
    assert acquire(memory, "e") == slots["a"]
    assert_tiers(memory, a="host", c="device", d="device", e="device")
    assert_counters(memory.stats.device, evictions=2, hits=1, misses=5)


def test_empty_slots_are_used_before_evicting(make_memory: MakeMemory,
                                              make_adapter: MakeAdapter) -> None:
    memory = make_memory(num_slots=2)
    for name in "abc":
        memory.register(make_adapter(name))
    memory.release(acquire(memory, "a"))
    memory.release(acquire(memory, "b"))
    assert_tiers(memory, a="device", b="device")
    assert memory.unregister("b")  # its idle slot is now empty
    acquire(memory, "c")
    assert_tiers(memory, a="device", c="device")
    assert_counters(memory.stats.device, evictions=0)


def test_host_cache_evicts_least_recently_used(make_memory: MakeMemory,
                                               make_adapter: MakeAdapter) -> None:
    memory = make_memory(num_slots=4, host_capacity=2)
    for name in "abcd":
        memory.register(make_adapter(name))
    for name in "ab":
        wait_until(lambda n=name: memory.can_acquire(n), f"{name} loaded", memory)
    assert memory.can_acquire("a")  # touches a: b is now the oldest host entry
    wait_until(lambda: memory.can_acquire("c"), "c loaded", memory)
    assert_tiers(memory, a="host", b="disk", c="host")
    assert_counters(memory.stats.host, evictions=1, loads=3)
    wait_until(lambda: memory.can_acquire("d"), "d loaded", memory)
    assert_tiers(memory, a="disk", b="disk", c="host", d="host")
    assert_counters(memory.stats.host, evictions=2, loads=4)
    assert memory.summary()["num_host_cached"] == 2


# --- unregister --------------------------------------------------------------------------------


def test_unregister_in_use_keeps_the_slot_until_release(make_memory: MakeMemory,
                                                        make_adapter: MakeAdapter) -> None:
    memory = make_memory(num_slots=2)
    specs = {name: make_adapter(name) for name in "abc"}
    for spec in specs.values():
        memory.register(spec)
    slot_a = acquire(memory, "a")
    slot_b = acquire(memory, "b")
    assert memory.unregister("a") is True
    assert memory.unregister("a") is False
    assert isinstance(memory.error("a"), NotFound), memory.error("a")
    assert not memory.can_acquire("a")
    assert memory.table.refcount[slot_a] == 1 and not memory.can_acquire("c")
    assert_slot_holds(memory, slot_a, specs["a"])  # running sequences keep their weights
    assert [s.adapter_id for s, _ in memory.snapshot()] == ["b", "c"]
    memory.release(slot_a)
    assert acquire(memory, "c") == slot_a
    assert_counters(memory.stats.device, evictions=0)  # the freed slot held nothing to evict
    assert_slot_holds(memory, slot_b, specs["b"])


def test_error_is_none_for_healthy_and_not_found_for_unknown(make_memory: MakeMemory,
                                                             make_adapter: MakeAdapter) -> None:
    memory = make_memory()
    memory.register(make_adapter("a"))
    assert memory.error("a") is None
    error = memory.error("who")
    assert isinstance(error, NotFound) and "'who'" in str(error), error


# --- counters, snapshot, summary --------------------------------------------------------------


def test_hit_and_miss_counters(make_memory: MakeMemory, make_adapter: MakeAdapter) -> None:
    memory = make_memory(num_slots=1, host_capacity=4)
    for name in "ab":
        memory.register(make_adapter(name))
    memory.release(acquire(memory, "a"))  # disk -> host -> device: misses in both tiers
    assert_counters(memory.stats.device, hits=0, misses=1, loads=1, evictions=0)
    assert_counters(memory.stats.host, hits=0, misses=1, loads=1, evictions=0)
    memory.release(acquire(memory, "a"))  # resident: a device hit, the host is not asked
    assert_counters(memory.stats.device, hits=1, misses=1)
    assert_counters(memory.stats.host, hits=0, misses=1)
    memory.release(acquire(memory, "b"))  # evicts a from the only slot
    assert_counters(memory.stats.device, hits=1, misses=2, evictions=1, loads=2)
    assert_counters(memory.stats.host, hits=0, misses=2, loads=2)
    memory.release(acquire(memory, "a"))  # back from the host copy: a host hit, no disk read
    assert_counters(memory.stats.device, hits=1, misses=3, evictions=2, loads=3)
    assert_counters(memory.stats.host, hits=1, misses=2, loads=2)
    assert memory.stats.device.mean_load_ms > 0


def test_snapshot_tiers(make_memory: MakeMemory, make_adapter: MakeAdapter) -> None:
    memory = make_memory(num_slots=1)
    specs = {name: make_adapter(name) for name in ("dev", "hst", "dsk")}
    for spec in specs.values():
        memory.register(spec)
    wait_until(lambda: memory.can_acquire("hst"), "hst loaded", memory)
    acquire(memory, "dev")
    snapshot = memory.snapshot()
    assert [(spec.adapter_id, tier) for spec, tier in snapshot] == [
        ("dev", "device"), ("hst", "host"), ("dsk", "disk")], snapshot
    assert all(spec is specs[spec.adapter_id] for spec, _ in snapshot)


def test_summary_numbers(make_memory: MakeMemory, make_adapter: MakeAdapter) -> None:
    memory = make_memory(num_slots=3, host_capacity=5)
    assert memory.summary() == {"num_device_slots": 3, "num_device_slots_in_use": 0,
                                "host_capacity": 5, "num_host_cached": 0, "num_registered": 0}
    for name in "abcd":
        memory.register(make_adapter(name))
    slot = acquire(memory, "a")
    acquire(memory, "a")
    memory.release(acquire(memory, "b"))
    wait_until(lambda: memory.can_acquire("c"), "c loaded", memory)
    assert memory.summary() == {"num_device_slots": 3, "num_device_slots_in_use": 1,
                                "host_capacity": 5, "num_host_cached": 3, "num_registered": 4}
    memory.release(slot)
    memory.release(slot)
    memory.unregister("b")
    assert memory.summary() == {"num_device_slots": 3, "num_device_slots_in_use": 0,
                                "host_capacity": 5, "num_host_cached": 2, "num_registered": 3}


# --- hostile adapters are refused at register ------------------------------------------------


def test_register_refuses_nan_weights(make_memory: MakeMemory, make_adapter: MakeAdapter) -> None:
    memory = make_memory()
    spec = make_adapter("nan")
    corrupt_data(spec)  # the header is fine: only reading the data finds it
    with pytest.raises(InvalidArgument, match="holds NaN or infinite values"):
        memory.register(spec)
    assert isinstance(memory.error("nan"), NotFound)


def test_register_refuses_nan_alpha(make_memory: MakeMemory, make_adapter: MakeAdapter) -> None:
    """read_adapter_spec refuses NaN in the JSON; a spec built by hand is checked too."""
    memory = make_memory()
    good = make_adapter("a")
    spec = AdapterSpec("a", good.path, good.rank, float("nan"), False, good.target_modules)
    with pytest.raises(InvalidArgument, match="'a'"):
        memory.register(spec)
    assert memory.registry == {}


def test_register_refuses_values_the_slot_dtype_cannot_hold(
        make_memory: MakeMemory, make_adapter: MakeAdapter) -> None:
    spec = make_adapter("big")
    file = Path(spec.path) / WEIGHTS_FILE
    tensors = load_file(str(file))
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name][0, 0] = 1e5  # finite in float32, inf in float16
    save_file(tensors, str(file))
    with pytest.raises(InvalidArgument, match=r"beyond 65504.*torch.float16 adapter slots"):
        make_memory(dtype=torch.float16).register(spec)
    make_memory(dtype=torch.bfloat16).register(spec)
    make_memory(dtype=torch.float32).register(spec)


def test_register_and_load_keep_to_max_adapter_bytes(make_memory: MakeMemory,
                                                     make_adapter: MakeAdapter,
                                                     tiny_model_dir: Path) -> None:
    small = make_adapter("small", modules=("q_proj",))
    size = (Path(small.path) / WEIGHTS_FILE).stat().st_size
    memory = make_memory(max_adapter_bytes=size)
    with pytest.raises(InvalidArgument, match="--max-adapter-mb"):
        memory.register(make_adapter("large"))
    memory.register(small)
    # The file is replaced by a larger one after registration: the load refuses it too.
    write_random_adapter(Path(small.path), tiny_model_dir, 4, 8.0, ("q_proj", "v_proj"))
    assert "--max-adapter-mb" in wait_for_error(memory, "small")


# --- acquire racing unregister ---------------------------------------------------------------


def test_acquire_of_an_adapter_unregistered_meanwhile_is_not_found(
        make_memory: MakeMemory, make_adapter: MakeAdapter) -> None:
    memory = make_memory(num_slots=1)
    memory.register(make_adapter("a"))
    wait_until(lambda: memory.can_acquire("a"), "a loaded", memory)
    memory.unregister("a")  # another thread, between can_acquire and acquire
    with pytest.raises(NotFound) as info:
        memory.acquire("a")
    assert str(info.value) == ("adapter 'a' was unregistered while this request was being "
                               "admitted"), info.value
    assert memory.table.refcount == [0, 0] and memory.table.idle() == [1], describe(memory)
    assert_counters(memory.stats.device, misses=0, loads=0)


def test_acquire_of_an_adapter_replaced_meanwhile_is_unavailable(
        make_memory: MakeMemory, make_adapter: MakeAdapter) -> None:
    memory = make_memory(num_slots=1)
    spec = make_adapter("a")
    memory.register(spec)
    wait_until(lambda: memory.can_acquire("a"), "a loaded", memory)
    memory.register(spec)  # re-registered: its host copy is dropped
    with pytest.raises(Unavailable, match="retry"):
        memory.acquire("a")
    assert memory.table.refcount == [0, 0], describe(memory)
    assert_slot_holds(memory, acquire(memory, "a"), spec)


def test_a_request_pinned_to_a_replaced_version_is_aborted(
        make_memory: MakeMemory, make_adapter: MakeAdapter) -> None:
    """A sequence preempted after its adapter was replaced must not go on with the new
    weights: its tokens so far came from the old ones."""
    memory = make_memory(num_slots=1)
    old = make_adapter("a")
    memory.register(old)
    slot = acquire(memory, "a")
    assert memory.slot_spec[slot] == old
    memory.release(slot)  # preempted
    new = dataclasses.replace(make_adapter("a2"), adapter_id="a")
    memory.register(new)
    with pytest.raises(Aborted, match="replaced or unregistered while this request ran"):
        memory.acquire("a", pinned=old)
    assert memory.table.refcount == [0, 0], describe(memory)
    slot = acquire(memory, "a")  # a new request gets the new version
    assert memory.slot_spec[slot] == new
    assert_slot_holds(memory, slot, new)
    memory.release(slot)
    assert memory.acquire("a", pinned=new) == slot  # the same version goes on
    memory.release(slot)
    memory.register(dataclasses.replace(new))  # the same content again: an equal version
    wait_until(lambda: memory.can_acquire("a"), "a loaded", memory)
    memory.release(memory.acquire("a", pinned=new))
    memory.unregister("a")
    with pytest.raises(Aborted):
        memory.acquire("a", pinned=new)


def test_acquire_racing_register_and_unregister_raises_only_edgelora_errors(
        make_memory: MakeMemory, make_adapter: MakeAdapter) -> None:
    """The scheduler's loop against a thread that keeps unregistering and re-registering."""
    memory = make_memory(num_slots=1)
    spec = make_adapter("a")
    memory.register(spec)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            memory.unregister("a")
            memory.register(spec)
            time.sleep(0.02)  # long enough for a load to finish now and then

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    outcomes: dict[str, int] = {}
    started = time.monotonic()
    try:  # at least 0.5 s and 5 acquisitions
        while time.monotonic() - started < 0.5 or outcomes.get("acquired", 0) < 5:
            assert time.monotonic() - started < DEADLINE_S, outcomes
            if not memory.can_acquire("a"):
                time.sleep(0.0005)  # the scheduler's poll, not a spin that starves the loader
                continue
            try:
                memory.release(memory.acquire("a"))
                outcome = "acquired"
            except EdgeLoraError as exc:
                outcome = type(exc).__name__
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    finally:
        stop.set()
        churner.join()
    assert memory.table.refcount == [0, 0], describe(memory)


# --- transient read failures -----------------------------------------------------------------


def flaky_reads(monkeypatch: pytest.MonkeyPatch, num_failures: int) -> list[int]:
    """Makes the next num_failures reads fail with EIO; -> a list counting every read."""
    real, reads = adapter_memory.read_adapter_weights, []

    def read(*args, **kwargs):
        reads.append(1)
        if len(reads) <= num_failures:
            raise OSError(5, "Input/output error")
        return real(*args, **kwargs)

    monkeypatch.setattr(adapter_memory, "read_adapter_weights", read)
    return reads


def test_transient_read_failures_are_retried(make_memory: MakeMemory, make_adapter: MakeAdapter,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    memory = make_memory()
    spec = make_adapter("a")
    memory.register(spec)
    reads = flaky_reads(monkeypatch, num_failures=2)

    def loaded() -> bool:
        assert memory.error("a") is None, memory.error("a")  # never reported to a request
        return memory.can_acquire("a")

    wait_until(loaded, "a loaded on the third attempt", memory)
    assert len(reads) == 3, reads
    assert memory._num_failures == {}, memory._num_failures  # a success resets the count
    assert_slot_holds(memory, memory.acquire("a"), spec)


def test_failures_count_only_while_consecutive(make_memory: MakeMemory,
                                               make_adapter: MakeAdapter,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    memory = make_memory(host_capacity=1)
    for name in "ab":
        memory.register(make_adapter(name))
    reads = flaky_reads(monkeypatch, num_failures=2)
    wait_until(lambda: memory.can_acquire("a"), "a loaded", memory)  # 2 failures, then success
    wait_until(lambda: memory.can_acquire("b"), "b loaded", memory)  # evicts a from the host
    reads.clear()
    wait_until(lambda: memory.can_acquire("a"), "a loaded again", memory)  # 2 more failures
    assert len(reads) == 3 and memory.error("a") is None, (reads, describe(memory))


def test_persistent_read_failure_is_unavailable_then_expires(
        make_memory: MakeMemory, make_adapter: MakeAdapter,
        monkeypatch: pytest.MonkeyPatch) -> None:
    memory = make_memory()
    spec = make_adapter("a")
    memory.register(spec)
    reads = flaky_reads(monkeypatch, num_failures=3)
    monkeypatch.setattr(adapter_memory, "LOAD_RETRY_S", 0.3)

    def failed() -> bool:
        memory.can_acquire("a")  # the scheduler's poll retries the load
        return memory.error("a") is not None

    wait_until(failed, "the third failure", memory)
    error = memory.error("a")
    assert isinstance(error, Unavailable), error
    assert str(error) == ("adapter 'a' could not be read after 3 attempts: [Errno 5] "
                          "Input/output error; retrying in 0.3 s"), error
    for _ in range(5):  # refused fast meanwhile: no read per request
        memory.prefetch("a")
        assert not memory.can_acquire("a")
    assert len(reads) == 3, reads
    wait_until(lambda: memory.error("a") is None, "the error to expire", memory)
    assert_slot_holds(memory, acquire(memory, "a"), spec)
    assert len(reads) == 4, reads


def test_validation_failure_at_load_stays_sticky(make_memory: MakeMemory,
                                                 make_adapter: MakeAdapter,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    memory = make_memory()
    spec = make_adapter("a")
    memory.register(spec)
    monkeypatch.setattr(adapter_memory, "LOAD_RETRY_S", 0.0)
    corrupt_data(spec)
    wait_for_error(memory, "a")
    time.sleep(0.01)
    assert isinstance(memory.error("a"), InvalidArgument)
    memory.prefetch("a")
    assert memory._loading == {}
