"""common.adapter_blobs: content addressing, whole-or-nothing writes, verification."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from common.adapter_blobs import (
    STALE_TMP_S,
    TRIM_GRACE_S,
    BlobStore,
    check_digest,
    digest_files,
)
from common.errors import InvalidArgument

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def adapter(folder: Path, weights: bytes = b"w" * 1000, config: bytes = b"{}") -> Path:
    folder.mkdir(parents=True)
    (folder / CONFIG).write_bytes(config)
    (folder / WEIGHTS).write_bytes(weights)
    return folder


def upload(store: BlobStore, folder: Path, chunk: int = 100, expected: str = "") -> str:
    with store.writer() as writer:
        for name in (CONFIG, WEIGHTS):
            data = (folder / name).read_bytes()
            for start in range(0, max(len(data), 1), chunk):
                writer.write(name, data[start:start + chunk])
        return writer.commit(expected)


def leftovers(store: BlobStore) -> list[Path]:
    return list((store.root / "tmp").iterdir())


def test_digest_is_the_content_not_the_place(tmp_path: Path) -> None:
    a = adapter(tmp_path / "a")
    same = adapter(tmp_path / "b")
    flipped = adapter(tmp_path / "c", weights=b"w" * 999 + b"x")
    moved = adapter(tmp_path / "d", weights=b"{}", config=b"w" * 1000)  # bytes swapped over
    digests = [digest_files(f, 1 << 20) for f in (a, same, flipped, moved)]
    assert digests[0] == digests[1]
    assert len(set(digests)) == 3 and check_digest(digests[0]) == digests[0]


def test_a_streamed_write_keeps_each_content_once(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store", max_weights_bytes=1 << 20)
    folder = adapter(tmp_path / "a")
    digest = upload(store, folder)
    assert digest == digest_files(folder, 1 << 20) == upload(store, folder, chunk=7)
    assert store.digests() == {digest} and store.has(digest) and store.verify(digest)
    assert (store.path(digest) / WEIGHTS).read_bytes() == b"w" * 1000
    assert not leftovers(store)


@pytest.mark.parametrize("messages, says", [
    ([(CONFIG, b"{}"), (WEIGHTS, b"w"), (CONFIG, b"{}")], "consecutive"),
    ([("../evil", b"x")], "an upload holds"),
    ([(CONFIG, b"x" * ((64 << 10) + 1))], "over 64"),
    ([(CONFIG, b"{}"), (WEIGHTS, b"w" * 600), (WEIGHTS, b"w" * 600)], "--max-adapter-mb"),
    ([(CONFIG, b"{}")], "has no adapter_model"),
])
def test_bad_uploads_leave_nothing(tmp_path: Path, messages: list, says: str) -> None:
    store = BlobStore(tmp_path / "store", max_weights_bytes=1000)
    with pytest.raises(InvalidArgument, match=says), store.writer() as writer:
        for name, data in messages:
            writer.write(name, data)
        writer.commit()
    assert not store.digests() and not leftovers(store)


def test_an_interrupted_write_or_a_wrong_digest_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    with pytest.raises(RuntimeError), store.writer() as writer:
        writer.write(CONFIG, b"{}")
        raise RuntimeError("the client went away")
    with pytest.raises(InvalidArgument, match="not to the digest"):
        upload(store, adapter(tmp_path / "a"), expected="0" * 64)
    assert not store.digests() and not leftovers(store)


def test_card_is_kept_aside_and_not_hashed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    folder = adapter(tmp_path / "a")
    with store.writer() as writer:
        writer.write(CONFIG, b"{}")
        writer.write(WEIGHTS, b"w" * 1000)
        writer.write("card.json", b'{"description": "x"}')
        digest = writer.commit()
    assert writer.card == b'{"description": "x"}' and digest == digest_files(folder, 1 << 20)


def test_verify_removes_a_corrupt_blob_and_a_restart_clears_tmp(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    digest = upload(store, adapter(tmp_path / "a"))
    weights = store.path(digest) / WEIGHTS
    weights.write_bytes(b"x" + weights.read_bytes()[1:])
    assert not store.verify(digest) and not store.has(digest)
    crashed, busy = store.root / "tmp" / "crashed", store.root / "tmp" / "busy"
    for folder in (crashed, busy):
        folder.mkdir()
        (folder / WEIGHTS).write_bytes(b"w")
    stale = time.time() - STALE_TMP_S - 1
    for path in (crashed, crashed / WEIGHTS):
        os.utime(path, (stale, stale))
    # another process's upload in progress (two workers given one folder) stays
    assert leftovers(BlobStore(tmp_path / "store")) == [busy]


def test_add_folder_copies_so_later_changes_on_disk_change_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store", max_weights_bytes=1 << 20)
    folder = adapter(tmp_path / "a")
    digest = store.add_folder(folder)
    assert digest == digest_files(folder, 1 << 20)
    (folder / WEIGHTS).write_bytes(b"changed")
    assert store.verify(digest) and (store.path(digest) / WEIGHTS).read_bytes() == b"w" * 1000
    (folder / WEIGHTS).write_bytes(b"w" * (2 << 20))
    with pytest.raises(InvalidArgument, match=r"over|at most"):
        store.add_folder(folder)
    assert not leftovers(store)


def test_trim_removes_least_recently_used_beyond_the_bound(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store", max_bytes=3100)  # 3 of the 4 fit
    digests = [upload(store, adapter(tmp_path / str(i), weights=bytes([i]) * 1000))
               for i in range(4)]
    long_ago = time.time() - TRIM_GRACE_S - 100
    for age, digest in enumerate(digests):  # 0 oldest ... 3 newest
        os.utime(store.path(digest), (long_ago + age, long_ago + age))
    assert store.verify(digests[0])  # a verified read makes it the most recently used
    assert sorted(store.trim(keep=digests[1])) == sorted([digests[2]])
    assert store.digests() == {digests[0], digests[1], digests[3]}
    assert BlobStore(tmp_path / "store").trim() == []  # no bound: keeps everything
    young = upload(store, adapter(tmp_path / "young", weights=b"y" * 3000))
    assert young not in store.trim() and store.has(young)  # just pushed: its registration follows


def test_a_removal_spares_what_was_just_written_or_read(tmp_path: Path) -> None:
    """A worker unregistering the last adapter of some pushed files removes them, but not in
    the moment between their push (or check) and another adapter's registration of them."""
    store = BlobStore(tmp_path / "store")
    pushed = upload(store, adapter(tmp_path / "pushed"))
    assert not store.remove_if_idle(pushed) and store.verify(pushed)
    long_ago = time.time() - TRIM_GRACE_S - 1
    os.utime(store.path(pushed), (long_ago, long_ago))
    assert store.verify(pushed)  # a registration's check: used again just now
    assert not store.remove_if_idle(pushed) and store.has(pushed)
    os.utime(store.path(pushed), (long_ago, long_ago))
    assert store.remove_if_idle(pushed) and not store.has(pushed)
    assert not store.remove_if_idle(pushed)  # gone already


def test_the_same_content_committed_at_once_by_two_threads(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    folder = adapter(tmp_path / "a", weights=b"w" * 200_000)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(upload(store, folder, 4096)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert store.digests() == {results[0]} and store.verify(results[0])
    assert not leftovers(store)


@pytest.mark.parametrize("digest", ["", "abc", "A" * 64, "0" * 63, "../" + "0" * 61])
def test_bad_digests_are_refused(digest: str) -> None:
    with pytest.raises(InvalidArgument):
        check_digest(digest)
