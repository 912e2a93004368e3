"""`--model FILE.gguf`: Llama- and Qwen2-family GGUF files (F16, Q8_0, Q4_0, written the way
llama.cpp's converter writes them) become a cached checkpoint with the file's tokenizer and chat
template, re-imported only when the file changes, and a worker serves them as it serves the
checkpoint they were made from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import pytest
import torch

from bench.gguf_writer import write_gguf
from edgelora.client import build_request
from edgelora.v1 import router_pb2_grpc
from tests.conftest import ServeThread, write_tiny_llama
from tests.worker.test_model import write_qwen2
from worker.config import WorkerConfig
from worker.gguf_import import resolve_model_path
from worker.tokenizer import Tokenizer

# of each matrix's largest weight
TOLERANCE = {"F16": 1e-3, "Q8_0": 1e-2, "Q4_0": 0.15, "Q4_K": 0.15}


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return write_qwen2(tmp_path_factory.mktemp("qwen2"), default_model_dir)


@pytest.mark.parametrize(("arch", "qtype"), [("llama", "Q8_0"), ("qwen2", "F16"),
                                             ("llama", "Q4_0"), ("llama-256", "Q4_K")])
def test_a_gguf_file_is_imported_with_its_tokenizer(tmp_path: Path, tiny_model_dir: Path,
                                                    tiny_qwen2: Path, default_model_dir: Path,
                                                    arch: str, qtype: str) -> None:
    """llama-256: hidden 256, so that every matrix's rows are whole 256-weight K-quant blocks."""
    from safetensors.torch import load_file

    source = {"llama": tiny_model_dir, "qwen2": tiny_qwen2}.get(arch) or write_tiny_llama(
        tmp_path / "llama-256", default_model_dir, hidden_size=256, intermediate_size=512)
    arch = arch.removesuffix("-256")
    gguf = write_gguf(source, tmp_path / f"Tiny-{arch}-{qtype}.gguf", qtype)
    imported = resolve_model_path(str(gguf), tmp_path / "cache")
    assert imported.name == gguf.stem  # the base model's name clients see
    config = json.loads((imported / "config.json").read_text())
    assert config["model_type"] == arch
    want, got = load_file(source / "model.safetensors"), load_file(imported / "model.safetensors")
    assert set(want) <= set(got) | {"lm_head.weight"}
    for name, tensor in want.items():
        error = float((got[name] - tensor).abs().max() / tensor.abs().max())
        assert error <= TOLERANCE[qtype], (name, error)
    ours, original = Tokenizer(imported), Tokenizer(default_model_dir)
    text = "Tell me about the sea, in 3 words: ¿qué?"
    assert ours.encode_prompt(text) == original.encode_prompt(text)
    assert ours.encode_chat([("user", "Hi")]) == original.encode_chat([("user", "Hi")])
    chat = [{"role": "user", "content": "Hi"}]
    assert ours.hf.apply_chat_template(chat, tokenize=False) == \
        original.hf.apply_chat_template(chat, tokenize=False)

    stamp = (imported / "edgelora_import.json").stat().st_mtime_ns
    assert resolve_model_path(str(gguf), tmp_path / "cache") == imported  # cached
    assert (imported / "edgelora_import.json").stat().st_mtime_ns == stamp
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))
    resolve_model_path(str(gguf), tmp_path / "cache")  # the file changed: imported again
    assert (imported / "edgelora_import.json").stat().st_mtime_ns != stamp


def test_a_worker_serves_a_gguf_file_as_its_checkpoint(tmp_path: Path,
                                                       default_model_dir: Path) -> None:
    source = write_tiny_llama(tmp_path / "hf", default_model_dir, seed=7)
    gguf = write_gguf(source, tmp_path / "Tiny-F16.gguf", "F16")
    tokens = {}
    for name, model in (("checkpoint", source), ("gguf", gguf)):
        server = ServeThread(WorkerConfig(model=str(model), port=0, num_threads=1,
                                          max_model_len=256, kv_cache_mb=16, dtype="float32",
                                          cache_dir=str(tmp_path / "cache")))
        try:
            stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(server.address))
            reply = stub.Generate(build_request("Tell me about the sea", max_tokens=12,
                                                temperature=0.0, ignore_eos=True), timeout=60)
            tokens[name] = list(reply.token_ids)
        finally:
            server.stop()
    assert len(tokens["gguf"]) == 12 and tokens["gguf"] == tokens["checkpoint"]


def test_a_missing_gguf_file_says_what_model_takes(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"\.gguf file"):
        resolve_model_path(str(tmp_path / "nope.gguf"), tmp_path)


def test_imported_weights_are_float32(tmp_path: Path, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    imported = resolve_model_path(str(write_gguf(tiny_model_dir, tmp_path / "t.gguf", "F16")),
                                  tmp_path / "cache")
    assert {t.dtype for t in load_file(imported / "model.safetensors").values()} == \
        {torch.float32}


def test_a_q4_0_file_is_held_in_its_own_4_bit_blocks(tmp_path: Path,
                                                     tiny_model_dir: Path) -> None:
    """--weights int4 on a Q4_0 file keeps its weights as they are (not re-quantized to Q4_1 or
    int8): every projection and the tied head 4.5 bits a weight, equal to the file's values."""
    import gguf as gguf_package
    import torch

    from worker.kernels.quantized_weights import Int4Linear
    from worker.loader import load_model

    path = write_gguf(tiny_model_dir, tmp_path / "Tiny-Q4_0.gguf", "Q4_0")
    model = load_model(resolve_model_path(str(path), tmp_path / "cache"), torch.device("cpu"),
                       torch.bfloat16, weights="int4")
    linears = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert model.lm_head in linears and model.embed_tokens.table is model.lm_head
    assert len(linears) == 4 * len(model.layers) + 1
    assert all(m.mins is None for m in linears)
    table = next(t for t in gguf_package.GGUFReader(path).tensors if t.name == "token_embd.weight")
    want = gguf_package.quants.dequantize(table.data, table.tensor_type)
    assert torch.equal(model.lm_head.rows(0, model.lm_head.out_features),
                       torch.from_numpy(want).to(torch.bfloat16))
