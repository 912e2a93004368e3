"""edgelora.cli: `serve` turns the OpenAI-compatible HTTP port on by default, `router` does not;
the flag and EDGELORA_HTTP_PORT win over that default."""

from __future__ import annotations

import pytest

from common.config import config_from_args
from edgelora.cli import build_parser, serve_configs
from router.config import SERVE_HTTP_PORT, RouterConfig


@pytest.fixture(autouse=True)
def no_edgelora_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EDGELORA_HTTP_PORT", "EDGELORA_STATE_DIR", "EDGELORA_INTERNAL_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_serve_has_http_on_by_default_and_router_off() -> None:
    _, router = serve_configs(build_parser().parse_args(["serve"]))
    assert router.http_port == SERVE_HTTP_PORT == 8000
    assert router.http_bind_host == router.host == "127.0.0.1"
    standalone = config_from_args(RouterConfig, build_parser().parse_args(["router"]))
    assert standalone.http_port == 0


def test_flag_and_env_set_the_http_port(monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["serve", "--http-port", "0"]
    assert serve_configs(build_parser().parse_args(args))[1].http_port == 0
    args = ["router", "--http-port", "8001", "--http-host", "0.0.0.0"]
    router = config_from_args(RouterConfig, build_parser().parse_args(args))
    assert (router.http_port, router.http_bind_host, router.host) == (8001, "0.0.0.0",
                                                                      "127.0.0.1")
    monkeypatch.setenv("EDGELORA_HTTP_PORT", "9001")
    assert serve_configs(build_parser().parse_args(["serve"]))[1].http_port == 9001


@pytest.mark.parametrize(("fields", "message"), [
    ({"http_port": -1}, "--http-port"), ({"http_port": 70000}, "--http-port"),
    ({"http_port": 50051, "port": 50051}, "differ")])
def test_bad_http_ports_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RouterConfig(**fields)


def test_outcome_flags_reach_serve_and_router(monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["serve", "--outcome-exploration", "0.2", "--outcome-max-reports", "10",
            "--outcome-window-s", "60"]
    router = serve_configs(build_parser().parse_args(args))[1]
    assert (router.outcome_exploration, router.outcome_max_reports,
            router.outcome_window_s) == (0.2, 10, 60.0)
    monkeypatch.setenv("EDGELORA_OUTCOME_EXPLORATION", "0")
    router = config_from_args(RouterConfig, build_parser().parse_args(["router"]))
    assert router.outcome_exploration == 0.0 and router.outcome_max_reports == 4096
    for bad in ({"outcome_exploration": 1.5}, {"outcome_max_reports": -1},
                {"outcome_window_s": 0}):
        with pytest.raises(ValueError, match="--outcome"):
            RouterConfig(**bad)


def test_flags_are_not_abbreviated() -> None:
    """`router train --out` is train's own flag, not a prefix of the router's --outcome-*."""
    args = build_parser().parse_args(["router", "train", "--labels", "l.jsonl", "--out", "h.pt"])
    assert args.out == "h.pt"
    args = build_parser().parse_args(["outcome", "0123abcd", "0.5", "--address", "h:1"])
    assert (args.request_id, args.reward, args.address) == ("0123abcd", 0.5, "h:1")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--outcome-explo", "0.1"])
