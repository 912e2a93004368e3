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


def test_card_kind_is_kept_and_an_older_database_gains_the_column(tmp_path: Path) -> None:
    import sqlite3

    old = sqlite3.connect(tmp_path / "registry.sqlite3")  # the schema before cards had a kind
    old.execute("CREATE TABLE adapters (owner TEXT NOT NULL, adapter_id TEXT NOT NULL, path TEXT "
                "NOT NULL, rank INTEGER NOT NULL, description TEXT NOT NULL, example_prompts "
                "TEXT NOT NULL, version INTEGER NOT NULL, digest TEXT NOT NULL, created_s REAL "
                "NOT NULL, updated_s REAL NOT NULL, PRIMARY KEY (owner, adapter_id))")
    old.execute("INSERT INTO adapters VALUES ('acme', 'old', '/a/o', 8, 'd', '[]', 3, 'g', 1.0, "
                "2.0)")
    old.commit()
    old.close()
    db = RegistryDB(tmp_path)
    [before] = db.load()
    assert (before.adapter_id, before.version, before.kind, before.digest) == ("old", 3, "", "g")
    db.put(StoredAdapter("acme", "maths", "/a/m", 8, "Maths word problems", ["2 + 2?"],
                         kind="domain"))
    db.close()
    loaded = {a.adapter_id: a for a in RegistryDB(tmp_path).load()}
    assert loaded["maths"].kind == "domain" and loaded["old"].kind == ""
