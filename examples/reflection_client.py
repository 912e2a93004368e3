"""A grpcurl-like client that knows nothing of edgelora: no stubs, no .proto files. It learns the
services and message types from the server's reflection service and builds the messages at run
time. Needs only grpcio, grpcio-reflection and protobuf.

    python examples/reflection_client.py localhost:50051 list
    python examples/reflection_client.py localhost:50051 describe edgelora.v1.Router
    python examples/reflection_client.py localhost:50051 call edgelora.v1.Router/GenerateStream \\
        '{"messages": [{"role": "user", "content": "What is the capital of France?"}]}'

A server with TLS and API keys, as with grpcurl:

    python examples/reflection_client.py -cacert ca.pem -H "authorization: Bearer $KEY" \
        localhost:50051 call edgelora.v1.Router/ListAdapters

`call` prints each response as one line of proto JSON (field names in lowerCamelCase, as grpcurl
prints them); on an error it prints the status code and message to stderr and exits 1.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

_SCALAR_NAMES = {value: name[len("TYPE_"):].lower()
                 for name, value in vars(FieldDescriptor).items() if name.startswith("TYPE_")}


def _type_name(field: FieldDescriptor) -> str:
    named = field.message_type or field.enum_type
    return named.full_name if named else _SCALAR_NAMES[field.type]


class ReflectionClient:
    """Calls any method of a server with reflection, request and reply built from descriptors."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.database = ProtoReflectionDescriptorDatabase(channel)
        # A pool of its own: only what the server describes, never generated code in this process.
        self.pool = descriptor_pool.DescriptorPool(self.database)

    def services(self) -> list[str]:
        return sorted(self.database.get_services())

    def describe(self, symbol: str) -> list[str]:
        """A service's methods ('Method(Input) returns (stream Output)') or a message's fields."""
        try:
            methods = self.pool.FindServiceByName(symbol).methods
        except KeyError:
            fields = self.pool.FindMessageTypeByName(symbol).fields
            return [f"{f.name} = {f.number}: {'repeated ' if f.is_repeated else ''}"
                    f"{_type_name(f)}" for f in fields]
        return [f"{m.name}({'stream ' if m.client_streaming else ''}{m.input_type.full_name}) "
                f"returns ({'stream ' if m.server_streaming else ''}{m.output_type.full_name})"
                for m in methods]

    def message_classes(self, full_method: str) -> tuple[type, type, bool]:
        """'pkg.Service/Method' -> (request class, response class, server streams?)."""
        service, _, name = full_method.rpartition("/")
        method = self.pool.FindServiceByName(service).FindMethodByName(name)
        if method is None:
            raise LookupError(f"{service} has no method {name!r}")
        if method.client_streaming:
            raise NotImplementedError("client-streaming methods are not supported here")
        return (message_factory.GetMessageClass(method.input_type),
                message_factory.GetMessageClass(method.output_type), method.server_streaming)

    def call(self, full_method: str, body: str = "{}", timeout_s: float = 300.0,
             metadata: tuple[tuple[str, str], ...] = ()):
        """Yields the response messages of one call; `body` is the request in proto JSON."""
        request_cls, response_cls, streams = self.message_classes(full_method)
        request = json_format.Parse(body, request_cls())
        path = "/" + full_method
        kwargs = {"request_serializer": request_cls.SerializeToString,
                  "response_deserializer": response_cls.FromString}
        if streams:
            yield from self.channel.unary_stream(path, **kwargs)(request, timeout=timeout_s,
                                                                 metadata=metadata)
        else:
            yield self.channel.unary_unary(path, **kwargs)(request, timeout=timeout_s,
                                                           metadata=metadata)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-cacert", default="", help="TLS: trust this PEM certificate bundle")
    parser.add_argument("-H", dest="headers", action="append", default=[],
                        help="'name: value' metadata sent with each call (repeatable)")
    parser.add_argument("address", help="host:port of a server with reflection")
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("list", help="services the server offers")
    describe = sub.add_parser("describe", help="methods of a service or fields of a message")
    describe.add_argument("symbol", help="e.g. edgelora.v1.Router or edgelora.v1.GenerateRequest")
    call = sub.add_parser("call", help="call Service/Method with a JSON request")
    call.add_argument("method", help="e.g. edgelora.v1.Router/GenerateStream")
    call.add_argument("body", nargs="?", default="{}", help="request as proto JSON")
    call.add_argument("--timeout-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    metadata = tuple((name.strip().lower(), value.strip()) for name, _, value in
                     (header.partition(":") for header in args.headers))
    if args.cacert:
        with open(args.cacert, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(args.address, credentials)
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        client = ReflectionClient(channel)
        try:
            if args.verb == "list":
                print("\n".join(client.services()))
            elif args.verb == "describe":
                print("\n".join(client.describe(args.symbol)))
            else:
                for reply in client.call(args.method, args.body, args.timeout_s, metadata):
                    print(json_format.MessageToJson(reply, indent=None), flush=True)
        except grpc.RpcError as exc:
            print(f"ERROR: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except (KeyError, LookupError, json_format.ParseError) as exc:
            print(f"ERROR: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
