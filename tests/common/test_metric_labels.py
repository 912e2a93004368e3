"""common.metrics' bounds: the tenant cap, status names, adapter labels pruned at scrape."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from common.metrics import OTHER, AdapterCounter, LabelCap, status_name
from tests.metrics_samples import parse, total


def test_label_cap_keeps_the_first_values_for_good() -> None:
    cap = LabelCap(2)
    assert [cap(v) for v in ("a", "b", "c", "a", "b", "d")] == ["a", "b", OTHER, "a", "b", OTHER]
    with pytest.raises(ValueError):
        LabelCap(0)


def test_status_names_are_grpc_codes_only() -> None:
    assert status_name(grpc.StatusCode.NOT_FOUND) == "NOT_FOUND"
    assert status_name("RESOURCE_EXHAUSTED") == "RESOURCE_EXHAUSTED"
    assert status_name("anything else") == "UNKNOWN"


def test_adapter_counter_labels_known_adapters_and_prunes_forgotten_ones() -> None:
    known, registry = {"a"}, CollectorRegistry()
    counter = AdapterCounter("x", "doc", ("tenant",), known.__contains__, registry)
    for adapter_id in ("", "a", "b", "a"):
        counter.inc(adapter_id, "t", amount=2)
    s = parse(generate_latest(registry).decode())
    assert {a: total(s, "x_total", adapter=a) for a in ("", "a", OTHER)} == \
        {"": 2, "a": 4, OTHER: 2}
    known.clear()
    s = parse(generate_latest(registry).decode())
    assert total(s, "x_total", adapter="a") == 0 and total(s, "x_total") == 4
