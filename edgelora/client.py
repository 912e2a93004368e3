"""A small streaming client of the public Router API, used by `edgelora generate` and the tests."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TextIO

import grpc

from edgelora.v1 import router_pb2_grpc, types_pb2


def build_request(prompt: str, chat: bool = False, adapter_id: str = "",
                  **params: object) -> types_pb2.GenerateRequest:
    """params: SamplingParams fields; None values stay unset (server defaults)."""
    sampling = types_pb2.SamplingParams(**{k: v for k, v in params.items() if v is not None})
    if chat:
        return types_pb2.GenerateRequest(
            messages=[types_pb2.ChatMessage(role="user", content=prompt)], adapter_id=adapter_id,
            params=sampling)
    return types_pb2.GenerateRequest(prompt=prompt, adapter_id=adapter_id, params=sampling)


def open_channel(address: str, tls_ca: str = "") -> grpc.Channel:
    """A channel to the router: TLS trusting the PEM bundle `tls_ca` when given, else plain."""
    if tls_ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
        return grpc.secure_channel(address, credentials)
    return grpc.insecure_channel(address)


def auth_metadata(api_key: str | None = None) -> tuple[tuple[str, str], ...]:
    """`authorization: Bearer <key>` for `api_key`, else EDGELORA_API_KEY; () when neither."""
    key = api_key or os.environ.get("EDGELORA_API_KEY", "")
    return (("authorization", f"Bearer {key}"),) if key else ()


def generate_to(out: TextIO, args: argparse.Namespace) -> int:
    """Streams one generation to `out`; returns the process exit code."""
    request = build_request(args.prompt, args.chat, args.adapter_id, max_tokens=args.max_tokens,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, stop=args.stop or None)
    with open_channel(args.address, args.tls_ca) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        try:
            last = None
            for last in stub.GenerateStream(request, timeout=args.timeout_s,
                                            metadata=auth_metadata(args.api_key)):
                out.write(last.text)
                out.flush()
        except grpc.RpcError as exc:
            out.write(f"\nerror: {exc.code().name}: {exc.details()}\n")
            return 1
    if last is not None:
        out.write(f"\n[{last.finish_reason}; {last.usage.prompt_tokens} prompt + "
                  f"{last.usage.completion_tokens} completion tokens; adapter "
                  f"{last.adapter_id or 'base'}]\n")
    return 0
