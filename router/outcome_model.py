"""What a tenant's reported outcomes say about each adapter near a prompt, blended into the
selector's confidences (Router.ReportOutcome; docs/selector.md, "Learning from outcomes").

A local, kernel-weighted bandit over the prompt embedding rather than a linear one (LinUCB):
every report is (prompt embedding, adapter, reward in [0, 1]); near a new prompt an adapter's
evidence is W = sum of k(prompt, report) over its reports and its reward sum R = sum of k * r,
with k = (cos - FLOOR) / (1 - FLOOR), 0 below FLOOR, on embeddings centered like the domain
rule's (router/zero_shot_domain.py). Its confidence becomes the posterior
mean with the card's confidence as prior worth PRIOR_WEIGHT reports:
    (PRIOR_WEIGHT * card + R) / (PRIOR_WEIGHT + W)
and the base model's reports move the threshold the same way (the threshold is its prior). Why
local: a linear model over MiniLM embeddings moves every prompt's score (unrelated prompts share
a large common direction), so rewards about maths prompts would change picks for cooking
prompts; here a prompt with no report nearby keeps exactly its card confidence. The
uncertainty term of a UCB is the evidence itself: `least_known` names the plausible candidate
with the least evidence, which the selector tries on a bounded share of requests
(--outcome-exploration times `uncertainty`, the prior's share of the pick's confidence: once
the pick is well known near a prompt, it is seldom second-guessed there).

State is per tenant: one tenant's reports never change another tenant's picks, shared adapters
included. At most `max_reports` per tenant, the oldest dropped first. With a database
(router/outcome_db.py) every change is written through, and `load` brings it back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from router.outcome_db import OutcomeDB

# Centered cosines of two prompts of one domain: median 0.14, 90th percentile 0.35; of two
# domains: median 0.01, 95th percentile 0.11 (adapters/domains/dev.jsonl against heldout.jsonl).
# At 0.2, 8 reports of a domain give its new prompts a median weight of 0.4-0.55 and other
# domains' prompts 0 (95th percentile <= 0.12, the worst 0.48). Chosen on the simulated loop of
# tests/router/test_outcome_loop.py: 0.2 let one generic prompt near the threshold move once the
# domain rule's CENTER went to 0.04; 0.25 and 0.3, a prior worth 4 reports, squared weights and
# only the nearest 8 or 16 reports leaked as little but learned 85% instead of 95%.
FLOOR = 0.22
PRIOR_WEIGHT = 2.0   # the card's confidence counts as this many reports
EVIDENT = 0.05       # less evidence than this is not worth naming in a selection's sources


@dataclass
class Evidence:
    weight: dict[str, float] = field(default_factory=dict)  # adapter key -> W near the prompt
    reward: dict[str, float] = field(default_factory=dict)  # adapter key -> R near the prompt


@dataclass
class _TenantReports:
    embeddings: list[torch.Tensor] = field(default_factory=list)  # raw, [dim] each
    keys: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    built: tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor] | None = None

    def retain(self, keep: Callable[[torch.Tensor, str], bool]) -> None:
        """Only the reports whose (embedding, adapter key) `keep` accepts."""
        kept = [i for i, (e, k) in enumerate(zip(self.embeddings, self.keys, strict=True))
                if keep(e, k)]
        if len(kept) != len(self.keys):
            self.embeddings = [self.embeddings[i] for i in kept]
            self.keys = [self.keys[i] for i in kept]
            self.rewards = [self.rewards[i] for i in kept]
            self.built = None


class OutcomeModel:
    def __init__(self, max_reports: int = 4096, db: OutcomeDB | None = None) -> None:
        self.max_reports = max_reports
        self.db = db
        self._center: torch.Tensor | None = None
        self._tenants: dict[str, _TenantReports] = {}

    def load(self, registered: Iterable[str]) -> int:
        """The database's reports about adapters still registered (the others are deleted);
        -> how many were loaded."""
        if self.db is None:
            return 0
        keep = set(registered) | {""}
        rows = list(self.db.load())
        gone = {key for _, key, _, _ in rows if key not in keep}
        if gone:
            self.db.forget(sorted(gone))
        for tenant, key, embedding, reward in rows:
            if key in keep:
                self._append(tenant, key, embedding, reward)
        return sum(len(r.keys) for r in self._tenants.values())

    def set_center(self, mean: torch.Tensor) -> None:
        """The mean embedding of the plain prompts (the selector's background); reports of
        another size (made with another embedder) are dropped."""
        self._center = mean
        for reports in self._tenants.values():
            reports.retain(lambda embedding, _: embedding.shape == mean.shape)
            reports.built = None  # centered anew

    def has_reports(self, tenant: str) -> bool:
        return bool(self._tenants.get(tenant) and self._tenants[tenant].keys)

    def count(self, tenant: str) -> int:
        return len(self._tenants[tenant].keys) if tenant in self._tenants else 0

    def add(self, tenant: str, adapter_key: str, embedding: torch.Tensor, reward: float) -> None:
        if self.db is not None:
            self.db.add(tenant, adapter_key, embedding, reward)
        self._append(tenant, adapter_key, embedding, reward)

    def _append(self, tenant: str, adapter_key: str, embedding: torch.Tensor,
                reward: float) -> None:
        reports = self._tenants.setdefault(tenant, _TenantReports())
        reports.embeddings.append(embedding.detach().float().reshape(-1))
        reports.keys.append(adapter_key)
        reports.rewards.append(float(reward))
        excess = len(reports.keys) - self.max_reports
        if excess > 0:
            del reports.embeddings[:excess], reports.keys[:excess], reports.rewards[:excess]
        reports.built = None

    def forget(self, adapter_keys: Iterable[str]) -> None:
        """Drops every tenant's reports about these adapters (unregistered)."""
        gone = set(adapter_keys)
        if self.db is not None and gone:
            self.db.forget(sorted(gone))
        for reports in self._tenants.values():
            reports.retain(lambda _, key: key not in gone)

    def evidence(self, tenant: str, whole: torch.Tensor) -> Evidence:
        """W and R per adapter key near the prompt (whole: its raw [dim] embedding)."""
        reports = self._tenants.get(tenant)
        if reports is None or not reports.keys or self._center is None:
            return Evidence()
        if reports.built is None:
            matrix = _centered(torch.stack(reports.embeddings), self._center)
            names = sorted(set(reports.keys))
            index = {name: i for i, name in enumerate(names)}
            reports.built = (matrix, torch.tensor([index[k] for k in reports.keys]), names,
                             torch.tensor(reports.rewards))
        matrix, key_index, names, rewards = reports.built
        cosine = matrix @ _centered(whole.float().reshape(1, -1), self._center)[0]
        kernel = ((cosine - FLOOR) / (1.0 - FLOOR)).clamp(min=0.0)
        weight = torch.zeros(len(names)).index_add_(0, key_index, kernel)
        reward = torch.zeros(len(names)).index_add_(0, key_index, kernel * rewards)
        out = Evidence()
        for name, w, r in zip(names, weight.tolist(), reward.tolist(), strict=True):
            if w > 0.0:
                out.weight[name], out.reward[name] = w, r
        return out

    @staticmethod
    def blend(confidences: Mapping[str, float], threshold: float, evidence: Evidence,
              base_key: str = "") -> tuple[dict[str, float], float]:
        """Posterior means: the cards' confidences and the threshold (the base model's prior)
        moved by the rewards near the prompt; untouched where there is no evidence."""
        def posterior(prior: float, key: str) -> float:
            w = evidence.weight.get(key, 0.0)
            return (PRIOR_WEIGHT * prior + evidence.reward.get(key, 0.0)) / (PRIOR_WEIGHT + w)

        return ({a: posterior(c, a) for a, c in confidences.items()},
                posterior(threshold, base_key))

    @staticmethod
    def uncertainty(evidence: Evidence, adapter_key: str) -> float:
        """1 where no report is near, shrinking as the adapter's evidence grows: the weight the
        card's prior still has in its confidence."""
        return PRIOR_WEIGHT / (PRIOR_WEIGHT + evidence.weight.get(adapter_key, 0.0))

    @staticmethod
    def least_known(candidates: Iterable[str], evidence: Evidence) -> str | None:
        """The candidate with the least evidence near the prompt (first on ties)."""
        ranked = sorted(candidates, key=lambda a: evidence.weight.get(a, 0.0))
        return ranked[0] if ranked else None


def _centered(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x - mean, dim=-1)
