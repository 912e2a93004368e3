"""Prompt encoding with the model's own tokenizer and chat template, and single tokens' bytes (for
logprobs); never decodes outputs."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from common.errors import InvalidArgument
from worker.detokenizer import IncrementalDetokenizer

CHAT_ROLES = ("system", "user", "assistant")


class Tokenizer:
    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer  # heavy import, only where a model is loaded

        self.hf = AutoTokenizer.from_pretrained(path)

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.hf(prompt).input_ids)

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        """messages = [(role, content), ...] rendered with the chat template + assistant prefix."""
        if self.hf.chat_template is None:
            raise InvalidArgument("this model has no chat template: send `prompt`, not messages")
        for role, _ in messages:
            if role not in CHAT_ROLES:
                raise InvalidArgument(
                    f"message role {role!r} is not one of {', '.join(CHAT_ROLES)}")
        turns = [{"role": role, "content": content} for role, content in messages]
        ids = self.hf.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding here, 4.x a plain list.
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    @cached_property
    def vocab_bytes(self) -> list[bytes]:
        """Each token id's raw bytes (byte-level BPE and byte-fallback pieces decoded), as
        xgrammar's tokenizer reader sees them; built on first use (logprobs)."""
        import xgrammar  # heavy import: only once a request asks for logprobs

        return list(xgrammar.TokenizerInfo.from_huggingface(self.hf).decoded_vocab)

    def token_bytes(self, token_id: int) -> bytes:
        """b"" for an id past the tokenizer's vocabulary (a model's padded embedding rows)."""
        table = self.vocab_bytes
        return table[token_id] if 0 <= token_id < len(table) else b""

    def detokenizer(self, stop: tuple[str, ...]) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.hf, stop)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return () if self.hf.eos_token_id is None else (self.hf.eos_token_id,)
