"""The Llama-family decoder in plain torch (Llama 2/3, SmolLM2, Mistral, Qwen2-style qkv bias).

Tokens of all sequences in a step are flattened to one [num_tokens, hidden] batch; attention reads
and writes the paged KV cache through the explicit ForwardBatch. Never schedules, samples or
loads files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


def token_ids(value: Any) -> tuple[int, ...]:
    """An HF config's token id field (an id, a list of ids, or absent) as a tuple."""
    return tuple(value) if isinstance(value, list) else (() if value is None else (value,))


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Reads an HF config.json dict of a Llama-family model."""
        num_heads = hf["num_attention_heads"]
        eos_ids = token_ids(hf.get("eos_token_id"))
        rope = hf.get("rope_scaling") or hf.get("rope_parameters")
        rope_theta = hf.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
        if rope and rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = None
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            rope_scaling=rope,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            # Qwen2 has q/k/v biases without saying so in its config.
            attention_bias=hf.get("attention_bias", hf.get("model_type") == "qwen2"),
            eos_token_ids=eos_ids,
        )


@dataclass
class AttentionGroup:
    """Rows attended together: decode rows (Lq = 1), or all prompt chunks padded to one Lq.

    torch's path reads kv_slots and mask; the paged decode kernel (ForwardBatch.decode_attention)
    reads block_tables and ctx_lens instead."""

    token_idx: torch.Tensor  # [rows, Lq] flat token index of each query (padding: a real one)
    src: torch.Tensor        # [tokens_in_group] index into the [rows * Lq] padded outputs ...
    dst: torch.Tensor        # [tokens_in_group] ... and where each lands among the flat tokens
    kv_slots: torch.Tensor | None = None  # [rows, Lk] KV-cache slot of each position (pad: 0)
    mask: torch.Tensor | None = None      # [rows, 1, Lq, Lk] bool, True = may attend
    block_tables: torch.Tensor | None = None  # [rows, B] each decode row's KV blocks
    ctx_lens: torch.Tensor | None = None      # [rows] context length of each decode row


class WeightCopies(Protocol):
    """Other copies of the projections' weights for a step
    (worker.kernels.int8_weights.Int8Weights)."""

    def linear(self, layer: int, name: str, x: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor: ...


class MatmulTiling(Protocol):
    """How batch-invariant steps feed a row-wise matmul its rows, so that each row's result does
    not depend on how many others share the call (worker.batch_invariant.RowTiling)."""

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor],
              x: torch.Tensor) -> torch.Tensor: ...


class LayerKernels(Protocol):
    """One-call forms of the layers' small ops (the C++ module of worker.kernels.cpu, on CPU;
    set by LlamaModel.use_kernels). torch dispatches each op in microseconds, tens of them a
    layer: at batch 1 a tenth of a 1B model's decode step. Each computes what the torch ops it
    replaces compute (tests/worker/kernels/test_layer_kernels.py)."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]: ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor: ...

    def paged_decode_step(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                          ctx_lens: torch.Tensor, num_heads: int, scale: float,
                          block_size: int) -> torch.Tensor: ...


class LoraDelta(Protocol):
    """Adds each token's adapter delta to a projection's output (worker.lora.LoraBatch)."""

    def apply(self, layer: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ForwardBatch:
    """Per-step metadata the runner builds once; every layer reads it."""

    positions: torch.Tensor     # [num_tokens] absolute position of each token
    slot_mapping: torch.Tensor  # [num_tokens] KV-cache slot each token's k/v is written to
    groups: list[AttentionGroup]
    lora: LoraDelta | None = None  # None: no token in this step uses an adapter
    # worker.kernels.paged_attention.DecodeAttention, for the groups with block tables
    decode_attention: Callable[..., torch.Tensor] | None = None
    block_size: int = 1  # tokens per KV block in those tables
    weights: WeightCopies | None = None  # set: projections multiply by these instead
    tiling: MatmulTiling | None = None  # set (--batch-invariant): projections run on it

    def project(self, layer: int, name: str, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """linear(x) plus the LoRA delta of each token's adapter."""
        if self.weights is not None:
            y = self.weights.linear(layer, name, x, linear.bias)
        else:
            y = linear(x) if self.tiling is None else self.tiling.apply(linear, x)
        return y if self.lora is None else self.lora.apply(layer, name, x, y)

    def paged_rows(self, num_tokens: int) -> AttentionGroup | None:
        """The step's one attention group when it is paged and token t is its row t (a step of
        decode rows only; every --batch-invariant step with the paged kernel), else None."""
        if len(self.groups) != 1 or self.groups[0].block_tables is None:
            return None
        return self.groups[0] if len(self.groups[0].block_tables) == num_tokens else None


class RMSNorm(nn.Module):
    kernels: LayerKernels | None = None  # LlamaModel.use_kernels

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernels_take(x):
            return self.kernels.rms_norm(x.contiguous(), self.weight, self.eps)
        # Normalise in fp32 like the reference, then cast back: bf16 variance drifts.
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
        """(x + residual, its norm): a layer's residual add and the next norm, in one call."""
        if self._kernels_take(x):
            return self.kernels.add_rms_norm(x, residual, self.weight, self.eps)
        x = x + residual
        return x, self(x)

    def _kernels_take(self, x: torch.Tensor) -> bool:
        return self.kernels is not None and x.dim() == 2 and x.dtype == self.weight.dtype


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[head_dim / 2] float32 on CPU, also under the loader's meta device (where these ops
    would import torch._dynamo, sympy and Triton: ~140 MiB resident for nothing)."""
    dim = cfg.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    scaling = cfg.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_mid, mid, out)
    raise ValueError(f"rope scaling {kind!r} is not supported (supported: linear, llama3)")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin; rotate_half(x)·sin = roll(x, half)·[-sin, sin]: three ops."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


class Attention(nn.Module):
    kernels: LayerKernels | None = None  # LlamaModel.use_kernels

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        # One matmul for q, k and v: three small GEMMs cost more dispatch than one larger one.
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = fb.project(self.layer, "qkv_proj", self.qkv_proj, x)
        if self.kernels is not None and (g := fb.paged_rows(num_tokens)) is not None:
            out = self.kernels.paged_decode_step(qkv, cos, sin, k_cache, v_cache,
                                                 fb.slot_mapping, g.block_tables, g.ctx_lens,
                                                 self.num_heads, self.scale, fb.block_size)
            return fb.project(self.layer, "o_proj", self.o_proj, out)
        q_size, kv_size = self.split_sizes[0], self.split_sizes[1]
        # q and k side by side as heads: one rotation for both
        qk = apply_rope(qkv[:, :q_size + kv_size].view(num_tokens, -1, self.head_dim), cos, sin)
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]  # [T, nh, hd], [T, kvh, hd]
        v = qkv[:, q_size + kv_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        k_cache.index_copy_(0, fb.slot_mapping, k)
        v_cache.index_copy_(0, fb.slot_mapping, v)
        out = q.new_empty(num_tokens, self.num_heads * self.head_dim)  # [T, nh * hd]
        for g in fb.groups:
            if g.block_tables is not None:  # decode rows, read where they lie in the cache
                qg = q.index_select(0, g.token_idx.view(-1))                 # [rows, nh, hd]
                og = fb.decode_attention(qg, k_cache, v_cache, g.block_tables, g.ctx_lens,
                                         self.scale, fb.block_size)
                out.index_copy_(0, g.dst, og.view(og.shape[0], -1))
                continue
            rows, q_len = g.token_idx.shape
            ctx_len = g.kv_slots.shape[1]
            # index_select on flat indices: ~3x faster than advanced indexing on CPU
            qg = q.index_select(0, g.token_idx.view(-1)).view(rows, q_len, *q.shape[1:])
            kg = k_cache.index_select(0, g.kv_slots.view(-1)).view(rows, ctx_len, *k.shape[1:])
            vg = v_cache.index_select(0, g.kv_slots.view(-1)).view(rows, ctx_len, *v.shape[1:])
            kg, vg = kg.transpose(1, 2), vg.transpose(1, 2)  # [rows, kvh, Lk, hd]
            if q_len == 1:
                # Decode: the query heads sharing a KV head attend as that head's queries, so
                # each K/V row is read once, not once per head (enable_gqa: 1.15-1.65x slower).
                qg = qg.view(rows, self.num_kv_heads, -1, self.head_dim)  # [rows, kvh, g, hd]
                og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask)
                og = og.reshape(rows, -1)                                 # [rows, nh * hd]
            else:
                og = F.scaled_dot_product_attention(qg.transpose(1, 2), kg, vg, attn_mask=g.mask,
                                                    enable_gqa=True)
                og = og.transpose(1, 2).reshape(rows * q_len, -1)         # [rows * Lq, nh * hd]
            out.index_copy_(0, g.dst, og.index_select(0, g.src))
        return fb.project(self.layer, "o_proj", self.o_proj, out)


class MLP(nn.Module):
    kernels: LayerKernels | None = None  # LlamaModel.use_kernels

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        gate_up = fb.project(self.layer, "gate_up_proj", self.gate_up_proj, x)
        if self.kernels is not None and gate_up.dim() == 2:
            act = self.kernels.silu_mul(gate_up)
        else:
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
            act = F.silu(gate) * up
        return fb.project(self.layer, "down_proj", self.down_proj, act)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(the previous layer's output, the residual stream before it; None in layer 0, whose
        x is the embedding) -> the same pair for the next layer. The stream's adds happen in
        the norms after them (RMSNorm.add_forward): one call each instead of two."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            residual, h = self.input_layernorm.add_forward(residual, x)
        h = self.self_attn(h, cos, sin, k_cache, v_cache, fb)
        residual, h = self.post_attention_layernorm.add_forward(residual, h)
        return self.mlp(h, fb), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        # The table comes from the checkpoint: no init (nn.Embedding's normal_ init on the meta
        # device the loader builds on would import torch._dynamo, as rope_inv_freq says).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(
            cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, input_ids: torch.Tensor, fb: ForwardBatch,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, hidden]; writes each token's k/v to the cache.

        kv_caches[i] = (k, v) of layer i, each [num_slots, num_kv_heads, head_dim].
        """
        x = self.embed_tokens(input_ids)  # [T, hidden]
        freqs = fb.positions.float()[:, None] * self.inv_freq[None, :]  # [T, hd / 2]
        cos = freqs.cos().repeat(1, 2)[:, None, :].to(x.dtype)  # [T, 1, hd], broadcast over heads
        sin = freqs.sin()
        sin = torch.cat((-sin, sin), dim=-1)[:, None, :].to(x.dtype)  # signed for apply_rope
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, cos, sin, k_cache, v_cache, fb)
        return self.norm.add_forward(residual, x)[1] if residual is not None else self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [rows, hidden] -> logits [rows, vocab] in float32 (the sampler's precision)."""
        if self.lm_head is None:  # tied to the embedding
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()  # an nn.Linear, or a quantized one

    def use_kernels(self, kernels: LayerKernels | None) -> None:
        """The layers' norms, activations and decode attention through `kernels` (None: torch's
        ops)."""
        for module in self.modules():
            if isinstance(module, RMSNorm | Attention | MLP):
                module.kernels = kernels

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the norms are never quantized)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device
