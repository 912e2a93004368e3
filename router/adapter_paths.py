"""Where an admin may register adapters from: a path confined to --adapter-root (real path
inside it, no '..', no symlink leading out), holding regular files of bounded size. Checks paths
and file metadata only; never opens an adapter file."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePath

from common.adapter_format import CONFIG_FILE, WEIGHTS_FILE
from common.errors import InvalidArgument, PermissionDenied
from common.limits import shown

MAX_CONFIG_BYTES = 64 << 10


def confine(path: str, root: str, max_weights_bytes: int) -> str:
    """The real path of the adapter directory `path`; PermissionDenied when it (or a file in it)
    lies outside `root` ('' = anywhere), InvalidArgument when it is no adapter directory."""
    if not path:
        raise InvalidArgument("path is empty: give the adapter directory to register")
    if "\x00" in path or ".." in PurePath(path).parts:
        raise PermissionDenied(f"path {shown(path)}: '..' and NUL are not allowed")
    base = Path(root).resolve() if root else None
    given = Path(path).expanduser()
    if base is not None and not given.is_absolute():
        given = base / given  # a relative path names a folder under the root
    try:
        real = given.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # missing, or a symlink loop
        raise InvalidArgument(f"path {shown(path)}: no such adapter directory") from exc
    if base is not None and not real.is_relative_to(base):
        raise PermissionDenied(f"path {shown(path)} is outside --adapter-root: register "
                               "adapters from folders under it")
    if not real.is_dir():
        raise InvalidArgument(f"path {shown(path)} is not a directory (a PEFT adapter directory "
                              f"holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    for name, limit in ((CONFIG_FILE, MAX_CONFIG_BYTES), (WEIGHTS_FILE, max_weights_bytes)):
        _check_file(real / name, base, limit)
    return str(real)


def _check_file(file: Path, base: Path | None, max_bytes: int) -> None:
    try:
        real = file.resolve(strict=True)
        st = os.stat(real)
    except (OSError, RuntimeError) as exc:
        raise InvalidArgument(f"{file.name} is missing from the adapter directory") from exc
    if base is not None and not real.is_relative_to(base):
        raise PermissionDenied(f"{file.name} links outside --adapter-root")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"{file.name} is not a regular file")
    if st.st_size > max_bytes:
        raise InvalidArgument(f"{file.name} is {st.st_size >> 20} MiB; this server accepts up to "
                              f"{max_bytes >> 20} MiB (--max-adapter-mb)" if max_bytes >= 1 << 20
                              else f"{file.name} is over {max_bytes} bytes")
