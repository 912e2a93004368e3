"""The `edgelora` command: serve (router + worker in one process), worker, router, generate,
outcome, adapters upload, import-default."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import secrets
import signal
import sys

from common.config import add_config_args, config_from_args
from common.logging import setup_logging
from common.shared_config import SHARED_FIELDS
from router.config import SERVE_HTTP_PORT, RouterConfig
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

    runtimes, metrics = [], []
    if worker_config is not None:
        worker = await start_worker(worker_config)
        runtimes.append(worker)
        metrics.append(worker.metrics_registry)  # one /metrics page: router and worker
        if router_config is not None and worker_config.port == 0:
            address = f"{worker_config.host}:{worker.port}"
            router_config = dataclasses.replace(router_config, workers=address)
    if router_config is not None:
        router = await start_router(router_config, metrics)
        runtimes.append(router)
        log.info("ready: clients connect to %s:%d (edgelora.v1.Router)%s", router_config.host,
                 router.port, f" and {router_config.http_bind_host}:{router.http_port} (HTTP, "
                 "OpenAI-compatible /v1)" if router.http_port else "")
    await _until_signal()
    for runtime in reversed(runtimes):
        await runtime.stop()


DEFAULT_STATE_DIR = "~/.local/state/edgelora"


def serve_configs(args: argparse.Namespace) -> tuple[WorkerConfig, RouterConfig]:
    """`edgelora serve`'s two configs: one box's defaults (state kept, HTTP on, a fresh
    router <-> worker secret) where neither a flag nor EDGELORA_* sets them."""
    overrides = {}
    if args.state_dir is None and "EDGELORA_STATE_DIR" not in os.environ:
        overrides["state_dir"] = os.path.expanduser(DEFAULT_STATE_DIR)  # one box keeps its state
    if args.http_port is None and "EDGELORA_HTTP_PORT" not in os.environ:
        overrides["http_port"] = SERVE_HTTP_PORT  # one box: the OpenAI API is on by default
    router = config_from_args(RouterConfig, args, workers=f"127.0.0.1:{args.worker_port}",
                              **overrides)
    if not router.internal_secret:  # one process: a fresh secret keeps the worker port private
        router = dataclasses.replace(router, internal_token=secrets.token_urlsafe(32))
    worker = config_from_args(WorkerConfig, args, host="127.0.0.1", port=args.worker_port,
                              internal_token=router.internal_secret, internal_token_file="")
    return worker, router


def _cmd_serve(args: argparse.Namespace) -> None:
    worker, router = serve_configs(args)
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


def _cmd_outcome(args: argparse.Namespace) -> None:
    from edgelora.client import report_outcome_to

    sys.exit(report_outcome_to(sys.stdout, args))


def _cmd_adapters_upload(args: argparse.Namespace) -> None:
    from edgelora.client import upload_to

    sys.exit(upload_to(sys.stdout, args))


def _cmd_adapters_remove(args: argparse.Namespace) -> None:
    from edgelora.client import remove_to

    sys.exit(remove_to(sys.stdout, args))


def _cmd_adapters_list(args: argparse.Namespace) -> None:
    from edgelora.client import list_to

    sys.exit(list_to(sys.stdout, args))


def _cmd_router_profile(args: argparse.Namespace) -> None:
    from router.profiling import run_profile

    setup_logging("INFO")
    config = config_from_args(RouterConfig, args)
    adapters = [a for a in args.adapters.split(",") if a] if args.adapters else None
    labeled = asyncio.run(run_profile(
        config.worker_addresses, args.dataset, args.out, adapters, min_gain=args.min_gain,
        best_margin=args.best_margin, max_tokens=args.max_tokens, concurrency=args.concurrency,
        secret=config.internal_secret))
    counts: dict[str, int] = {}
    for row in labeled:
        for adapter_id in row["positives"] or [""]:
            counts[adapter_id] = counts.get(adapter_id, 0) + 1
    summary = ", ".join(f"{a or 'base only'}: {n}" for a, n in sorted(counts.items()))
    print(f"profiled {len(labeled)} prompts x {len(labeled[0]['adapter_ids'])} adapters -> "
          f"{args.out} (positives: {summary})")


def _cmd_router_train(args: argparse.Namespace) -> None:
    import torch

    from router.embedder import PromptEmbedder
    from router.head_training import HeadNotSaved, train

    setup_logging("INFO")
    config = config_from_args(RouterConfig, args)
    torch.set_num_threads(max(config.embedder_threads, torch.get_num_threads()))
    try:
        metrics = train(args.labels, args.out, holdout=args.holdout, epochs=args.epochs,
                        seed=args.seed, threshold=config.selector_threshold,
                        embedder=PromptEmbedder(dtype=config.embedder_dtype), force=args.force,
                        l2=args.l2)
    except HeadNotSaved as exc:
        print(_train_summary(exc.metrics))
        print(exc, file=sys.stderr)
        sys.exit(1)
    print(_train_summary(metrics))
    print(f"saved {args.out}: a router with --selector-head {args.out} reloads it on its next "
          "selection")


def _train_summary(metrics: dict) -> str:
    best_id = metrics["heldout_best_constant_id"]
    best = "the base model" if best_id == "" else repr(best_id)
    return (f"held-out ({metrics['heldout_rows']} prompts): decision accuracy "
            f"{metrics['heldout_accuracy']:.3f} (mean reward of the head's picks); best constant"
            f": always {best} {metrics['heldout_best_constant']:.3f} (the best on the training "
            f"prompts); oracle "
            f"{metrics['heldout_oracle']:.3f}; label F1 {metrics['heldout_f1']:.3f}\n"
            f"train ({metrics['train_rows']} prompts): decision accuracy "
            f"{metrics['train_accuracy']:.3f}; L2 {metrics['l2']:g}")


def _add_selector_commands(router: argparse.ArgumentParser) -> None:
    """`edgelora router profile|train`; plain `edgelora router [flags]` still runs the router."""
    sub = router.add_subparsers(dest="router_command", required=False, metavar="{profile,train}")
    profile = sub.add_parser("profile", help="label a dataset: score every adapter on every "
                             "prompt on the workers (Worker.Score / Generate + checker)")
    # SUPPRESS: unset here keeps a --workers given before `profile` (or EDGELORA_WORKERS)
    profile.add_argument("--workers", default=argparse.SUPPRESS, metavar="STR",
                         help="worker addresses host:port,... (as for the router)")
    profile.add_argument("--dataset", required=True, help="JSONL: prompt or messages, and "
                         "reference or checker ({\"regex\": ...} / {\"contains\": ...})")
    profile.add_argument("--out", required=True, help="labels JSONL to write")
    profile.add_argument("--adapters", default="", help="comma-separated adapter ids "
                         "(default: every adapter registered on the first worker)")
    profile.add_argument("--min-gain", type=float, default=0.1, help="nats/token an adapter "
                         "must gain over the base model to be a positive (default 0.1)")
    profile.add_argument("--best-margin", type=float, default=0.1, help="nats/token a positive "
                         "may trail the best adapter by (default 0.1)")
    profile.add_argument("--max-tokens", type=int, default=48,
                         help="tokens generated per adapter for checker rows (default 48)")
    profile.add_argument("--concurrency", type=int, default=4, help="prompts in flight")
    profile.set_defaults(func=_cmd_router_profile)
    train = sub.add_parser("train", help="fit the selector head on labels, print its held-out "
                           "score beside the best constant choice and the oracle, save it")
    train.add_argument("--labels", required=True, help="labels JSONL: from `router profile`, or "
                       "graded ({\"prompt\": ..., \"scores\": {adapter: reward in [0, 1]}})")
    train.add_argument("--out", required=True, help="head file to write (atomically)")
    train.add_argument("--holdout", type=float, default=0.2,
                       help="fraction of prompts held out for the score (default 0.2)")
    train.add_argument("--epochs", type=int, default=300)
    train.add_argument("--seed", type=int, default=0, help="split and init seed")
    train.add_argument("--l2", type=float, default=None, help="L2 strength (default: chosen "
                       "on an inner split of the training prompts)")
    train.add_argument("--force", action="store_true", help="save the head even when its "
                       "held-out picks score below always picking the best single adapter")
    train.set_defaults(func=_cmd_router_train)


class _Parser(argparse.ArgumentParser):
    """Every subcommand's parser: flags are spelled out (see build_parser)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    # no abbreviations: `router train --out` must not read as a prefix of --outcome-* flags
    parser = argparse.ArgumentParser(prog="edgelora", description=__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser("serve", help="router + one worker in one process (one box)")
    add_config_args(serve, RouterConfig, skip=("workers",))
    # SharedConfig fields come once, from RouterConfig's group: both configs read the same flag
    add_config_args(serve, WorkerConfig, skip=("host", "port", "log_level", *SHARED_FIELDS))
    serve.add_argument("--worker-port", type=int, default=0,
                       help="internal worker port on 127.0.0.1 (default 0: any free port)")
    serve.set_defaults(func=_cmd_serve)
    worker = sub.add_parser("worker", help="one worker process (device, model, decode loop)")
    add_config_args(worker, WorkerConfig)
    worker.set_defaults(func=_cmd_worker)
    router = sub.add_parser("router", help="the public router in front of --workers; "
                            "`router profile` / `router train` make the selector's head")
    add_config_args(router, RouterConfig)
    router.set_defaults(func=_cmd_router)
    _add_selector_commands(router)
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
    _add_client_options(gen)
    outcome = sub.add_parser("outcome", help="say how good a generation was: 'auto' learns "
                             "from it (Router.ReportOutcome)")
    outcome.add_argument("request_id", help="the request id `generate` printed")
    outcome.add_argument("reward", type=float, help="how good, in [0, 1]")
    outcome.add_argument("--timeout-s", type=float, default=30.0)
    _add_client_options(outcome)
    outcome.set_defaults(func=_cmd_outcome)
    adapters = sub.add_parser("adapters", help="manage adapters on a router")
    adapters_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    upload = adapters_sub.add_parser("upload", help="upload a PEFT adapter directory and "
                                     "register it (no path on the server needed)")
    upload.add_argument("dir", help="adapter_config.json + adapter_model.safetensors "
                        "(+ card.json)")
    upload.add_argument("--id", required=True, help="adapter id to register it under")
    upload.add_argument("--description", default="", help="what it does (else card.json's)")
    upload.add_argument("--example-prompt", action="append", default=[],
                        help="a prompt it is meant for (repeatable)")
    upload.add_argument("--kind", default="", choices=("", "behaviour", "domain"),
                        help="how 'auto' reads the card: behaviour (a style the prompt asks "
                        "for) or domain (what the prompt is about); default: told from the "
                        "examples (or card.json's \"kind\")")
    upload.add_argument("--replace", action="store_true", help="replace your adapter of this id")
    upload.add_argument("--tenant", default="", help="admin: upload for this tenant")
    upload.add_argument("--shared", action="store_true", help="admin: for every tenant")
    upload.add_argument("--timeout-s", type=float, default=600.0)
    _add_client_options(upload)
    upload.set_defaults(func=_cmd_adapters_upload)
    list_ = adapters_sub.add_parser("list", help="the adapters you may use (an admin: all), "
                                    "every page")
    list_.add_argument("--timeout-s", type=float, default=30.0)
    _add_client_options(list_)
    list_.set_defaults(func=_cmd_adapters_list)
    remove = adapters_sub.add_parser("remove", help="unregister one of your adapters (an "
                                     "admin: any tenant's, or a shared one)")
    remove.add_argument("id", help="the adapter id")
    remove.add_argument("--tenant", default="", help="admin: the tenant whose adapter it is")
    remove.add_argument("--shared", action="store_true", help="admin: the shared adapter of "
                        "this id")
    remove.add_argument("--timeout-s", type=float, default=60.0)
    _add_client_options(remove)
    remove.set_defaults(func=_cmd_adapters_remove)
    return parser


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    """Where the router is and how to reach it (the same for every client command)."""
    if not any(a.dest == "address" for a in parser._actions):
        parser.add_argument("--address", default="127.0.0.1:50051", help="router host:port")
    parser.add_argument("--api-key", default=None,
                        help="API key sent as 'authorization: Bearer' (default: env "
                             "EDGELORA_API_KEY)")
    parser.add_argument("--tls-ca", default=os.environ.get("EDGELORA_TLS_CA", ""),
                        help="connect with TLS, trusting this PEM certificate bundle (default: "
                             "env EDGELORA_TLS_CA; unset = plain connection)")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # config and path mistakes: say what to fix
        print(f"edgelora {args.command}: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])

