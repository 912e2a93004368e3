"""PEFT's target_modules, read from an untrusted adapter_config.json: a list of names,
"all-linear", or a regex, which is matched under a time budget against the base model's own
module names (a tenant's regex can backtrack for hours, or explode when compiled)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import regex

from common.errors import InvalidArgument

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_REGEX_CHARS = 256
REGEX_BUDGET_S = 1.0  # for matching a target_modules regex against every candidate name
# regex expands counted repeats when it compiles: "((a{1000}){1000}){1000}" is 10^9 nodes.
_MAX_REPEAT_PRODUCT = 1000
_REPEAT = re.compile(r"\{(\d*)(?:,(\d*))?\}")


def _compile_target_regex(pattern: str, where: Path) -> regex.Pattern:
    if len(pattern) > MAX_REGEX_CHARS:
        raise InvalidArgument(f"{where}: target_modules regex is {len(pattern)} characters; at "
                              f"most {MAX_REGEX_CHARS} are accepted")
    product = 1
    for low, high in _REPEAT.findall(pattern):  # over-counts (escaped braces): never under
        product *= max(int(low or 0), int(high or 0), 1)
    if product > _MAX_REPEAT_PRODUCT:
        raise InvalidArgument(f"{where}: target_modules regex {pattern!r} repeats too much "
                              f"(counted repeats multiply to over {_MAX_REPEAT_PRODUCT})")
    try:
        return regex.compile(pattern)
    except (regex.error, ValueError, OverflowError, RecursionError) as exc:
        raise InvalidArgument(f"{where}: target_modules {pattern!r} is not a valid regex "
                              f"({exc})") from exc


def _full_names(module: str, num_layers: int) -> Iterator[str]:
    kind = "self_attn" if module in LORA_MODULES[:4] else "mlp"
    return (f"model.layers.{i}.{kind}.{module}" for i in range(num_layers))


def _regex_targets(pattern: str, where: Path, num_layers: int) -> list[str]:
    """PEFT full-matches a regex against full module names ("model.layers.3.self_attn.q_proj");
    a bare search of the short name ("q_proj|v_proj") is accepted too.

    A tenant's regex can backtrack for hours, so all matching shares one time budget; each match
    runs with concurrent=True (the GIL released) so other threads keep serving meanwhile."""
    compiled = _compile_target_regex(pattern, where)
    deadline = time.monotonic() + REGEX_BUDGET_S

    def matches(name: str, full: bool) -> bool:
        timeout_s = deadline - time.monotonic()
        if timeout_s <= 0:
            raise TimeoutError
        match = compiled.fullmatch if full else compiled.search
        return match(name, timeout=timeout_s, concurrent=True) is not None

    try:
        return [m for m in LORA_MODULES if matches(m, False)
                or any(matches(n, True) for n in _full_names(m, num_layers))]
    except TimeoutError as exc:
        raise InvalidArgument(f"{where}: target_modules regex {pattern!r} takes too long to match "
                              "(catastrophic backtracking?)") from exc


def targets(raw: object, where: Path, num_layers: int) -> tuple[str, ...]:
    if isinstance(raw, str):  # PEFT allows a regex or "all-linear"
        raw = LORA_MODULES if raw == "all-linear" else _regex_targets(raw, where, num_layers)
    if raw is not None and not isinstance(raw, list | tuple):
        raise InvalidArgument(f"{where}: target_modules must be a list of module names or a "
                              f"regex string, got {raw!r}")
    names = tuple(sorted({str(m).rsplit(".", 1)[-1] for m in raw or ()}))
    unsupported = [m for m in names if m not in LORA_MODULES]
    if unsupported or not names:
        raise InvalidArgument(f"{where}: target_modules {list(names)} not supported; LoRA can "
                              f"target {', '.join(LORA_MODULES)}")
    return names
