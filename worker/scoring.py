"""Reference scoring inside a forward step: which hidden rows predict reference tokens, and the
log-probabilities of those tokens.

Only steps that hold a scoring sequence come here (see ModelRunner.run); logits are computed for
the predicting rows alone, a bounded number at a time, never for the whole step.
"""

from __future__ import annotations

import torch

from worker.model import LlamaModel
from worker.scheduler import ScheduledSeq

# Logit rows per pass: 256 x a 49k vocabulary is 48 MiB of float32, whatever the chunk length.
LOGIT_ROWS_PER_PASS = 256


def scored_positions(items: list[ScheduledSeq], offsets: list[int]
                     ) -> tuple[list[int], list[int], list[int]]:
    """-> (flat hidden index, target token id, row in items) of every reference token whose
    prediction this step computes. The hidden state at position p predicts token p + 1."""
    hidden_idx: list[int] = []
    targets: list[int] = []
    rows: list[int] = []
    for row, (it, offset) in enumerate(zip(items, offsets, strict=True)):
        seq = it.seq
        if not seq.is_scoring:
            continue
        start = seq.num_computed_tokens
        first = max(start, seq.first_scored_position)
        end = min(start + it.num_new_tokens, seq.num_tokens - 1)  # the last token predicts nothing
        for pos in range(first, end):
            hidden_idx.append(offset + pos - start)
            targets.append(seq.token_ids[pos + 1])
            rows.append(row)
    return hidden_idx, targets, rows


def row_log_likelihoods(model: LlamaModel, hidden: torch.Tensor, hidden_idx: list[int],
                        targets: list[int], rows: list[int], num_rows: int) -> list[float]:
    """Sum of log p(target) per row of the step (0 for rows without scored tokens); one sync."""
    device = hidden.device
    sums = torch.zeros(num_rows, dtype=torch.float64, device=device)
    if not hidden_idx:
        return sums.tolist()
    idx = torch.tensor(hidden_idx, dtype=torch.long, device=device)
    tgt = torch.tensor(targets, dtype=torch.long, device=device)
    row = torch.tensor(rows, dtype=torch.long, device=device)
    for start in range(0, len(hidden_idx), LOGIT_ROWS_PER_PASS):
        part = slice(start, start + LOGIT_ROWS_PER_PASS)
        logits = model.compute_logits(hidden.index_select(0, idx[part]))      # [n, vocab] fp32
        # log_softmax at the target only: no second [n, vocab] tensor
        logp = logits.gather(1, tgt[part, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        # float64 sums: thousands of terms of a few nats each keep 1e-6 nats of precision
        sums.index_add_(0, row[part], logp.double())
    return sums.tolist()
