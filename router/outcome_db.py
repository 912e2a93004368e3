"""Reported outcomes on disk, beside the registry under --state-dir (SQLite, WAL): what the
selector learned survives a restart. At most `max_reports` rows per tenant, the oldest deleted
first, as in memory. synchronous=NORMAL: a power cut may lose the last few reports (a crash of
the process does not), which costs some learning, never a registration.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

DB_FILE = "outcomes.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    adapter_key TEXT NOT NULL,      -- the worker key that served ('' = base model)
    embedding BLOB NOT NULL,        -- float32, the prompt's raw whole embedding
    reward REAL NOT NULL,
    created_s REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_by_tenant ON reports (tenant, seq);
"""


class OutcomeDB:
    def __init__(self, state_dir: str | Path, max_reports: int) -> None:
        folder = Path(state_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / DB_FILE
        self.max_reports = max_reports
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def add(self, tenant: str, adapter_key: str, embedding: torch.Tensor, reward: float) -> None:
        blob = embedding.detach().float().reshape(-1).numpy().tobytes()
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("INSERT INTO reports (tenant, adapter_key, embedding, reward, "
                             "created_s) VALUES (?, ?, ?, ?, ?)",
                             (tenant, adapter_key, blob, reward, time.time()))
            # through the (tenant, seq) index: the max_reports-th newest and older go, without
            # reading the tenant's other rows (NULL while it has fewer: nothing goes)
            self._db.execute("DELETE FROM reports WHERE tenant = ? AND seq <= (SELECT seq FROM "
                             "reports WHERE tenant = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                             (tenant, tenant, self.max_reports))
            self._db.execute("COMMIT")

    def forget(self, adapter_keys: list[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM reports WHERE adapter_key = ?",
                                 [(key,) for key in adapter_keys])

    def load(self) -> Iterator[tuple[str, str, torch.Tensor, float]]:
        """(tenant, adapter key, embedding, reward), oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT tenant, adapter_key, embedding, reward FROM reports "
                                    "ORDER BY seq").fetchall()
        for tenant, key, blob, reward in rows:
            yield tenant, key, torch.frombuffer(bytearray(blob), dtype=torch.float32), reward

    def close(self) -> None:
        with self._lock:
            self._db.close()
