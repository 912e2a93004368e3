"""A content-addressed folder of PEFT adapter directories: the router's store of uploaded
adapters and each worker's cache of the ones pushed to it.

root/blobs/<digest>/ holds adapter_config.json and adapter_model.safetensors; work in progress
lives in root/tmp/ and becomes a blob only by an atomic rename once it is whole, so a crash or an
interrupted upload never leaves a blob that counts (leftovers in tmp/ go at the next start). The
digest is sha256 over a canonical form of the two files (names, sizes, bytes). Torch-free.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
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
    def __init__(self, root: str | Path, max_weights_bytes: int = 512 << 20) -> None:
        self.root = Path(root).expanduser()
        self.max_weights_bytes = max_weights_bytes
        self._blobs, self._tmp = self.root / "blobs", self.root / "tmp"
        self._blobs.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)  # a crash's leftovers never count
        self._tmp.mkdir(parents=True, exist_ok=True)

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
                return True
        except Exception:  # unreadable or grown past the caps: as bad as a wrong hash
            pass
        self.remove(digest)
        return False

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def remove(self, digest: str) -> None:
        shutil.rmtree(self.path(digest), ignore_errors=True)

    def digests(self) -> set[str]:
        return {p.name for p in self._blobs.iterdir() if DIGEST.fullmatch(p.name)}

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
