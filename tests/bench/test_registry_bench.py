"""bench/registry.py --quick end to end: real worker and router processes on the default model,
uploads cold and warm, router restarts with 500 registrations. Checks the figures are there and
sane, and that a restart against a worker holding every registration registers nothing again.
Slow (a benchmark, about a minute on 2 cores): not part of `make test`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]

REPO = Path(__file__).resolve().parents[2]
QUICK_N = 500
QUICK_REPEATS = 2


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path
          ) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("registry-bench") / "figures.json"
    run = subprocess.run([sys.executable, "bench/registry.py", "--quick", "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout, json.loads(out.read_text())


def test_prints_every_section_and_the_machine(quick) -> None:
    text, _ = quick
    for heading in ("command: ", "machine: ", "1. upload", "2. registration -> first token",
                    f"3. router restart with N={QUICK_N}", "cold/warm", "load average at start",
                    "at end"):
        assert heading in text, text


def test_upload_figures_are_positive_and_sane(quick) -> None:
    _, figures = quick
    uploads = figures["uploads"]
    assert set(uploads) == {"8", "64"}
    # rank 64 holds 8x the numbers of rank 8 (all 7 projections, float32)
    assert 7.5 < uploads["64"]["bytes"] / uploads["8"]["bytes"] < 8.5
    for rank in uploads.values():
        for key in ("cold_ack", "warm_ack", "cold_first", "warm_first"):
            assert len(rank[key]) == QUICK_REPEATS
            assert all(0 < seconds < 120 for seconds in rank[key]), (key, rank[key])
        # cold really was cold (pushed), warm really was on the worker's disk
        assert rank["cold_checks"] == rank["warm_checks"] == QUICK_REPEATS


def test_restarts_list_every_registration_and_sync_only_what_is_missing(quick) -> None:
    _, figures = quick
    restarts = figures["restarts"]
    assert restarts["n"] == QUICK_N and restarts["fill_s"] > 0
    empty, cold, *warm = restarts["rows"]
    assert warm, "at least one restart with the worker holding them"
    for row in (empty, cold, *warm):
        assert 0 < row["serving_s"] <= row["listed_s"] <= row["generated_s"] < 600, row
        assert row["log_serving"] > 0 and row["generate_again_s"] > 0, row
    assert empty["listed"] == 0
    assert cold["listed"] == QUICK_N and all(w["listed"] == QUICK_N for w in warm)
    # the worker lacked them: the start registered every one there, once
    assert cold["log_sync_registered"] == QUICK_N and cold["worker_registered"] == QUICK_N
    assert cold["log_synced"] >= cold["log_loaded"] > 0
    for row in warm:  # it held them: nothing registered again, nothing reloaded
        assert "log_sync_registered" not in row, row
        assert row["worker_registered"] == 0 and row["worker_new_loads"] == 0, row
    assert restarts["worker_list_bytes"] > 0
