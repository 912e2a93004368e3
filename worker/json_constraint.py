"""JSON output (response_format json_object / json_schema): grammars compiled with xgrammar, one
matcher per sequence, and the per-row token masks of a step.

xgrammar (vLLM's default structured-output backend) over llguidance: both build masks on this
CPU and read SmolLM2's byte-level tokenizer, but xgrammar filled a mask in 2-80 us here against
llguidance's 40 us-8 ms, and imports in a quarter of the time. Masks are applied in plain torch,
so CPU and CUDA workers share the code and no extra kernel is built.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from common.errors import InvalidArgument
from common.limits import shown
from worker.schema_trial import SchemaTrial

JSON_OBJECT, JSON_SCHEMA = "json_object", "json_schema"
# Whitespace characters allowed between two JSON tokens: enough for pretty-printing, while a
# small model can no longer loop on whitespace until max_tokens (cutting the JSON short).
MAX_WHITESPACE = 32
_BITS = 32  # tokens per int32 word of a bitmask
CACHED_GRAMMARS = 64  # clients tend to send the same few schemas again and again


class JsonGrammars:
    """Compiles response formats for one tokenizer and vocabulary (the model's, which may be
    larger than the tokenizer's: the extra ids are never allowed)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        import xgrammar  # heavy import: only once a request asks for JSON

        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=stop_token_ids)
        # one thread: compiles run off the event loop and must not take the engine's cores
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self._trial = SchemaTrial(info)  # a client's schema, under a deadline
        self._cache: dict[tuple[str, str], Any] = {}  # (type, schema) -> compiled, oldest first
        self.vocab_size = vocab_size

    def cached(self, format_type: str, json_schema: str = "") -> Any | None:
        """The compiled grammar if this format was compiled lately, else None; no compiling."""
        return self._cache.get((format_type, json_schema))

    def compile(self, format_type: str, json_schema: str = "") -> Any:
        """A compiled grammar for the format; InvalidArgument for a schema it cannot take, or
        that takes longer than MAX_JSON_COMPILE_S to compile (worker.schema_trial)."""
        compiled = self.cached(format_type, json_schema)
        if compiled is not None:
            return compiled
        if format_type == JSON_SCHEMA:
            self._trial.check(json_schema)
        try:
            compiled = self._compiler.compile_grammar(
                grammar_text(self._xgr, format_type, json_schema))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidArgument(f"response_format.json_schema is not a JSON Schema this "
                                  f"server can follow: {_reason(exc)}") from exc
        if len(self._cache) >= CACHED_GRAMMARS:
            self._cache.pop(next(iter(self._cache)))  # the oldest
        self._cache[(format_type, json_schema)] = compiled
        return compiled

    def constraint(self, compiled: Any) -> JsonConstraint:
        return JsonConstraint(self._xgr.GrammarMatcher(compiled))

    def close(self) -> None:
        self._trial.close()


def grammar_text(xgrammar: Any, format_type: str, json_schema: str = "") -> str:
    """The grammar compiled for a response format, here and in worker.schema_trial's child."""
    # json_object: any object, so properties beyond none listed are allowed. json_schema:
    # xgrammar's (and vLLM's) strict mode, additionalProperties false unless given.
    grammar = xgrammar.Grammar.from_json_schema(
        '{"type": "object"}' if format_type == JSON_OBJECT else json_schema,
        strict_mode=format_type == JSON_SCHEMA, max_whitespace_cnt=MAX_WHITESPACE)
    return _no_raw_control_characters(str(grammar))


def _no_raw_control_characters(ebnf: str) -> str:
    r"""xgrammar 0.2.9 writes the characters of a length-bounded string (minLength, maxLength)
    as [^"\\\r\n], which lets raw control characters such as \x1f in: strict JSON parsers
    refuse them (its other strings exclude \0-\x1f). The same class minus those; a no-op once
    xgrammar writes it otherwise."""
    return ebnf.replace(r'[^\"\\\r\n]', r'[^\0-\x1f\"\\]')


def _reason(exc: Exception) -> str:
    """xgrammar's message without its C++ source location."""
    text = str(exc).strip()
    return shown(re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text.splitlines()[0] if text else ""),
                 200)


class JsonConstraint:
    """One sequence's matcher (worker.sequence.Constraint): the tokens it may sample next, and
    where its output is once it accepts each sampled token."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    @property
    def is_done(self) -> bool:
        """It accepted a stop token after a complete JSON value."""
        return self._matcher.is_terminated()

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes its allowed tokens into bitmask[row] (int32 words, CPU); changes no state."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        return self._matcher.accept_token(token_id)


class TokenMasks:
    """Applies the constrained rows' masks to a step's logits: each matcher fills its row of a
    host bitmask, one copy takes them to the device, and only those rows change."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._words = -(-vocab_size // _BITS)
        self._host = torch.zeros(0, self._words, dtype=torch.int32)
        self._shifts = torch.arange(_BITS, dtype=torch.int32, device=device)  # [32]

    def apply(self, logits: torch.Tensor, rows: list[int], constraints: list[Any]) -> None:
        """logits [batch, vocab] float32: rows `rows` lose every token their constraint forbids
        (-inf), in place."""
        if self._host.shape[0] < len(rows):
            # pinned on CUDA, so the copy below is asynchronous; the step's host sync completes
            # it before the next step refills the buffer
            self._host = torch.zeros(len(rows), self._words, dtype=torch.int32,
                                     pin_memory=self.device.type == "cuda")
        bitmask = self._host[:len(rows)]
        for i, constraint in enumerate(constraints):
            constraint.fill_mask(bitmask, i)
        allowed = unpack_bitmask(bitmask.to(self.device, non_blocking=True), self._shifts,
                                 self.vocab_size)  # [c, vocab]
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        masked = logits.index_select(0, index).masked_fill_(~allowed, float("-inf"))
        logits.index_copy_(0, index, masked)


def unpack_bitmask(bitmask: torch.Tensor, shifts: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 words [rows, words] (bit j of word w = token 32 w + j) -> bool [rows, vocab]."""
    bits = (bitmask[:, :, None] >> shifts) & 1  # [rows, words, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
