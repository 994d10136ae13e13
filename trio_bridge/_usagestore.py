"""Usage that survives restarts: SQLite (stdlib ``sqlite3``, WAL), per UTC day × key × model.

Table ``usage(day, key_id, model, requests, prompt_tokens, completion_tokens, estimated,
errors)``. Requests are counted in memory as they end (:meth:`UsageStore.record`, no I/O) and
written in one transaction every ``flush_interval`` seconds from a worker thread
(:meth:`UsageStore.run`), and once more on shutdown. So a crash (``kill -9``, OOM) loses at most
the counts of the last ``flush_interval`` (default 2 s); a committed flush survives it (WAL,
``synchronous=NORMAL``; a power loss may also take the last commits).

``estimated`` counts requests whose tokens were estimated, not reported by the LLM (a stream
without a usage chunk: one completion token per event; prompt tokens: request bytes / 4).
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import sqlite3
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import trio

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    estimated INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key_id, model)
) WITHOUT ROWID
"""
_UPSERT = """
INSERT INTO usage (day, key_id, model, requests, prompt_tokens, completion_tokens, estimated,
                   errors)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, key_id, model) DO UPDATE SET
    requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    estimated = estimated + excluded.estimated,
    errors = errors + excluded.errors
"""
COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "estimated", "errors")
MAX_MODEL = 128


@functools.lru_cache(maxsize=4)
def _day_text(day: int) -> str:
    return dt.datetime.fromtimestamp(day * 86400, dt.UTC).strftime("%Y-%m-%d")


def utc_day(ts: float) -> str:
    """``YYYY-MM-DD`` of a Unix time, in UTC (cached per day: it is on the hot path)."""
    return _day_text(int(ts // 86400))


#: the files SQLite keeps beside a database (WAL, its shared memory, a rollback journal)
SIDE_FILES = ("-wal", "-shm", "-journal")


def make_private(path: Path) -> None:
    """Create ``path`` (empty) with mode 0600 if it is missing, and take group and other
    permissions off it and its side files if an older release left them there.

    SQLite creates the -wal, -shm and -journal files with the database file's mode (whatever
    the umask), so a database file that is private before SQLite first opens it keeps them
    private too; one chmod after opening came too late for them. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in SIDE_FILES:
        side = path.with_name(path.name + suffix)
        try:
            if side.stat().st_mode & 0o077:
                side.chmod(0o600)
        except FileNotFoundError:
            pass


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_private(path)
    db = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(SCHEMA)
    return db


class UsageStore:
    def __init__(self, path: Path, flush_interval: float = 2.0) -> None:
        self.path = path
        self.flush_interval = flush_interval
        self._db = connect(path)
        self._lock = threading.Lock()  # the connection is used from worker threads
        self._pending: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0] * 5)
        self._writing: dict[tuple[str, str, str], list[int]] = {}  # the batch being written

    def record(
        self,
        key_id: str,
        model: str,
        *,
        prompt: int,
        completion: int,
        estimated: bool,
        error: bool,
        now: float,
    ) -> None:
        """Count one finished request (memory only; written by the next flush)."""
        row = self._pending[(utc_day(now), key_id, (model or "unknown")[:MAX_MODEL])]
        row[0] += 1
        row[1] += prompt
        row[2] += completion
        row[3] += estimated
        row[4] += error

    def _write(self, batch: dict[tuple[str, str, str], list[int]]) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN")
                try:
                    self._db.executemany(_UPSERT, [(*k, *v) for k, v in batch.items()])
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                self._writing = {}  # in the database now (rows() reads both under the lock)

    async def flush(self) -> None:
        """Write what was counted since the last flush (in a worker thread)."""
        if not self._pending:
            return
        # until its commit, the batch stays visible to rows() as _writing
        self._writing, self._pending = self._pending, defaultdict(lambda: [0] * 5)
        await trio.to_thread.run_sync(self._write, self._writing)

    async def run(self) -> None:
        """Flush every ``flush_interval`` until cancelled; then a last flush (shielded)."""
        try:
            while True:
                await trio.sleep(self.flush_interval)
                await self.flush()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.flush()

    def rows(
        self, *, since_day: str = "", key_ids: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Rows (flushed and pending), newest day first."""
        with self._lock:
            cur = self._db.execute(
                "SELECT day, key_id, model, " + ", ".join(COLUMNS) + " FROM usage WHERE day >= ?",
                (since_day,),
            )
            merged: dict[tuple[str, str, str], list[int]] = {
                (r[0], r[1], r[2]): list(r[3:]) for r in cur.fetchall()
            }
            unwritten = [*self._writing.items(), *self._pending.items()]
        for k, v in unwritten:
            if k[0] >= since_day:
                row = merged.setdefault(k, [0] * 5)
                for i, n in enumerate(v):
                    row[i] += n
        out = [
            {"day": k[0], "key_id": k[1], "model": k[2], **dict(zip(COLUMNS, v, strict=True))}
            for k, v in merged.items()
            if key_ids is None or k[1] in key_ids
        ]
        return sorted(out, key=lambda r: (r["day"], r["key_id"], r["model"]), reverse=True)

    def tokens_on(self, day: str) -> dict[str, int]:
        """Prompt + completion tokens per key id on ``day`` (seeds daily budgets at start)."""
        totals: dict[str, int] = defaultdict(int)
        for r in self.rows(since_day=day):
            if r["day"] == day:
                totals[r["key_id"]] += r["prompt_tokens"] + r["completion_tokens"]
        return dict(totals)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def read_rows(path: Path, *, since_day: str = "") -> list[dict[str, Any]]:
    """Rows of a usage file for the CLI (read-only; a missing file has none)."""
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        cur = db.execute(
            "SELECT day, key_id, model, " + ", ".join(COLUMNS) + " FROM usage WHERE day >= ? "
            "ORDER BY day DESC, key_id, model",
            (since_day,),
        )
        return [dict(zip(("day", "key_id", "model", *COLUMNS), r, strict=True)) for r in cur]
    finally:
        db.close()
