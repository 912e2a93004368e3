"""Tests for common.config (flags and EDGELORA_* env from dataclasses) and the config validators."""

from __future__ import annotations

import argparse
import dataclasses
import os

import pytest

from common.config import add_config_args, config_from_args
from common.shared_config import SHARED_FIELDS
from router.config import RouterConfig
from worker.config import WorkerConfig


@dataclasses.dataclass(frozen=True)
class Demo:
    flag: bool = False
    count: int = 3
    ratio: float = 0.5
    name: str = "x"
    maybe: int | None = None
    derived: int = dataclasses.field(default=0, init=False)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No EDGELORA_* from the caller's shell may leak into these tests."""
    for name in list(os.environ):
        if name.startswith("EDGELORA_"):
            monkeypatch.delenv(name)


def parse(cls: type, argv: list[str], skip: tuple[str, ...] = ()) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="test", exit_on_error=False)
    add_config_args(parser, cls, skip=skip)
    return parser.parse_args(argv)


def build(cls: type, argv: list[str], **overrides):
    return config_from_args(cls, parse(cls, argv), **overrides)


# --- precedence --------------------------------------------------------------------------------


def test_defaults_when_nothing_is_set() -> None:
    assert build(Demo, []) == Demo()
    assert build(WorkerConfig, []) == WorkerConfig()
    assert build(RouterConfig, []) == RouterConfig()


def test_flag_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELORA_MAX_BATCH_SIZE", "4")
    cfg = build(WorkerConfig, ["--max-batch-size", "8"])
    assert cfg.max_batch_size == 8, cfg


def test_falsy_flag_still_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELORA_PORT", "6000")
    monkeypatch.setenv("EDGELORA_FLAG", "true")
    assert build(WorkerConfig, ["--port", "0"]).port == 0
    assert build(Demo, ["--flag", "false"]).flag is False


def test_env_wins_over_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELORA_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("EDGELORA_DEVICE", "cpu")
    monkeypatch.setenv("EDGELORA_WORKERS", "a:1,b:2")
    cfg = build(WorkerConfig, [])
    assert (cfg.max_batch_size, cfg.device) == (4, "cpu"), cfg
    assert build(RouterConfig, []).worker_addresses == ["a:1", "b:2"]


def test_env_converts_every_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in [("FLAG", "yes"), ("COUNT", "7"), ("RATIO", "0.25"), ("NAME", "hello"),
                        ("MAYBE", "9")]:
        monkeypatch.setenv(f"EDGELORA_{name}", value)
    cfg = build(Demo, [])
    assert (cfg.flag, cfg.count, cfg.ratio, cfg.name, cfg.maybe) == (True, 7, 0.25, "hello", 9)


def test_flags_convert_every_kind() -> None:
    cfg = build(Demo, ["--flag", "on", "--count", "5", "--ratio", "1.5", "--name", "n",
                       "--maybe", "2"])
    assert (cfg.flag, cfg.count, cfg.ratio, cfg.name, cfg.maybe) == (True, 5, 1.5, "n", 2)


def test_overrides_win_over_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELORA_COUNT", "7")
    assert build(Demo, ["--count", "5"], count=11).count == 11


def test_empty_env_string_is_used_for_str_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELORA_NAME", "")
    assert build(Demo, []).name == ""


def test_non_init_fields_get_no_flag_and_ignore_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELORA_DERIVED", "5")
    parser = argparse.ArgumentParser(prog="test")
    add_config_args(parser, Demo)
    _, unknown = parser.parse_known_args(["--derived", "1"])
    assert unknown == ["--derived", "1"]
    assert build(Demo, []).derived == 0


# --- bools and bad values ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True), (" True ", True),
    ("0", False), ("false", False), ("False", False), ("no", False), ("off", False),
])
def test_bool_parsing(monkeypatch: pytest.MonkeyPatch, text: str, expected: bool) -> None:
    assert build(Demo, ["--flag", text]).flag is expected
    monkeypatch.setenv("EDGELORA_FLAG", text)
    assert build(Demo, []).flag is expected


def test_bad_bool_flag_is_an_argparse_error() -> None:
    with pytest.raises(argparse.ArgumentError, match="maybe"):
        parse(Demo, ["--flag", "maybe"])


@pytest.mark.parametrize(("name", "value", "cls"), [
    ("EDGELORA_FLAG", "maybe", Demo),
    ("EDGELORA_COUNT", "three", Demo),
    ("EDGELORA_RATIO", "half", Demo),
    ("EDGELORA_MAX_BATCH_SIZE", "abc", WorkerConfig),
    ("EDGELORA_PORT", "80.5", RouterConfig),
])
def test_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                          cls: type) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name) as info:
        build(cls, [])
    assert repr(value) in str(info.value), str(info.value)


def test_bad_env_value_is_ignored_when_the_flag_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELORA_COUNT", "three")
    assert build(Demo, ["--count", "4"]).count == 4


def test_bad_int_flag_is_an_argparse_error() -> None:
    with pytest.raises(argparse.ArgumentError):
        parse(WorkerConfig, ["--max-batch-size", "lots"])


# --- help and skip -----------------------------------------------------------------------------


def test_help_names_default_and_env_variable() -> None:
    parser = argparse.ArgumentParser(prog="test")
    add_config_args(parser, WorkerConfig)
    text = parser.format_help()
    for expected in ("--max-batch-size", "--kv-cache-mb", "EDGELORA_MAX_BATCH_SIZE",
                     "most sequences in one forward pass"):
        assert expected in text, f"{expected!r} missing from help:\n{text}"


def test_skip_omits_flags() -> None:
    parser = argparse.ArgumentParser(prog="test")
    add_config_args(parser, WorkerConfig, skip=("host", "port", "log_level"))
    options = {s for action in parser._actions for s in action.option_strings}
    assert "--host" not in options and "--port" not in options and "--log-level" not in options
    assert "--max-batch-size" in options
    _, unknown = parser.parse_known_args(["--port", "1"])
    assert unknown == ["--port", "1"]


def test_skipped_field_falls_back_to_override_env_or_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse(WorkerConfig, [], skip=("port",))
    assert not hasattr(args, "port")
    assert config_from_args(WorkerConfig, args).port == WorkerConfig().port
    assert config_from_args(WorkerConfig, args, port=7000).port == 7000
    monkeypatch.setenv("EDGELORA_PORT", "6001")
    assert config_from_args(WorkerConfig, args).port == 6001


def test_two_configs_share_one_parser() -> None:
    parser = argparse.ArgumentParser(prog="test")
    add_config_args(parser, RouterConfig, skip=("workers",))
    add_config_args(parser, WorkerConfig, skip=("host", "port", "log_level", *SHARED_FIELDS))
    args = parser.parse_args(["--port", "9000", "--max-batch-size", "2", "--log-level", "DEBUG",
                              "--max-stop-strings", "3"])
    router = config_from_args(RouterConfig, args, workers="127.0.0.1:9001")
    worker = config_from_args(WorkerConfig, args, host="127.0.0.1", port=9001)
    assert (router.port, router.log_level, router.workers) == (9000, "DEBUG", "127.0.0.1:9001")
    assert (worker.port, worker.max_batch_size, worker.log_level) == (9001, 2, "DEBUG")
    # a SharedConfig flag, given once, reaches both processes
    assert router.max_stop_strings == worker.max_stop_strings == 3


# --- WorkerConfig / RouterConfig validation ----------------------------------------------------


@pytest.mark.parametrize(("fields", "message"), [
    ({"max_batch_size": 0}, "--max-batch-size"),
    ({"max_batch_size": 32, "max_num_batched_tokens": 16}, "--max-num-batched-tokens"),
    ({"kv_block_size": 0}, "--kv-block-size"),
    ({"kv_cache_mb": 0}, "--kv-cache-mb"),
    ({"max_model_len": 1}, "--max-model-len"),
    ({"max_queue": 0}, "--max-queue"),
    ({"num_threads": -1}, "--num-threads"),
    ({"port": -1}, "--port"),
    ({"port": 65536}, "--port"),
    ({"dtype": "float8"}, "--dtype"),
    ({"device": "tpu"}, "--device"),
])
def test_worker_config_rejects_bad_values(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkerConfig(**fields)


@pytest.mark.parametrize("fields", [
    {"max_batch_size": 1, "max_num_batched_tokens": 1},
    {"port": 0}, {"port": 65535},
    {"device": "cpu"}, {"device": "cuda"}, {"device": "cuda:1"},
    {"dtype": "bfloat16"}, {"dtype": "float16"}, {"dtype": "float32"},
])
def test_worker_config_accepts_edge_values(fields: dict) -> None:
    WorkerConfig(**fields)


def test_bad_flag_value_fails_validation_through_config_from_args() -> None:
    with pytest.raises(ValueError, match="--max-batch-size"):
        build(WorkerConfig, ["--max-batch-size", "0"])


def test_worker_cache_path(tmp_path) -> None:
    assert WorkerConfig(cache_dir=str(tmp_path)).cache_path == tmp_path
    assert WorkerConfig().cache_path.name == "edgelora"


@pytest.mark.parametrize(("workers", "message"), [
    ("", "at least one worker"),
    (" , ", "at least one worker"),
    ("localhost", "not host:port"),
    ("localhost:", "not host:port"),
    (":50052", "not host:port"),
    ("host:abc", "not host:port"),
    ("a:1,b", "'b' is not host:port"),
])
def test_router_config_rejects_bad_workers(workers: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RouterConfig(workers=workers)


@pytest.mark.parametrize("port", [-1, 65536])
def test_router_config_rejects_bad_port(port: int) -> None:
    with pytest.raises(ValueError, match="--port"):
        RouterConfig(port=port)


def test_router_worker_addresses_are_stripped() -> None:
    cfg = RouterConfig(workers=" a:1 , b.example:2,,[::1]:3 ")
    assert cfg.worker_addresses == ["a:1", "b.example:2", "[::1]:3"]


def test_bad_workers_env_fails_with_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELORA_WORKERS", "nohost")
    with pytest.raises(ValueError, match="'nohost' is not host:port"):
        build(RouterConfig, [])
