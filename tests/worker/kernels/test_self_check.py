"""worker.kernels.self_check: what a start-up check accepts, and what it logs when it refuses."""

from __future__ import annotations

import logging

import pytest

from worker.kernels.self_check import agrees

log = logging.getLogger("test_self_check")


def test_a_gap_within_tolerance_agrees(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert agrees(log, "kernel", "fallback", lambda: 0.01, 0.01)
        assert agrees(log, "kernel", "fallback", lambda: 0.0, 0.0)
    assert not caplog.records


@pytest.mark.parametrize(("gap", "logged"), [(0.5, "kernel off by 0.5 (> 0.01), fallback"),
                                             (float("nan"), "kernel off by nan")])
def test_a_larger_or_nan_gap_is_refused_and_logged(caplog: pytest.LogCaptureFixture, gap: float,
                                                   logged: str) -> None:
    with caplog.at_level(logging.WARNING):
        assert not agrees(log, "kernel", "fallback", lambda: gap, 0.01)
    assert logged in caplog.text


def test_a_check_that_raises_is_refused_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    def error() -> float:
        raise RuntimeError("out of resource: shared memory")

    with caplog.at_level(logging.WARNING):
        assert not agrees(log, "kernel", "fallback", error, 0.01)
    assert "kernel unusable, fallback: out of resource: shared memory" in caplog.text
