"""Usage that survives restarts: SQLite (stdlib ``sqlite3``, WAL), per UTC day × key × model.

Table ``usage(day, key_id, model, requests, prompt_tokens, completion_tokens, estimated,
errors, refused)``. Requests are counted in memory as they end (:meth:`UsageStore.record`, no
I/O) and written in one transaction every ``flush_interval`` seconds from a worker thread
(:meth:`UsageStore.run`), and once more on shutdown. So a crash (``kill -9``, OOM) loses at most
the counts of the last ``flush_interval`` (default 2 s); a committed flush survives it (WAL,
``synchronous=NORMAL``; a power loss may also take the last commits).

``requests`` counts every request of the key that the connector answered (its key valid),
whatever the answer; of those, ``refused`` the ones the bridge itself refused (a 4xx it made: a
limit's 429, the model allowlist's 403 or 400, a bad target, a body too large) and ``errors``
the ones that failed (a 5xx, from the bridge or the LLM, or an answer that broke off): the same
rule as the metrics' error rate, where a refusal is no error. ``estimated`` counts requests
whose tokens were estimated, not reported by the LLM (a stream without a usage chunk: one
completion token per event; prompt tokens: request bytes / 4). ``model`` is ``"unknown"`` for a
request that named none (``GET /v1/models``) or was refused before its body was read.

A file written before ``refused`` existed gains the column when the connector opens it.

Bounded, and never in the event loop's way:

- **Model names** are kept only for models the connector knows (``models``: its configured or
  discovered list; ``name`` also counts for ``name:latest``); any other name the LLM echoes
  (llama.cpp echoes whatever the client sent) is counted under ``"other"``. While the list is
  unknown, the first ``MAX_UNLISTED_MODELS`` names seen are kept, then ``"other"``. Rows per
  day are at most keys × (models + 2).
- **Reads** (:meth:`UsageStore.rows`, :meth:`UsageStore.tokens_on`: the admin page and
  ``/_bridge/usage``) come from an in-memory summary of the last ``WINDOW_DAYS`` days per key,
  day and model, read from the file once (:meth:`UsageStore.load`, in a worker thread) and kept
  up to date by :meth:`UsageStore.record`; they never touch SQLite nor wait for a flush. Rows
  an older release wrote per echoed name are folded at load: per key and day the
  ``MAX_MODELS_LOADED`` biggest by name, the rest as ``"other"``.
- **A failed flush** (``database is locked`` beyond SQLite's 10 s wait, disk full, …) is logged
  on one line with its cause and counted (``trio_bridge_usage_flush_failures_total``); its
  batch goes back to memory (at most ``max_pending_rows`` rows, the oldest days dropped first
  and counted in ``trio_bridge_usage_rows_dropped_total``) and is written by a later flush,
  retried with backoff up to a minute apart. It never ends :meth:`UsageStore.run`.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from trio_bridge._backoff import Backoff

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("trio_bridge.usage")

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
    refused INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key_id, model)
) WITHOUT ROWID
"""
_UPSERT = """
INSERT INTO usage (day, key_id, model, requests, prompt_tokens, completion_tokens, estimated,
                   errors, refused)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, key_id, model) DO UPDATE SET
    requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    estimated = estimated + excluded.estimated,
    errors = errors + excluded.errors,
    refused = refused + excluded.refused
"""
COLUMNS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "estimated",
    "errors",
    "refused",
)
#: columns a file of an older release may lack, with how to add them
_ADDED_COLUMNS = {"refused": "ALTER TABLE usage ADD COLUMN refused INTEGER NOT NULL DEFAULT 0"}
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
    have = _columns(db)
    for name, alter in _ADDED_COLUMNS.items():
        if name not in have:
            db.execute(alter)
    return db


def _columns(db: sqlite3.Connection) -> set[str]:
    return {row[1] for row in db.execute("PRAGMA table_info(usage)")}


Key = tuple[str, str, str]  # (day, key id, model)
#: the model names the connector knows now (None: not known)
KnownModels = Callable[[], Collection[str] | None]
#: what a key's requests were counted under when the connector does not know the model
OTHER = "other"
#: names kept while the LLM's model list is unknown (then OTHER)
MAX_UNLISTED_MODELS = 16
#: days the in-memory summary covers (the admin page and /_bridge/usage show 30)
WINDOW_DAYS = 31
#: model names per key and day that a load keeps from an older file (then OTHER)
MAX_MODELS_LOADED = 50
#: a flush that keeps failing keeps at most this many rows in memory
MAX_PENDING_ROWS = 100_000
#: flushes that fail are retried at most this far apart
MAX_RETRY_INTERVAL = 60.0


def zeros() -> list[int]:
    """An empty usage row (one count per column of COLUMNS)."""
    return [0] * len(COLUMNS)


def count_request(
    row: list[int],
    *,
    prompt: int,
    completion: int,
    estimated: bool,
    error: bool,
    refused: bool,
) -> None:
    """Add one finished request to a usage ``row`` (the order of COLUMNS)."""
    row[0] += 1
    row[1] += prompt
    row[2] += completion
    row[3] += estimated
    row[4] += error
    row[5] += refused


class UsageBook(Protocol):
    """Where a connector counts its usage: this file (:class:`UsageStore`) or the pool's
    shared store (``accounts/_pool.py``)."""

    last_error: str | None

    @property
    def loaded(self) -> bool: ...

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
        refused: bool = False,
    ) -> None: ...

    async def load(self) -> None: ...

    async def flush(self) -> bool: ...

    def write_now(self, timeout: float = 2.0) -> bool: ...

    def rows(
        self, *, since_day: str = "", key_ids: list[str] | None = None
    ) -> list[dict[str, Any]]: ...

    def tokens_on(self, day: str) -> dict[str, int]: ...


class ModelNames:
    """What a request for a model is counted under, in a usage store (a file or the pool's):
    the name when the LLM lists it (or lists nothing yet: the first MAX_UNLISTED_MODELS names),
    else OTHER; names that are not printable are never stored. Any client can name any model:
    this bounds the rows."""

    def __init__(self, models: KnownModels | None) -> None:
        self._models = models or (lambda: None)
        self._known_from: Collection[str] | None = None
        self._known: frozenset[str] = frozenset()
        self._unlisted: set[str] = set()

    def __call__(self, model: str) -> str:
        model = (model or "unknown")[:MAX_MODEL]
        if not model.isprintable():  # control characters, lone surrogates: never stored
            return OTHER
        known = self._models()
        if known is not None:
            if known is not self._known_from:
                self._known_from, self._known = known, frozenset(known)
            if model in self._known or model == "unknown" or f"{model}:latest" in self._known:
                return model
            return OTHER
        if model in self._unlisted:
            return model
        if len(self._unlisted) < MAX_UNLISTED_MODELS:
            self._unlisted.add(model)
            return model
        return OTHER


class UsageStore:
    """The usage file of one connector: counts in memory, written by :meth:`run`.

    ``models``: the model names the connector knows now (None: not known); called as requests
    end. ``registry``: where the flush failure counters go (the connector's metrics)."""

    def __init__(
        self,
        path: Path,
        flush_interval: float = 2.0,
        *,
        models: KnownModels | None = None,
        registry: CollectorRegistry | None = None,
        max_pending_rows: int = MAX_PENDING_ROWS,
    ) -> None:
        self.path = path
        self.flush_interval = flush_interval
        self.max_pending_rows = max_pending_rows
        self._db = connect(path)
        #: the connection is used from worker threads, one at a time; never taken on the loop
        #: while serving (only by tokens_on before load, at start, and close)
        self._lock = threading.Lock()
        self._pending: dict[Key, list[int]] = defaultdict(zeros)
        #: key id → day → model → counts: what the file holds for the last WINDOW_DAYS days,
        #: plus everything counted since (pending, being written, or kept after a failure)
        self._summary: dict[str, dict[str, dict[str, list[int]]]] = {}
        self._today = ""
        self.loaded = False
        self._loading: trio.Event | None = None
        self.model_name = ModelNames(models)
        self.flush_failures = 0
        #: why the last flush failed (None: it did not); its rows wait in memory
        self.last_error: str | None = None
        self.rows_dropped = 0
        self._failures_metric: Any = None
        self._dropped_metric: Any = None
        if registry is not None:
            from prometheus_client import Counter

            self._failures_metric = Counter(
                "trio_bridge_usage_flush_failures",
                "Usage store flushes that failed (the batch is kept in memory and retried).",
                registry=registry,
            )
            self._dropped_metric = Counter(
                "trio_bridge_usage_rows_dropped",
                "Usage rows dropped from memory while flushes kept failing (max_pending_rows).",
                registry=registry,
            )

    # -- counting (the request path: memory only) --
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
        refused: bool = False,
    ) -> None:
        """Count one finished request (memory only; written by the next flush): ``refused``
        by the bridge (a 4xx it made), or an ``error`` (see the module docstring)."""
        day = utc_day(now)
        if day != self._today:
            self._new_day(day, now)
        model = self.model_name(model)
        per_day = self._summary.get(key_id)
        if per_day is None:
            per_day = self._summary[key_id] = {}
        models = per_day.get(day)
        if models is None:
            models = per_day[day] = {}
        for row in (self._pending[(day, key_id, model)], models.setdefault(model, zeros())):
            count_request(
                row,
                prompt=prompt,
                completion=completion,
                estimated=estimated,
                error=error,
                refused=refused,
            )

    def _new_day(self, day: str, now: float) -> None:
        """Forget the summary's days that left the window."""
        self._today = day
        oldest = utc_day(now - (WINDOW_DAYS - 1) * 86400)
        for key_id, per_day in list(self._summary.items()):
            for old in [d for d in per_day if d < oldest]:
                del per_day[old]
            if not per_day:
                del self._summary[key_id]

    # -- the summary (read once, off the loop) --
    async def load(self) -> None:  # noqa: ASYNC910  loaded: nothing to wait for
        """Read the last ``WINDOW_DAYS`` days of the file into the summary, once, in a worker
        thread (later calls return at once; concurrent ones wait for the first).
        Cancellation: the read is not interrupted (it finishes in its thread first)."""
        if self.loaded:
            return  # noqa: ASYNC910  loaded: nothing to wait for
        if self._loading is not None:
            await self._loading.wait()
            return
        self._loading = trio.Event()
        try:
            since = utc_day(time.time() - (WINDOW_DAYS - 1) * 86400)  # wall clock
            try:
                rows = await trio.to_thread.run_sync(self._read_window, since)
            except (sqlite3.Error, OSError) as exc:
                # flushes go on (they add to the file); reading later could count twice
                log.error(
                    "usage: cannot read %s (%s: %s); the admin page and /_bridge/usage show "
                    "only what was counted since the start",
                    self.path,
                    type(exc).__name__,
                    exc,
                )
                rows = {}
            for (day, key_id, model), counts in rows.items():
                models = self._summary.setdefault(key_id, {}).setdefault(day, {})
                row = models.setdefault(model, zeros())
                for i, n in enumerate(counts):
                    row[i] += n
            self.loaded = True
        finally:
            self._loading.set()
            self._loading = None

    def _read_window(self, since: str) -> dict[Key, list[int]]:
        """The file's rows since ``since``, at most MAX_MODELS_LOADED names per key and day
        (the rest folded into OTHER). Runs in a worker thread."""
        with self._lock:
            cur = self._db.execute(
                "SELECT day, key_id, model, " + ", ".join(COLUMNS) + " FROM usage WHERE day >= ?"
                " ORDER BY day, key_id, requests DESC",
                (since,),
            )
            out: dict[Key, list[int]] = {}
            names: dict[tuple[str, str], int] = defaultdict(int)
            for day, key_id, model, *counts in cur:
                n = names[(day, key_id)]
                if n >= MAX_MODELS_LOADED and model != OTHER:
                    model = OTHER
                elif model != OTHER:
                    names[(day, key_id)] = n + 1
                row = out.setdefault((day, key_id, model), zeros())
                for i, c in enumerate(counts):
                    row[i] += c
        return out

    # -- writing (worker threads) --
    def _write(self, batch: dict[Key, list[int]]) -> None:
        with self._lock:
            self._write_locked(batch)

    def _write_locked(self, batch: dict[Key, list[int]]) -> None:
        self._db.execute("BEGIN")
        try:
            self._db.executemany(_UPSERT, [(*k, *v) for k, v in batch.items()])
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def write_now(self, timeout: float = 2.0) -> bool:
        """Write what is pending, from any thread and without the event loop: the hard-stop
        backstop's last act (the loop may be stuck). Waits at most ``timeout`` seconds for a
        flush in progress (whose batch it cannot know: lost if that flush never ends). True
        if nothing is left unwritten."""
        if not self._pending:
            return True
        if not self._lock.acquire(timeout=timeout):
            return False
        try:
            batch, self._pending = self._pending, defaultdict(zeros)
            self._write_locked(batch)
        except (sqlite3.Error, OSError):
            return False
        finally:
            self._lock.release()
        return True

    async def flush(self) -> bool:
        """Write what was counted since the last flush (in a worker thread; the summary is
        read first, so nothing is counted twice). True if written (or nothing to write).
        Error handling: a failure is logged (one line, its cause), counted, and the batch
        kept for the next flush: False. Never raises but for cancellation while loading."""
        await self.load()
        if not self._pending:
            return True
        batch, self._pending = self._pending, defaultdict(zeros)
        try:
            await trio.to_thread.run_sync(self._write, batch)
        except (sqlite3.Error, OSError) as exc:
            self._requeue(batch)
            self.flush_failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self._failures_metric is not None:
                self._failures_metric.inc()
            log.warning(
                "usage flush failed (%s: %s); %d rows kept in memory, written by a later "
                "flush (%s)",
                type(exc).__name__,
                exc,
                len(self._pending),
                self.path,
            )
            return False
        except Exception as exc:  # a batch that cannot be written at all: not kept for ever
            self.flush_failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.rows_dropped += len(batch)
            if self._failures_metric is not None:
                self._failures_metric.inc()
            if self._dropped_metric is not None:
                self._dropped_metric.inc(len(batch))
            log.error("usage flush failed (%s); %d rows dropped", type(exc).__name__, len(batch))
            return False
        if self.last_error is not None:
            log.info("usage flush works again (%s)", self.path)
            self.last_error = None
        return True

    def _requeue(self, batch: dict[Key, list[int]]) -> None:
        """Put a batch that was not written back in front of what came since (bounded)."""
        for k, v in batch.items():
            row = self._pending[k]
            for i, n in enumerate(v):
                row[i] += n
        excess = len(self._pending) - self.max_pending_rows
        if excess > 0:
            for k in sorted(self._pending)[:excess]:  # the oldest days first
                del self._pending[k]
            self.rows_dropped += excess
            if self._dropped_metric is not None:
                self._dropped_metric.inc(excess)
            log.error(
                "usage: %d rows dropped from memory (flushes keep failing; max %d kept)",
                excess,
                self.max_pending_rows,
            )

    async def run(self) -> None:
        """Read the summary, then flush every ``flush_interval`` until cancelled (after a
        failure, again with backoff, at most ``MAX_RETRY_INTERVAL`` apart); then a last flush
        (shielded, at most 5 s). Never ends by itself: a failing file is retried."""
        interval = self.flush_interval
        retry = Backoff(base=interval, cap=max(interval, MAX_RETRY_INTERVAL), floor=interval)
        try:
            await self.load()
            delay = interval
            while True:
                await trio.sleep(delay)
                if await self.flush():
                    retry.attempt = 0
                    delay = interval
                else:
                    delay = retry.next_delay()
        finally:
            with trio.move_on_after(5, shield=True):
                await self.flush()

    # -- reading (the event loop: memory only) --
    def rows(
        self, *, since_day: str = "", key_ids: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Rows of the last ``WINDOW_DAYS`` days (written or not), newest day first: from
        memory, never from the file (older days: :func:`read_rows`)."""
        out = []
        ids = self._summary.keys() if key_ids is None else key_ids
        for key_id in ids:
            for day, models in self._summary.get(key_id, {}).items():
                if day < since_day:
                    continue
                for model, v in models.items():
                    row: dict[str, Any] = {"day": day, "key_id": key_id, "model": model}
                    row.update(zip(COLUMNS, v, strict=True))
                    out.append(row)
        return sorted(out, key=lambda r: (r["day"], r["key_id"], r["model"]), reverse=True)

    def tokens_on(self, day: str) -> dict[str, int]:
        """Prompt + completion tokens per key id on ``day`` (seeds daily budgets at start:
        before :meth:`load`, one small query of the file)."""
        totals: dict[str, int] = defaultdict(int)
        if not self.loaded:  # nothing flushed yet: the file, plus what was counted since
            with self._lock:
                cur = self._db.execute(
                    "SELECT key_id, SUM(prompt_tokens + completion_tokens) FROM usage "
                    "WHERE day = ? GROUP BY key_id",
                    (day,),
                )
                for key_id, tokens in cur:
                    totals[key_id] += tokens
        for key_id, per_day in self._summary.items():
            for v in per_day.get(day, {}).values():
                totals[key_id] += v[1] + v[2]
        return dict(totals)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def check_writable(path: Path) -> str:
    """Try a real write where the connector would keep its usage (for ``check``): a row
    inserted and deleted in one committed transaction of the file, or, while the file does
    not exist yet, a small file written, synced and removed in its directory (the usage file
    itself is not created: run as root, it would belong to root). Returns what was done;
    raises sqlite3.Error or OSError. Blocking (call it in a worker thread)."""
    if not path.exists():
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if parent != path.parent:
            if not os.access(parent, os.W_OK):
                raise PermissionError(f"{parent} is not writable for this user")
            return f"{path.parent} will be created (in {parent}, writable)"
        probe = parent / f".{path.name}.check-{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink()
        return "not created yet; a test write in its directory worked"
    db = connect(path)  # as the connector opens it (private, WAL, the table)
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            test_row = ("0000-00-00", "trio-bridge-check", "check", 1, 0, 0, 0, 0, 0)
            db.execute(_UPSERT, test_row)
            db.execute("DELETE FROM usage WHERE day = ? AND key_id = ?", test_row[:2])
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    finally:
        db.close()
    return "writable (a test write committed)"


def read_rows(path: Path, *, since_day: str = "") -> list[dict[str, Any]]:
    """Rows of a usage file for the CLI (read-only; a missing file has none)."""
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        have = _columns(db)  # a file of an older release, not opened by a connector since
        columns = ", ".join(c if c in have else f"0 AS {c}" for c in COLUMNS)
        cur = db.execute(
            "SELECT day, key_id, model, " + columns + " FROM usage WHERE day >= ? "
            "ORDER BY day DESC, key_id, model",
            (since_day,),
        )
        return [dict(zip(("day", "key_id", "model", *COLUMNS), r, strict=True)) for r in cur]
    finally:
        db.close()
