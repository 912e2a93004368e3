"""Zero-shot adapter confidences from each adapter's description and example prompts.

Rule: embed the prompt and each of its clauses; for every clause take its best cosine to the
adapter's prototypes (description + example prompts, each also split into clauses) minus its best
cosine to the plain background prompts (router/plain_prompts.py); the adapter's contrast is the
best clause's. A clause that is only the topic of the question ("what is a comet") is as close to
plain prompts as to any example, so it scores ~0 or below; a clause that asks for the adapter's
behaviour ("answer briefly") is close to the examples and to no plain prompt. The contrast maps
to [0, 1] with a logistic: CENTER is where plain questions and style requests part (measured on
the demo adapters: plain ~ -0.1, requests +0.1 .. +0.6), SCALE keeps a rival adapter whose
examples share a generic clause ("... your answer ...", contrast ~0.2) well below a clear match
(0.4+), so the residency margin does not swap them. Both were chosen on a dev set of 32 prompts
kept apart from adapters/demo/heldout.jsonl (best decision accuracy, also with every adapter but
the intended one resident).

Each adapter's score depends only on its own card and the fixed background, so registering one
adapter never changes another's confidence. An adapter with no description and no examples has
no prototypes and confidence 0 (until a trained head knows it).
"""

from __future__ import annotations

import torch

CENTER = 0.1
SCALE = 0.07


def to_confidence(contrast: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid((contrast - CENTER) / SCALE)


def prototype_texts(description: str, example_prompts: list[str]) -> list[str]:
    return [t for t in [description, *example_prompts] if t.strip()]


def prototype_segments(per_text: list[torch.Tensor]) -> torch.Tensor:
    """The prototypes of one adapter from the embeddings of its prototype texts (rows: the whole
    text, then its clauses): the description whole and split, each example prompt's clauses, and
    its whole only when it has a single clause. The whole of "Answer briefly: why is the sky
    blue?" mixes the request with a topic and would pull in plain questions on nearby topics;
    its clause "Answer briefly" is the request alone."""
    kept = [t if i == 0 or len(t) == 1 else t[1:] for i, t in enumerate(per_text)]
    return torch.cat(kept) if kept else torch.empty(0)


class PrototypeIndex:
    """Clause embeddings of every adapter's prototypes, plus the background's."""

    def __init__(self, background: torch.Tensor) -> None:
        self.background = background  # [num_background_segments, dim]
        self._by_adapter: dict[str, torch.Tensor] = {}
        self._matrix: torch.Tensor | None = None  # [num_prototype_segments, dim], all adapters
        self._owner: torch.Tensor | None = None   # [num_prototype_segments] -> adapter index
        self._ids: list[str] = []

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._by_adapter

    def set(self, adapter_id: str, segments: torch.Tensor) -> None:
        """segments: [n, dim], every clause of every prototype text ([0, dim] = none)."""
        self._by_adapter[adapter_id] = segments
        self._matrix = None

    def remove(self, adapter_id: str) -> None:
        if self._by_adapter.pop(adapter_id, None) is not None:
            self._matrix = None

    def _build(self) -> None:
        self._ids = [a for a, seg in self._by_adapter.items() if len(seg)]
        parts = [self._by_adapter[a] for a in self._ids]
        dim = self.background.shape[1]
        self._matrix = torch.cat(parts) if parts else torch.empty(0, dim)
        self._owner = torch.cat([torch.full((len(p),), i) for i, p in enumerate(parts)]) \
            if parts else torch.empty(0, dtype=torch.long)

    def contrasts(self, segments: torch.Tensor) -> dict[str, float]:
        """segments: [k, dim] of one prompt -> raw contrast per adapter that has prototypes."""
        if self._matrix is None:
            self._build()
        assert self._matrix is not None and self._owner is not None
        if not self._ids:
            return {}
        plain = (segments @ self.background.T).amax(dim=1)  # [k]
        sims = segments @ self._matrix.T  # [k, num_prototype_segments]
        best = torch.full((len(segments), len(self._ids)), -2.0)  # [k, num_adapters]
        best.scatter_reduce_(1, self._owner.expand(len(segments), -1), sims, reduce="amax")
        contrast = (best - plain[:, None]).amax(dim=0)  # [num_adapters]
        return dict(zip(self._ids, contrast.tolist(), strict=True))
