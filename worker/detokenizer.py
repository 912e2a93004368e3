"""Incremental detokenization with stop strings for one sequence; never tokenizes or samples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class IncrementalDetokenizer:
    """Turns generated token ids into text that is safe to stream, one token at a time.

    Uses the prefix/read offset scheme (as in vLLM/TGI): a short window of already-emitted ids
    is re-decoded with the new ones so byte-level merges and split UTF-8 characters come out
    exactly as a full decode would, without re-decoding the whole sequence every step.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        # an empty stop string would match at once and end every request with no output
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""  # decoded so far, truncated at a stop string once one appears
        self._emitted = 0  # len of the prefix of _text already returned to the caller
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def text(self) -> str:
        return self._text

    def add_token(self, token_id: int) -> str:
        """Append one generated token; return the new text now safe to stream ("" if none yet)."""
        if self._stopped:
            raise RuntimeError("add_token called after a stop string was reached")
        self._ids.append(token_id)
        return self._advance(self._decode_delta(final=False), final=False)

    def flush(self) -> str:
        """At finish: return whatever text is still held back, partial characters included."""
        if self._stopped:
            return ""
        return self._advance(self._decode_delta(final=True), final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_delta(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        # a trailing U+FFFD is a multi-byte character whose remaining bytes are still to come
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def _advance(self, delta: str, final: bool) -> str:
        if delta:
            start = len(self._text)
            self._text += delta
            if self._stop:
                self._check_stop(start)
        if self._stopped or final:
            end = len(self._text)
        else:
            # the tail could be the start of a stop string completed by the next token
            end = len(self._text) - self._hold
        if end <= self._emitted:
            return ""
        out = self._text[self._emitted : end]
        self._emitted = end
        return out

    def _check_stop(self, start: int) -> None:
        # the text before `start` held no stop string, so any match must end after it
        first = -1
        for s in self._stop:
            i = self._text.find(s, max(0, start - len(s) + 1))
            if i != -1 and (first == -1 or i < first):
                first = i
        if first != -1:
            self._text = self._text[:first]
            self._stopped = True
