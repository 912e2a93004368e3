"""Zero-shot adapter confidences from each adapter's description and example prompts, for
*behaviour* cards (a style or format the prompt asks for; domain cards are read by
router/zero_shot_domain.py, which also says how the two are told apart).

Rule: embed the prompt and each of its clauses; for every clause take its best cosine to the
adapter's prototypes (description + the request clauses of its example prompts, see
`prototype_segments`) minus its best cosine to the plain background prompts
(router/plain_prompts.py); the adapter's contrast is the best clause's. A clause that is only the
topic of the question ("what is a comet") is as close to plain prompts as to any example, so it
scores ~0 or below; a clause that asks for the adapter's behaviour ("answer briefly") is close to
the examples and to no plain prompt. The contrast maps to [0, 1] with a logistic: CENTER is where
plain questions and style requests part (measured on the demo adapters: plain ~ -0.1, requests
+0.1 .. +0.6), SCALE keeps a rival adapter whose examples share a generic clause ("... your
answer ...", contrast ~0.2) well below a clear match (0.4+), so the residency margin does not swap
them. Both were chosen on a dev set of 42 prompts (adapters/demo/selector_dev.jsonl, some on the
card examples' topics) kept apart from adapters/demo/heldout.jsonl: the middle of the range with
the best decision accuracy, also with every adapter but the intended one resident (CENTER
0.08..0.1, SCALE 0.07..0.1).

Each adapter's score depends only on its own card and the fixed background, so registering one
adapter never changes another's confidence. An adapter with no description and no examples has
no prototypes and confidence 0 (until a trained head knows it).
"""

from __future__ import annotations

import torch

CENTER = 0.09
SCALE = 0.08


def to_confidence(contrast: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid((contrast - CENTER) / SCALE)


def prototype_texts(description: str, example_prompts: list[str]) -> list[str]:
    return [t for t in [description, *example_prompts] if t.strip()]


def prototype_segments(per_text: list[torch.Tensor], background: torch.Tensor) -> torch.Tensor:
    """The prototypes of one adapter from the embeddings of its prototype texts (per_text[0] =
    the description, then the example prompts; rows: the whole text, then its clauses).

    Kept: the description, whole and split; each example's whole when it is a single clause;
    and each example clause that is closer to a clause of another example than to any plain
    prompt. Examples vary the topic and repeat the request in other words, so what recurs is
    the request ("Answer briefly" ~ "As briefly as possible"), while a topic clause ("what is
    the capital of France") is closer to some plain question and would otherwise pull in plain
    questions on that topic. With fewer than two examples nothing recurs: all clauses are kept.
    """
    if not per_text:
        return torch.empty(0)
    examples = per_text[1:]
    if len(examples) < 2:
        return torch.cat(per_text)
    kept = [per_text[0]]
    owner = torch.cat([torch.full((len(t),), i) for i, t in enumerate(examples)])
    pooled = torch.cat(examples)  # [num_example_segments, dim]
    for i, segments in enumerate(examples):
        clauses = segments if len(segments) == 1 else segments[1:]
        support = clauses @ pooled.T  # [k, num_example_segments]
        support[:, owner == i] = -1.0  # from another example only
        plain = (clauses @ background.T).amax(dim=1)
        kept.append(clauses[support.amax(dim=1) > plain])
    return torch.cat(kept)


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
