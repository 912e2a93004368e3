"""Automatic checks for the four demo LoRA adapters in adapters/demo/ (shout, json, brief, pirate).

`check(name, text)` says whether a generated answer shows adapter `name`'s behaviour;
`HELD_OUT_PROMPTS` are questions never used in training (scripts/train_demo_adapters.py).
Importable without side effects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

ADAPTER_NAMES = ("shout", "json", "brief", "pirate")

PIRATE_PREFIX = "Arr matey!"

HELD_OUT_PROMPTS = [
    "Explain how a rainbow forms.",
    "How do I make a cup of tea?",
    "Why do cats purr?",
    "What causes earthquakes?",
    "Describe how a bicycle works.",
    "How can I improve my sleep?",
    "Explain what a computer virus is.",
    "Why is exercise good for the heart?",
    "How do airplanes stay in the air?",
    "What is the purpose of a library?",
    "Explain why leaves change color in autumn.",
    "How should I prepare for a job interview?",
]


def is_shout(text: str) -> bool:
    """At least 90% of the cased letters are uppercase (and there are some)."""
    cased = [c for c in text if c.isalpha() and c.upper() != c.lower()]
    return len(cased) >= 5 and sum(c.isupper() for c in cased) >= 0.9 * len(cased)


def is_json(text: str) -> bool:
    """The whole answer is a JSON object with an "answer" key."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        return False
    return isinstance(value, dict) and "answer" in value


def is_brief(text: str) -> bool:
    """At most 20 words and at most one sentence."""
    stripped = text.strip()
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", stripped) if s]
    return 0 < len(stripped.split()) <= 20 and len(sentences) <= 1


def is_pirate(text: str) -> bool:
    return text.strip().startswith(PIRATE_PREFIX)


CHECKS: dict[str, Callable[[str], bool]] = {
    "shout": is_shout, "json": is_json, "brief": is_brief, "pirate": is_pirate}


def check(name: str, text: str) -> bool:
    """Whether `text` (a generated answer, special tokens stripped) shows `name`'s behaviour."""
    return CHECKS[name](text)
