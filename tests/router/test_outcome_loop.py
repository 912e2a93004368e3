"""Learning from outcomes, in a simulated loop on the real embedder: two adapters whose cards both
fit maths word problems, one of which the simulated client rewards; after a bounded number of
reports "auto" picks the rewarded one for >= 90% of new maths prompts, whichever of the two the
cards preferred, and nothing changes for prompts of other clusters (cooking, medical, legal,
generic questions, behaviour requests) or for another tenant. Prompts of neighbouring domains
that share words with maths problems (SQL over prices, finance) may move: at most 1% of them."""

from __future__ import annotations

import asyncio

import pytest

from bench.selector_accuracy import DEMO, DOMAINS, Card, read_cards, read_rows
from router.outcome_model import OutcomeModel
from router.selector import AdapterSelector

TENANT, OTHER = "acme", "globex"
APART = ("cooking", "medical", "legal", "")  # clusters with nothing of maths in them
MAX_REPORTS = 60  # the bound: 3 passes over 20 training prompts
# A second maths adapter, its card written apart from adapters/domains/maths/card.json.
TUTOR = Card("Arithmetic and algebra tutor: explains how to solve word problems about prices, "
             "speeds, ages, percentages and equations.",
             ["How many apples are left if I had 30 and gave away 12?",
              "A car uses 6 litres per 100 km. How much fuel for 450 km?",
              "What is 15% of 260?",
              "Sam is three times as old as his son; in 10 years he will be twice as old. "
              "How old is the son?",
              "Solve 5y - 3 = 2y + 9.",
              "A tank fills in 4 hours with one pump. How long with three pumps?"])


def cluster(path, adapter_id: str) -> list[str]:
    return [r["prompt"] for r in read_rows(path) if r["adapter_id"] == adapter_id]


@pytest.fixture(scope="module")
def cards() -> dict[str, Card]:
    return {**read_cards(DEMO, DOMAINS), "tutor": TUTOR}


def run(coro):
    return asyncio.run(coro)


def picks(selector: AdapterSelector, prompts: list[str], cards, tenant: str) -> list[str]:
    async def go():
        return [(await selector.select(p, cards, set(), tenant=tenant)).adapter_id
                for p in prompts]
    return run(go())


def loop(selector: AdapterSelector, prompts: list[str], cards, rewarded: str) -> int:
    """The client: every answer from `rewarded` gets 1, any other 0; -> reports sent."""
    async def go() -> int:
        sent = 0
        while sent < MAX_REPORTS:
            for prompt in prompts:
                selection = await selector.select(prompt, cards, set(), tenant=TENANT,
                                                  explore=True)
                assert selection.embedding is not None
                selector.outcomes.add(TENANT, selection.adapter_id, selection.embedding,
                                      float(selection.adapter_id == rewarded))
                sent += 1
        return sent
    return run(go())


@pytest.mark.parametrize("rewarded", ["maths", "tutor"])
def test_auto_learns_the_rewarded_adapter_of_a_cluster_and_only_there(batcher, cards,
                                                                        rewarded: str) -> None:
    selector = AdapterSelector(batcher, outcomes=OutcomeModel(), exploration=0.1, seed=0)
    train = cluster(DOMAINS / "heldout2.jsonl", "maths")
    new = cluster(DOMAINS / "heldout.jsonl", "maths")
    apart = [r["prompt"] for r in read_rows(DOMAINS / "heldout.jsonl")
             if r["adapter_id"] in APART] + [r["prompt"] for r in read_rows(DEMO / "heldout.jsonl")]
    near = [r["prompt"] for r in read_rows(DOMAINS / "heldout.jsonl")
            if r["adapter_id"] not in APART and r["adapter_id"] != "maths"]
    before_new = picks(selector, new, cards, TENANT)
    before_apart, before_near = picks(selector, apart, cards, TENANT), picks(selector, near, cards,
                                                                             TENANT)
    assert sum(p in ("maths", "tutor") for p in before_new) >= 0.8 * len(new)  # both fit
    print(f"cards alone: {before_new.count(rewarded)}/{len(new)} new maths prompts to "
          f"{rewarded!r}")

    loop(selector, train, cards, rewarded)

    after_new = picks(selector, new, cards, TENANT)
    share = after_new.count(rewarded) / len(new)
    print(f"after {MAX_REPORTS} reports: {share:.0%} to {rewarded!r}: {after_new}")
    assert share >= 0.9, after_new
    after_apart = picks(selector, apart, cards, TENANT)
    assert after_apart == before_apart, [(p, a, b) for p, a, b in zip(
        apart, before_apart, after_apart, strict=True) if a != b]
    after_near = picks(selector, near, cards, TENANT)
    moved = [(p, a, b) for p, a, b in zip(near, before_near, after_near, strict=True) if a != b]
    print(f"neighbouring domains: {len(moved)} of {len(near)} moved: {moved}")
    assert len(moved) <= 0.01 * len(near) + 1, moved
    # another tenant's "auto" is what the cards alone say
    assert picks(selector, new, cards, OTHER) == before_new


def test_reports_about_an_unregistered_adapter_are_forgotten(batcher, cards) -> None:
    selector = AdapterSelector(batcher, outcomes=OutcomeModel(), exploration=0.0)
    train = cluster(DOMAINS / "heldout2.jsonl", "maths")
    loop(selector, train[:5], cards, "tutor")
    assert selector.outcomes.count(TENANT) > 0
    remaining = {a: c for a, c in cards.items() if a not in ("tutor", "maths")}
    run(selector.sync(remaining))
    assert selector.outcomes.count(TENANT) == 0
