"""worker.kernels.quantized_weights (--weights int8 / int4): the kernels against dequantized
references at every step size, the layouts read back, a model held with no full-precision copy,
LoRA on top, and the flag through a served model."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from bench.gguf_writer import write_gguf
from bench.random_weights import write_random_adapter
from edgelora.client import build_request
from edgelora.v1 import router_pb2_grpc
from tests.conftest import ServeThread
from tests.worker.test_model import write_qwen2
from worker.config import WorkerConfig
from worker.kernels import quantized_weights as qw
from worker.kernels import weight_packing as wp
from worker.kernels.quantized_weights import (
    GATHER_ROWS,
    Int4Linear,
    Int8Linear,
    QuantizedEmbedding,
    QuantizedLinear,
    quantize_model,
    weight_bytes,
)
from worker.kernels.weight_packing import GROUP_SIZE
from worker.loader import load_model
from worker.model import ForwardBatch, LlamaModel
from worker.sequence import SamplingOptions, Sequence
from worker.server import assemble_engine, pick_device

BF16 = torch.bfloat16
STEP_SIZES = (1, 3, 8, 9, 16, 17, 32, 33, 256, 257)  # the kernels' 16-row passes, tiles


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("shape", [(200, 64), (576, 576), (96, 1536)])
def test_every_step_size_is_the_dequantized_matmul(cls: type[QuantizedLinear],
                                                   shape: tuple[int, int]) -> None:
    """A step runs the C++ kernel, or without it dequantizes row blocks (dequantized_step,
    called directly here): both must be x @ dequantized(W)ᵀ + bias, to bf16's rounding of the
    output (out 200: the last tile's padded rows)."""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(*shape, generator=g), torch.randn(shape[0], generator=g)
    layer = cls(weight, bias)
    dense = layer.rows(0, shape[0]).float()  # the weights the format holds
    assert relative_error(dense, weight) < (0.01 if cls is Int8Linear else 0.08)
    for rows in STEP_SIZES:
        x = torch.randn(rows, shape[1], generator=g).to(BF16)
        want = x.float() @ dense.T + bias.to(BF16).float()
        for got in (layer(x), layer.dequantized_step(x) + bias.to(BF16)):
            assert got.shape == (rows, shape[0]) and got.dtype == BF16
            assert relative_error(got, want) < 0.01, rows


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_steps_from_the_devices_row_count_dequantize(cls: type[QuantizedLinear], cpu_kernels,
                                                     monkeypatch) -> None:
    """With AMX (torch's bf16 GEMM on its tiles) steps of AMX_DEQUANTIZED_FROM rows or more
    dequantize; without, every step takes the kernel."""
    g = torch.Generator().manual_seed(4)
    layer = cls(torch.randn(200, 128, generator=g))
    x = torch.randn(40, 128, generator=g).to(BF16)
    monkeypatch.setattr(qw, "dequantized_from_rows", lambda: 9)
    assert torch.equal(layer(x[:8]), layer.kernel_step(cpu_kernels, x[:8]))
    for rows in (9, 40):
        assert torch.equal(layer(x[:rows]), layer.dequantized_step(x[:rows]))
    monkeypatch.setattr(qw, "dequantized_from_rows", lambda: None)
    assert torch.equal(layer(x), layer.kernel_step(cpu_kernels, x))
    monkeypatch.undo()
    for amx, want in ((True, qw.AMX_DEQUANTIZED_FROM), (False, None)):
        qw.dequantized_from_rows.cache_clear()
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx,
                            raising=False)
        assert qw.dequantized_from_rows() == want
    qw.dequantized_from_rows.cache_clear()


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_gather_reads_the_rows_of_the_table(cls: type[QuantizedLinear]) -> None:
    weight = torch.randn(300, 64, generator=torch.Generator().manual_seed(1))
    layer = cls(weight)
    ids = torch.tensor([0, 1, 31, 32, 63, 64, 127, 128, 299, 5, 5])
    assert torch.equal(layer.gather(ids), layer.rows(0, 300)[ids])
    many = torch.arange(GATHER_ROWS + 5) * 7 % 300  # past the C++ path's row count: torch's
    assert torch.equal(layer.gather(many), layer.rows(0, 300)[many])
    assert torch.equal(QuantizedEmbedding(layer)(ids), layer.gather(ids))
    assert torch.equal(layer.rows(70, 150), layer.rows(0, 300)[70:150])  # mid-block starts


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_the_cpp_dequantization_is_torchs_bit_for_bit(cls: type[QuantizedLinear], cpu_kernels,
                                                      monkeypatch) -> None:
    layer = cls(torch.randn(333, 128, generator=torch.Generator().manual_seed(7)))
    kernel = [layer.columns(start, min(start + 128, 333)) for start in (0, 128, 256)]
    monkeypatch.setattr("worker.kernels.cpu.load", lambda: None)  # torch's ops
    for start, got in zip((0, 128, 256), kernel, strict=True):
        assert torch.equal(got, layer.columns(start, min(start + 128, 333))), start


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_the_kernel_against_torchs_ops(cls: type[QuantizedLinear], cpu_kernels,
                                       monkeypatch) -> None:
    """The C++ kernel (activations quantized per group of 32 to int8) against torch's ops on the
    same weights (activations in bf16): within the activations' int8 rounding."""
    g = torch.Generator().manual_seed(2)
    layer = cls(torch.randn(128, 192, generator=g))
    x = torch.randn(5, 192, generator=g).to(BF16)
    kernel = layer(x)
    monkeypatch.setattr("worker.kernels.cpu.load", lambda: None)
    assert relative_error(kernel, layer(x)) < 0.02


def test_int8_maps_each_rows_largest_weight_to_127() -> None:
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    w[3] = 0.0
    q, scales = wp.quantize_int8(w)
    assert q.dtype == torch.int8 and scales.dtype == BF16
    assert (q.abs().amax(dim=1)[[0, 1, 39]] == 127).all() and not q[3].any()


def test_the_int4_tile_layout_puts_each_weight_where_the_kernel_reads_it() -> None:
    """Byte 64 k + 4 l + i of block (tile, group) holds weight 4 k + i of row l in its low
    nibble and 16 + 4 k + i in its high one (csrc/q4_matmul.cpp); rows past the last pad with
    zeros; unpacking inverts it."""
    q = torch.randint(0, 16, (37, 3 * GROUP_SIZE), generator=torch.Generator().manual_seed(5))
    packed = wp.pack_int4(q)
    assert packed.shape == (3, 3, 256) and packed.dtype == torch.uint8
    row, group, k, i = 16 + 5, 2, 3, 1  # tile 1, lane 5
    byte = int(packed[1, group, 64 * k + 4 * 5 + i])
    assert byte & 0xF == q[row, 32 * group + 4 * k + i]
    assert byte >> 4 == q[row, 32 * group + 16 + 4 * k + i]
    unpacked = wp.unpack_int4(packed).reshape(48, -1)
    assert torch.equal(unpacked[:37], q.to(torch.uint8)) and not unpacked[37:].any()
    scales = torch.arange(37 * 3, dtype=torch.float16).view(37, 3)
    tiled = wp.tile_rows(scales)
    assert tiled.shape == (3, 3, 16) and tiled[1, 2, 5] == scales[21, 2] and tiled[2, 0, 5] == 0


def test_the_int8_tile_layout_puts_each_weight_where_the_kernel_reads_it() -> None:
    """Byte 64 k + 4 l + i of block (tile, group) holds weight 4 k + i of the group in row l
    (csrc/q4_matmul.cpp, tile_dot8); rows past the last pad with zeros; unpacking inverts it."""
    q = torch.randint(-127, 128, (37, 3 * GROUP_SIZE), dtype=torch.int8,
                      generator=torch.Generator().manual_seed(6))
    packed = wp.pack_int8(q)
    assert packed.shape == (3, 3, 512) and packed.dtype == torch.int8
    row, group, k, i = 16 + 5, 2, 7, 3  # tile 1, lane 5
    assert packed[1, group, 64 * k + 4 * 5 + i] == q[row, 32 * group + 4 * k + i]
    unpacked = wp.unpack_int8(packed).reshape(48, -1)
    assert torch.equal(unpacked[:37], q) and not unpacked[37:].any()


def test_int4_groups_span_their_range_and_requantize_to_themselves() -> None:
    """Each group's least weight is q = 0 and its largest q = 15; the weights a GGUF Q4_1 file
    dequantizes to (the same form) quantize back to the same values."""
    w = torch.randn(16, 4 * GROUP_SIZE, generator=torch.Generator().manual_seed(4))
    q, scales, mins = wp.quantize_int4(w)
    groups = q.view(16, -1, GROUP_SIZE)
    assert (groups.amin(dim=2) == 0).all() and (groups.amax(dim=2) == 15).all()
    dense = (q.float().view(16, -1, GROUP_SIZE) * scales[:, :, None] + mins[:, :, None]).view_as(w)
    q2, scales2, mins2 = wp.quantize_int4(dense)
    assert torch.equal(q2, q)
    assert torch.allclose(scales2, scales) and torch.allclose(mins2, mins)


def q4_0_weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Weights as a GGUF Q4_0 file dequantizes them: fp16 scale * (q - 8) in each group."""
    q, scales = wp.quantize_q4_0(torch.randn(rows, cols, generator=torch.Generator().manual_seed(
        seed)))
    return ((q.view(rows, -1, GROUP_SIZE) - 8) * scales.half().float()[:, :, None]).view(rows, cols)


def test_weights_already_in_q4_0_form_are_kept_as_they_are(cpu_kernels) -> None:
    """A Q4_0 file's weights: 4.5 bits a weight, dequantized back bit for bit, on the C++ and
    torch paths, and every step size the matmul of exactly those weights."""
    weight = q4_0_weights(192, 256, seed=8)
    weight[5, :GROUP_SIZE] = 0.0  # an all-zero group: scale 0
    assert wp.pack_q4_0(weight) is not None
    layer = Int4Linear(weight)
    assert layer.mins is None
    assert layer.nbytes == 192 * 256 * 4.5 / 8
    assert torch.equal(layer.rows(0, 192), weight.to(BF16))
    assert torch.equal(layer.gather(torch.tensor([5, 0, 191])), weight[[5, 0, 191]].to(BF16))
    g = torch.Generator().manual_seed(9)
    for rows in STEP_SIZES:
        x = torch.randn(rows, 256, generator=g).to(BF16)
        assert relative_error(layer(x), x.float() @ weight.T) < 0.01, rows


def test_symmetric_int4_on_torchs_paths(monkeypatch) -> None:
    layer = Int4Linear(q4_0_weights(64, 128, seed=10))
    kernel_rows = layer.rows(0, 64)
    monkeypatch.setattr("worker.kernels.cpu.load", lambda: None)
    assert torch.equal(layer.rows(0, 64), kernel_rows)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(11)).to(BF16)
    assert relative_error(layer(x), x.float() @ kernel_rows.float().T) < 0.01


def test_other_weights_are_not_taken_for_q4_0() -> None:
    """Any float weights, Q4_1-form ones, and Q4_0 weights one ulp off stay asymmetric (5 bits,
    more accurate for them); a head in 4 bits only where the file had it so."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(12))
    assert wp.pack_q4_0(w) is None and Int4Linear(w).mins is not None
    q, scales, mins = wp.quantize_int4(w)
    q4_1 = (q.float().view(64, -1, GROUP_SIZE) * scales[:, :, None] + mins[:, :, None])
    assert wp.pack_q4_0(q4_1.view(64, 128)) is None
    near = q4_0_weights(64, 128, seed=13)
    near[7, 3] = torch.nextafter(near[7, 3], torch.tensor(1.0))
    assert wp.pack_q4_0(near) is None
    assert wp.pack_q4_0(q4_0_weights(64, 96, seed=14)) is None  # in-features not runs of 64
    assert isinstance(qw.quantized_table("int4", w), Int8Linear)
    assert isinstance(qw.quantized_table("int8", q4_0_weights(64, 128, seed=15)), Int8Linear)
    head = qw.quantized_table("int4", q4_0_weights(64, 128, seed=15))
    assert isinstance(head, Int4Linear) and head.mins is None


def test_quantized_weights_refuse_a_float32_model(tiny_model_dir: Path) -> None:
    """The loader (for callers other than the worker's flags) and an already loaded model."""
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"CPU workers computing in bfloat16 \(this one: cpu, "
                                         r"float32\)"):
        load_model(tiny_model_dir, cpu, torch.float32, weights="int8")
    with pytest.raises(ValueError, match=r"this one: cpu, float32"):
        quantize_model(load_model(tiny_model_dir, cpu, torch.float32), "int4")


def test_int8_takes_any_width_int4_falls_back_to_it() -> None:
    assert isinstance(qw.quantized_linear("int4", torch.randn(64, 96)), Int8Linear)  # 96 % 64
    g = torch.Generator().manual_seed(9)
    layer = qw.quantized_linear("int8", torch.randn(40, 40, generator=g))  # 40 = 32 + 8 padded
    dense = layer.rows(0, 40)
    assert dense.shape == (40, 40)
    assert torch.equal(layer.gather(torch.tensor([3, 39])), dense[[3, 39]])
    for rows in (1, 17, 40):
        x = torch.randn(rows, 40, generator=g).to(BF16)
        for got in (layer(x), layer.dequantized_step(x)):
            assert relative_error(got, x.float() @ dense.float().T) < 0.01


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_quantized_model_holds_no_full_precision_projection(tiny_model_dir: Path,
                                                              fmt: str) -> None:
    dense = load_model(tiny_model_dir, torch.device("cpu"), BF16)
    model = load_model(tiny_model_dir, torch.device("cpu"), BF16, weights=fmt)
    for layer in model.layers:
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                       layer.mlp.gate_up_proj, layer.mlp.down_proj):
            assert isinstance(linear, QuantizedLinear)
    assert isinstance(model.embed_tokens, QuantizedEmbedding)
    assert model.embed_tokens.table is model.lm_head  # tied: one table, read both ways
    # what is left in floating point: the norms only
    floats = [n for n, p in model.named_parameters() if p.is_floating_point()]
    assert floats and all("norm" in n for n in floats)
    # (int4: the tied embedding, most of this tiny model, is int8: HEAD_FORMAT)
    assert weight_bytes(model) < (0.6 if fmt == "int8" else 0.55) * weight_bytes(dense)
    # its logits are the bf16 model's to within the format's rounding
    ids = torch.tensor([5, 900, 33, 4001, 17])
    hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(5)).to(BF16)
    assert relative_error(model.embed_tokens(ids), dense.embed_tokens(ids)) < 0.02
    assert relative_error(model.compute_logits(hidden), dense.compute_logits(hidden)) < 0.02


def test_quantize_model_on_a_loaded_model_matches_the_loader(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, torch.device("cpu"), BF16)
    quantize_model(model, "int8")
    loaded = load_model(tiny_model_dir, torch.device("cpu"), BF16, weights="int8")
    # the loader quantizes the checkpoint's float32 weights, this the bf16 model's: one step apart
    for a, b in zip(model.layers, loaded.layers, strict=True):
        assert (a.mlp.down_proj.packed.int() - b.mlp.down_proj.packed.int()).abs().max() <= 1
    assert (model.lm_head.packed.int() - loaded.lm_head.packed.int()).abs().max() <= 1


class ExactLora:
    """A LoRA delta computed here in float32 from x (worker.model.LoraDelta)."""

    def __init__(self, model: LlamaModel, rank: int = 4) -> None:
        g = torch.Generator().manual_seed(6)
        self.pairs = {}
        for i, layer in enumerate(model.layers):
            for name, out in (("qkv_proj", layer.self_attn.qkv_proj.out_features),
                              ("down_proj", layer.mlp.down_proj.out_features)):
                fan_in = 64 if name == "qkv_proj" else model.config.intermediate_size
                self.pairs[i, name] = (torch.randn(rank, fan_in, generator=g) * 0.3,
                                       torch.randn(out, rank, generator=g) * 0.3)

    def apply(self, layer: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if (layer, proj) not in self.pairs:
            return y
        a, b = self.pairs[layer, proj]
        return y + (x.float() @ a.T @ b.T).to(y.dtype)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_lora_adds_to_the_quantized_base_as_to_its_dense_form(tiny_model_dir: Path,
                                                              tmp_path: Path, fmt: str) -> None:
    """The same adapter on the quantized model and on a bf16 model holding exactly the
    dequantized weights gives the same hidden states: the delta is computed from the
    activations, untouched by the base's format."""
    quantized = load_model(tiny_model_dir, torch.device("cpu"), BF16, weights=fmt)
    dense = load_model(tiny_model_dir, torch.device("cpu"), BF16)
    for q_layer, d_layer in zip(quantized.layers, dense.layers, strict=True):
        for parent_q, parent_d, name in ((q_layer.self_attn, d_layer.self_attn, "qkv_proj"),
                                         (q_layer.self_attn, d_layer.self_attn, "o_proj"),
                                         (q_layer.mlp, d_layer.mlp, "gate_up_proj"),
                                         (q_layer.mlp, d_layer.mlp, "down_proj")):
            linear = getattr(parent_q, name)
            getattr(parent_d, name).weight.copy_(linear.rows(0, linear.out_features))
    table = quantized.lm_head
    dense.embed_tokens.weight.copy_(table.rows(0, table.out_features))
    lora = ExactLora(quantized)
    states = {}
    for label, model in (("quantized", quantized), ("dense", dense)):
        for with_lora in (False, True):
            states[label, with_lora] = prefill_hidden(model, tmp_path, lora if with_lora else None)
    delta_q = states["quantized", True].float() - states["quantized", False].float()
    delta_d = states["dense", True].float() - states["dense", False].float()
    assert delta_d.abs().max() > 0.1  # the adapter moves the output
    assert relative_error(delta_q, delta_d) < 0.05
    assert relative_error(states["quantized", True], states["dense", True]) < 0.05


def prefill_hidden(model: LlamaModel, tmp_path: Path, lora: ExactLora | None) -> torch.Tensor:
    """The final hidden states of one 24-token prompt (one prefill, prompt chunk > small steps)."""
    config = WorkerConfig(device="cpu", kv_cache_mb=4, max_batch_size=4,
                          adapter_cache_dir=str(tmp_path / "cache"))
    engine, _ = assemble_engine(config, model, lambda stop: None, (), lambda event: None)
    ids = list(range(100, 124))
    engine.scheduler.add(Sequence(0, ids, SamplingOptions(max_tokens=1)))
    batch = engine.scheduler.schedule()
    input_ids, fb, _ = engine.runner.prepare(batch)
    fb = ForwardBatch(fb.positions, fb.slot_mapping, fb.groups, lora, fb.decode_attention,
                      fb.block_size)
    with torch.inference_mode():
        return model(input_ids, fb, engine.runner.kv_cache.layers)


def test_the_weights_flag_sets_the_dtype_and_refuses_contradictions(monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert pick_device(WorkerConfig(device="cpu", weights="int4")) == (cpu, BF16)
    assert pick_device(WorkerConfig(device="cpu", weights="bf16")) == (cpu, BF16)
    assert pick_device(WorkerConfig(device="cpu", weights="fp32")) == (cpu, torch.float32)
    assert pick_device(WorkerConfig(device="cpu", weights="int8", dtype="bfloat16"))[1] == BF16
    with pytest.raises(ValueError, match="--dtype auto or bfloat16"):
        pick_device(WorkerConfig(device="cpu", weights="int8", dtype="float32"))
    with pytest.raises(ValueError, match="CPU workers"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        pick_device(WorkerConfig(device="cuda", weights="int4"))
    with pytest.raises(ValueError, match="--weights must be one of"):
        WorkerConfig(weights="int3")
    with pytest.raises(ValueError, match="use one of the two"):
        WorkerConfig(weights="int8", int8_small_steps=True)


def generate(server: ServeThread, adapter_id: str = "") -> list[int]:
    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(server.address))
    reply = stub.Generate(build_request("Tell me about the sea", max_tokens=12, temperature=0.0,
                                        ignore_eos=True, adapter_id=adapter_id), timeout=60)
    return list(reply.token_ids)


def test_a_served_int4_gguf_model_with_an_adapter(tmp_path: Path, default_model_dir: Path) -> None:
    """`--model FILE.gguf --weights int4` through a worker and router: the base model and an
    adapter answer over gRPC, the adapter's answer its own."""
    gguf = write_gguf(write_qwen2(tmp_path / "qwen2", default_model_dir),
                      tmp_path / "Qwen2-Tiny-F16.gguf", "F16")
    adapters = tmp_path / "adapters"
    write_random_adapter(adapters / "sea", tmp_path / "qwen2", rank=8, std=0.5)
    server = ServeThread(WorkerConfig(model=str(gguf), port=0, num_threads=1, weights="int4",
                                      max_model_len=256, kv_cache_mb=16,
                                      cache_dir=str(tmp_path / "cache")),
                         adapters_dir=str(adapters))
    try:
        base, adapted = generate(server), generate(server, "sea")
    finally:
        server.stop()
    assert len(base) == 12 and len(adapted) == 12 and base != adapted
