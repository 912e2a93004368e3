"""The `edgelora` command: serve (router + worker in one process), worker, router, generate,
import-default."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from common.config import add_config_args, config_from_args
from common.logging import setup_logging
from router.config import RouterConfig
from worker.config import WorkerConfig

log = logging.getLogger("edgelora")


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")


async def _serve(worker_config: WorkerConfig | None, router_config: RouterConfig | None) -> None:
    from router.server import start_router
    from worker.server import start_worker

    runtimes = []
    if worker_config is not None:
        worker = await start_worker(worker_config)
        runtimes.append(worker)
        if router_config is not None and worker_config.port == 0:
            address = f"{worker_config.host}:{worker.port}"
            router_config = RouterConfig(**{**router_config.__dict__, "workers": address})
    if router_config is not None:
        runtimes.append(await start_router(router_config))
        log.info("ready: clients connect to %s:%d (edgelora.v1.Router)", router_config.host,
                 runtimes[-1].port)
    await _until_signal()
    for runtime in reversed(runtimes):
        await runtime.stop()


def _cmd_serve(args: argparse.Namespace) -> None:
    worker = config_from_args(WorkerConfig, args, host="127.0.0.1", port=args.worker_port)
    router = config_from_args(RouterConfig, args, workers=f"127.0.0.1:{args.worker_port}")
    setup_logging(router.log_level)
    asyncio.run(_serve(worker, router))


def _cmd_worker(args: argparse.Namespace) -> None:
    config = config_from_args(WorkerConfig, args)
    setup_logging(config.log_level)
    asyncio.run(_serve(config, None))


def _cmd_router(args: argparse.Namespace) -> None:
    config = config_from_args(RouterConfig, args)
    setup_logging(config.log_level)
    asyncio.run(_serve(None, config))


def _cmd_import_default(args: argparse.Namespace) -> None:
    from worker.gguf_import import ensure_default_checkpoint

    setup_logging("INFO")
    config = config_from_args(WorkerConfig, args)
    print(ensure_default_checkpoint(config.cache_path))


def _cmd_generate(args: argparse.Namespace) -> None:
    from edgelora.client import generate_to

    sys.exit(generate_to(sys.stdout, args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgelora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="router + one worker in one process (one box)")
    add_config_args(serve, RouterConfig, skip=("workers",))
    add_config_args(serve, WorkerConfig, skip=("host", "port", "log_level"))
    serve.add_argument("--worker-port", type=int, default=0,
                       help="internal worker port on 127.0.0.1 (default 0: any free port)")
    serve.set_defaults(func=_cmd_serve)
    worker = sub.add_parser("worker", help="one worker process (device, model, decode loop)")
    add_config_args(worker, WorkerConfig)
    worker.set_defaults(func=_cmd_worker)
    router = sub.add_parser("router", help="the public router in front of --workers")
    add_config_args(router, RouterConfig)
    router.set_defaults(func=_cmd_router)
    imp = sub.add_parser("import-default", help="dequantize the embedded SmolLM2 GGUF once")
    add_config_args(imp, WorkerConfig, skip=tuple(
        f for f in WorkerConfig.__dataclass_fields__ if f != "cache_dir"))
    imp.set_defaults(func=_cmd_import_default)
    gen = sub.add_parser("generate", help="stream one generation from a router")
    gen.add_argument("prompt", help="prompt text (a user message with --chat)")
    gen.add_argument("--address", default="127.0.0.1:50051", help="router host:port")
    gen.add_argument("--chat", action="store_true", help="send as a chat message (chat template)")
    gen.add_argument("--adapter-id", default="", help="'' = base model, 'auto' = selector")
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--timeout-s", type=float, default=300.0)
    gen.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # config and path mistakes: say what to fix
        print(f"edgelora {args.command}: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])

