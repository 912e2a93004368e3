"""router.adapter_pages: keyset pages of ListAdapters, bounded in count and bytes, tokens
checked before use."""

from __future__ import annotations

import base64

import pytest

from common.errors import InvalidArgument
from router.adapter_pages import (
    DEFAULT_PAGE_SIZE,
    MAX_TOKEN_BYTES,
    decode_token,
    encode_token,
    in_page_order,
    page_slice,
    within_bytes,
)
from router.adapter_record import SHARED, AdapterRecord


def record(owner: str, adapter_id: str, description: str = "") -> AdapterRecord:
    return AdapterRecord(adapter_id=adapter_id, path="/x", rank=4, owner=owner,
                         description=description)


def every_page(records: list[AdapterRecord], page_size: int) -> list[list[str]]:
    ordered, token, pages = in_page_order(records), "", []
    while True:
        page, more = page_slice(ordered, page_size, token)
        pages.append([f"{r.owner}:{r.adapter_id}" for r in page])
        if not more:
            return pages
        token = encode_token(page[-1])


def test_pages_cover_every_record_once_in_tenant_then_id_order() -> None:
    records = [record(owner, f"a{i}") for owner in ("beta", SHARED, "acme") for i in range(7)]
    pages = every_page(records, 5)
    assert [len(p) for p in pages] == [5, 5, 5, 5, 1]
    flat = [key for page in pages for key in page]
    assert flat == sorted(f"{r.owner}:{r.adapter_id}" for r in records)
    assert every_page(records, 0) == [flat], "0: the server's default size, all of 21"
    assert every_page(records, 21) == [flat]
    assert every_page([], 5) == [[]]


def test_page_size_is_capped_at_the_default() -> None:
    records = [record("t", f"a{i:05d}") for i in range(DEFAULT_PAGE_SIZE + 3)]
    page, more = page_slice(in_page_order(records), 10**9, "")
    assert len(page) == DEFAULT_PAGE_SIZE and more


def test_registrations_between_pages_neither_repeat_nor_shift_the_others() -> None:
    records = [record("t", f"a{i}") for i in range(6)]
    first, _ = page_slice(in_page_order(records), 3, "")
    token = encode_token(first[-1])
    changed = [r for r in records if r.adapter_id != "a1"] + [record("t", "a0x")]  # before it
    second, more = page_slice(in_page_order(changed), 3, token)
    assert [r.adapter_id for r in second] == ["a3", "a4", "a5"] and not more
    gone = [r for r in records if r.adapter_id != "a2"]  # the token's own record removed
    assert [r.adapter_id for r in page_slice(in_page_order(gone), 3, token)[0]] == ["a3", "a4",
                                                                                     "a5"]


def test_pages_stay_under_the_byte_limit() -> None:
    infos = [record("t", f"a{i}", "x" * 4000).info(False) for i in range(10)]
    assert within_bytes(infos, limit=10_000) == 2
    assert within_bytes(infos[:1], limit=100) == 1, "one adapter always fits"
    assert within_bytes(infos, limit=10**9) == 10


@pytest.mark.parametrize("token", [
    "not base64 !",
    base64.urlsafe_b64encode(b"{}").decode(),
    base64.urlsafe_b64encode(b'["a", 1]').decode(),
    base64.urlsafe_b64encode(b'["a", "b", "c"]').decode(),
    base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    "é",
    "A" * (MAX_TOKEN_BYTES + 4),
])
def test_tokens_the_server_did_not_give_are_refused(token: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        decode_token(token)


def test_a_token_names_its_record() -> None:
    assert decode_token(encode_token(record("acme", "sql/v2"))) == ("acme", "sql/v2")
