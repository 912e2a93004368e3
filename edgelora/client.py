"""A small streaming client of the public Router API, used by `edgelora generate` and the tests."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO, TypeVar

import grpc

from edgelora.v1 import router_pb2, router_pb2_grpc, types_pb2

T = TypeVar("T")


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
                  f"{last.adapter_id or 'base'}; request {last.request_id}]\n")
    return 0


def call_router(out: TextIO, args: argparse.Namespace,
                call: Callable[[router_pb2_grpc.RouterStub, tuple[tuple[str, str], ...]], T]
                ) -> T | None:
    """call(stub, metadata) on the router `args` names (--address, --tls-ca, --api-key); None
    after writing its gRPC error to `out` (the client commands then exit 1)."""
    with open_channel(args.address, args.tls_ca) as channel:
        try:
            return call(router_pb2_grpc.RouterStub(channel), auth_metadata(args.api_key))
        except grpc.RpcError as exc:
            out.write(f"error: {exc.code().name}: {exc.details()}\n")
            return None


def report_outcome_to(out: TextIO, args: argparse.Namespace) -> int:
    """`edgelora outcome REQUEST_ID REWARD`: tells the router how good a generation was."""
    reply = call_router(out, args, lambda stub, metadata: stub.ReportOutcome(
        router_pb2.ReportOutcomeRequest(request_id=args.request_id, reward=args.reward),
        timeout=args.timeout_s, metadata=metadata))
    if reply is None:
        return 1
    out.write(f"reported {args.reward:g} for adapter {reply.adapter_id or 'base'} "
              f"({reply.reports_kept} reports kept for 'auto')\n")
    return 0


UPLOAD_FILES = ("adapter_config.json", "adapter_model.safetensors", "card.json")
UPLOAD_CHUNK_BYTES = 1 << 20  # well under gRPC's 4 MiB message limit


def upload_messages(folder: str | Path, header: router_pb2.UploadAdapterHeader
                    ) -> Iterator[router_pb2.UploadAdapterRequest]:
    """The UploadAdapter stream of a PEFT directory: the header, then each file (card.json
    when there is one) in 1 MiB chunks."""
    yield router_pb2.UploadAdapterRequest(header=header)
    for name in UPLOAD_FILES:
        path = Path(folder) / name
        if name == "card.json" and not path.is_file():
            continue
        with open(path, "rb") as f:
            while chunk := f.read(UPLOAD_CHUNK_BYTES):
                yield router_pb2.UploadAdapterRequest(
                    chunk=types_pb2.AdapterFileChunk(file_name=name, data=chunk))


def upload_to(out: TextIO, args: argparse.Namespace) -> int:
    """`edgelora adapters upload DIR --id X`: uploads and registers; -> the exit code."""
    header = router_pb2.UploadAdapterHeader(
        adapter_id=args.id, description=args.description or "",
        example_prompts=args.example_prompt, replace=args.replace, tenant=args.tenant or "",
        shared=args.shared, kind=getattr(args, "kind", "") or "")
    reply = call_router(out, args, lambda stub, metadata: stub.UploadAdapter(
        upload_messages(args.dir, header), timeout=args.timeout_s, metadata=metadata))
    if reply is None:
        return 1
    adapter = reply.adapter
    out.write(f"registered {adapter.adapter_id!r} (rank {adapter.rank}, digest "
              f"{adapter.digest[:12]}, {'shared' if adapter.shared else adapter.tenant or 'yours'})"
              "\n")
    return 0


def list_adapters(stub: router_pb2_grpc.RouterStub, metadata: Sequence[tuple[str, str]] = (),
                  timeout_s: float = 30.0, page_size: int = 0) -> Iterator[types_pb2.AdapterInfo]:
    """Every adapter the caller may see, following ListAdapters' pages (ordered by tenant, then
    id; 0 = the server's page size)."""
    token = ""
    while True:
        reply = stub.ListAdapters(types_pb2.ListAdaptersRequest(page_size=page_size,
                                                                page_token=token),
                                  timeout=timeout_s, metadata=metadata)
        yield from reply.adapters
        token = reply.next_page_token
        if not token:
            return


def remove_to(out: TextIO, args: argparse.Namespace) -> int:
    """`edgelora adapters remove ID`: unregisters it (its files go once nothing uses them);
    -> the exit code."""
    request = types_pb2.UnregisterAdapterRequest(adapter_id=args.id, tenant=args.tenant or "",
                                                 shared=args.shared)
    if call_router(out, args, lambda stub, metadata: stub.UnregisterAdapter(
            request, timeout=args.timeout_s, metadata=metadata)) is None:
        return 1
    out.write(f"removed {args.id!r}\n")
    return 0


TIERS = {types_pb2.ADAPTER_TIER_DEVICE: "device", types_pb2.ADAPTER_TIER_HOST: "host",
         types_pb2.ADAPTER_TIER_DISK: "disk"}


def list_to(out: TextIO, args: argparse.Namespace) -> int:
    """`edgelora adapters list`: one line an adapter (every page); -> the exit code."""
    adapters = call_router(out, args, lambda stub, metadata: list(
        list_adapters(stub, metadata, args.timeout_s)))
    if adapters is None:
        return 1
    out.write(f"{'ADAPTER':24} {'TENANT':16} {'RANK':>4} {'TIER':6} {'VER':>3} DESCRIPTION\n")
    for a in adapters:
        owner = "(shared)" if a.shared else a.tenant or "-"
        description = " ".join(a.description.split())
        out.write(f"{a.adapter_id:24} {owner:16} {a.rank:4d} {TIERS.get(a.tier, '?'):6} "
                  f"{a.version:3d} {description[:60]}\n")
    out.write(f"{len(adapters)} adapters\n")
    return 0
