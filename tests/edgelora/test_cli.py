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
