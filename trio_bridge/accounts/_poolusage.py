"""A pool's usage as read from its store: rows from the day hashes (:func:`read_usage`, for
the CLI), and :class:`UsageSummary`, the recent days a connector keeps in memory for its pages
and ``/_bridge/usage``."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import trio

from trio_bridge.accounts._poolscripts import PREFIX, usage_key
from trio_bridge.accounts._usagestore import COLUMNS, utc_day

#: the usage summary (admin page, /_bridge/usage) is re-read this often
SUMMARY_INTERVAL = 2.0
SUMMARY_DAYS = 31
#: the summary's older days (before yesterday: they change only by late writes and imports)
#: are re-read this often; each refresh reads today and yesterday
SUMMARY_FULL_INTERVAL = 60.0


def rows_from(days: list[tuple[str, dict[bytes, bytes]]]) -> list[dict[str, Any]]:
    """Usage rows from the store's day hashes, newest day first."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for day, fields in days:
        for field, value in fields.items():
            key_id, model, column = field.decode(errors="replace").split("\t", 2)
            row = rows.get((day, key_id, model))
            if row is None:
                row = {"day": day, "key_id": key_id, "model": model}
                row.update(dict.fromkeys(COLUMNS, 0))
                rows[(day, key_id, model)] = row
            if column in row:
                row[column] += int(value)
    return sorted(rows.values(), key=lambda r: (r["day"], r["key_id"], r["model"]), reverse=True)


async def read_usage(client: Any, since_day: str = "") -> list[dict[str, Any]]:
    """The pool's usage rows since ``since_day``, newest day first."""
    found = [k async for k in client.scan_iter(match=PREFIX + "usage:*")]
    days = sorted(
        d for k in found if (d := k.decode().removeprefix(PREFIX + "usage:")) >= since_day
    )
    return rows_from([(d, await client.hgetall(usage_key(d))) for d in days])


class UsageSummary:
    """The pool's usage of the last SUMMARY_DAYS days, as the store held it when last read
    (:meth:`read`: due every SUMMARY_INTERVAL), newest day first."""

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self._days: dict[str, list[dict[str, Any]]] = {}
        self.read_at = -1e9
        self.full_at = -1e9

    @property
    def due(self) -> bool:
        return trio.current_time() - self.read_at >= SUMMARY_INTERVAL

    @property
    def loaded(self) -> bool:
        """Read from the store at least once."""
        return self.read_at > -1e9

    async def read(self, client: Any) -> None:
        """Today and yesterday (the whole month every SUMMARY_FULL_INTERVAL: reading it is
        ~13 µs of the event loop per row)."""
        now = time.time()  # wall clock
        month = [utc_day(now - i * 86400) for i in range(SUMMARY_DAYS)]
        full = trio.current_time() - self.full_at >= SUMMARY_FULL_INTERVAL
        days = month if full else month[:2]
        async with client.pipeline(transaction=False) as p:
            answers = [p.hgetall(usage_key(day)) for day in days]
        for day, answer in zip(days, answers, strict=True):
            self._days[day] = rows_from([(day, await answer)])
        self._days = {d: self._days[d] for d in month if d in self._days}
        self._rows = [row for d in month for row in self._days.get(d, ())]
        self.read_at = trio.current_time()
        if full:
            self.full_at = self.read_at

    def rows(
        self, *, since_day: str = "", key_ids: list[str] | None = None
    ) -> list[dict[str, Any]]:
        wanted = None if key_ids is None else set(key_ids)
        return [
            r
            for r in self._rows
            if r["day"] >= since_day and (wanted is None or r["key_id"] in wanted)
        ]

    def tokens_on(self, day: str) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for r in self._rows:
            if r["day"] == day:
                totals[r["key_id"]] += r["prompt_tokens"] + r["completion_tokens"]
        return dict(totals)
