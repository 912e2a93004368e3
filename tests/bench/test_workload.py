"""The DESIGN.md workload generator, the replay driver and the summary metrics (no server)."""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics

import pytest

from bench.workload import Record, Request, generate_workload, replay, summarize


def test_arrivals_follow_gamma_rate_and_cv() -> None:
    requests = generate_workload(20000, 8, rate=4.0, cv=1.5, seed=1)
    gaps = [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(requests)]
    assert requests[0].arrival_s == 0.0
    assert all(g >= 0 for g in gaps)
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / 4.0, rel=0.05)
    assert statistics.pstdev(gaps) / mean == pytest.approx(1.5, rel=0.07)


def test_lengths_are_uniform_in_closed_ranges() -> None:
    requests = generate_workload(5000, 4, input_range=(8, 12), output_range=(20, 22), seed=2)
    assert {r.input_len for r in requests} == set(range(8, 13))
    assert {r.output_len for r in requests} == {20, 21, 22}
    assert [r.index for r in requests] == list(range(5000))


def test_zipf_popularity_matches_the_power_law() -> None:
    n, alpha = 32, 1.0
    requests = generate_workload(40000, n, alpha=alpha, seed=3)
    counts = [0] * n
    for r in requests:
        counts[r.adapter] += 1
    norm = sum((i + 1) ** -alpha for i in range(n))
    for i in (0, 1, 3, 31):
        assert counts[i] / len(requests) == pytest.approx((i + 1) ** -alpha / norm, abs=0.01)


def test_edgelora_rule_is_uniform_at_alpha_one_and_skewed_above() -> None:
    uniform = generate_workload(32000, 8, alpha=1.0, rule="edgelora", seed=4)
    shares = [sum(r.adapter == i for r in uniform) / len(uniform) for i in range(8)]
    assert max(shares) - min(shares) < 0.03
    skewed = generate_workload(32000, 8, alpha=2.0, rule="edgelora", seed=4)
    # floor(n * U^(1/2)) favours the high indices: P(i) = ((i+1)^2 - i^2) / n^2
    assert sum(r.adapter == 7 for r in skewed) / len(skewed) == pytest.approx(15 / 64, abs=0.02)


def test_same_seed_same_workload_and_duration_gives_a_prefix() -> None:
    full = generate_workload(300, 16, rate=2.0, seed=5)
    assert full == generate_workload(300, 16, rate=2.0, seed=5)
    assert full != generate_workload(300, 16, rate=2.0, seed=6)
    window = generate_workload(300, 16, rate=2.0, seed=5, duration_s=30.0)
    assert 0 < len(window) < len(full)
    assert window == full[:len(window)]
    assert all(r.arrival_s < 30.0 for r in window) and full[len(window)].arrival_s >= 30.0


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="rule"):
        generate_workload(4, 4, rule="uniform")
    with pytest.raises(ValueError):
        generate_workload(4, 0)


def test_summary_of_known_records() -> None:
    records = [Record(0, 0.0, 1.0, 4.0, 10), Record(1, 1.0, 8.0, 9.0, 20),
               Record(2, 2.0, 4.0, 6.0, 30), Record(3, 3.0, 0.0, 0.0, 0, "Boom")]
    s = summarize(records, slo_ttft_s=6.0)
    assert s["num_requests"] == 4 and s["num_failed"] == 1
    assert s["duration_s"] == pytest.approx(9.0)  # first arrival 0 -> last completion 9
    assert s["req_per_s"] == pytest.approx(3 / 9) and s["tokens_per_s"] == pytest.approx(60 / 9)
    assert s["latency_mean_s"] == pytest.approx((4 + 8 + 4) / 3)
    assert s["latency_p50_s"] == pytest.approx(4.0)
    assert s["latency_p99_s"] == pytest.approx(4 + 4 * 0.98)  # interpolated between 4 and 8
    assert s["ttft_mean_s"] == pytest.approx((1 + 7 + 2) / 3)
    assert s["slo_attainment"] == pytest.approx(2 / 4)  # the 7 s TTFT and the failure miss it
    assert summarize([Record(0, 0.0, 1.0, 2.0, 5)], slo_ttft_s=0.5)["slo_attainment"] == 0.0
    assert math.isnan(summarize([Record(0, 0.0, 0.0, 0.0, 0, "x")])["latency_mean_s"])


def test_replay_sends_at_arrival_times_and_records_each_outcome() -> None:
    requests = [Request(0, 0.0, 0, 8, 3), Request(1, 0.15, 1, 8, 2), Request(2, 0.05, 0, 8, 2),
                Request(3, 0.0, 0, 8, 2)]
    started: dict[int, float] = {}
    finished: list[int] = []

    async def stream(r: Request):
        started[r.index] = asyncio.get_running_loop().time()
        if r.index == 2:
            raise ConnectionError("refused")
        if r.index == 3:
            yield 0  # a stream that ends without a token has no TTFT: a failure
            return
        yield 0  # e.g. a prompt-progress event: not the first token
        await asyncio.sleep(0.05)
        for _ in range(r.output_len):
            yield 1

    records = asyncio.run(replay(requests, stream, on_done=lambda rec: finished.append(rec.index)))
    assert [r.index for r in records] == [0, 1, 2, 3]
    assert sorted(finished) == [0, 1, 2, 3]
    assert started[1] - started[0] == pytest.approx(0.15, abs=0.04)
    ok, late, failed, empty = records
    assert (ok.output_tokens, late.output_tokens) == (3, 2) and not ok.error
    assert ok.first_token_at - ok.arrival >= 0.045  # the zero-token chunk did not count
    assert late.arrival - ok.arrival == pytest.approx(0.15, abs=1e-6)
    assert failed.error == "ConnectionError: refused"
    assert empty.error == "no tokens streamed"
    assert summarize(records)["num_failed"] == 2
