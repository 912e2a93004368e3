"""Serves an ASGI app with uvicorn on the running asyncio loop (the router's, beside its gRPC
server), over TLS when given the public port's certificate; start and stop only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

log = logging.getLogger(__name__)
START_TIMEOUT_S = 30.0


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The process's own handlers (edgelora/cli.py) stop the router, this server included;
        # uvicorn's would replace them and stop only the HTTP side.
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port (IPv6 too); the error says what to fix."""
    host = host.strip("[]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port} for HTTP: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} for HTTP ({exc.strerror}): is the port "
                      "in use? Choose another --http-port, or 0 for no HTTP") from None
    return sock


class HttpServer:
    """uvicorn on the current loop; `port` is the bound one (for a requested 0)."""

    def __init__(self, app: object, host: str, port: int,
                 tls: tuple[str, str] | None = None) -> None:
        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        cert, key = tls or (None, None)
        # log_config None: keep the process's logging, uvicorn's own chatter at warning; no
        # access log (a line per request costs the hot path and may carry what users sent)
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                                lifespan="off", ws="none", ssl_certfile=cert, ssl_keyfile=key)
        self.server = _EmbeddedServer(config)
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while not self.server.started:
            if self.task.done():  # a start failure (the TLS files, say): raise it here
                self.task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"the HTTP server did not start in {START_TIMEOUT_S:g} s")
            await asyncio.sleep(0.01)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stops taking connections; requests still running get `grace_s`, then are cut."""
        if self.task is None:
            self.sock.close()
            return
        # at least a moment: uvicorn's timeout of 0 expires before it even sees that nothing
        # runs, and logs an error
        self.server.config.timeout_graceful_shutdown = max(grace_s, 0.5)
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.sock.close()
