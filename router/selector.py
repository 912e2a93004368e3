"""The adaptive adapter selector behind `adapter_id: "auto"` and SelectAdapter.

Confidence per registered adapter, in [0, 1], multi-label (several adapters can fit a prompt):
from the trained head (`--selector-head`, made by `edgelora router train`) for the adapters it
was trained on, else zero-shot from the adapter's description and example prompts, so an adapter
is selectable as soon as it is registered. A card is read by one of two rules: the kind it
declares, else the one its examples call for (router/zero_shot_domain.py, `card_kind`):
behaviour cards by the request they repeat (router/zero_shot.py), domain cards by the topic they
share (router/zero_shot_domain.py); a clear behaviour request outranks any topic
(`_topic_factor`).

Decision (`decide`, pure): rank by confidence; below `threshold` -> base model (""); else among the
`top_k` best that pass the threshold, take the best one resident on some worker (host or device
memory) unless it trails the best by more than `margin`, in which case the best (a disk load).

Outcomes (Router.ReportOutcome, router/outcome_model.py): a tenant's reported rewards near a
prompt move that tenant's confidences and threshold; where it has reported, a bounded share of
its requests (`exploration`, scaled down as the pick's evidence near the prompt grows) tries the
plausible adapter the rewards know least about.

Hot reload: the head file is re-read when its mtime or size changes, checked on every selection
(one stat). `edgelora router train` writes it atomically (temp file + rename), so a running router
picks up a new head on its next request, without restart or signal. A file that fails to load
keeps the previous head (logged).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
from collections.abc import Collection, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from router.embedder import EmbeddingBatcher
from router.outcome_db import OutcomeDB
from router.outcome_model import EVIDENT, Evidence, OutcomeModel
from router.plain_prompts import PLAIN_PROMPTS
from router.selector_head import TrainedHead
from router.zero_shot import PrototypeIndex, prototype_segments, prototype_texts, to_confidence
from router.zero_shot_domain import DOMAIN, TopicIndex, card_kind
from router.zero_shot_domain import to_confidence as to_domain_confidence

log = logging.getLogger(__name__)
BASE = ""
CLEAR_REQUEST = 0.9  # a behaviour confidence that outranks every domain (_topic_factor)
# Selection.kind: which rule of `decide` chose, a closed set (the metrics' "reason" label).
NO_ADAPTERS, BELOW_THRESHOLD = "no_adapters", "below_threshold"
BEST_RESIDENT, RESIDENT_WITHIN_MARGIN, BEST_NOT_RESIDENT, EXPLORING = (
    "best_resident", "resident_within_margin", "best_not_resident", "exploring")
SELECTION_KINDS = (NO_ADAPTERS, BELOW_THRESHOLD, BEST_RESIDENT, RESIDENT_WITHIN_MARGIN,
                   BEST_NOT_RESIDENT, EXPLORING)


class AdapterCard(Protocol):  # router.registry.AdapterRecord
    description: str
    example_prompts: list[str]


@dataclass(frozen=True)
class Selection:
    adapter_id: str                                  # "" = base model
    ranking: list[tuple[str, float]]                 # every adapter, best first
    reason: str
    # adapter -> "head" / "zero-shot" (a behaviour card) / "zero-shot domain"
    sources: dict[str, str] = field(default_factory=dict)
    kind: str = ""                                   # one of SELECTION_KINDS
    # the prompt's whole embedding (a report of its outcome is learned at this point)
    embedding: Any = field(default=None, compare=False, repr=False)


def decide(confidences: Mapping[str, float], resident: Set[str], *, top_k: int = 3,
           threshold: float = 0.5, margin: float = 0.1,
           sources: Mapping[str, str] | None = None) -> Selection:
    """Picks from confidences; `resident` = adapters held in memory by some worker."""
    ranking = sorted(confidences.items(), key=lambda item: (-item[1], item[0]))
    sources = dict(sources or {})
    if not ranking:
        return Selection(BASE, [], "no adapter is registered: base model", sources,
                         NO_ADAPTERS)
    best_id, best = ranking[0]
    how = f" ({sources[best_id]})" if best_id in sources else ""
    if best < threshold:
        return Selection(BASE, ranking, f"best adapter {best_id!r} has confidence {best:.2f}{how}"
                         f" < threshold {threshold:.2f}: base model", sources, BELOW_THRESHOLD)
    candidates = [(a, c) for a, c in ranking[:top_k] if c >= threshold]
    if best_id in resident:
        return Selection(best_id, ranking, f"{best_id!r} has the highest confidence {best:.2f}"
                         f"{how} and is resident on a worker", sources, BEST_RESIDENT)
    for adapter_id, confidence in candidates[1:]:
        if adapter_id in resident and best - confidence <= margin:
            return Selection(adapter_id, ranking, (
                f"{adapter_id!r} (confidence {confidence:.2f}) is resident on a worker and within "
                f"margin {margin:.2f} of the best {best_id!r} ({best:.2f}{how}), which is not"),
                sources, RESIDENT_WITHIN_MARGIN)
    return Selection(best_id, ranking, f"{best_id!r} has the highest confidence {best:.2f}{how}"
                     "; no resident candidate within the margin (it loads from disk)", sources,
                     BEST_NOT_RESIDENT)


class AdapterSelector:
    def __init__(self, batcher: EmbeddingBatcher, head_path: str = "", threshold: float = 0.5,
                 margin: float = 0.1, top_k: int = 3, outcomes: OutcomeModel | None = None,
                 exploration: float = 0.0, seed: int | None = None) -> None:
        self.batcher = batcher
        self.head_path = head_path
        self.threshold, self.margin, self.top_k = threshold, margin, top_k
        self.outcomes = outcomes  # None: reports are not learned
        self.exploration = exploration
        self._rng = random.Random(seed)
        self.head: TrainedHead | None = None
        self._head_stamp: tuple[float, int] | None = None
        self._index: PrototypeIndex | None = None  # behaviour cards (router/zero_shot.py)
        self._topics: TopicIndex | None = None     # domain cards (router/zero_shot_domain.py)
        self.kinds: dict[str, str] = {}  # adapter id -> how its card is read: behaviour / domain
        self._cards: dict[str, Any] = {}  # adapter id -> registry record its prototypes are of
        self._lock = asyncio.Lock()
        self._warm_up_task: asyncio.Task | None = None

    @classmethod
    def from_config(cls, config: Any) -> AdapterSelector:  # config: router.config.RouterConfig
        batcher = EmbeddingBatcher(num_threads=config.embedder_threads,
                                   dtype=config.embedder_dtype)
        outcomes = None
        if config.outcome_max_reports:  # kept beside the registry when it is kept
            db = OutcomeDB(config.state_dir, config.outcome_max_reports) if config.state_dir \
                else None
            outcomes = OutcomeModel(config.outcome_max_reports, db)
        return cls(batcher, config.selector_head, config.selector_threshold,
                   config.selector_margin, config.selector_top_k, outcomes,
                   config.outcome_exploration)

    # -- keeping up with the registry and the head file --
    async def sync(self, cards: Mapping[str, AdapterCard]) -> None:
        """Embeds the prototypes of adapters registered (or re-registered) since the last call,
        forgets unregistered ones. Cheap when nothing changed (identity check per adapter)."""
        if self._index is not None and len(cards) == len(self._cards) and all(
                self._cards.get(a) is card for a, card in cards.items()):
            return
        async with self._lock:
            if self._index is None or self._topics is None:
                plain = await self.batcher.run(lambda e, t: e.embed_segments(t),
                                               list(PLAIN_PROMPTS))
                self._index = PrototypeIndex(torch.cat(plain))
                self._topics = TopicIndex(torch.stack([p[0] for p in plain]))
                if self.outcomes is not None:
                    self.outcomes.set_center(self._topics.mean)
            removed = [a for a in self._cards if a not in cards]
            for adapter_id in removed:
                self._forget(adapter_id)
                del self._cards[adapter_id]
            if removed and self.outcomes is not None:  # its reports would mislead a new one
                self.outcomes.forget(removed)
            changed = {a: c for a, c in cards.items() if self._cards.get(a) is not c}
            for adapter_id, card in changed.items():
                texts = prototype_texts(card.description, list(card.example_prompts))
                if texts:  # a changed card's old prototypes serve until the new ones are in
                    per_text = await self.batcher.run(lambda e, t: e.embed_segments(t), texts)
                    self._add(adapter_id, per_text, has_description=bool(
                        card.description.strip()), declared=getattr(card, "kind", ""))
                else:  # nothing to embed (most tenants' adapters): no thread hop
                    self._forget(adapter_id)
                self._cards[adapter_id] = card

    def _add(self, adapter_id: str, per_text: list[torch.Tensor], has_description: bool,
             declared: str = "") -> None:
        """Files a card's embedded texts under the rule its kind (declared, else the one its
        examples call for) says."""
        assert self._index is not None and self._topics is not None
        kind = declared or card_kind(per_text[1:] if has_description else per_text)
        self.kinds[adapter_id] = kind
        if kind == DOMAIN:
            self._topics.set(adapter_id, torch.stack([t[0] for t in per_text]))
            self._index.remove(adapter_id)
        else:
            self._index.set(adapter_id, prototype_segments(per_text, self._index.background))
            self._topics.remove(adapter_id)

    def _forget(self, adapter_id: str) -> None:
        assert self._index is not None and self._topics is not None
        self._index.remove(adapter_id)
        self._topics.remove(adapter_id)
        self.kinds.pop(adapter_id, None)

    async def reload_head_if_changed(self) -> None:
        if not self.head_path:
            return
        try:
            st = os.stat(self.head_path)
        except FileNotFoundError:
            return  # not trained yet: zero-shot only
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._head_stamp:
            return
        self._head_stamp = stamp
        try:
            self.head = await self.batcher.run(_load_head, self.head_path)
        except Exception as exc:  # a bad file must not take selection down: keep the old head
            log.warning("selector head %s not loaded (keeping the previous one): %s",
                        self.head_path, exc)
            return
        log.info("selector head loaded from %s: %d adapters, held-out %s", self.head_path,
                 len(self.head.adapter_ids), self.head.metrics)

    # -- selecting --
    def confidences(self, segments: torch.Tensor, registered: Sequence[str]
                    ) -> tuple[dict[str, float], dict[str, str]]:
        """segments [k, dim] of one prompt -> confidence and its source per registered adapter."""
        assert self._index is not None and self._topics is not None
        registered_set = set(registered)
        confidences: dict[str, float] = dict.fromkeys(registered, 0.0)
        sources: dict[str, str] = dict.fromkeys(registered, "no description or examples")
        requested = 0.0  # the most confident behaviour card's confidence
        for raw, rule, source in ((self._index.contrasts(segments), to_confidence, "zero-shot"),
                                  (self._topics.scores(segments[0]), to_domain_confidence,
                                   "zero-shot domain")):
            ids = [a for a in raw if a in registered_set]
            if ids:
                values = rule(torch.tensor([raw[a] for a in ids]))
                if source == "zero-shot":
                    requested = float(values.max())
                else:
                    values = values * _topic_factor(requested)
                confidences.update(zip(ids, values.tolist(), strict=True))
                sources.update(dict.fromkeys(ids, source))
        if self.head is not None:
            known = {a: c for a, c in self.head.confidences(segments).items()
                     if a in registered_set}
            confidences.update(known)
            sources.update(dict.fromkeys(known, "head"))
        return confidences, sources

    async def select(self, text: str, cards: Mapping[str, AdapterCard], resident: Set[str],
                     candidates: Collection[str] | None = None, tenant: str | None = None,
                     explore: bool = False) -> Selection:
        """The decision for one prompt text (see router.embedder.prompt_text) among
        `candidates` (the adapters the caller may use; None = every one of `cards`, which are
        all the registered adapters: the index keeps every card's prototypes), moved by
        `tenant`'s reported outcomes; `explore`: may try a less known plausible adapter."""
        await self.sync(cards)
        await self.reload_head_if_changed()
        segments = await self.batcher.embed_segments(text)
        confidences, sources = self.confidences(
            segments, list(cards if candidates is None else candidates))
        threshold, evidence, prior = self.threshold, None, confidences
        if tenant is not None and self.outcomes is not None and \
                self.outcomes.has_reports(tenant):
            evidence = self.outcomes.evidence(tenant, segments[0])
            confidences, threshold = self.outcomes.blend(confidences, threshold, evidence)
            for adapter_id, weight in evidence.weight.items():
                if adapter_id in sources and weight >= EVIDENT:
                    sources[adapter_id] += f" + outcomes (weight {weight:.1f})"
        selection = decide(confidences, resident, top_k=self.top_k, threshold=threshold,
                           margin=self.margin, sources=sources)
        if explore and evidence is not None and self.exploration > 0 and \
                self._rng.random() < self.exploration * OutcomeModel.uncertainty(
                    evidence, selection.adapter_id):
            selection = self._explore(selection, prior, evidence)
        return dataclasses.replace(selection, embedding=segments[0])

    def _explore(self, selection: Selection, prior: Mapping[str, float],
                 evidence: Evidence) -> Selection:
        """The plausible adapter (its card passes the threshold) with the least evidence near
        the prompt, when it has less than the pick: rewards can only correct what is tried."""
        plausible = [a for a, c in prior.items() if c >= self.threshold]
        pick = selection.adapter_id
        other = OutcomeModel.least_known([a for a in plausible if a != pick], evidence)
        if other is None or evidence.weight.get(other, 0.0) >= evidence.weight.get(pick, 0.0):
            return selection
        return dataclasses.replace(selection, adapter_id=other, kind=EXPLORING, reason=(
            f"exploring: {other!r} fits by its card ({prior[other]:.2f}) and has less reported "
            f"evidence near this prompt than {pick or 'the base model'!r}"))

    async def warm_up(self, cards: Mapping[str, AdapterCard]) -> None:
        """Loads the model and embeds the prototypes now instead of on the first request."""
        await self.batcher.warm_up()
        await self.sync(cards)
        await self.reload_head_if_changed()

    def start_warm_up(self, cards: Mapping[str, AdapterCard]) -> None:
        """warm_up in the background (the server starts meanwhile); failures are logged and
        retried on first use."""
        self._warm_up_task = asyncio.get_running_loop().create_task(self.warm_up(cards))
        self._warm_up_task.add_done_callback(_log_failure)

    def close(self) -> None:
        self.batcher.close()
        if self.outcomes is not None and self.outcomes.db is not None:
            self.outcomes.db.close()


def _topic_factor(requested: float) -> float:
    """A clear behaviour request (zero-shot confidence b >= CLEAR_REQUEST) outranks any topic:
    domain confidences are scaled by 1 - b, far below the threshold, in their order
    (SelectAdapter's ranking still shows the topic). A weaker one competes as it is: the
    behaviour rule fires weakly on some topics ("a dictionary" ~ JSON, 0.5-0.8), where the
    domain is right; real requests score 0.99+ (the dev sets of router/zero_shot_domain.py)."""
    return 1.0 - requested if requested >= CLEAR_REQUEST else 1.0


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("selector warm-up failed (retried on first use): %r", task.exception())


def _load_head(embedder: Any, path: str) -> TrainedHead:
    head = TrainedHead.load(path)
    if head.weight.shape[1] != embedder.dim:
        raise ValueError(f"the head takes {head.weight.shape[1]}-d embeddings, the embedder "
                         f"makes {embedder.dim}-d ones: train it again with this embedder")
    return head
