"""An adapter's card: its id, description and example prompts, from an optional card.json in
its directory (or among an upload's files). Torch-free, reads no weights."""

from __future__ import annotations

import json
from pathlib import Path

from common.errors import InvalidArgument
from common.limits import CARD_KINDS
from edgelora.v1 import types_pb2

CARD_FILE = "card.json"  # optional: {"adapter_id", "description", "example_prompts", "kind"}
MAX_CARD_FILE_BYTES = 64 << 10


def parse_card(data: bytes, where: str) -> dict:
    """card.json's fields, checked: adapter_id, description and kind strings, example_prompts
    a list of strings (each optional)."""
    if len(data) > MAX_CARD_FILE_BYTES:
        raise InvalidArgument(f"{where} is over {MAX_CARD_FILE_BYTES >> 10} KiB")
    try:
        card = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidArgument(f"{where} is not valid JSON ({exc})") from exc
    examples = card.get("example_prompts", []) if isinstance(card, dict) else None
    if not isinstance(card, dict) or not isinstance(card.get("adapter_id", ""), str) or \
            not isinstance(card.get("description", ""), str) or \
            not isinstance(card.get("kind", ""), str) or \
            not isinstance(examples, list) or not all(isinstance(e, str) for e in examples) or \
            card.get("kind", "") not in CARD_KINDS:
        raise InvalidArgument(f"{where}: expected {{\"adapter_id\": str, \"description\": "
                              "str, \"example_prompts\": [str, ...], \"kind\": \"behaviour\" | "
                              "\"domain\"} (each optional)")
    return card


def read_card(path: Path) -> types_pb2.RegisterAdapterRequest:
    """The registration of the adapter directory `path`: id, description and example prompts
    from its optional card.json (id = the directory's name unless the card says otherwise)."""
    card_file = path / CARD_FILE
    card: dict = {}
    if card_file.is_file():
        if card_file.stat().st_size > MAX_CARD_FILE_BYTES:
            raise InvalidArgument(f"{card_file} is over {MAX_CARD_FILE_BYTES >> 10} KiB")
        card = parse_card(card_file.read_bytes(), str(card_file))
    return types_pb2.RegisterAdapterRequest(
        adapter_id=card.get("adapter_id", path.name), path=str(path.resolve()),
        description=card.get("description", ""),
        example_prompts=card.get("example_prompts", []), kind=card.get("kind", ""))
