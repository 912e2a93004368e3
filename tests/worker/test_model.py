"""worker.model + worker.loader + worker.runner against transformers on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import built_cpu_kernels, write_tiny_llama
from worker.kernels import paged_attention_triton
from worker.kv_cache import BlockManager, KVCache
from worker.loader import load_model
from worker.runner import ModelRunner
from worker.scheduler import Batch, ScheduledSeq
from worker.sequence import SamplingOptions, Sequence

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]
ATOL = 1e-4
# decode attention: torch's gather + SDPA, the paged C++ kernel, that kernel with the layers'
# other C++ kernels (CPU workers: rope, cache writes and attention of decode steps in one call,
# fused norms and activation), or the paged Triton kernel (CUDA workers; here in Triton's
# interpreter)
ATTENTION = ["torch", "paged", "fused", "triton"]


class Harness:
    """Our model behind a real runner and paged KV cache, stepped by hand."""

    def __init__(self, path: Path, device: str = "cpu", num_blocks: int = 64, block_size: int = 4,
                 attention: str = "torch"):
        self.device = torch.device(device)
        self.model = load_model(path, self.device, torch.float32)
        self.blocks = BlockManager(num_blocks, block_size)
        kv = KVCache(self.model.config, num_blocks, block_size, self.device, torch.float32)
        kernel = None
        if attention in ("paged", "fused"):
            kernel = built_cpu_kernels().paged_decode_attention
        if attention == "fused":
            self.model.use_kernels(built_cpu_kernels())
        elif attention == "triton":
            kernel = paged_attention_triton.paged_decode_attention
        self.runner = ModelRunner(self.model, kv, block_size, self.device,
                                  decode_attention=kernel)

    @torch.inference_mode()
    def logits(self, steps: list[tuple[Sequence, int]]) -> list[torch.Tensor]:
        """Feeds each (seq, n) its next n tokens in ONE forward; -> logits [n, vocab] per seq."""
        for seq, n in steps:
            self.blocks.allocate(seq.block_table, seq.num_computed_tokens + n)
        batch = Batch([ScheduledSeq(seq, n) for seq, n in steps])
        input_ids, fb, _ = self.runner.prepare(batch)
        hidden = self.model(input_ids, fb, self.runner.kv_cache.layers)
        out, offset = [], 0
        for seq, n in steps:
            out.append(self.model.compute_logits(hidden[offset:offset + n]).cpu())
            offset += n
            seq.num_computed_tokens += n
        return out


def hf_logits(path: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def new_seq(request_id: int, ids: list[int]) -> Sequence:
    return Sequence(request_id, ids, SamplingOptions(max_tokens=8))


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs diff {diff:.3g} > {ATOL}"


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_logits_match_transformers(tiny_model_dir: Path, device: str) -> None:
    ids = list(range(100, 140))
    (ours,) = Harness(tiny_model_dir, device).logits([(new_seq(1, ids), len(ids))])
    assert_close(ours, hf_logits(tiny_model_dir, ids), "single prefill")


@pytest.mark.parametrize("attention", ATTENTION)
def test_chunked_prefill_then_decode_match_transformers(tiny_model_dir: Path,
                                                        attention: str) -> None:
    ids = torch.randint(0, 49152, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = hf_logits(tiny_model_dir, ids)
    h, seq = Harness(tiny_model_dir, attention=attention), new_seq(1, ids)
    got = h.logits([(seq, 10)]) + h.logits([(seq, 7)])  # two prompt chunks over block borders
    got += [h.logits([(seq, 1)])[0] for _ in range(6)]  # then one token at a time
    assert_close(torch.cat(got), ref, "chunked prefill + decode")


@pytest.mark.parametrize("attention", ATTENTION)
def test_mixed_step_rows_do_not_interfere(tiny_model_dir: Path, attention: str) -> None:
    a, b, c = list(range(200, 231)), list(range(300, 305)), list(range(400, 412))
    h = Harness(tiny_model_dir, attention=attention)
    sa, sb, sc = new_seq(1, a), new_seq(2, b), new_seq(3, c)
    h.logits([(sa, 30), (sb, 4)])
    # one step: two decodes of different lengths + a prompt chunk of a newcomer
    la, lb, lc = h.logits([(sa, 1), (sb, 1), (sc, 12)])
    assert_close(la, hf_logits(tiny_model_dir, a)[-1:], "decode row a")
    assert_close(lb, hf_logits(tiny_model_dir, b)[-1:], "decode row b")
    assert_close(lc, hf_logits(tiny_model_dir, c), "prefill row c")


@pytest.mark.parametrize("attention", ATTENTION)
def test_decode_rows_of_far_apart_lengths_match(tiny_model_dir: Path, attention: str) -> None:
    prompts = [list(range(500, 500 + n)) for n in (3, 5, 150, 160, 4)]
    h = Harness(tiny_model_dir, num_blocks=128, attention=attention)
    seqs = [new_seq(i, ids[:-1]) for i, ids in enumerate(prompts)]
    h.logits([(seq, len(seq.token_ids)) for seq in seqs])
    for seq, ids in zip(seqs, prompts, strict=True):
        seq.token_ids.append(ids[-1])
    steps = [(seq, 1) for seq in seqs]
    for seq, n in steps:
        h.blocks.allocate(seq.block_table, seq.num_computed_tokens + n)
    _, fb, _ = h.runner.prepare(Batch([ScheduledSeq(seq, n) for seq, n in steps]))
    # torch's path splits the short rows from the long ones; a kernel reads each row's length
    expected = [3, 2] if attention == "torch" else [5]
    assert [g.token_idx.shape[0] for g in fb.groups] == expected
    for ids, got in zip(prompts, h.logits(steps), strict=True):
        assert_close(got, hf_logits(tiny_model_dir, ids)[-1:], f"decode at length {len(ids)}")


@pytest.mark.parametrize("variant", ["llama3_rope", "untied_mistral_heads", "qwen2_bias"])
def test_architecture_variants_match_transformers(tmp_path: Path, default_model_dir: Path,
                                                  variant: str) -> None:
    if variant == "qwen2_bias":
        path = write_qwen2(tmp_path, default_model_dir)
    elif variant == "llama3_rope":
        path = write_tiny_llama(tmp_path, default_model_dir, seed=3, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    else:
        path = write_tiny_llama(tmp_path, default_model_dir, seed=4, tie_word_embeddings=False,
                                num_key_value_heads=4, head_dim=32)
    ids = list(range(1000, 1090))
    (ours,) = Harness(path, num_blocks=64).logits([(new_seq(1, ids), len(ids))])
    assert_close(ours, hf_logits(path, ids), variant)


def write_qwen2(target: Path, tokenizer_dir: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(5)
    config = Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # zero-initialised otherwise: make sure they are read
    model.save_pretrained(target)
    return target


def test_missing_weights_are_named(tmp_path: Path, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    weights = load_file(tiny_model_dir / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp"):
        load_model(tmp_path, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("weights", ["auto", "int4"])
def test_loading_imports_no_compiler(tiny_model_dir: Path, weights: str) -> None:
    """Building the model on the meta device must not run ops there (an nn.Embedding init, the
    rope frequencies): those import torch._dynamo with sympy and Triton, ~140 MiB resident and
    seconds of start-up that serving never uses. In a fresh process, as a worker starts."""
    import subprocess
    import sys

    probe = ("import sys, torch; from pathlib import Path; from worker.loader import load_model;"
             f"load_model(Path({str(tiny_model_dir)!r}), torch.device('cpu'), torch.bfloat16,"
             f" {weights!r}); print(sorted(m for m in ('torch._dynamo', 'sympy', 'triton')"
             " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("damage", ["header length", "offsets past the end", "size != shape",
                                    "unknown dtype", "truncated file"])
def test_a_malformed_checkpoint_file_is_refused_by_name(tmp_path: Path, tiny_model_dir: Path,
                                                        damage: str) -> None:
    """The loader reads safetensors itself (plain reads, worker.loader._tensor_sources): a
    damaged header or file is a clear error naming the file, never a read past its end."""
    import json as json_lib
    import struct

    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    raw = (tiny_model_dir / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json_lib.loads(raw[8:8 + length]), raw[8 + length:]
    first = next(k for k in header if k != "__metadata__")
    if damage == "header length":
        blob = struct.pack("<Q", len(raw) * 10) + raw[8:]
    else:
        if damage == "offsets past the end":
            header[first]["data_offsets"] = [0, len(data) + 4096]
        elif damage == "size != shape":
            header[first]["shape"] = [header[first]["shape"][0] + 1, *header[first]["shape"][1:]]
        elif damage == "unknown dtype":
            header[first]["dtype"] = "F8_E9M9"
        encoded = json_lib.dumps(header).encode()
        blob = struct.pack("<Q", len(encoded)) + encoded + data
        if damage == "truncated file":
            blob = blob[:len(blob) - len(data) // 2]
    (tmp_path / "model.safetensors").write_bytes(blob)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_model(tmp_path, torch.device("cpu"), torch.float32)
