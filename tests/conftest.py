"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, the real default model, the
compiled CPU kernels, and in-process worker/router servers on ephemeral ports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# the tests' random models and adapters (re-exported: tests import them from here)
from bench.random_weights import (  # noqa: F401
    ATTN_MODULES,
    TOKENIZER_FILES,
    write_random_adapter,
    write_tiny_llama,
)
from worker.config import WorkerConfig
from worker.gguf_import import ensure_default_checkpoint
from worker.kernels import cpu as kernels

# Tests run several processes at once on 2 cores: torch with 2 threads collapses then.
torch.set_num_threads(1)
# Without a GPU the Triton kernels (worker/*_triton.py) run in Triton's interpreter, which reads
# this when they are decorated and again when they run.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"



def built_cpu_kernels():
    """worker.kernels.cpu' module. CPU workers need it, so a failed build fails the tests."""
    module = kernels.load()
    assert module is not None, "the CPU kernels did not build (see the log)"
    return module


def write_api_keys(path: Path) -> dict[str, str]:
    """A keys file at `path`: tenant "ops" an admin, "acme" and "beta" tenants; -> their keys."""
    import json
    import secrets

    keys = {name: f"k-{name}-{secrets.token_urlsafe(12)}" for name in ("ops", "acme", "beta")}
    path.write_text(json.dumps({"keys": [
        {"key": keys["ops"], "tenant": "ops", "role": "admin"},
        {"key": keys["acme"], "tenant": "acme"}, {"key": keys["beta"], "tenant": "beta"}]}))
    return keys


def resident_anon_mib() -> float:
    """This process's anonymous resident memory (RssAnon, Linux), MiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status
                    if line.startswith("RssAnon:"))


@pytest.fixture(scope="session", autouse=True)
def adapter_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Workers' pushed adapter files go under the session's temporary folder, never to the
    user's ~/.cache: in-process workers (ServeThread) and worker processes (the environment)."""
    folder = tmp_path_factory.mktemp("adapter-cache")
    os.environ.setdefault("EDGELORA_ADAPTER_CACHE_DIR", str(folder))
    return Path(os.environ["EDGELORA_ADAPTER_CACHE_DIR"])


@pytest.fixture(scope="session")
def cpu_kernels():
    return built_cpu_kernels()


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct checkpoint (imported once by `make setup`)."""
    return ensure_default_checkpoint(WorkerConfig().cache_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), default_model_dir)


class ServeThread:
    """Worker + router running in-process on ephemeral ports, on an asyncio loop in a thread."""

    def __init__(self, worker_config: WorkerConfig, **router_fields) -> None:
        import asyncio
        import dataclasses
        import threading

        if not worker_config.adapter_cache_dir and "EDGELORA_ADAPTER_CACHE_DIR" in os.environ:
            worker_config = dataclasses.replace(
                worker_config, adapter_cache_dir=os.environ["EDGELORA_ADAPTER_CACHE_DIR"])

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.worker, self.router = self._call(self._start(worker_config, router_fields))
        self.address = f"127.0.0.1:{self.router.port}"
        self.worker_address = f"127.0.0.1:{self.worker.port}"

    def _call(self, coro):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    @staticmethod
    async def _start(worker_config: WorkerConfig, router_fields: dict):
        from router.config import RouterConfig
        from router.server import start_router
        from worker.server import start_worker

        worker = await start_worker(worker_config)
        router = await start_router(RouterConfig(port=0, workers=f"127.0.0.1:{worker.port}",
                                                 **router_fields),
                                    [worker.metrics_registry])  # as `serve`: one /metrics
        return worker, router

    def stop(self) -> None:
        self._call(self.router.stop(0))
        self._call(self.worker.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir: Path):
    """Router + worker on the tiny model: small context so limits are quick to reach."""
    server = ServeThread(WorkerConfig(model=str(tiny_model_dir), port=0, num_threads=1,
                                      max_model_len=512, kv_cache_mb=16, max_batch_size=8))
    yield server
    server.stop()


def run_engine(engine, requests: list[tuple[list[int], object]],
               adapter_ids: list[str] | None = None) -> list[list[int]]:
    """Adds every (prompt_ids, SamplingOptions) at once, steps the engine synchronously until all
    finish; -> generated token ids per request, in order."""
    from worker.sequence import Sequence

    outputs: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    done: set[int] = set()

    def collect(event) -> None:
        assert event.finish_reason != "error", event.error
        outputs[event.request_id].extend(event.token_ids)
        if event.finish_reason:
            done.add(event.request_id)

    engine.emit = collect
    for i, (ids, options) in enumerate(requests):
        engine.scheduler.add(Sequence(i, list(ids), options,
                                      adapter_ids[i] if adapter_ids else "",
                                      detok=engine.make_detokenizer(options.stop)))
    while len(done) < len(requests):
        engine.step()
    return [outputs[i] for i in range(len(requests))]
