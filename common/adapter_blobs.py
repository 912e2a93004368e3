"""A content-addressed folder of PEFT adapter directories: the router's store of uploaded
adapters and each worker's cache of the ones pushed to it.

root/blobs/<digest>/ holds adapter_config.json and adapter_model.safetensors; work in progress
lives in root/tmp/ and becomes a blob only by an atomic rename once it is whole, so a crash or
an interrupted upload never leaves a blob that counts (stale leftovers in tmp/ go at the next
start). The digest is sha256 over a canonical form of the two files (names, sizes, bytes).
Torch-free.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from types import TracebackType

from common.errors import InvalidArgument
from common.untrusted_files import CONFIG_FILE, WEIGHTS_FILE, human_size, open_checked, read_exact

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
CARD_FILE = "card.json"
MAX_CONFIG_BYTES = 64 << 10
DIGEST = re.compile(r"[0-9a-f]{64}")
READ_BYTES = 1 << 20
TRIM_GRACE_S = 30.0
STALE_TMP_S = 600.0


def check_digest(digest: str) -> str:
    if not DIGEST.fullmatch(digest):
        raise InvalidArgument(f"digest {digest[:80]!r} is not 64 lowercase hex characters")
    return digest


def _limit(name: str, max_weights_bytes: int) -> int:
    return max_weights_bytes if name == WEIGHTS_FILE else MAX_CONFIG_BYTES


def digest_files(folder: Path, max_weights_bytes: int) -> str:
    """sha256 over name, size and bytes of each adapter file, in ADAPTER_FILES order."""
    sha = hashlib.sha256()
    for name in ADAPTER_FILES:
        limit = _limit(name, max_weights_bytes)
        with open_checked("upload", folder / name, limit, "{} at most") as (f, size):
            sha.update(f"{name}\0{size}\0".encode())
            done = 0
            while done < size:
                chunk = read_exact("upload", folder / name, f, min(READ_BYTES, size - done))
                sha.update(chunk)
                done += len(chunk)
    return sha.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """`max_bytes` (0 = no bound) caps what trim() keeps: a worker's cache, whose blobs the
    router can push again. The router's own store is the source of truth and never trims."""

    def __init__(self, root: str | Path, max_weights_bytes: int = 512 << 20,
                 max_bytes: int = 0) -> None:
        self.root = Path(root).expanduser()
        self.max_weights_bytes = max_weights_bytes
        self.max_bytes = max_bytes
        self._blobs, self._tmp = self.root / "blobs", self.root / "tmp"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._clean_tmp()

    def _clean_tmp(self) -> None:
        """Removes a crash's leftovers: work in tmp/ untouched for STALE_TMP_S. Younger work may
        be another process's upload in progress (two workers given one folder)."""
        now = time.time()
        for folder in self._tmp.iterdir():
            try:
                touched = max([folder.stat().st_mtime,
                               *(f.stat().st_mtime for f in folder.iterdir())])
            except OSError:  # finished or removed meanwhile
                continue
            if now - touched > STALE_TMP_S:
                shutil.rmtree(folder, ignore_errors=True)

    def path(self, digest: str) -> Path:
        return self._blobs / check_digest(digest)

    def has(self, digest: str) -> bool:
        folder = self.path(digest)
        return all((folder / name).is_file() for name in ADAPTER_FILES)

    def verify(self, digest: str) -> bool:
        """Whether the blob is there and still hashes to its name; a corrupt one is removed."""
        if not self.has(digest):
            return False
        try:
            if digest_files(self.path(digest), self.max_weights_bytes) == digest:
                os.utime(self.path(digest))  # used: last in trim()'s order
                return True
        except Exception:  # unreadable or grown past the caps: as bad as a wrong hash
            pass
        self.remove(digest)
        return False

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def add_folder(self, folder: Path) -> str:
        """Copies an adapter directory's files in (regular files, sizes capped as they are read);
        -> their digest. What is served is then this copy: a later change of the files on disk
        changes nothing until they are registered again."""
        with self.writer() as writer:
            for name in ADAPTER_FILES:
                limit = _limit(name, self.max_weights_bytes)
                with open_checked(folder.name, folder / name, limit, "{} at most") as (f, _):
                    while chunk := f.read(READ_BYTES):
                        writer.write(name, chunk)
            return writer.commit()

    def remove(self, digest: str) -> None:
        shutil.rmtree(self.path(digest), ignore_errors=True)

    def remove_if_idle(self, digest: str) -> bool:
        """Removes the blob unless it was written or read in the last TRIM_GRACE_S, trim()'s
        rule: a push is followed by its registration, and that may be another adapter's of the
        same files than the one whose removal asks (ids are locked apart). A blob kept goes at
        a later trim(). -> whether it was removed."""
        try:
            used = self.path(digest).stat().st_mtime
        except OSError:  # gone already
            return False
        if time.time() - used < TRIM_GRACE_S:
            return False
        self.remove(digest)
        return True

    def digests(self) -> set[str]:
        return {p.name for p in self._blobs.iterdir() if DIGEST.fullmatch(p.name)}

    def trim(self, keep: str = "") -> list[str]:
        """Removes the least recently used blobs (a blob's folder mtime: set when written and
        at each verified read) until the rest fit in max_bytes; -> the digests removed. `keep`
        and blobs written in the last TRIM_GRACE_S stay: a push is followed by its registration.
        """
        if not self.max_bytes:
            return []
        blobs = []
        for digest in self.digests():
            folder = self.path(digest)
            try:
                size = sum((folder / name).stat().st_size for name in ADAPTER_FILES)
                blobs.append((folder.stat().st_mtime, digest, size))
            except OSError:  # removed meanwhile, or half there: nothing to count
                continue
        total, removed, now = sum(size for _, _, size in blobs), [], time.time()
        for used, digest, size in sorted(blobs):
            if total <= self.max_bytes:
                break
            if digest != keep and now - used >= TRIM_GRACE_S:
                self.remove(digest)
                total -= size
                removed.append(digest)
        return removed

    def _new_tmp(self) -> Path:
        folder = self._tmp / uuid.uuid4().hex
        folder.mkdir()
        return folder

    def _install(self, folder: Path, digest: str) -> None:
        """Renames a whole tmp folder into place (atomic); same content there already: dropped."""
        target = self.path(digest)
        try:
            os.rename(folder, target)
        except OSError:
            if not self.has(digest):
                raise
            shutil.rmtree(folder, ignore_errors=True)
            return
        _fsync(self._blobs)


class BlobWriter:
    """One streamed adapter: write() its files' chunks, then commit(). Leaving the with-block
    without commit() removes everything written."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self.folder = store._new_tmp()
        self.card: bytes | None = None
        self._sizes: dict[str, int] = {}
        self._current: str | None = None
        self._file = None
        self._committed = False

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._close()
        if not self._committed:
            shutil.rmtree(self.folder, ignore_errors=True)

    def write(self, file_name: str, data: bytes) -> None:
        if file_name not in (*ADAPTER_FILES, CARD_FILE):
            raise InvalidArgument(f"file {file_name[:80]!r}: an upload holds "
                                  f"{', '.join(ADAPTER_FILES)} and optionally {CARD_FILE}")
        if file_name != self._current:
            if file_name in self._sizes:
                raise InvalidArgument(f"{file_name}: the chunks of one file must be "
                                      "consecutive")
            self._close()
            self._current, self._sizes[file_name] = file_name, 0
            if file_name != CARD_FILE:
                self._file = open(self.folder / file_name, "wb")  # noqa: SIM115
        size = self._sizes[file_name] + len(data)
        limit = _limit(file_name, self.store.max_weights_bytes)
        if size > limit:
            flag = " (--max-adapter-mb)" if file_name == WEIGHTS_FILE else ""
            raise InvalidArgument(f"{file_name} is over {human_size(limit)}: this server "
                                  f"accepts up to {human_size(limit)}{flag}")
        self._sizes[file_name] = size
        if file_name == CARD_FILE:
            self.card = (self.card or b"") + data
        else:
            self._file.write(data)

    def commit(self, expected_digest: str = "") -> str:
        """Makes the files a blob; -> their digest. Nothing is kept when a file is missing or
        the content does not hash to `expected_digest` (when given)."""
        self._close()
        for name in ADAPTER_FILES:
            if name not in self._sizes:
                raise InvalidArgument(f"the upload has no {name}")
            _fsync(self.folder / name)
        digest = digest_files(self.folder, self.store.max_weights_bytes)
        if expected_digest and digest != expected_digest:
            raise InvalidArgument(f"the files hash to {digest}, not to the digest "
                                  f"{expected_digest[:80]} they were sent as")
        self.store._install(self.folder, digest)
        self._committed = True
        return digest

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
