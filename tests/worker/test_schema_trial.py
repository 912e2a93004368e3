"""worker.schema_trial: a json_schema that compiles slowly is refused at the deadline (the child
is killed and the next schema gets a new one); schemas that compile in time, or fail to, pass
through to the worker's own compile."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from common.errors import InvalidArgument
from worker.json_constraint import JsonGrammars
from worker.schema_trial import SchemaTrial

# xgrammar spends seconds on bounded repetition in patterns (21 s for 100 of these on the
# 2-core dev VM, ~4 s for 20): far past the deadlines below on any machine.
SLOW = json.dumps({"type": "object", "properties": {
    f"p{i}": {"type": "string", "pattern": "[a-z]{1,2000}"} for i in range(40)}})
FAST = json.dumps({"type": "object", "properties": {"name": {"type": "string"}},
                   "required": ["name"]})


@pytest.fixture(scope="module")
def tokenizer_info(default_model_dir: Path):
    import xgrammar
    from transformers import AutoTokenizer

    return xgrammar.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(default_model_dir))


def test_a_slow_schema_is_refused_at_the_deadline_and_the_next_one_compiles(
        tokenizer_info) -> None:
    trial = SchemaTrial(tokenizer_info, timeout_s=0.5)
    try:
        trial.check(FAST)  # starts the child
        first = trial.pid
        assert first is not None
        start = time.monotonic()
        with pytest.raises(InvalidArgument, match=r"over 0.5 s to compile"):
            trial.check(SLOW)
        assert time.monotonic() - start < 3.0
        assert trial.pid is None and not Path(f"/proc/{first}").exists()  # killed and reaped
        trial.check(FAST)  # a new child
        assert trial.pid not in (None, first)
    finally:
        trial.close()


def test_a_schema_that_crashes_the_compiler_is_refused(tokenizer_info) -> None:
    trial = SchemaTrial(tokenizer_info, timeout_s=30)
    try:
        trial.check(FAST)
        os.kill(trial.pid, signal.SIGKILL)  # as a crash inside xgrammar would end it
        with pytest.raises(InvalidArgument, match="compiler failed"):
            trial.check(FAST)
        trial.check(FAST)  # and the next one gets a new child
    finally:
        trial.close()


def test_a_schema_that_does_not_compile_is_left_to_the_workers_compile(tokenizer_info) -> None:
    trial = SchemaTrial(tokenizer_info, timeout_s=30)
    try:
        trial.check('{"type": "bogus"}')  # no refusal here: the reason comes later
    finally:
        trial.close()


def test_grammars_refuse_a_slow_schema_and_keep_serving(default_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    grammars = JsonGrammars(AutoTokenizer.from_pretrained(default_model_dir), 49152, [2])
    grammars._trial.timeout_s = 0.5
    try:
        with pytest.raises(InvalidArgument, match="to compile"):
            grammars.compile("json_schema", SLOW)
        assert grammars.cached("json_schema", SLOW) is None
        assert grammars.compile("json_schema", FAST) is grammars.cached("json_schema", FAST)
        with pytest.raises(InvalidArgument, match="not a JSON Schema"):
            grammars.compile("json_schema", '{"type": "bogus"}')
    finally:
        grammars.close()


def test_the_child_exits_when_idle_and_comes_back_on_demand(tokenizer_info) -> None:
    trial = SchemaTrial(tokenizer_info, timeout_s=30, idle_s=0.5)
    try:
        trial.check(FAST)
        first = trial.pid
        deadline = time.monotonic() + 10
        while trial.pid is not None:
            assert time.monotonic() < deadline, "the idle child is still running"
            time.sleep(0.1)
        assert not Path(f"/proc/{first}").exists()
        trial.check(FAST)
        assert trial.pid not in (None, first)
    finally:
        trial.close()
