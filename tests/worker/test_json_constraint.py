"""worker.json_constraint: bitmask unpacking and per-row masks against references, schema
errors, and JSON output through the engine (tiny model: json_schema validates, greedy and
sampled, next to unconstrained rows whose tokens do not change; SmolLM2: json_object parses)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from common.errors import InvalidArgument
from worker.config import WorkerConfig
from worker.json_constraint import JsonGrammars, TokenMasks, unpack_bitmask
from worker.sequence import SamplingOptions, Sequence, TokenEvent
from worker.server import build_engine

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]
# Every field bounded, so even the tiny random model's JSON ends well inside max_tokens.
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "ok": {"type": "boolean"},
    "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "age", "ok", "color", "tags"]}


class FixedMask:
    """A Constraint stand-in that allows a fixed set of tokens."""

    def __init__(self, allowed: list[int]) -> None:
        self.allowed = allowed

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        words = [0] * bitmask.shape[1]
        for token in self.allowed:
            words[token // 32] |= 1 << (token % 32)
        # int32 words: bit 31 set is a negative number
        bitmask[row] = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words],
                                    dtype=torch.int32)


@pytest.mark.parametrize("device", DEVICES)
def test_unpack_bitmask_matches_bit_by_bit(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**31), 2**31, (3, 4), generator=g, dtype=torch.int64)
    bitmask = words.to(torch.int32)
    got = unpack_bitmask(bitmask.to(device), torch.arange(32, dtype=torch.int32, device=device),
                         100).cpu()
    for row in range(3):
        for token in range(100):
            bit = (int(words[row, token // 32]) >> (token % 32)) & 1
            assert got[row, token].item() == bool(bit), (row, token)


@pytest.mark.parametrize("device", DEVICES)
def test_masks_change_only_their_rows(device: str) -> None:
    logits = torch.randn(4, 70, generator=torch.Generator().manual_seed(1)).to(device)
    before = logits.clone()
    TokenMasks(70, torch.device(device)).apply(logits, [1, 3], [FixedMask([0, 31, 33, 69]),
                                                               FixedMask([5])])
    assert torch.equal(logits[[0, 2]], before[[0, 2]])
    allowed = torch.isfinite(logits)
    assert allowed[1].nonzero().flatten().tolist() == [0, 31, 33, 69]
    assert allowed[3].nonzero().flatten().tolist() == [5]
    assert torch.equal(logits[1, [0, 31, 33, 69]], before[1, [0, 31, 33, 69]])


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    engine, tokenizer, _ = build_engine(WorkerConfig(
        model=str(tiny_model_dir), dtype="float32", num_threads=1, max_model_len=512,
        kv_cache_mb=16), emit=lambda e: None)
    grammars = JsonGrammars(tokenizer.hf, engine.runner.model.config.vocab_size,
                            sorted(engine.scheduler.eos_token_ids))
    return engine, tokenizer, grammars


@pytest.mark.parametrize("schema", ['{"type": "bogus"}', '{"type": "string", "minLength": -1}',
                                    '{"$ref": "#/nowhere"}'])
def test_a_schema_it_cannot_follow_is_invalid_argument(engine, schema: str) -> None:
    with pytest.raises(InvalidArgument, match="json_schema"):
        engine[2].compile("json_schema", schema)


def test_bounded_strings_take_no_raw_control_characters(engine) -> None:
    _, tokenizer, grammars = engine
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 8}},
              "required": ["a"]}
    constraint = grammars.constraint(grammars.compile("json_schema", json.dumps(schema)))
    for token in tokenizer.hf.encode('{"a": "ab', add_special_tokens=False):
        assert constraint.accept(token)
    bitmask = torch.zeros(1, -(-grammars.vocab_size // 32), dtype=torch.int32)
    constraint.fill_mask(bitmask, 0)
    allowed = unpack_bitmask(bitmask, torch.arange(32, dtype=torch.int32), grammars.vocab_size)
    controls = [t for t in range(grammars.vocab_size)
                if any(b < 0x20 for b in tokenizer.token_bytes(t))]
    assert controls and not allowed[0, controls].any()
    assert allowed[0, tokenizer.hf.encode('"', add_special_tokens=False)].all()


def run(engine, requests: list[tuple[str, SamplingOptions, object]]
        ) -> list[tuple[list[int], str, str]]:
    """(prompt, options, constraint) all at once -> (tokens, text, finish_reason) each."""
    eng, tokenizer, _ = engine
    events: dict[int, list[TokenEvent]] = {i: [] for i in range(len(requests))}

    def collect(event: TokenEvent) -> None:
        assert event.finish_reason != "error", event.error
        events[event.request_id].append(event)

    eng.emit = collect
    for i, (prompt, options, constraint) in enumerate(requests):
        eng.scheduler.add(Sequence(i, tokenizer.encode_prompt(prompt), options,
                                   detok=tokenizer.detokenizer(options.stop),
                                   constraint=constraint))
    while not all(e and e[-1].finish_reason for e in events.values()):
        eng.step()
    return [([t for e in evs for t in e.token_ids], "".join(e.text for e in evs),
             evs[-1].finish_reason) for evs in events.values()]


def test_schema_output_validates_next_to_unchanged_free_rows(engine) -> None:
    grammars = engine[2]
    compiled = grammars.compile("json_schema", json.dumps(SCHEMA))
    free = [("Once upon a time", SamplingOptions(max_tokens=20, ignore_eos=True), None),
            ("Once upon a time", SamplingOptions(max_tokens=20, ignore_eos=True,
                                                 temperature=0.8, seed=5), None)]
    constrained = [
        ("A person as JSON:", SamplingOptions(max_tokens=300), grammars.constraint(compiled)),
        ("A person as JSON:", SamplingOptions(max_tokens=300, temperature=1.0, seed=1),
         grammars.constraint(compiled)),
        # the grammar ends it even where EOS would not
        ("JSON:", SamplingOptions(max_tokens=300, temperature=0.7, seed=2, ignore_eos=True),
         grammars.constraint(compiled))]
    mixed = run(engine, [constrained[0], free[0], constrained[1], free[1], constrained[2]])
    for tokens, text, reason in (mixed[0], mixed[2], mixed[4]):
        assert reason == "stop", (reason, text)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert tokens[-1] in engine[0].scheduler.eos_token_ids
    alone = run(engine, free)
    assert [mixed[1][0], mixed[3][0]] == [alone[0][0], alone[1][0]]


def test_json_object_output_parses_when_it_ends(engine) -> None:
    grammars = engine[2]
    requests = [("JSON:", SamplingOptions(max_tokens=60, temperature=1.0, seed=seed),
                 grammars.constraint(grammars.compile("json_object"))) for seed in range(4)]
    results = run(engine, requests)
    for _, text, reason in results:
        assert text.startswith("{")
        if reason == "stop":  # a random model may stay in a string until max_tokens
            assert isinstance(json.loads(text), dict)
    assert any(reason == "stop" for _, _, reason in results)


@pytest.mark.smollm2
def test_smollm2_json_object_parses_greedy_and_sampled(default_model_dir: Path) -> None:
    eng, tokenizer, _ = build_engine(WorkerConfig(dtype="float32", num_threads=1,
                                                  kv_cache_mb=64), emit=lambda e: None)
    grammars = JsonGrammars(tokenizer.hf, eng.runner.model.config.vocab_size,
                            sorted(eng.scheduler.eos_token_ids))
    compiled = grammars.compile("json_object")
    prompt = tokenizer.hf.apply_chat_template(
        [{"role": "user", "content": "Describe a cat as a JSON object with name and age."}],
        add_generation_prompt=True, tokenize=False)
    requests = [(prompt, SamplingOptions(max_tokens=120, **sampling), grammars.constraint(compiled))
                for sampling in ({}, {"temperature": 0.7, "seed": 1}, {"temperature": 1.0,
                                                                       "seed": 2})]
    for _, text, reason in run((eng, tokenizer, grammars), requests):
        assert reason == "stop", text
        assert isinstance(json.loads(text), dict), text
