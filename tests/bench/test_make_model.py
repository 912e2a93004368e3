"""bench/make_model.py: the shapes are the published models' (parameter counts), and the tiny
shape's files (HF checkpoint, GGUF, adapters) load: the GGUF imports to the same weights and the
worker serves the checkpoint with an adapter."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from bench.make_model import SHAPES, hf_config, main
from edgelora.client import build_request
from edgelora.v1 import router_pb2_grpc, types_pb2
from tests.conftest import ServeThread
from worker.config import WorkerConfig
from worker.gguf_import import resolve_model_path


def parameters(config: dict) -> int:
    hidden, inter, kv = config["hidden_size"], config["intermediate_size"], \
        config["num_key_value_heads"] * config["head_dim"]
    per_layer = 2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * inter + 2 * hidden
    if config["model_type"] == "qwen2":
        per_layer += hidden + 2 * kv  # q/k/v biases
    return config["vocab_size"] * hidden + config["num_hidden_layers"] * per_layer + hidden


@pytest.mark.parametrize(("shape", "published"), [
    ("llama-3.2-1b", 1_235_814_400), ("llama-3.2-3b", 3_212_749_824),
    ("qwen2.5-0.5b", 494_032_768), ("qwen2.5-1.5b", 1_543_714_304)])
def test_shapes_are_the_published_models(shape: str, published: int) -> None:
    assert parameters(hf_config(shape)) == published
    assert shape in SHAPES


def test_tiny_files_load_and_serve(tmp_path: Path) -> None:
    made = main(["--shape", "tiny", "--out", str(tmp_path / "tiny"), "--types", "F16,Q4_0",
                 "--ranks", "8"])
    assert {"hf", "F16", "Q4_0", "r8"} <= set(made)
    from safetensors.torch import load_file

    imported = resolve_model_path(str(made["F16"]), tmp_path / "cache")
    want, got = load_file(made["hf"] / "model.safetensors"), \
        load_file(imported / "model.safetensors")
    for name, tensor in want.items():
        assert float((got[name] - tensor.float()).abs().max()) <= 1e-3, name
    server = ServeThread(WorkerConfig(model=str(made["hf"]), port=0, num_threads=1,
                                      max_model_len=256, kv_cache_mb=16))
    try:
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(server.address))
        stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(adapter_id="r8",
                                                              path=str(made["r8"])), timeout=60)
        for adapter_id in ("", "r8"):
            reply = stub.Generate(build_request("Hello", adapter_id=adapter_id, max_tokens=4,
                                                ignore_eos=True), timeout=60)
            assert len(reply.token_ids) == 4 and reply.adapter_id == adapter_id
    finally:
        server.stop()
