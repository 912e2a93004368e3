"""The OpenAI-compatible HTTP front under the suite's keys and TLS: HTTPS with the public port's
certificate only, the same API keys as gRPC, and a tenant sees and uses only its own and shared
adapters there too (another tenant's is a 404, exactly like an unknown one)."""

from __future__ import annotations

import ssl

import httpx2 as httpx
import pytest

from tests.conftest import write_random_adapter
from tests.security.helpers import RANK, SHARED_AT_START, greedy, register, stream

CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def https(sec):
    context = ssl.create_default_context(cadata=sec.cert.decode())
    with httpx.Client(base_url=f"https://localhost:{sec.http_port}", verify=context,
                      timeout=60) as client:
        yield client


def bearer(sec, tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {sec.keys[tenant]}"}


def test_http_speaks_tls_only(sec, https) -> None:
    assert https.get("/health").status_code == 200
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{sec.http_port}/health", timeout=10)


def test_the_same_keys_as_grpc(sec, https) -> None:
    for headers in ({}, {"Authorization": "Bearer k-nobody-0123456789abcdef"},
                    {"Authorization": "Basic b3BzOnNlY3JldA=="}):
        for method, path, body in (("POST", "/v1/chat/completions", CHAT),
                                   ("POST", "/v1/completions", {"prompt": "Hi"}),
                                   ("GET", "/v1/models", None),
                                   ("POST", "/tokenize", {"prompt": "Hi"})):
            reply = https.request(method, path, json=body, headers=headers)
            assert reply.status_code == 401, (path, headers, reply.text)
            assert reply.json()["error"]["type"] == "authentication_error"
    reply = https.post("/v1/chat/completions", json=CHAT, headers=bearer(sec, "acme"))
    assert reply.status_code == 200, reply.text


def test_tenants_see_and_use_only_theirs_over_http(sec, https) -> None:
    path = write_random_adapter(sec.root / "http-acme-own", sec.base_dir, rank=RANK, seed=140)
    code, details, _ = register(sec.router(), sec.auth("ops"), "http-acme-own", path,
                                tenant="acme")
    assert code.name == "OK", details
    seen = {t: [m["id"] for m in https.get("/v1/models", headers=bearer(sec, t)).json()["data"]]
            for t in ("acme", "beta")}
    assert "http-acme-own" in seen["acme"] and "http-acme-own" not in seen["beta"]
    assert SHARED_AT_START in seen["acme"] and SHARED_AT_START in seen["beta"]
    own = https.post("/v1/chat/completions", headers=bearer(sec, "acme"),
                     json={**CHAT, "model": "http-acme-own"})
    assert own.status_code == 200 and own.json()["model"] == "http-acme-own"
    # the same tokens as gRPC for the same request: one path behind both protocols
    _, _, _, text = stream(sec.router(), greedy("Once upon", "http-acme-own", 4),
                           sec.auth("acme"))
    legacy = https.post("/v1/completions", headers=bearer(sec, "acme"), json={
        "model": "http-acme-own", "prompt": "Once upon", "max_tokens": 4, "temperature": 0,
        "ignore_eos": True})
    assert legacy.json()["choices"][0]["text"] == text
    for model in ("http-acme-own", "never-registered"):
        other = https.post("/v1/chat/completions", headers=bearer(sec, "beta"),
                           json={**CHAT, "model": model})
        assert other.status_code == 404
        assert other.json()["error"]["code"] == "model_not_found"
