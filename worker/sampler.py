"""Batched next-token sampling on device; never syncs with the host and never uses torch RNG."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.penalties import PenaltyTensors, apply_penalties

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # keeps fmix32 off its fixed point at zero


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [batch] float32; 0 = greedy
    top_p: torch.Tensor  # [batch] float32 in (0, 1]
    top_k: torch.Tensor  # [batch] int64; 0 = off
    seed: torch.Tensor  # [batch] int64, non-negative, < 2**31
    step: torch.Tensor  # [batch] int64, tokens this request has generated so far
    all_greedy: bool
    needs_top_k_top_p: bool
    penalties: PenaltyTensors | None = None  # None: no row of the step uses one


def make_sampling_tensors(
    temperature: list[float],
    top_p: list[float],
    top_k: list[int],
    seed: list[int],
    step: list[int],
    device: torch.device,
) -> SamplingTensors:
    """Build the per-batch tensors once from host lists and derive the host-side skip flags."""
    if not len(temperature) == len(top_p) == len(top_k) == len(seed) == len(step):
        raise ValueError("sampling parameter lists must all have the batch length")
    sampled = [i for i, t in enumerate(temperature) if t > 0.0]
    return SamplingTensors(
        temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
        top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
        top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
        seed=torch.tensor(seed, dtype=torch.int64, device=device),
        step=torch.tensor(step, dtype=torch.int64, device=device),
        all_greedy=not sampled,
        needs_top_k_top_p=any(top_k[i] > 0 or top_p[i] < 1.0 for i in sampled),
    )


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    # x < 2**32 and m < 2**32: splitting m in 16-bit halves keeps every product below 2**49,
    # so int64 never overflows and CPU/CUDA agree bit for bit.
    lo = x * (m & 0xFFFF)
    hi = ((x * (m >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # murmur3 finalizer: a bijection on 32-bit values with full avalanche
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hash_uniform(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1), shape [batch, vocab], a pure function of (seed, step, token index)."""
    step32 = (step ^ (step >> 32)) & _M32
    key = _fmix32(((_fmix32(seed & _M32) ^ step32) + _GOLDEN) & _M32)  # [batch]
    idx = torch.arange(vocab, dtype=torch.int64, device=seed.device)  # [vocab]
    h = _fmix32(key[:, None] ^ idx[None, :])  # [batch, vocab]
    h = _fmix32((h + _GOLDEN) & _M32)
    # 23 bits plus the half step still fit float32's 24-bit mantissa, so u is exact and
    # strictly inside (0, 1); with 24 bits the top value would round up to 1.0
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def _top_k_top_p_mask(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Bool [batch, vocab]: True for tokens that survive top-k then top-p."""
    vocab = logits.shape[-1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # [batch, vocab]
    k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)  # [batch]
    pos = torch.arange(vocab, device=logits.device)
    keep = pos[None, :] < k[:, None]  # [batch, vocab]
    probs = sorted_logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    # exclusive cumsum < p keeps the smallest prefix reaching p, and always the top token
    before = probs.cumsum(dim=-1) - probs
    # top_p == 1 must keep everything: a rounded cumsum could otherwise cut the far tail,
    # which would make a row's result depend on whether its batch took this path
    keep &= (before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    return torch.empty_like(keep).scatter_(-1, sorted_idx, keep)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """[batch, vocab] float32 -> each row's first-index argmax [batch] int64: the C++ kernel on
    CPU (~10 us a 128k-token row, where torch's reduction takes ~110), else torch's."""
    if logits.device.type == "cpu" and logits.dim() == 2:
        from worker.kernels import cpu  # not at import: the sampler serves any device

        kernels = cpu.load()
        if kernels is not None:
            return kernels.argmax_rows(logits)
    # max(dim).indices: the same first-index argmax, 2-4x faster than argmax on CPU here
    return logits.max(dim=-1).indices


def sample(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """logits [batch, vocab] float32 -> next token ids [batch] int64 (same device).

    Penalties change the penalized rows of `logits` in place (the caller took any logprobs
    before: they are of the unpenalized logits, as vLLM's default)."""
    if t.penalties is not None:
        logits = apply_penalties(logits, t.penalties)
    greedy_tokens = argmax(logits)  # [batch]
    if t.all_greedy:
        return greedy_tokens
    greedy = t.temperature <= 0.0  # [batch]
    temp = torch.where(greedy, 1.0, t.temperature)
    scaled = logits / temp[:, None]  # [batch, vocab]
    if t.needs_top_k_top_p:
        mask = _top_k_top_p_mask(scaled, t.top_k, t.top_p)
        scaled = scaled.masked_fill(~mask, float("-inf"))
    probs = scaled.softmax(dim=-1)  # [batch, vocab]
    u = hash_uniform(t.seed, t.step, logits.shape[-1])
    # exponential race: argmax(p / Exp(1)) draws index i with probability p_i
    sampled_tokens = (probs / -torch.log(u)).argmax(dim=-1)
    return torch.where(greedy, greedy_tokens, sampled_tokens)
