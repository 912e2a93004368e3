"""Zero-shot confidences for *domain* adapters (chosen by what a prompt is about: maths word
problems, SQL, clinical questions), and which of the two zero-shot rules reads a card.

Two kinds of cards, told apart by how their example prompts are written (`card_kind`):
  - behaviour cards ("Answer in JSON: what is DNA?", "Reply in JSON format: how do plants grow?")
    vary the topic and repeat a request: one clause of each example recurs in the other examples
    more than the example as a whole does. They are read by router/zero_shot.py, which discounts
    a prompt's topic and looks for the request.
  - domain cards ("How long should I roast a chicken?", "Why did my bread come out dense?") share
    a topic and no request: the whole example recurs at least as much as any of its clauses.
    They are read here, by topic, because discounting the topic would erase their only signal.
The lift (best clause's recurrence minus the whole example's, averaged over the examples) is
0.16..0.32 on behaviour cards and -0.07..0.03 on domain cards (the 4 demo cards, the 7 of
adapters/domains/ and 11 more written to check this rule, 5 behaviour and 6 domain, in
tests/router/data/kind_check_cards.jsonl);
KIND_LIFT sits between. A card with fewer than two examples has nothing to recur: behaviour,
the rule the selector used for every card before domain cards existed.

Domain rule: embeddings are centered on the mean of the plain background prompts
(router/plain_prompts.py) and renormalized, which removes the direction every English question
shares (MiniLM's raw cosines between unrelated questions are 0.2-0.5) and leaves the topic. A
prompt's score for an adapter is the mean of its TOP_PROTOTYPES best centered cosines to the
adapter's description and example prompts (whole), minus the mean of its TOP_BACKGROUND best to
the background: a prompt about cooking is near several cooking examples and near only one or two
plain prompts; a prompt about cats is near no cooking example and near several plain prompts.
Plain prompts on an adapter's own topic ("How do I boil pasta?" for a cooking card) would count
against that topic's prompts, so each adapter leaves out of its background the plain prompts its
card claims (the ones this rule would send to it, scored against the rest of the background);
and the mean over several background prompts (not the best one) dampens any it misses. The score
maps to [0, 1] with a logistic. CENTER, SCALE, TOP_PROTOTYPES and TOP_BACKGROUND were chosen on
adapters/domains/dev.jsonl, dev2.jsonl and adapters/demo/selector_dev.jsonl, kept apart from the
held-out sets the benchmark reports (docs/selector.md, "Measured", says what was decided after a
look at held-out misses: leaving claimed prompts out of the background was).

Like the behaviour rule, an adapter's score depends only on its own card and the fixed
background: registering one adapter never changes another's confidence.
"""

from __future__ import annotations

import torch

BEHAVIOUR, DOMAIN = "behaviour", "domain"
KIND_LIFT = 0.09
TOP_PROTOTYPES = 3
TOP_BACKGROUND = 10
CENTER = 0.04  # 0.06 until adapters/domains/dev2.jsonl: see docs/selector.md, "Measured"
SCALE = 0.05


def card_kind(examples: list[torch.Tensor]) -> str:
    """BEHAVIOUR or DOMAIN, from a card's embedded example prompts (rows of each: the whole
    text, then its clauses)."""
    if len(examples) < 2:
        return BEHAVIOUR
    lifts = []
    for i, segments in enumerate(examples):
        others = [e for j, e in enumerate(examples) if j != i]
        clauses = segments if len(segments) == 1 else segments[1:]
        best_clause = (clauses @ torch.cat(others).T).max()
        best_whole = (segments[:1] @ torch.stack([e[0] for e in others]).T).max()
        lifts.append(float(best_clause - best_whole))
    return BEHAVIOUR if sum(lifts) / len(lifts) > KIND_LIFT else DOMAIN


def to_confidence(score: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid((score - CENTER) / SCALE)


def _center(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x - mean, dim=-1)


class TopicIndex:
    """The whole-text embeddings of every domain adapter's card, centered, plus the
    background's, centered the same way."""

    def __init__(self, background: torch.Tensor) -> None:
        """background: [num_plain_prompts, dim], the whole embedding of each plain prompt."""
        self._mean = background.mean(dim=0)  # [dim]
        self._background = _center(background, self._mean)  # [num_plain_prompts, dim]
        among = self._background @ self._background.T  # [num_plain, num_plain]
        among.fill_diagonal_(float("-inf"))  # each plain prompt against the others
        self._plain_level = _top_mean(among, TOP_BACKGROUND)  # [num_plain_prompts]
        self._by_adapter: dict[str, torch.Tensor] = {}
        self._claimed: dict[str, torch.Tensor] = {}  # adapter -> [num_plain_prompts] bool
        self._ids: list[str] = []
        self._padded: torch.Tensor | None = None  # [num_adapters, max_prototypes, dim], zeros past
        self._count: torch.Tensor | None = None   # [num_adapters] prototypes of each
        self._left_out: torch.Tensor | None = None  # [num_adapters, num_plain_prompts] claimed

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._by_adapter

    @property
    def mean(self) -> torch.Tensor:
        """The plain prompts' mean whole embedding, what centering removes: [dim]."""
        return self._mean

    def set(self, adapter_id: str, wholes: torch.Tensor) -> None:
        """wholes: [n, dim], the whole embedding of the description and of each example."""
        prototypes = _center(wholes, self._mean)
        self._by_adapter[adapter_id] = prototypes
        self._claimed[adapter_id] = self._claims(prototypes)
        self._padded = None

    def _claims(self, prototypes: torch.Tensor) -> torch.Tensor:
        """The plain prompts this rule would give the adapter -> [num_plain_prompts] bool; at
        most all but TOP_BACKGROUND (or half) of them, the most claimed: a background remains."""
        if not len(prototypes):
            return torch.zeros(len(self._background), dtype=torch.bool)
        score = _top_mean(self._background @ prototypes.T, TOP_PROTOTYPES) - self._plain_level
        claimed = score >= CENTER
        room = len(self._background) - min(TOP_BACKGROUND, len(self._background) // 2)
        if int(claimed.sum()) > room:
            claimed = torch.zeros_like(claimed)
            claimed[score.topk(room).indices] = True
        return claimed

    def remove(self, adapter_id: str) -> None:
        if self._by_adapter.pop(adapter_id, None) is not None:
            del self._claimed[adapter_id]
            self._padded = None

    def _build(self) -> None:
        self._ids = [a for a, p in self._by_adapter.items() if len(p)]
        width = max((len(self._by_adapter[a]) for a in self._ids), default=0)
        self._padded = torch.zeros(len(self._ids), width, self._background.shape[1])
        for row, adapter_id in enumerate(self._ids):
            prototypes = self._by_adapter[adapter_id]
            self._padded[row, :len(prototypes)] = prototypes
        self._count = torch.tensor([len(self._by_adapter[a]) for a in self._ids])
        self._left_out = torch.stack([self._claimed[a] for a in self._ids]) if self._ids \
            else torch.zeros(0, len(self._background), dtype=torch.bool)

    def scores(self, whole: torch.Tensor) -> dict[str, float]:
        """whole: [dim], the prompt's whole embedding -> raw score per domain adapter."""
        if self._padded is None:
            self._build()
        assert self._padded is not None and self._count is not None
        assert self._left_out is not None
        if not self._ids:
            return {}
        query = _center(whole, self._mean)  # [dim]
        plain = (self._background @ query).expand(len(self._ids), -1)  # [num_adapters, num_plain]
        plain = _top_mean(plain.masked_fill(self._left_out, float("-inf")), TOP_BACKGROUND)
        sims = self._padded @ query  # [num_adapters, max_prototypes]
        width = sims.shape[1]
        sims = sims.masked_fill(torch.arange(width) >= self._count[:, None], float("-inf"))
        best = _top_mean(sims, TOP_PROTOTYPES)  # [num_adapters]
        return dict(zip(self._ids, (best - plain).tolist(), strict=True))


def _top_mean(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k largest finite values of each row: [n, m] -> [n] (-inf = absent)."""
    top = values.topk(min(k, values.shape[1]), dim=1).values  # [n, k]
    present = top > float("-inf")
    return top.masked_fill(~present, 0.0).sum(dim=1) / present.sum(dim=1).clamp(min=1)
