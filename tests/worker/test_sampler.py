"""Tests for worker.sampler: greedy, reproducibility, distribution, top-k/top-p, the hash, and
penalties inside a batch."""

from __future__ import annotations

import math

import pytest
import torch

from worker.penalties import PenaltyState
from worker.sampler import hash_uniform, make_sampling_tensors, sample
from worker.sequence import SamplingOptions, Sequence

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]

_M = 0xFFFFFFFF
_G = 0x9E3779B9


def _ref_fmix(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M
    return h ^ (h >> 16)


def _ref_uniform(seed: int, step: int, idx: int) -> float:
    """Pure-Python big-int reference of the same hash, free of any overflow concerns."""
    step32 = (step ^ (step >> 32)) & _M
    key = _ref_fmix(((_ref_fmix(seed) ^ step32) + _G) & _M)
    h = _ref_fmix((_ref_fmix(key ^ idx) + _G) & _M)
    return ((h >> 9) + 0.5) / 2**23


def _params(n: int, device: str, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
            seed: list[int] | None = None, step: list[int] | None = None):
    return make_sampling_tensors(
        [temperature] * n, [top_p] * n, [top_k] * n,
        seed if seed is not None else [0] * n,
        step if step is not None else list(range(n)),
        torch.device(device),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax(device: str) -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)).to(device)
    t = _params(6, device, temperature=0.0)
    assert t.all_greedy
    assert torch.equal(sample(logits, t), logits.argmax(-1))
    # mixed batch: greedy rows still argmax while the others sample
    t = make_sampling_tensors([0.0, 1.5, 0.0, 2.0, 0.0, 1.0], [1.0, 0.5] * 3, [0, 5] * 3,
                              [1] * 6, [3] * 6, torch.device(device))
    assert not t.all_greedy and t.needs_top_k_top_p
    out = sample(logits, t)
    assert out.dtype == torch.int64 and out.device.type == device
    assert torch.equal(out[::2], logits.argmax(-1)[::2])


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_ties_take_the_lowest_token(device: str) -> None:
    # bf16 logits tie often; the lowest id wins, as with argmax and transformers' generate
    logits = torch.zeros(3, 49152)
    logits[:, [7, 300, 49151]] = 2.0
    logits[1, 5] = 2.0
    logits = logits.to(torch.bfloat16).float().to(device)
    assert sample(logits, _params(3, device, temperature=0.0)).tolist() == [7, 5, 7]


@pytest.mark.parametrize("device", DEVICES)
def test_reproducible_whatever_the_batch(device: str) -> None:
    g = torch.Generator().manual_seed(1)
    row = torch.randn(1, 200, generator=g).to(device)
    others = torch.randn(5, 200, generator=g).to(device)
    for seed, step in [(0, 0), (7, 3), (12345, 99), (2**31 - 1, 10_000)]:
        alone = sample(row, make_sampling_tensors([0.9], [1.0], [0], [seed], [step],
                                                  torch.device(device)))
        # same row at position 3, next to rows that force the top-k/top-p sort path
        batch = torch.cat([others[:3], row, others[3:]])
        t = make_sampling_tensors([1.0, 0.0, 0.5, 0.9, 2.0, 1.0], [0.8, 1.0, 1.0, 1.0, 0.5, 1.0],
                                  [10, 0, 3, 0, 0, 0], [5, 6, 7, seed, 8, seed],
                                  [1, 2, 3, step, 4, step + 1], torch.device(device))
        assert t.needs_top_k_top_p
        assert sample(batch, t)[3] == alone[0]


@pytest.mark.parametrize("device", DEVICES)
def test_different_seeds_differ_on_flat_distribution(device: str) -> None:
    n, vocab = 200, 1000
    logits = torch.zeros(n, vocab, device=device)
    by_seed = sample(logits, _params(n, device, seed=list(range(n)), step=[0] * n))
    by_step = sample(logits, _params(n, device, seed=[42] * n, step=list(range(n))))
    # 200 uniform draws over 1000 tokens: ~180 distinct expected, a broken hash gives few
    assert len(set(by_seed.tolist())) > 150
    assert len(set(by_step.tolist())) > 150


@pytest.mark.parametrize("device", DEVICES)
def test_empirical_distribution_matches_softmax(device: str) -> None:
    n, temp = 20_000, 0.7
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2], device=device)
    t = _params(n, device, temperature=temp, seed=[9] * n)
    tokens = sample(logits.expand(n, -1).contiguous(), t)
    freq = torch.bincount(tokens.cpu(), minlength=8).double() / n
    expected = torch.softmax(logits.cpu().double() / temp, dim=-1)
    assert (freq - expected).abs().max() < 0.02


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_distribution_is_renormalized(device: str) -> None:
    n = 20_000
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2], device=device)
    t = _params(n, device, top_k=3, seed=[11] * n)
    tokens = sample(logits.expand(n, -1).contiguous(), t)
    freq = torch.bincount(tokens.cpu(), minlength=8).double() / n
    top = logits.cpu().double().topk(3).indices
    expected = torch.zeros(8, dtype=torch.float64)
    expected[top] = torch.softmax(logits.cpu().double()[top], dim=-1)
    assert (freq - expected).abs().max() < 0.02


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_one_is_argmax_even_when_hot(device: str) -> None:
    n = 500
    logits = torch.randn(n, 64, generator=torch.Generator().manual_seed(2)).to(device)
    t = _params(n, device, temperature=100.0, top_k=1, seed=list(range(n)))
    assert t.needs_top_k_top_p
    assert torch.equal(sample(logits, t), logits.argmax(-1))


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_stays_inside_top_k(device: str) -> None:
    n, k = 5000, 5
    logits = torch.randn(64, generator=torch.Generator().manual_seed(3)).to(device)
    tokens = sample(logits.expand(n, -1).contiguous(), _params(n, device, temperature=5.0, top_k=k))
    allowed = set(logits.topk(k).indices.tolist())
    assert set(tokens.tolist()) == allowed


@pytest.mark.parametrize("device", DEVICES)
def test_small_top_p_is_argmax(device: str) -> None:
    n = 500
    logits = torch.randn(n, 64, generator=torch.Generator().manual_seed(4)).to(device)
    t = _params(n, device, temperature=2.0, top_p=1e-4, seed=list(range(n)))
    assert torch.equal(sample(logits, t), logits.argmax(-1))


@pytest.mark.parametrize("device", DEVICES)
def test_top_p_stays_inside_nucleus(device: str) -> None:
    n = 5000
    # cumulative 0.5, 0.8, 0.95: the 0.9 nucleus is exactly tokens {2, 0, 4}
    probs = torch.tensor([0.3, 0.03, 0.5, 0.02, 0.15])
    logits = probs.log().to(device)
    tokens = sample(logits.expand(n, -1).contiguous(), _params(n, device, top_p=0.9))
    assert set(tokens.tolist()) == {0, 2, 4}
    # random logits: nucleus computed independently in float64
    logits = torch.randn(100, generator=torch.Generator().manual_seed(5)).double()
    p, order = torch.softmax(logits, -1).sort(descending=True)
    size = int((p.cumsum(-1) < 0.9).sum()) + 1
    nucleus = set(order[:size].tolist())
    tokens = sample(logits.float().to(device).expand(n, -1).contiguous(),
                    _params(n, device, top_p=0.9, seed=[3] * n))
    assert set(tokens.tolist()) <= nucleus


@pytest.mark.parametrize("device", DEVICES)
def test_hash_uniform_range_mean_and_reference(device: str) -> None:
    seeds = [0, 1, 2**31 - 1, 123456789]
    steps = [0, 5, 2**40 + 3, 4096]
    u = hash_uniform(torch.tensor(seeds, device=device), torch.tensor(steps, device=device), 50_000)
    assert u.shape == (4, 50_000) and u.dtype == torch.float32
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert abs(u.double().mean().item() - 0.5) < 0.005
    for r, (seed, step) in enumerate(zip(seeds, steps, strict=True)):
        for idx in [0, 1, 777, 49_999]:
            assert math.isclose(u[r, idx].item(), _ref_uniform(seed, step, idx), abs_tol=0.0)


def test_hash_uniform_same_on_cpu_and_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    seed, step = torch.tensor([3, 2**31 - 1]), torch.tensor([0, 77])
    assert torch.equal(hash_uniform(seed, step, 1000),
                       hash_uniform(seed.cuda(), step.cuda(), 1000).cpu())


def _penalized(request_id: int, outputs: list[int], **penalties) -> Sequence:
    seq = Sequence(request_id, [1, 2, 3], SamplingOptions(max_tokens=64, **penalties))
    seq.token_ids += outputs
    return seq


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_steer_greedy_away_from_repeats(device: str) -> None:
    logits = torch.zeros(3, 20, device=device)
    logits[:, 5] = 1.0  # the favourite, already generated twice
    logits[:, 6] = 0.9
    seqs = [_penalized(0, [5, 5], frequency_penalty=0.1),  # 1 - 0.2 < 0.9
            _penalized(1, [5, 5], presence_penalty=0.05),  # 0.95 still wins
            _penalized(2, [5], repetition_penalty=1.2)]  # 1 / 1.2 < 0.9
    t = _params(3, device, temperature=0.0)
    t.penalties = PenaltyState(20, torch.device(device)).gather([0, 1, 2], seqs)
    assert sample(logits.clone(), t).tolist() == [6, 5, 6]


@pytest.mark.parametrize("device", DEVICES)
def test_penalized_rows_are_batch_invariant_and_others_untouched(device: str) -> None:
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(6, 300, generator=g).to(device)
    history = torch.randint(300, (40,), generator=g).tolist()
    me = _penalized(0, history, repetition_penalty=1.4, frequency_penalty=0.3)
    dev = torch.device(device)
    alone = make_sampling_tensors([0.9], [1.0], [0], [3], [7], dev)
    alone.penalties = PenaltyState(300, dev).gather([0], [me])
    expected = sample(logits[2:3].clone(), alone)
    # the same row at position 2, neighbours with other penalties, none, and top-k / top-p
    args = ([1.0, 0.0, 0.9, 2.0, 0.7, 0.0], [0.8, 1.0, 1.0, 0.5, 1.0, 1.0], [5, 0, 0, 0, 3, 0],
            [5, 6, 3, 8, 9, 10], [1, 2, 7, 4, 5, 6])
    crowd = make_sampling_tensors(*args, dev)
    neighbours = [_penalized(i, history[:10 * i], presence_penalty=-0.5 * i) for i in (1, 2)]
    crowd.penalties = PenaltyState(300, dev).gather([0, 2, 4], [neighbours[0], me, neighbours[1]])
    got = sample(logits.clone(), crowd)
    assert got[2] == expected[0]
    plain = sample(logits.clone(), make_sampling_tensors(*args, dev))
    assert got[[1, 3, 5]].tolist() == plain[[1, 3, 5]].tolist()  # rows without penalties
