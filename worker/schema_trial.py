"""A client's JSON Schema compiled first in a child process, under a deadline.

Compile time is not bounded by a schema's size: xgrammar turned 14 KiB (100 string properties,
each with `"pattern": "[a-z]{1,2000}"`) into a grammar in 21 s on this CPU, and 1,400 `format`
fields in 64 KiB take seconds too. The worker compiles in one thread, so such a schema would hold
every tenant's JSON requests behind it (and take a core from decoding). Here the schema is first
compiled in a child process that is killed when it runs past MAX_JSON_COMPILE_S; only a schema
that compiled in time is then compiled in the worker (its own compile takes about as long, and
its result needs no 6 MB transfer). The child (`python -m worker.schema_trial`: a plain
subprocess, so it never re-imports the worker's main module) starts with the first json_schema
request (~2 s: an interpreter importing xgrammar, which imports torch: ~200 MB of its own) and
again after a kill; it exits after IDLE_S without a new schema (clients send the same few
schemas again and again, and those are served from the worker's cache without it).

Protocol, one JSON document per line: the tokenizer info first, then {"schema"} per request,
each answered with {"error": ""} or the compiler's message. The child compiles the grammar the
worker would (worker.json_constraint.grammar_text). Torch-free on the worker's side.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from common.errors import InvalidArgument, Unavailable
from common.limits import MAX_JSON_COMPILE_S

STARTUP_S = 60.0  # a cold start imports xgrammar from disk
IDLE_S = 120.0
ROOT = Path(__file__).resolve().parent.parent


class SchemaTrial:
    """`check(schema)` returns once the schema compiled in the child within the deadline, and
    raises InvalidArgument when it did not (the child is then killed, a new one started on the
    next check). One check at a time (the worker's compile thread)."""

    def __init__(self, tokenizer_info: Any, timeout_s: float = MAX_JSON_COMPILE_S,
                 idle_s: float = IDLE_S) -> None:
        self._hello = json.dumps({"tokenizer_info": tokenizer_info.serialize_json()})
        self.timeout_s, self.idle_s = timeout_s, idle_s
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._idle: threading.Timer | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id while one runs."""
        return self._child.pid if self._child is not None else None

    def check(self, schema: str) -> None:
        with self._lock:
            child = self._running_child()
            if self._idle is not None:
                self._idle.cancel()
            self._idle = threading.Timer(self.idle_s, self._close_idle)
            self._idle.daemon = True
            self._idle.start()
            assert child.stdin is not None and child.stdout is not None
            try:
                child.stdin.write(json.dumps({"schema": schema}) + "\n")
                child.stdin.flush()
                reply = _read_line(child.stdout, self.timeout_s)
            except OSError:  # it died on an earlier one
                reply = ""
            if reply is None:
                self.close()
                raise InvalidArgument(
                    f"response_format.json_schema took over {self.timeout_s:g} s to compile and "
                    "was refused: simplify it (large repetition counts in `pattern`, many "
                    "`format` or `pattern` fields)")
            if not reply:  # it crashed the compiler: it must not reach the worker's
                self.close()
                raise InvalidArgument("response_format.json_schema could not be compiled: the "
                                      "compiler failed on it")
            # {"error": ""}, or an error that the worker's own compile raises with its reason

    def _running_child(self) -> subprocess.Popen:
        if self._child is not None and self._child.poll() is None:
            return self._child
        self.close()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        child = subprocess.Popen([sys.executable, "-m", "worker.schema_trial"], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(self._hello + "\n")
        child.stdin.flush()
        if _read_line(child.stdout, STARTUP_S) != "ready":
            child.kill()
            child.wait()
            raise Unavailable("the JSON schema compile process did not start: try again")
        self._child = child
        return child

    def _close_idle(self) -> None:
        with self._lock:
            self.close()

    def close(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        if self._child is not None:
            self._child.kill()
            self._child.wait()
            for pipe in (self._child.stdin, self._child.stdout):
                if pipe is not None:
                    pipe.close()
        self._child = None


def _read_line(stream: IO[str], timeout_s: float) -> str | None:
    """The next line without its newline ("" at end of file), or None after timeout_s."""
    ready, _, _ = select.select([stream], [], [], timeout_s)
    return stream.readline().rstrip("\n") if ready else None


def main() -> None:
    """The child: compiles each schema it is sent and answers with the error, if any."""
    import xgrammar

    from worker.json_constraint import JSON_SCHEMA, grammar_text

    hello = json.loads(sys.stdin.readline())
    compiler = xgrammar.GrammarCompiler(
        xgrammar.TokenizerInfo.deserialize_json(hello["tokenizer_info"]), max_threads=1,
        cache_enabled=False)
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            compiler.compile_grammar(grammar_text(xgrammar, JSON_SCHEMA, request["schema"]))
            error = ""
        except Exception as exc:  # the worker's own compile reports it
            error = str(exc) or type(exc).__name__
        print(json.dumps({"error": error}), flush=True)


if __name__ == "__main__":
    main()
