"""worker.logprobs: values against log_softmax in float64, only the asking rows, forbidden
tokens left out of the top list, and the tokens returned unchanged."""

from __future__ import annotations

import pytest
import torch

from worker.logprobs import StepLogprobs

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_of_the_asking_rows(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 1000, generator=g) * 4).to(device)
    tokens = torch.tensor([3, 999, 0, 512, 7], device=device)
    step = StepLogprobs(logits, rows=[1, 3, 4], num_top=[0, 5, 20])
    host_tokens, rows = step.fetch(tokens)
    assert host_tokens == tokens.tolist()
    ref = logits.cpu().double().log_softmax(-1)
    for row, lp, want in zip([1, 3, 4], rows, [0, 5, 20], strict=True):
        assert lp.token_id == host_tokens[row]
        assert abs(lp.logprob - ref[row, lp.token_id].item()) < 1e-5
        assert len(lp.top) == want
        top = ref[row].topk(want)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        for (_, value), expected in zip(lp.top, top.values.tolist(), strict=True):
            assert abs(value - expected) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_forbidden_tokens_are_not_among_the_top(device: str) -> None:
    logits = torch.full((1, 100), float("-inf"), device=device)
    logits[0, [4, 9, 60]] = torch.tensor([1.0, 2.0, 0.5], device=device)
    _, (lp,) = StepLogprobs(logits, [0], [20]).fetch(torch.tensor([9], device=device))
    assert [t for t, _ in lp.top] == [9, 4, 60]
    assert lp.token_id == 9 and lp.logprob == pytest.approx(lp.top[0][1])
