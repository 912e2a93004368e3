"""router.outcome_model and router.outcome_db on hand-made embeddings: evidence is local, the
blend is a posterior mean with the card as prior, tenants are apart, reports are bounded and
come back from the database."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from router.outcome_db import OutcomeDB
from router.outcome_model import FLOOR, PRIOR_WEIGHT, Evidence, OutcomeModel

DIM = 8


def axis(i: int, tilt: float = 0.0, j: int = 1) -> torch.Tensor:
    v = torch.zeros(DIM)
    v[i] = 1.0
    v[j] += tilt
    return torch.nn.functional.normalize(v, dim=0)


def model(**kwargs) -> OutcomeModel:
    m = OutcomeModel(**kwargs)
    m.set_center(torch.zeros(DIM))  # no centering: cosines as built
    return m


def test_evidence_is_local_and_weighted_by_closeness() -> None:
    m = model()
    for _ in range(3):
        m.add("t", "a", axis(0), 1.0)
    m.add("t", "b", axis(0, tilt=0.3), 0.0)
    near = m.evidence("t", axis(0))
    assert near.weight["a"] == 3.0 and near.reward["a"] == 3.0
    cos_b = float(axis(0) @ axis(0, tilt=0.3))
    assert math.isclose(near.weight["b"], (cos_b - FLOOR) / (1 - FLOOR), rel_tol=1e-5)
    assert near.reward["b"] == 0.0
    assert m.evidence("t", axis(3)).weight == {}  # an orthogonal prompt: no evidence at all


def test_blend_is_the_posterior_mean_and_moves_the_threshold_with_the_base_model() -> None:
    evidence = Evidence(weight={"a": 2.0, "": 1.0}, reward={"a": 2.0, "": 0.0})
    confidences, threshold = OutcomeModel.blend({"a": 0.2, "b": 0.7}, 0.5, evidence)
    assert math.isclose(confidences["a"], (PRIOR_WEIGHT * 0.2 + 2.0) / (PRIOR_WEIGHT + 2.0))
    assert confidences["b"] == 0.7  # no evidence: the card as it is
    assert math.isclose(threshold, PRIOR_WEIGHT * 0.5 / (PRIOR_WEIGHT + 1.0))


def test_tenants_are_apart_and_reports_are_bounded() -> None:
    m = model(max_reports=3)
    m.add("acme", "shared", axis(0), 1.0)
    assert m.evidence("globex", axis(0)).weight == {} and not m.has_reports("globex")
    for i in range(5):
        m.add("acme", f"x{i}", axis(1), 0.5)
    assert m.count("acme") == 3 and "shared" not in m.evidence("acme", axis(0)).weight


def test_least_known_and_uncertainty() -> None:
    evidence = Evidence(weight={"a": 3.0, "b": 0.5})
    assert OutcomeModel.uncertainty(evidence, "c") == 1.0
    assert OutcomeModel.uncertainty(evidence, "a") == PRIOR_WEIGHT / (PRIOR_WEIGHT + 3.0)
    assert OutcomeModel.least_known(["a", "b", "c"], evidence) == "c"
    assert OutcomeModel.least_known([], evidence) is None


def test_reports_persist_and_unregistered_ones_are_dropped(tmp_path: Path) -> None:
    m = model(db=OutcomeDB(tmp_path, max_reports=100))
    m.add("acme", "acme:a", axis(0), 1.0)
    m.add("acme", "acme:gone", axis(0), 0.0)
    m.add("globex", "", axis(2), 0.25)
    m.db.close()
    again = OutcomeModel(db=OutcomeDB(tmp_path, max_reports=100))
    assert again.load(registered=["acme:a"]) == 2  # "gone" is no longer registered
    again.set_center(torch.zeros(DIM))
    assert again.evidence("acme", axis(0)).weight == {"acme:a": 1.0}
    assert again.evidence("globex", axis(2)).reward == {"": 0.25}
    again.forget(["acme:a"])
    again.db.close()
    third = OutcomeModel(db=OutcomeDB(tmp_path, max_reports=100))
    assert third.load(registered=["acme:a"]) == 1  # only the base model's report is left


def test_database_keeps_at_most_max_reports_per_tenant(tmp_path: Path) -> None:
    db = OutcomeDB(tmp_path, max_reports=2)
    for i in range(4):
        db.add("acme", f"k{i}", axis(0), 1.0)
    db.add("globex", "k", axis(0), 1.0)
    assert [key for tenant, key, _, _ in db.load() if tenant == "acme"] == ["k2", "k3"]
    assert len(list(db.load())) == 3


def test_reports_of_another_embedding_size_are_dropped_at_set_center() -> None:
    m = OutcomeModel()
    m.add("t", "a", torch.ones(4), 1.0)
    m.add("t", "a", axis(0), 1.0)
    m.set_center(torch.zeros(DIM))
    assert m.count("t") == 1
