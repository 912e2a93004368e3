"""Tests for common.adapter_format: reading and validating PEFT LoRA adapter directories."""

from __future__ import annotations

import errno
import io
import itertools
import json
import math
import os
import random
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common import untrusted_files
from common.adapter_format import (
    CONFIG_FILE,
    LORA_MODULES,
    WEIGHTS_FILE,
    AdapterSpec,
    check_adapter_shapes,
    read_adapter_spec,
    read_adapter_weights,
    validate_adapter_weights,
)
from common.errors import EdgeLoraError, InvalidArgument, Unavailable
from tests.conftest import write_random_adapter
from worker.loader import read_model_config
from worker.lora import module_shapes

PREFIX = "base_model.model.model.layers"


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> tuple[dict[str, tuple[int, int]], int]:
    cfg = read_model_config(tiny_model_dir)
    return module_shapes(cfg), cfg.num_layers


@pytest.fixture
def adapter_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    return write_random_adapter(tmp_path / "adapter", tiny_model_dir, rank=4, alpha=8.0)


def edit_config(path: Path, **changes: object) -> None:
    """Sets fields of adapter_config.json; a value of None deletes the field."""
    config = json.loads((path / CONFIG_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / CONFIG_FILE).write_text(json.dumps(config))


def edit_tensors(path: Path, edit) -> None:
    """Rewrites adapter_model.safetensors as edit(tensors) returns it."""
    tensors = load_file(str(path / WEIGHTS_FILE))
    save_file(edit(dict(tensors)), str(path / WEIGHTS_FILE))


def raises_invalid(fn, *args, match: str | None = None) -> str:
    """Calls fn(*args), which must raise InvalidArgument (whose message contains `match`)."""
    with pytest.raises(InvalidArgument) as info:
        fn(*args)
    message = str(info.value)
    if match is not None:
        assert match in message, f"expected {match!r} in the message, got: {message}"
    return message


# --- read_adapter_spec: files and JSON -------------------------------------------------------


@pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE])
def test_missing_file_is_named(adapter_dir: Path, missing: str) -> None:
    (adapter_dir / missing).unlink()
    message = raises_invalid(read_adapter_spec, "a", adapter_dir, match=missing)
    assert "missing" in message and "'a'" in message, message


def test_missing_directory_is_rejected(tmp_path: Path) -> None:
    raises_invalid(read_adapter_spec, "a", tmp_path / "nowhere", match=CONFIG_FILE)


def test_bad_json_is_rejected(adapter_dir: Path) -> None:
    (adapter_dir / CONFIG_FILE).write_text("{not json")
    message = raises_invalid(read_adapter_spec, "a", adapter_dir, match="not valid JSON")
    assert CONFIG_FILE in message, message


def test_json_that_is_not_an_object_is_rejected(adapter_dir: Path) -> None:
    (adapter_dir / CONFIG_FILE).write_text("[1, 2]")
    raises_invalid(read_adapter_spec, "a", adapter_dir, match="JSON object")


def test_peft_type_other_than_lora_is_rejected(adapter_dir: Path) -> None:
    edit_config(adapter_dir, peft_type="IA3")
    raises_invalid(read_adapter_spec, "a", adapter_dir, match="'IA3' is not LORA")


def test_missing_peft_type_means_lora(adapter_dir: Path) -> None:
    edit_config(adapter_dir, peft_type=None)
    assert read_adapter_spec("a", adapter_dir).rank == 4


@pytest.mark.parametrize(("feature", "value"), [
    ("use_dora", True),
    ("modules_to_save", ["lm_head"]),
    ("rank_pattern", {"q_proj": 16}),
    ("alpha_pattern", {"q_proj": 32}),
])
def test_unsupported_peft_features_are_rejected(adapter_dir: Path, feature: str,
                                                value: object) -> None:
    edit_config(adapter_dir, **{feature: value})
    raises_invalid(read_adapter_spec, "a", adapter_dir, match=f"{feature} is not supported")


@pytest.mark.parametrize(("feature", "value"), [
    ("use_dora", False), ("modules_to_save", None), ("rank_pattern", {}), ("alpha_pattern", {}),
])
def test_disabled_peft_features_are_accepted(adapter_dir: Path, feature: str,
                                             value: object) -> None:
    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    config[feature] = value  # null / false / {} as PEFT writes them
    (adapter_dir / CONFIG_FILE).write_text(json.dumps(config))
    assert read_adapter_spec("a", adapter_dir).rank == 4


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_is_rejected(adapter_dir: Path, bias: str) -> None:
    edit_config(adapter_dir, bias=bias)
    raises_invalid(read_adapter_spec, "a", adapter_dir, match=f"bias={bias!r}")


@pytest.mark.parametrize("rank", [None, 0, -4, "8", 4.0])
def test_rank_must_be_a_positive_integer(adapter_dir: Path, rank: object) -> None:
    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    if rank is None:
        del config["r"]
    else:
        config["r"] = rank
    (adapter_dir / CONFIG_FILE).write_text(json.dumps(config))
    raises_invalid(read_adapter_spec, "a", adapter_dir, match="r must be a positive integer")


# --- read_adapter_spec: target modules -------------------------------------------------------


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["embed_tokens"], [], None])
def test_unsupported_target_modules_are_rejected_naming_supported_ones(
        adapter_dir: Path, targets: list[str] | None) -> None:
    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    config["target_modules"] = targets
    (adapter_dir / CONFIG_FILE).write_text(json.dumps(config))
    message = raises_invalid(read_adapter_spec, "a", adapter_dir, match="not supported")
    for name in targets or []:
        if name not in LORA_MODULES:
            assert name in message, message
    for supported in LORA_MODULES:
        assert supported in message, message


def test_target_modules_as_full_dotted_names(adapter_dir: Path) -> None:
    edit_config(adapter_dir, target_modules=["model.layers.0.self_attn.q_proj",
                                             "base_model.model.model.layers.1.mlp.down_proj",
                                             "model.layers.1.self_attn.q_proj"])
    assert read_adapter_spec("a", adapter_dir).target_modules == ("down_proj", "q_proj")


@pytest.mark.parametrize(("pattern", "expected"), [
    ("all-linear", tuple(sorted(LORA_MODULES))),
    ("q_proj|v_proj", ("q_proj", "v_proj")),
    (r".*\.(q_proj|v_proj)", ("q_proj", "v_proj")),  # PEFT full-matches full module names
    (r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj", ("k_proj", "o_proj", "q_proj", "v_proj")),
    (r".*layers\.(30|31)\.mlp\.(gate|up)_proj", ("gate_proj", "up_proj")),
    (r".*mlp.*", ("down_proj", "gate_proj", "up_proj")),
])
def test_target_modules_as_a_regex_string(adapter_dir: Path, pattern: str,
                                          expected: tuple[str, ...]) -> None:
    edit_config(adapter_dir, target_modules=pattern)
    assert read_adapter_spec("a", adapter_dir).target_modules == expected


@pytest.mark.parametrize("pattern", ["lm_head", r".*embed_tokens", "("])
def test_regex_matching_nothing_or_invalid_is_rejected(adapter_dir: Path, pattern: str) -> None:
    edit_config(adapter_dir, target_modules=pattern)
    raises_invalid(read_adapter_spec, "a", adapter_dir, match="target_modules")


def test_spec_fields(adapter_dir: Path) -> None:
    spec = read_adapter_spec("tenant/a", adapter_dir)
    assert (spec.adapter_id, spec.path, spec.rank, spec.lora_alpha, spec.use_rslora) == (
        "tenant/a", str(adapter_dir), 4, 8.0, False)
    assert spec.target_modules == tuple(sorted(LORA_MODULES))


@pytest.mark.parametrize(("rank", "alpha", "rslora", "expected"), [
    (4, 8.0, False, 2.0),
    (16, 16.0, False, 1.0),
    (4, 8.0, True, 4.0),      # alpha / sqrt(r)
    (16, 32.0, True, 8.0),
    (8, None, False, 1.0),    # lora_alpha defaults to r
])
def test_scaling_with_and_without_rslora(adapter_dir: Path, rank: int, alpha: float | None,
                                         rslora: bool, expected: float) -> None:
    edit_config(adapter_dir, r=rank, lora_alpha=alpha, use_rslora=rslora)
    spec = read_adapter_spec("a", adapter_dir)
    assert math.isclose(spec.scaling, expected), (spec, spec.scaling, expected)


# --- check_adapter_shapes ----------------------------------------------------------------------


def test_valid_adapter_passes_the_shape_check(adapter_dir: Path, base) -> None:
    check_adapter_shapes(read_adapter_spec("a", adapter_dir), *base)


def test_wrong_shape_says_what_the_base_model_needs(tmp_path: Path, tiny_model_dir: Path,
                                                    base) -> None:
    other_base = tmp_path / "other-base"  # write_random_adapter only reads config.json
    other_base.mkdir()
    hf = json.loads((tiny_model_dir / "config.json").read_text())
    (other_base / "config.json").write_text(json.dumps({**hf, "intermediate_size": 96}))
    path = write_random_adapter(tmp_path / "a", other_base, rank=4, modules=("down_proj",))
    message = raises_invalid(check_adapter_shapes, read_adapter_spec("a", path), *base)
    assert "mlp.down_proj.lora_A" in message, message
    assert "has shape [4, 96], this base model needs [4, 128]" in message, message


def test_rank_in_config_disagreeing_with_tensors_is_rejected(adapter_dir: Path, base) -> None:
    edit_config(adapter_dir, r=8)  # tensors are rank 4
    message = raises_invalid(check_adapter_shapes, read_adapter_spec("a", adapter_dir), *base)
    assert "needs [8," in message or ", 8]" in message, message


def test_layer_beyond_the_base_model_is_rejected(adapter_dir: Path, base) -> None:
    def add_layer_5(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for half in "AB":
            t[f"{PREFIX}.5.self_attn.q_proj.lora_{half}.weight"] = t[
                f"{PREFIX}.0.self_attn.q_proj.lora_{half}.weight"].clone()
        return t

    edit_tensors(adapter_dir, add_layer_5)
    raises_invalid(check_adapter_shapes, read_adapter_spec("a", adapter_dir), *base,
                   match="layer 5 does not exist in this 2-layer base model")


@pytest.mark.parametrize("name", [
    "base_model.model.lm_head.lora_A.weight",
    "base_model.model.model.embed_tokens.lora_embedding_A",
    "base_model.model.model.layers.0.self_attn.q_proj.weight",
])
def test_stray_tensor_is_named(adapter_dir: Path, base, name: str) -> None:
    edit_tensors(adapter_dir, lambda t: {**t, name: torch.zeros(4, 64)})
    raises_invalid(check_adapter_shapes, read_adapter_spec("a", adapter_dir), *base,
                   match=repr(name))


def test_unknown_projection_in_a_layer_is_named(adapter_dir: Path, base) -> None:
    name = f"{PREFIX}.0.self_attn.rotary_emb.lora_A.weight"
    edit_tensors(adapter_dir, lambda t: {**t, name: torch.zeros(4, 64)})
    message = raises_invalid(check_adapter_shapes, read_adapter_spec("a", adapter_dir), *base,
                             match="'rotary_emb' is not supported")
    assert name in message, message


def test_empty_weights_file_is_rejected(adapter_dir: Path, base) -> None:
    save_file({}, str(adapter_dir / WEIGHTS_FILE))
    raises_invalid(check_adapter_shapes, read_adapter_spec("a", adapter_dir), *base,
                   match="holds no tensors")


def test_adapter_name_in_tensor_keys_is_accepted(adapter_dir: Path, base) -> None:
    """Some PEFT versions save keys as ...q_proj.lora_A.default.weight."""
    edit_tensors(adapter_dir, lambda t: {k.replace(".weight", ".default.weight"): v
                                         for k, v in t.items()})
    spec = read_adapter_spec("a", adapter_dir)
    check_adapter_shapes(spec, *base)
    assert len(read_adapter_weights(spec, *base)) == 2 * len(LORA_MODULES)


@pytest.mark.parametrize("keep", [10, 200, -100])
def test_truncated_weights_file_is_invalid_argument(adapter_dir: Path, base, keep: int) -> None:
    data = (adapter_dir / WEIGHTS_FILE).read_bytes()
    (adapter_dir / WEIGHTS_FILE).write_bytes(data[:keep])
    spec = read_adapter_spec("a", adapter_dir)
    for fn in (check_adapter_shapes, read_adapter_weights):
        raises_invalid(fn, spec, *base, match=WEIGHTS_FILE)


def test_garbage_weights_file_is_invalid_argument(adapter_dir: Path, base) -> None:
    (adapter_dir / WEIGHTS_FILE).write_bytes(b"this is not a safetensors file at all")
    spec = read_adapter_spec("a", adapter_dir)
    for fn in (check_adapter_shapes, read_adapter_weights):
        raises_invalid(fn, spec, *base, match="'a'")


# --- read_adapter_weights ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rslora", [False, True])
def test_weights_come_back_float32_with_b_scaled(tmp_path: Path, tiny_model_dir: Path, base,
                                                 dtype: torch.dtype, rslora: bool) -> None:
    path = write_random_adapter(tmp_path / "a", tiny_model_dir, rank=4, alpha=12.0,
                                modules=("q_proj", "down_proj"), dtype=dtype, use_rslora=rslora)
    spec = read_adapter_spec("a", path)
    scaling = 12.0 / (2.0 if rslora else 4.0)
    raw = load_file(str(path / WEIGHTS_FILE))
    weights = read_adapter_weights(spec, *base)
    assert sorted(weights) == [(0, "down_proj"), (0, "q_proj"), (1, "down_proj"), (1, "q_proj")]
    for (layer, module), (a, b) in weights.items():
        kind = "self_attn" if module == "q_proj" else "mlp"
        prefix = f"{PREFIX}.{layer}.{kind}.{module}"
        assert a.dtype == b.dtype == torch.float32, (a.dtype, b.dtype)
        assert torch.equal(a, raw[f"{prefix}.lora_A.weight"].float()), prefix
        torch.testing.assert_close(b, raw[f"{prefix}.lora_B.weight"].float() * scaling,
                                   rtol=1e-6, atol=0, msg=lambda m, p=prefix: f"{p}: {m}")
        fan_in, fan_out = base[0][module]
        assert a.shape == (4, fan_in) and b.shape == (fan_out, 4), (prefix, a.shape, b.shape)


@pytest.mark.parametrize("which", ["A", "B"])
def test_half_of_a_pair_is_rejected(adapter_dir: Path, base, which: str) -> None:
    other = "B" if which == "A" else "A"
    edit_tensors(adapter_dir, lambda t: {k: v for k, v in t.items()
                                         if k != f"{PREFIX}.1.mlp.up_proj.lora_{other}.weight"})
    raises_invalid(read_adapter_weights, read_adapter_spec("a", adapter_dir), *base,
                   match=f"layer 1 up_proj has lora_{which} without its pair")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", ["A", "B"])
def test_non_finite_values_are_rejected(adapter_dir: Path, base, bad: float, which: str) -> None:
    def poison(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t[f"{PREFIX}.0.self_attn.v_proj.lora_{which}.weight"][1, 2] = bad
        return t

    edit_tensors(adapter_dir, poison)
    spec = read_adapter_spec("a", adapter_dir)
    check_adapter_shapes(spec, *base)  # the header is fine: data problems show at load
    raises_invalid(read_adapter_weights, spec, *base, match="layer 0 v_proj holds NaN or infinite")


def test_read_weights_checks_shapes_too(adapter_dir: Path, base) -> None:
    edit_tensors(adapter_dir, lambda t: {**t, f"{PREFIX}.0.mlp.up_proj.lora_B.weight":
                                         torch.zeros(100, 4)})
    raises_invalid(read_adapter_weights, read_adapter_spec("a", adapter_dir), *base,
                   match="this base model needs [128, 4]")


def test_spec_is_cheap_and_hashable() -> None:
    spec = AdapterSpec("a", "/nowhere", 8, 16.0, False, ("q_proj",))
    assert spec.scaling == 2.0 and {spec: 1}[spec] == 1


# --- hostile files -----------------------------------------------------------------------------


def finishes(fn, *args, within_s: float = 5.0):
    """fn(*args) on a daemon thread: -> what it returned or raised, failing if it blocks (a FIFO
    opened without a writer would hang the test run, not fail it)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(fn(*args))
        except BaseException as exc:  # handed back to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within_s)
    assert outcome, f"{getattr(fn, '__name__', fn)} still blocked after {within_s} s"
    return outcome[0]


def refused(fn, *args, match: str) -> str:
    """Like raises_invalid, but on a thread so a blocking open fails instead of hanging."""
    result = finishes(fn, *args)
    assert isinstance(result, InvalidArgument), f"expected InvalidArgument, got {result!r}"
    assert match in str(result), f"expected {match!r} in the message, got: {result}"
    return str(result)


@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE])
@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_non_regular_files_are_refused_without_blocking(adapter_dir: Path, name: str,
                                                        kind: str) -> None:
    file = adapter_dir / name
    file.unlink()
    if kind == "fifo":
        os.mkfifo(file)
    elif kind == "directory":
        file.mkdir()
    else:
        file.symlink_to("/dev/zero")  # symlinks are followed: what they point at counts
    message = refused(read_adapter_spec, "a", adapter_dir, match="is not a regular file")
    assert str(file) in message and "'a'" in message, message


@pytest.mark.parametrize("fn", [check_adapter_shapes, read_adapter_weights])
def test_weights_swapped_for_a_fifo_after_registration_are_refused(adapter_dir: Path, base,
                                                                   fn) -> None:
    spec = read_adapter_spec("a", adapter_dir)
    (adapter_dir / WEIGHTS_FILE).unlink()
    os.mkfifo(adapter_dir / WEIGHTS_FILE)
    refused(fn, spec, *base, match="is not a regular file")


def test_oversize_config_is_refused(adapter_dir: Path) -> None:
    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    (adapter_dir / CONFIG_FILE).write_text(json.dumps(config) + " " * (64 << 10))
    message = raises_invalid(read_adapter_spec, "a", adapter_dir, match="64 KiB at most")
    assert CONFIG_FILE in message, message


def test_deeply_nested_config_is_invalid_argument(adapter_dir: Path) -> None:
    (adapter_dir / CONFIG_FILE).write_text("[" * 60_000)  # RecursionError inside json
    raises_invalid(read_adapter_spec, "a", adapter_dir, match="not valid JSON")


def test_oversize_weights_are_refused_naming_the_limit(adapter_dir: Path, base) -> None:
    size = (adapter_dir / WEIGHTS_FILE).stat().st_size
    spec = read_adapter_spec("a", adapter_dir, max_weights_bytes=size)  # exactly at the cap: ok
    read_adapter_weights(spec, *base, size)
    for cap in (size - 1, 1000):
        message = raises_invalid(read_adapter_spec, "a", adapter_dir, 256, cap,
                                 match="this server accepts adapter files up to")
        assert WEIGHTS_FILE in message and "(--max-adapter-mb)" in message, message
    assert "is 35.38 KiB; this server accepts adapter files up to 1000 bytes" in message, message
    for fn in (check_adapter_shapes, read_adapter_weights, validate_adapter_weights):
        raises_invalid(fn, spec, *base, size - 1, match="--max-adapter-mb")


def test_weights_grown_after_registration_are_refused_at_load(adapter_dir: Path, base) -> None:
    spec = read_adapter_spec("a", adapter_dir)  # the default cap: 512 MiB
    os.truncate(adapter_dir / WEIGHTS_FILE, 700 << 20)  # sparse: costs no disk
    for fn in (check_adapter_shapes, read_adapter_weights):
        raises_invalid(fn, spec, *base, match="is 700 MiB; this server accepts adapter files "
                                              "up to 512 MiB (--max-adapter-mb)")


def test_io_errors_are_unavailable_not_invalid(adapter_dir: Path, base,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    spec = read_adapter_spec("a", adapter_dir)

    class FailingOpen:  # os for untrusted_files alone, whose open() fails as a bad disk does
        def __getattr__(self, name: str) -> object:
            return getattr(os, name)

        @staticmethod
        def open(*args, **kwargs) -> int:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(untrusted_files, "os", FailingOpen())
    with pytest.raises(Unavailable, match=r"cannot be read now.*Input/output error"):
        read_adapter_weights(spec, *base)


def test_a_file_that_shrinks_while_read_is_unavailable() -> None:
    with pytest.raises(Unavailable, match="shrank while being read"):
        untrusted_files.read_exact("a", Path(WEIGHTS_FILE), io.BytesIO(b"12345"), 10)


# --- hostile config values ---------------------------------------------------------------------


@pytest.mark.parametrize("rank", [True, 4097, 10**30])
def test_rank_must_be_an_int_up_to_4096(adapter_dir: Path, rank: object) -> None:
    edit_config(adapter_dir, r=rank)
    raises_invalid(read_adapter_spec, "a", adapter_dir, match="up to 4096")


def test_rank_4096_is_accepted(adapter_dir: Path) -> None:
    edit_config(adapter_dir, r=4096)
    assert read_adapter_spec("a", adapter_dir).rank == 4096


@pytest.mark.parametrize("alpha", ["NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 400,
                                   '"16"', "true", "[16]"])
def test_lora_alpha_must_be_a_finite_number(adapter_dir: Path, alpha: str) -> None:
    text = (adapter_dir / CONFIG_FILE).read_text()
    (adapter_dir / CONFIG_FILE).write_text(text.replace('"lora_alpha": 8.0',
                                                        f'"lora_alpha": {alpha}'))
    raises_invalid(read_adapter_spec, "a", adapter_dir, match="lora_alpha must be a finite number")


@pytest.mark.parametrize("alpha", [0, -8, 32])
def test_any_finite_lora_alpha_is_accepted(adapter_dir: Path, alpha: int) -> None:
    edit_config(adapter_dir, lora_alpha=alpha)
    assert read_adapter_spec("a", adapter_dir).scaling == alpha / 4


@pytest.mark.parametrize("value", ["true", 1, [True]])
def test_use_rslora_must_be_a_bool(adapter_dir: Path, value: object) -> None:
    edit_config(adapter_dir, use_rslora=value)
    raises_invalid(read_adapter_spec, "a", adapter_dir, match="use_rslora must be true or false")


def test_use_rslora_null_means_false(adapter_dir: Path) -> None:
    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    config["use_rslora"] = None
    (adapter_dir / CONFIG_FILE).write_text(json.dumps(config))
    assert read_adapter_spec("a", adapter_dir).use_rslora is False


# --- hostile target_modules regexes ------------------------------------------------------------


def test_long_regex_is_refused(adapter_dir: Path) -> None:
    edit_config(adapter_dir, target_modules="q_proj|" * 40)
    raises_invalid(read_adapter_spec, "a", adapter_dir, match="at most 256 are accepted")


@pytest.mark.parametrize("pattern", [r"((a{1000}){1000}){1000}", r"(?:x{65535}){65535}"])
def test_regex_that_compiles_huge_is_refused(adapter_dir: Path, pattern: str) -> None:
    """regex expands counted repeats when compiling: these would take GBs (or the OOM killer)."""
    edit_config(adapter_dir, target_modules=pattern)
    started = time.monotonic()
    raises_invalid(read_adapter_spec, "a", adapter_dir, match="repeats too much")
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("pattern", [r"(.|.)*\d", r"(?:.*?){30}\d", r"(.|\w)*[A-Z]"])
def test_catastrophic_regex_is_refused_in_time_while_other_threads_run(
        adapter_dir: Path, pattern: str) -> None:
    """With `re`, each of these backtracks ~2^31 times per name, over 256 x 7 names."""
    edit_config(adapter_dir, target_modules=pattern)
    ticks: list[float] = []
    done = threading.Event()

    def count() -> None:  # stands in for the event loop and the engine thread
        while not done.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    counter = threading.Thread(target=count, daemon=True)
    started = time.monotonic()
    counter.start()
    try:
        message = raises_invalid(read_adapter_spec, "a", adapter_dir,
                                 match="takes too long to match (catastrophic backtracking?)")
    finally:
        done.set()
        counter.join()
    elapsed_s = time.monotonic() - started
    assert elapsed_s < 2.0, f"took {elapsed_s:.2f} s"
    assert repr(pattern) in message, message
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert len(ticks) > 100 and max(gaps) < 0.25, (len(ticks), max(gaps, default=None))


def test_regex_candidates_are_the_model_layers(adapter_dir: Path) -> None:
    edit_config(adapter_dir, target_modules=r".*layers\.(30|31)\.mlp\.(gate|up)_proj")
    assert read_adapter_spec("a", adapter_dir, 32).target_modules == ("gate_proj", "up_proj")
    raises_invalid(read_adapter_spec, "a", adapter_dir, 2, match="not supported")


# --- hostile tensors ---------------------------------------------------------------------------


def write_raw_safetensors(file: Path, header: object, data: bytes = b"") -> None:
    """A safetensors file with any header, valid or not."""
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.float64, torch.bool])
def test_other_dtypes_are_refused_from_the_header(adapter_dir: Path, base,
                                                  dtype: torch.dtype) -> None:
    name = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
    edit_tensors(adapter_dir, lambda t: {**t, name: t[name].to(dtype)})
    spec = read_adapter_spec("a", adapter_dir)
    for fn in (check_adapter_shapes, read_adapter_weights, validate_adapter_weights):
        message = raises_invalid(fn, spec, *base, match="LoRA weights must be F16, BF16, F32")
        assert name in message, message


@pytest.mark.parametrize("which", ["A", "B"])
def test_duplicate_tensors_are_refused(adapter_dir: Path, base, which: str) -> None:
    name = f"{PREFIX}.1.mlp.down_proj.lora_{which}.weight"
    twin = name.replace(".weight", ".default.weight")
    edit_tensors(adapter_dir, lambda t: {**t, twin: t[name].clone()})
    spec = read_adapter_spec("a", adapter_dir)
    for fn in (check_adapter_shapes, read_adapter_weights, validate_adapter_weights):
        message = raises_invalid(fn, spec, *base, match=f"lora_{which} of layer 1 down_proj")
        assert name in message and twin in message, message


def test_missing_pair_is_refused_from_the_header(adapter_dir: Path, base) -> None:
    edit_tensors(adapter_dir, lambda t: {k: v for k, v in t.items()
                                         if "1.mlp.up_proj.lora_B" not in k})
    raises_invalid(check_adapter_shapes, read_adapter_spec("a", adapter_dir), *base,
                   match="layer 1 up_proj has lora_A without its pair")


def test_b_times_scaling_overflow_is_refused(adapter_dir: Path, base) -> None:
    def big(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t[f"{PREFIX}.0.mlp.gate_proj.lora_B.weight"][3, 1] = 100.0
        return t

    edit_tensors(adapter_dir, big)
    edit_config(adapter_dir, lora_alpha=1e38)  # finite, as is 100 * 1e38 / 4 in float64
    spec = read_adapter_spec("a", adapter_dir)
    check_adapter_shapes(spec, *base)
    for fn in (read_adapter_weights, validate_adapter_weights):
        raises_invalid(fn, spec, *base, match="layer 0 gate_proj: lora_B times the scaling "
                                              "2.5e+37 overflows float32")


def test_validate_accepts_a_good_adapter_and_refuses_nan(adapter_dir: Path, base) -> None:
    spec = read_adapter_spec("a", adapter_dir)
    assert validate_adapter_weights(spec, *base) is None
    nan_spec = AdapterSpec("n", spec.path, spec.rank, float("nan"), False, spec.target_modules)
    raises_invalid(validate_adapter_weights, nan_spec, *base, match="'n'")


@pytest.mark.parametrize("header", [
    b"[" * 100_000,                                              # nested past the recursion limit
    b"not json",
    ["a list"],
    {"x.layers.0.self_attn.q_proj.lora_A.weight": "F32"},
    {"x.layers.0.self_attn.q_proj.lora_A.weight": {"dtype": "F32", "shape": "ab",
                                                   "data_offsets": [0, 8]}},
    {"x.layers.0.self_attn.q_proj.lora_A.weight": {"dtype": "F32", "shape": [4, 64],
                                                   "data_offsets": [0, 10**12]}},
    {"x.layers.0.self_attn.q_proj.lora_A.weight": {"dtype": "F32", "shape": [4, 64],
                                                   "data_offsets": [8, 0]}},
    {"x.layers.0.self_attn.q_proj.lora_A.weight": {"dtype": "F32", "shape": [4, 64],
                                                   "data_offsets": [0, 16]}},  # too short
])
def test_malformed_safetensors_headers_are_invalid_argument(adapter_dir: Path, base,
                                                            header: object) -> None:
    spec = read_adapter_spec("a", adapter_dir)
    write_raw_safetensors(adapter_dir / WEIGHTS_FILE, header, bytes(64))
    for fn in (check_adapter_shapes, read_adapter_weights):
        raises_invalid(fn, spec, *base, match=WEIGHTS_FILE)


def test_header_length_beyond_the_file_is_refused(adapter_dir: Path, base) -> None:
    spec = read_adapter_spec("a", adapter_dir)
    (adapter_dir / WEIGHTS_FILE).write_bytes(struct.pack("<Q", 2**63) + b"{}")
    raises_invalid(read_adapter_weights, spec, *base, match="header in a 10-byte file")


def test_misaligned_tensor_data_is_read_correctly(tmp_path: Path, base) -> None:
    """A hand-made file whose float32 A starts 2 bytes into the data: still read exactly."""
    shapes, _ = base
    a = torch.arange(4 * 64, dtype=torch.float32).view(4, 64)
    b = torch.ones(shapes["q_proj"][1], 4, dtype=torch.float16)
    key = f"{PREFIX}.0.self_attn.q_proj"
    header = {f"{key}.lora_B.weight": {"dtype": "F16", "shape": list(b.shape),
                                      "data_offsets": [0, b.numel() * 2]},
              f"{key}.lora_A.weight": {"dtype": "F32", "shape": [4, 64],
                                      "data_offsets": [b.numel() * 2 + 2,
                                                       b.numel() * 2 + 2 + a.numel() * 4]}}
    tmp_path.joinpath("m").mkdir()
    write_raw_safetensors(tmp_path / "m" / WEIGHTS_FILE, header,
                          b.numpy().tobytes() + b"\0\0" + a.numpy().tobytes())
    spec = AdapterSpec("m", str(tmp_path / "m"), 4, 8.0, False, ("q_proj",))
    (got_a, got_b), = read_adapter_weights(spec, *base).values()
    assert torch.equal(got_a, a) and torch.equal(got_b, b.float() * 2.0)


def test_weights_are_read_not_memory_mapped(adapter_dir: Path, base,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors' safe_open maps the file: truncating it then kills the process (SIGBUS)."""
    import safetensors

    def no_mmap(*args, **kwargs):
        raise AssertionError("safe_open maps the file")

    monkeypatch.setattr(safetensors, "safe_open", no_mmap)
    spec = read_adapter_spec("a", adapter_dir)
    check_adapter_shapes(spec, *base)
    assert len(read_adapter_weights(spec, *base)) == 2 * len(LORA_MODULES)


def test_huge_layer_index_is_invalid_argument(adapter_dir: Path, base) -> None:
    """int() of over 4300 digits raises ValueError: such a name must not get that far."""
    name = f"{PREFIX}.{'9' * 5000}.self_attn.q_proj.lora_A.weight"
    edit_tensors(adapter_dir, lambda t: {**t, name: torch.zeros(4, 64)})
    raises_invalid(check_adapter_shapes, read_adapter_spec("a", adapter_dir), *base,
                   match="is not a LoRA A/B weight")


def test_oversize_header_is_refused(adapter_dir: Path, base) -> None:
    spec = read_adapter_spec("a", adapter_dir)
    write_raw_safetensors(adapter_dir / WEIGHTS_FILE, b"{}" + b" " * (9 << 20))
    raises_invalid(read_adapter_weights, spec, *base, match="-byte header in a")


@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE])
def test_random_corruption_only_ever_raises_our_errors(adapter_dir: Path, base,
                                                       name: str) -> None:
    """Flips bytes at random (seeded): every outcome is a spec/weights or an EdgeLoraError, never
    another exception."""
    file = adapter_dir / name
    original = file.read_bytes()
    gen = random.Random(0)
    outcomes: dict[str, int] = {}
    for _ in range(150):
        data = bytearray(original)
        span = 300 if gen.random() < 0.7 else len(data)  # mostly the JSON / header
        for _ in range(gen.randint(1, 4)):
            data[gen.randrange(min(span, len(data)))] = gen.randrange(256)
        file.write_bytes(bytes(data[:gen.randrange(len(data) + 1)] if gen.random() < 0.2
                               else data))
        try:
            read_adapter_weights(read_adapter_spec("a", adapter_dir), *base)
            outcome = "ok"
        except EdgeLoraError as exc:
            outcome = type(exc).__name__
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("InvalidArgument"), outcomes
