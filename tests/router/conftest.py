"""Fixtures shared by the selector's tests: one loaded embedder for the whole session (loading
MiniLM takes seconds; every selector test module embeds with it)."""

from __future__ import annotations

import pytest

from router.embedder import EmbeddingBatcher


@pytest.fixture(scope="session")
def batcher():
    batcher = EmbeddingBatcher(num_threads=1)
    yield batcher
    batcher.close()
