"""The registry's durable copy: one SQLite file under --state-dir, written before an RPC answers.

WAL with synchronous=FULL: a registration is on disk when put() returns, and a kill -9 at any
moment leaves each row either wholly written or absent (SQLite's transactions), never half.
Knows nothing of workers or gRPC; every call is short and thread-safe (one lock).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

DB_FILE = "registry.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    owner TEXT NOT NULL,            -- tenant, '' = shared
    adapter_id TEXT NOT NULL,
    path TEXT NOT NULL,
    rank INTEGER NOT NULL,
    description TEXT NOT NULL,
    example_prompts TEXT NOT NULL,  -- JSON list of strings
    version INTEGER NOT NULL,       -- 1, then +1 at each replacement
    digest TEXT NOT NULL,           -- an uploaded adapter's content in the store, '' = a path
    created_s REAL NOT NULL,
    updated_s REAL NOT NULL,
    kind TEXT NOT NULL DEFAULT '',  -- the card's declared kind ('' = told from its examples)
    PRIMARY KEY (owner, adapter_id)
)
"""


@dataclass
class StoredAdapter:
    owner: str
    adapter_id: str
    path: str
    rank: int
    description: str = ""
    example_prompts: list[str] = field(default_factory=list)
    version: int = 1
    created_s: float = 0.0
    updated_s: float = 0.0
    digest: str = ""
    kind: str = ""


class RegistryDB:
    def __init__(self, state_dir: str | Path) -> None:
        folder = Path(state_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / DB_FILE
        self._lock = threading.Lock()
        # autocommit off: each write is one explicit transaction
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(adapters)")}
        if "kind" not in columns:  # a database written before cards had a kind
            self._db.execute("ALTER TABLE adapters ADD COLUMN kind TEXT NOT NULL DEFAULT ''")

    def load(self) -> list[StoredAdapter]:
        with self._lock:
            rows = self._db.execute(
                "SELECT owner, adapter_id, path, rank, description, example_prompts, version, "
                "created_s, updated_s, digest, kind FROM adapters ORDER BY owner, adapter_id"
            ).fetchall()
        return [StoredAdapter(o, a, p, r, d, json.loads(e), v, c, u, g, k)
                for o, a, p, r, d, e, v, c, u, g, k in rows]

    def put(self, adapter: StoredAdapter) -> StoredAdapter:
        """Inserts or replaces (owner, adapter_id); -> the row as stored (version, times)."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                old = self._db.execute(
                    "SELECT version, created_s FROM adapters WHERE owner = ? AND adapter_id = ?",
                    (adapter.owner, adapter.adapter_id)).fetchone()
                version, created = (old[0] + 1, old[1]) if old else (1, now)
                self._db.execute(
                    "INSERT OR REPLACE INTO adapters (owner, adapter_id, path, rank, "
                    "description, example_prompts, version, digest, created_s, updated_s, kind) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (adapter.owner, adapter.adapter_id, adapter.path, adapter.rank,
                     adapter.description, json.dumps(adapter.example_prompts), version,
                     adapter.digest, created, now, adapter.kind))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return StoredAdapter(adapter.owner, adapter.adapter_id, adapter.path, adapter.rank,
                             adapter.description, list(adapter.example_prompts), version,
                             created, now, adapter.digest, adapter.kind)

    def delete(self, owner: str, adapter_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM adapters WHERE owner = ? AND adapter_id = ?",
                             (owner, adapter_id))

    def set_rank(self, owner: str, adapter_id: str, rank: int) -> None:
        """Records a rank learned later (an --adapters-dir entry validated when a worker joined)."""
        with self._lock:
            self._db.execute("UPDATE adapters SET rank = ? WHERE owner = ? AND adapter_id = ?",
                             (rank, owner, adapter_id))

    def close(self) -> None:
        with self._lock:
            self._db.close()
