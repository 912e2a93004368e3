"""ListAdapters a page at a time. Pages are keyset pages over (tenant, adapter id): a page token
names the last adapter of its page, so adapters registered or removed between two calls neither
shift the others nor make them repeat. A page is bounded in count and in bytes, because a
gRPC client refuses a reply over 4 MiB by default, and one tenant's card can be 4 KiB."""

from __future__ import annotations

import base64
import binascii
import json
from bisect import bisect_right
from collections.abc import Sequence

from common.errors import InvalidArgument
from edgelora.v1 import types_pb2
from router.adapter_record import AdapterRecord

DEFAULT_PAGE_SIZE = 1000  # adapters a page when the request says 0, and the most it may ask
MAX_PAGE_BYTES = 2 << 20  # half of a client's default receive limit
MAX_TOKEN_BYTES = 1024


def in_page_order(records: Sequence[AdapterRecord]) -> list[AdapterRecord]:
    return sorted(records, key=_position)


def page_slice(ordered: Sequence[AdapterRecord], page_size: int,
               page_token: str) -> tuple[list[AdapterRecord], bool]:
    """(the records of the page `page_token` starts, whether any come after them); `ordered` as
    in_page_order() leaves it."""
    size = DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, DEFAULT_PAGE_SIZE)
    start = bisect_right(ordered, decode_token(page_token), key=_position) if page_token else 0
    return list(ordered[start:start + size]), start + size < len(ordered)


def within_bytes(infos: Sequence[types_pb2.AdapterInfo], limit: int = MAX_PAGE_BYTES) -> int:
    """How many of `infos`, from the first, fit in a reply of `limit` bytes (at least one)."""
    total = 0
    for count, info in enumerate(infos):
        total += info.ByteSize() + 8  # its field tag and length
        if total > limit and count > 0:
            return count
    return len(infos)


def encode_token(record: AdapterRecord) -> str:
    return base64.urlsafe_b64encode(json.dumps(_position(record)).encode()).decode()


def decode_token(token: str) -> tuple[str, str]:
    """The (tenant, id) a page token names; InvalidArgument for anything this server did not
    give (the token is opaque to clients, and bounded before it is parsed)."""
    refused = InvalidArgument("page_token is not one a ListAdapters reply gave: pass its "
                              "next_page_token unchanged, or \"\" for the first page")
    if len(token) > MAX_TOKEN_BYTES:
        raise refused
    try:
        position = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (UnicodeError, binascii.Error, ValueError):
        raise refused from None
    if not (isinstance(position, list) and len(position) == 2
            and all(isinstance(part, str) for part in position)):
        raise refused
    return position[0], position[1]


def _position(record: AdapterRecord) -> tuple[str, str]:
    return record.owner, record.adapter_id
