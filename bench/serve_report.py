"""Tables, ratios and the PNG plot of bench/serve_bench.py results.

results: {scenario: {target: {"summary": summarize(...) dict, "records": [Record as dict],
"mismatched": int}}}.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

Results = dict[str, dict[str, dict[str, Any]]]

_COLUMNS = (("req/s", "req_per_s", "{:.3f}"), ("tok/s", "tokens_per_s", "{:.1f}"),
            ("lat mean", "latency_mean_s", "{:.1f}s"), ("lat p50", "latency_p50_s", "{:.1f}s"),
            ("lat p99", "latency_p99_s", "{:.1f}s"), ("TTFT mean", "ttft_mean_s", "{:.2f}s"),
            ("SLO", "slo_attainment", "{:.0%}"), ("failed", "num_failed", "{}"))


def _cell(fmt: str, value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return fmt.format(value)


def format_table(results: Results, slo_ttft_s: float) -> str:
    head = f"{'scenario':<10}{'target':<15}" + "".join(f"{name:>10}" for name, _, _ in _COLUMNS)
    lines = [head + f"{'len!=':>6}", "-" * (len(head) + 6)]
    for scenario, targets in results.items():
        for target, result in targets.items():
            summary = result["summary"]
            lines.append(f"{scenario:<10}{target:<15}" + "".join(
                f"{_cell(fmt, summary.get(key, math.nan)):>10}" for _, key, fmt in _COLUMNS)
                + f"{result.get('mismatched', 0):>6}")
    lines.append(f"SLO = share of requests with TTFT <= {slo_ttft_s:g} s; len!= = requests whose "
                 "streamed token count differs from the requested output length")
    return "\n".join(lines)


def ratio_lines(results: Results, ours: str = "edgelora", theirs: str = "llamacpp",
                target_ratio: float = 4.0, gated: str = "mixed",
                single_ratio: float | None = None) -> list[str]:
    """ours / theirs per scenario; PASS/MISS for the gated scenario (issue 5: throughput >=
    target_ratio x and SLO attainment >= theirs) and, given single_ratio, for "single" on
    throughput alone (issue 16's 1B-shape target); the others are reported as they are."""
    lines = []
    for scenario, targets in results.items():
        if ours not in targets or theirs not in targets:
            continue
        a, b = targets[ours]["summary"], targets[theirs]["summary"]
        req = a["req_per_s"] / b["req_per_s"] if b["req_per_s"] else math.inf
        tok = a["tokens_per_s"] / b["tokens_per_s"] if b["tokens_per_s"] else math.inf
        line = (f"{scenario}: {ours} / {theirs} = {req:.2f}x req/s, {tok:.2f}x tok/s; SLO "
                f"{a['slo_attainment']:.0%} vs {b['slo_attainment']:.0%}")
        if scenario == gated:
            ok = req >= target_ratio and a["slo_attainment"] >= b["slo_attainment"]
            line = (f"{'PASS' if ok else 'MISS'}  {line} (target >= {target_ratio:g}x and SLO "
                    ">= theirs)")
        elif scenario == "single" and single_ratio is not None:
            line = (f"{'PASS' if req >= single_ratio else 'MISS'}  {line} (target >= "
                    f"{single_ratio:g}x)")
        lines.append(line)
    return lines


def http_cost_lines(results: Results, http: str, grpc: str, max_cost: float = 0.05,
                    gated: str = "mixed") -> list[str]:
    """What our HTTP front costs against gRPC, per scenario: 1 - http / grpc tok/s, the median
    of the per-round ratios when both ran several rounds (round i of one against round i of the
    other); PASS/MISS for the gated scenario (issue 15: at most `max_cost`)."""
    lines = []
    for scenario, targets in results.items():
        if http not in targets or grpc not in targets:
            continue
        a, b = targets[http], targets[grpc]
        rounds = list(zip(a.get("rounds", [a["summary"]]), b.get("rounds", [b["summary"]]),
                          strict=True))
        ratios = sorted(h["tokens_per_s"] / g["tokens_per_s"] if g["tokens_per_s"] else math.nan
                        for h, g in rounds)
        ratio = (ratios[(len(ratios) - 1) // 2] + ratios[len(ratios) // 2]) / 2
        a, b = a["summary"], b["summary"]
        line = (f"{scenario}: {http} / {grpc} = {ratio:.3f}x tok/s ("
                f"{a['req_per_s']:.3f} vs {b['req_per_s']:.3f} req/s; TTFT "
                f"{a['ttft_mean_s']:.2f} vs {b['ttft_mean_s']:.2f} s): HTTP costs "
                f"{1 - ratio:.1%}")
        if len(rounds) > 1:
            line += f"; median of {len(rounds)} rounds' ratios " + ", ".join(
                f"{h['tokens_per_s'] / g['tokens_per_s']:.3f}" for h, g in rounds)
        if scenario == gated:
            ok = 1 - ratio <= max_cost
            line = f"{'PASS' if ok else 'MISS'}  {line} (target <= {max_cost:.0%})"
        lines.append(line)
    return lines


def _cdf(values: list[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)  # starts at 0 so a post-step plot rises at the first value
    return [ordered[0], *ordered], [0.0] + [(i + 1) / len(ordered) for i in range(len(ordered))]


def plot(results: Results, path: Path, slo_ttft_s: float) -> Path:
    """One row per scenario: latency CDF and TTFT over arrival time, one colour per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(results)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.6 * rows), squeeze=False)
    for row, (scenario, targets) in enumerate(results.items()):
        cdf_ax, ttft_ax = axes[row]
        for target, result in targets.items():
            ok = [r for r in result["records"] if not r["error"]]
            if not ok:
                continue
            start = min(r["arrival"] for r in result["records"])
            xs, ys = _cdf([r["done_at"] - r["arrival"] for r in ok])
            label = f"{target} ({result['summary']['tokens_per_s']:.0f} tok/s)"
            cdf_ax.step(xs, ys, where="post", label=label)
            ttft_ax.scatter([r["arrival"] - start for r in ok],
                            [r["first_token_at"] - r["arrival"] for r in ok], s=10, label=target)
        cdf_ax.set(title=f"{scenario}: end-to-end latency CDF", xlabel="latency (s)",
                   ylabel="fraction of requests")
        ttft_ax.axhline(slo_ttft_s, color="grey", linestyle="--", linewidth=1,
                        label=f"SLO {slo_ttft_s:g} s")
        ttft_ax.set(title=f"{scenario}: time to first token", xlabel="arrival (s)",
                    ylabel="TTFT (s)")
        for ax in (cdf_ax, ttft_ax):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
