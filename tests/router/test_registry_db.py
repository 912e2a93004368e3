"""router.registry_db: what is put is loaded back, after a reopen too; versions count up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from router.registry_db import RegistryDB, StoredAdapter


def test_put_load_replace_delete_and_reopen(tmp_path: Path) -> None:
    db = RegistryDB(tmp_path)
    first = db.put(StoredAdapter("acme", "x", "/a/x", 8, "d", ["p1", "p2"]))
    db.put(StoredAdapter("", "shared", "/a/s", 4))
    assert first.version == 1 and first.created_s > 0
    again = db.put(StoredAdapter("acme", "x", "/a/x2", 16))
    assert again.version == 2 and again.created_s == first.created_s
    db.set_rank("", "shared", 6)
    db.close()
    loaded = {(a.owner, a.adapter_id): a for a in RegistryDB(tmp_path).load()}
    assert set(loaded) == {("acme", "x"), ("", "shared")}
    assert (loaded["acme", "x"].path, loaded["acme", "x"].rank, loaded["acme", "x"].version) \
        == ("/a/x2", 16, 2)
    assert loaded["", "shared"].rank == 6
    reopened = RegistryDB(tmp_path)
    reopened.delete("acme", "x")
    assert [a.adapter_id for a in RegistryDB(tmp_path).load()] == ["shared"]


def test_a_killed_writer_leaves_whole_rows_only(tmp_path: Path) -> None:
    """A process that writes rows in a loop is killed with SIGKILL mid-way: every row it
    acknowledged (printed after put returned) is there, whole, and nothing else is half there."""
    script = (
        "import sys; sys.path.insert(0, '.')\n"
        "from router.registry_db import RegistryDB, StoredAdapter\n"
        f"db = RegistryDB({str(tmp_path)!r})\n"
        "for i in range(100000):\n"
        "    db.put(StoredAdapter('t', f'a{i}', '/p' * 50, 8, 'd' * 200, ['e'] * 20))\n"
        "    print(i, flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    acknowledged = -1
    for line in proc.stdout:
        acknowledged = int(line)
        if acknowledged >= 30:
            proc.kill()
            break
    proc.wait()
    rows = RegistryDB(tmp_path).load()
    ids = {a.adapter_id for a in rows}
    assert {f"a{i}" for i in range(acknowledged + 1)} <= ids
    assert all(a.example_prompts == ["e"] * 20 and a.description == "d" * 200 for a in rows)
