"""router.adapter_paths.confine: path registration stays inside --adapter-root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.errors import InvalidArgument, PermissionDenied
from router.adapter_paths import confine

MB = 1 << 20


def adapter_dir(path: Path, weights_bytes: int = 16) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"\0" * weights_bytes)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    adapter_dir(tmp_path / "root" / "good")
    adapter_dir(tmp_path / "outside")
    return tmp_path / "root"


def test_inside_the_root_by_absolute_or_relative_path(root: Path) -> None:
    real = str((root / "good").resolve())
    assert confine(str(root / "good"), str(root), MB) == real
    assert confine("good", str(root), MB) == real


def test_outside_the_root_is_permission_denied(root: Path) -> None:
    with pytest.raises(PermissionDenied, match="outside"):
        confine(str(root.parent / "outside"), str(root), MB)
    with pytest.raises(PermissionDenied, match=r"\.\."):
        confine(str(root / ".." / "outside"), str(root), MB)
    os.symlink(root.parent / "outside", root / "link")
    with pytest.raises(PermissionDenied, match="outside"):
        confine(str(root / "link"), str(root), MB)


def test_a_file_linking_out_of_the_root_is_refused(root: Path) -> None:
    target = adapter_dir(root / "sneaky")
    (target / "adapter_model.safetensors").unlink()
    os.symlink(root.parent / "outside" / "adapter_model.safetensors",
               target / "adapter_model.safetensors")
    with pytest.raises(PermissionDenied, match="links outside"):
        confine(str(target), str(root), MB)


def test_fifo_missing_and_oversized_files_are_refused(root: Path) -> None:
    fifo = adapter_dir(root / "fifo")
    (fifo / "adapter_model.safetensors").unlink()
    os.mkfifo(fifo / "adapter_model.safetensors")
    with pytest.raises(InvalidArgument, match="not a regular file"):
        confine(str(fifo), str(root), MB)
    with pytest.raises(InvalidArgument, match="no such"):
        confine(str(root / "nope"), str(root), MB)
    big = adapter_dir(root / "big", weights_bytes=2 * MB)
    with pytest.raises(InvalidArgument, match="--max-adapter-mb"):
        confine(str(big), str(root), MB)


def test_open_mode_takes_any_local_adapter_dir(root: Path) -> None:
    assert confine(str(root.parent / "outside"), "", MB).endswith("outside")
