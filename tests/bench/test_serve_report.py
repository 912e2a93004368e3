"""Tables, ratios and the plot of bench/serve_bench.py from hand-made results."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bench.serve_bench import (
    HTTP_LABEL,
    labels,
    median_round,
    parse_args,
    result_of,
    scenario_requests,
)
from bench.serve_report import format_table, http_cost_lines, plot, ratio_lines
from bench.workload import Record, Request, generate_workload
from worker.config import WorkerConfig


def _result(tokens_per_request: int, latency: float, ttft: float, n: int = 4) -> dict:
    requests = [Request(i, float(i), i % 2, 8, 10) for i in range(n)]
    records = [Record(i, float(i), i + ttft, i + latency, tokens_per_request) for i in range(n)]
    return result_of(requests, records, slo_ttft_s=6.0)


def test_result_counts_requests_whose_length_differs() -> None:
    assert _result(10, 5.0, 1.0)["mismatched"] == 0
    assert _result(9, 5.0, 1.0)["mismatched"] == 4


def test_ratios_and_pass_miss() -> None:
    results = {"mixed": {"edgelora": _result(10, 2.0, 1.0), "llamacpp": _result(10, 20.0, 7.0)},
               "single": {"edgelora": _result(10, 2.0, 1.0), "llamacpp": _result(10, 3.0, 1.0)}}
    mixed, single = ratio_lines(results, target_ratio=4.0)
    # throughput spans first arrival (0) -> last completion (3 + latency)
    assert mixed.startswith("PASS") and f"{23 / 5:.2f}x req/s" in mixed and "100% vs 0%" in mixed
    assert not single.startswith(("PASS", "MISS")) and f"{6 / 5:.2f}x" in single
    assert ratio_lines(results, target_ratio=5.0)[0].startswith("MISS")
    gated = ratio_lines(results, target_ratio=4.0, single_ratio=1.2)[1]
    assert gated.startswith("PASS") and "target >= 1.2x" in gated  # 6 / 5 = 1.2
    assert ratio_lines(results, target_ratio=4.0, single_ratio=1.3)[1].startswith("MISS")
    table = format_table(results, 6.0)
    assert table.count("edgelora") == 2 and "100%" in table and "0%" in table


def test_http_cost_against_grpc() -> None:
    results = {"mixed": {"edgelora": _result(100, 2.0, 1.0), HTTP_LABEL: _result(96, 2.0, 1.0)},
               "single": {"edgelora": _result(100, 2.0, 1.0), HTTP_LABEL: _result(90, 2.0, 1.0)}}
    mixed, single = http_cost_lines(results, http=HTTP_LABEL, grpc="edgelora")
    assert mixed.startswith("PASS") and "HTTP costs 4.0%" in mixed
    assert not single.startswith(("PASS", "MISS")) and "HTTP costs 10.0%" in single
    results["mixed"][HTTP_LABEL] = _result(94, 2.0, 1.0)
    assert http_cost_lines(results, http=HTTP_LABEL, grpc="edgelora")[0].startswith("MISS")
    assert HTTP_LABEL in format_table(results, 6.0)


def test_http_cost_of_several_rounds_is_the_median_of_paired_ratios() -> None:
    grpc = [_result(100, 2.0, 1.0), _result(50, 2.0, 1.0), _result(100, 2.0, 1.0)]
    http = [_result(97, 2.0, 1.0), _result(49, 2.0, 1.0), _result(80, 2.0, 1.0)]
    results = {"mixed": {"edgelora": median_round(grpc), HTTP_LABEL: median_round(http)}}
    # per round: 0.97, 0.98, 0.80 -> 0.97; the medians of each side alone would say 80/100
    (line,) = http_cost_lines(results, http=HTTP_LABEL, grpc="edgelora")
    assert line.startswith("PASS") and "HTTP costs 3.0%" in line and "0.970, 0.980, 0.800" in line
    assert results["mixed"]["edgelora"]["summary"] == grpc[0]["summary"]


def test_protocols_expand_our_target() -> None:
    assert labels(["edgelora", "llamacpp"], ["grpc"]) == ["edgelora", "llamacpp"]
    assert labels(["edgelora"], ["grpc", "http"]) == ["edgelora", HTTP_LABEL]
    assert parse_args(["--protocols", "grpc,http"]).protocols == ["grpc", "http"]
    assert parse_args(["--rounds", "3"]).rounds == 3


def test_plot_writes_a_png(tmp_path: Path) -> None:
    results = {"mixed": {"edgelora": _result(10, 2.0, 1.0), "llamacpp": _result(10, 20.0, 7.0)}}
    path = plot(results, tmp_path / "p.png", 6.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_scenario_puts_every_request_on_adapter_zero() -> None:
    requests = generate_workload(50, 32, seed=0)
    single = scenario_requests(requests, "single")
    assert {r.adapter for r in single} == {0}
    assert [dataclasses.replace(r, adapter=0) for r in requests] == single
    assert scenario_requests(requests, "mixed") is requests


def test_cli_defaults_match_the_issue() -> None:
    args = parse_args([])
    assert args.targets == ["edgelora", "llamacpp"] and args.scenarios == ["mixed", "single"]
    assert args.protocols == ["grpc"]  # `--protocols grpc,http` adds ours over HTTP
    # llama.cpp's --parallel is our max batch, the worker's default; 4 req/s saturates both;
    # every adapter fits our device slots, as llama.cpp holds them all
    assert (args.num_adapters, args.threads, args.rate) == (32, 2, 4.0)
    assert args.max_batch == WorkerConfig().max_batch_size == 64
    assert args.device_slots == args.num_adapters
