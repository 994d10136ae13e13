"""What a connector of a pool has yet to write to its store: the ends of requests (their places
in flight given back, their tokens) and the usage, kept in memory and taken as numbered
batches, one call of :data:`~trio_bridge.accounts._poolscripts.WRITE` each. No I/O here:
:class:`~trio_bridge.accounts._pool.PoolStore` writes the batches."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import attrs

from trio_bridge.accounts._usagestore import COLUMNS, count_request, zeros

#: usage rows (day x key x model) kept in memory while the store is unreachable
MAX_PENDING_ROWS = 100_000


@attrs.define
class Batch:
    """What ended and the usage, as one call of :data:`WRITE` (sent again as it is until the
    store answers: it applies a batch once)."""

    number: int
    payload: bytes
    ends: int
    tokens: int
    rows: int
    #: keys whose count in flight it sets
    keys: int = 0


class Backlog:
    """What ended and was not written yet, and the batch sent whose answer never came."""

    def __init__(self) -> None:
        #: requests the store had admitted, per key id (the key's in-flight count is set
        #: again); tokens per (key id, UTC day); usage rows per (day, key id, model)
        self.ended: dict[str, int] = defaultdict(int)
        self.tokens: dict[tuple[str, str], int] = defaultdict(int)
        self.usage: dict[tuple[str, str, str], list[int]] = defaultdict(zeros)
        #: a batch sent whose answer never came (the store may have applied it): sent again
        #: as it is before anything else (at most one; what ends meanwhile waits above)
        self.unsent: Batch | None = None
        self.batches = 0
        #: usage rows not kept: MAX_PENDING_ROWS waited already
        self.rows_dropped = 0

    @property
    def empty(self) -> bool:
        return not (self.unsent or self.ended or self.tokens or self.usage)

    def count(
        self,
        key: tuple[str, str, str],
        *,
        prompt: int,
        completion: int,
        estimated: bool,
        error: bool,
        refused: bool,
    ) -> bool:
        """One finished request in the usage row ``key`` (day, key id, model); False: not
        counted (MAX_PENDING_ROWS other rows wait)."""
        if key not in self.usage and len(self.usage) >= MAX_PENDING_ROWS:
            self.rows_dropped += 1
            return False
        count_request(
            self.usage[key],
            prompt=prompt,
            completion=completion,
            estimated=estimated,
            error=error,
            refused=refused,
        )
        return True

    def take(self, flight: Callable[[str], list[Any]]) -> Batch:
        """What waits (ends, tokens, usage), taken as the next batch; ``flight(key_id)``: the
        entry that sets the key's count in flight (key id, count, sequence number)."""
        ended, tokens, usage = self.ended, self.tokens, self.usage
        self.ended, self.tokens = defaultdict(int), defaultdict(int)
        self.usage = defaultdict(zeros)
        per_key: dict[str, int] = defaultdict(int)
        for (k, _day), n in tokens.items():
            per_key[k] += n
        entries = [flight(k) for k in {*ended, *per_key}]
        self.batches += 1
        payload = {
            "flight": entries,
            "tokens": [[k, n] for k, n in per_key.items() if n],
            "usage": [
                [day, f"{key_id}\t{model}\t{column}", n]
                for (day, key_id, model), counts in usage.items()
                for column, n in zip(COLUMNS, counts, strict=True)
                if n
            ],
        }
        # an empty list must stay a JSON array for cjson: "[]", never "{}"
        blob = json.dumps(payload, separators=(",", ":")).encode()
        return Batch(self.batches, blob, sum(ended.values()), len(tokens), len(usage), len(entries))

    def waiting(self) -> tuple[int, int]:
        """(usage rows, token counts) not written yet, the unsent batch's included."""
        unsent = self.unsent or Batch(0, b"", 0, 0, 0)
        return len(self.usage) + unsent.rows, len(self.tokens) + unsent.tokens
