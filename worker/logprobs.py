"""Log-probabilities of a step's sampled tokens and of the most likely tokens, on the device, for
the rows that asked; one copy brings them to the host with the sampled tokens.

They are vLLM's default ("raw") logprobs: float32 log_softmax of the model's logits after the
response_format mask, before penalties, temperature, top-k and top-p.
"""

from __future__ import annotations

import torch

from worker.sequence import TokenLogprobs


class StepLogprobs:
    """Taken from the logits before sampling; fetch() after, with the sampled tokens."""

    def __init__(self, logits: torch.Tensor, rows: list[int], num_top: list[int]) -> None:
        """logits [batch, vocab] float32; rows: the batch rows that asked, num_top: how many
        most likely tokens each wants."""
        self.rows, self.num_top = rows, num_top
        self.index = torch.tensor(rows, dtype=torch.int64, device=logits.device)  # [L]
        self.logprobs = logits.index_select(0, self.index).log_softmax(dim=-1)  # [L, vocab]
        k = min(max(num_top), logits.shape[-1])
        self.top = self.logprobs.topk(k, dim=-1) if k else None  # ([L, k], [L, k])

    def fetch(self, tokens: torch.Tensor) -> tuple[list[int], list[TokenLogprobs]]:
        """tokens [batch] int64 -> (tokens on the host, each asking row's TokenLogprobs), in one
        device-to-host copy: float64 holds token ids exactly."""
        sampled = self.logprobs.gather(1, tokens.index_select(0, self.index)[:, None])  # [L, 1]
        parts = [tokens.double(), sampled.double().flatten()]
        if self.top is not None:
            parts += [self.top.values.double().flatten(), self.top.indices.double().flatten()]
        host = torch.cat(parts).tolist()
        batch, n = tokens.shape[0], len(self.rows)
        token_ids = [int(t) for t in host[:batch]]
        k = 0 if self.top is None else self.top.values.shape[1]
        values = host[batch + n:batch + n + n * k]
        ids = host[batch + n + n * k:]
        out = []
        for i, (row, want) in enumerate(zip(self.rows, self.num_top, strict=True)):
            # a token the response_format forbids has -inf: it is not among the likely ones
            top = [(int(ids[i * k + j]), values[i * k + j]) for j in range(min(want, k))
                   if values[i * k + j] != float("-inf")]
            out.append(TokenLogprobs(token_ids[row], host[batch + i], top))
        return token_ids, out
