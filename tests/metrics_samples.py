"""Reading Prometheus text for the metrics tests: scrape over HTTP, parse with prometheus_client's
own parser, look samples up by name and labels."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    """A port nothing listens on now (for servers that take no port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(url: str, timeout_s: float = 10.0) -> Samples:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        assert response.status == 200, response.status
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(response.read().decode())


def parse(text: str) -> Samples:
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    wanted = set(labels.items())
    return sum(value for (sample, have), value in samples.items()
               if sample == name and wanted <= have)


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(have)[label] for sample, have in samples if sample == name and label in dict(have)}
