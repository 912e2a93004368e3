"""Opening and reading files named by untrusted input without blocking or overreading:
regular files only (a FIFO would block open() forever), sizes capped before reading and checked
again on the open file (it may have been swapped), I/O failures that may pass told apart from a
tenant's mistakes. Knows nothing of what the files hold."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from common.errors import InvalidArgument, Unavailable

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# A FIFO swapped in between stat() and open() would block a plain open() forever.
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def human_size(num_bytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if num_bytes >= 1 << shift:
            return f"{num_bytes / (1 << shift):.4g} {unit}"
    return f"{num_bytes} bytes"


def check_stat(adapter_id: str, file: Path, info: os.stat_result, max_bytes: int,
               limit: str) -> int:
    """-> the size of a regular file of at most max_bytes; refuses FIFOs, devices, directories."""
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgument(f"adapter {adapter_id!r}: {file} is not a regular file")
    if info.st_size > max_bytes:
        raise InvalidArgument(f"adapter {adapter_id!r}: {file} is {human_size(info.st_size)}; "
                              + limit.format(human_size(max_bytes)))
    return info.st_size


@contextmanager
def os_errors(adapter_id: str, file: Path) -> Iterator[None]:
    """A missing file is the tenant's mistake; other OSErrors (EIO, EMFILE) may pass."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise InvalidArgument(f"adapter {adapter_id!r}: {file} is missing (a PEFT adapter "
                              f"directory holds {CONFIG_FILE} and {WEIGHTS_FILE})") from exc
    except OSError as exc:
        raise Unavailable(f"adapter {adapter_id!r}: {file} cannot be read now ({exc})") from exc


def stat_checked(adapter_id: str, file: Path, max_bytes: int, limit: str) -> int:
    """Before opening: open() of a FIFO blocks until a writer comes, possibly forever."""
    with os_errors(adapter_id, file):
        return check_stat(adapter_id, file, os.stat(file), max_bytes, limit)


@contextmanager
def open_checked(adapter_id: str, file: Path, max_bytes: int,
                  limit: str) -> Iterator[tuple[BinaryIO, int]]:
    """-> (file, size): a regular file of at most max_bytes, checked before and after opening."""
    with os_errors(adapter_id, file):
        stat_checked(adapter_id, file, max_bytes, limit)
        with os.fdopen(os.open(file, os.O_RDONLY | _NONBLOCK), "rb") as f:
            # the file opened need not be the one stat() saw: it may have been swapped since
            yield f, check_stat(adapter_id, file, os.fstat(f.fileno()), max_bytes, limit)


def read_exact(adapter_id: str, file: Path, f: BinaryIO, num_bytes: int) -> bytearray:
    """Reads num_bytes into a fresh (writable, so torch.frombuffer can view it) buffer."""
    buf = bytearray(num_bytes)
    view, done = memoryview(buf), 0
    while done < num_bytes:
        got = f.readinto(view[done:])
        if not got:
            raise Unavailable(f"adapter {adapter_id!r}: {file} shrank while being read")
        done += got
    return buf
