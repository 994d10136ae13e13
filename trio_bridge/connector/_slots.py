"""The connector's LLM slots: at most ``max_concurrent`` requests at the LLM, the others waiting
in a bounded :class:`~trio_bridge.accounts._limits.FairQueue` (weighted round-robin over API keys).

Cancellation: a waiter that is cancelled (client gone, deadline) leaves the queue; a slot handed
to a waiter that was cancelled at the same moment is passed on, never lost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from trio_bridge._errors import QueueFull
from trio_bridge.accounts._limits import FairQueue


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.granted = False


class FairSlots:
    def __init__(
        self,
        slots: int,
        max_queue: int,
        *,
        on_wait: Callable[[str, float], None] | None = None,
    ) -> None:
        self.slots = slots
        self.busy = 0
        self.queue: FairQueue[_Waiter] = FairQueue(max_queue)
        self._on_wait = on_wait

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def _free(self) -> bool:
        """A slot is free and nobody waits for one (waiters come first)."""
        return self.busy < self.slots and not len(self.queue)

    def try_acquire(self) -> bool:
        """Take a free LLM slot now (True), or none (False: every slot is busy, or others
        wait for one and come first). Pair a True with :meth:`release`."""
        if self._free:
            self.busy += 1
            return True
        return False

    async def acquire(self, key: str, weight: int = 1) -> None:
        """Take one LLM slot, waiting in the fair queue while none is free. A free slot is
        taken without a schedule point (the request's task is about to write to the LLM,
        which has one), but a cancelled caller gets Cancelled either way. Raises QueueFull at
        once when the queue is full. Pair with :meth:`release`."""
        if self._free:
            await trio.lowlevel.checkpoint_if_cancelled()
            self.busy += 1
            return
        if self.queue.full:
            raise QueueFull
        t0 = trio.current_time()
        waiter = _Waiter()
        self.queue.push(key, waiter, weight)
        try:
            await waiter.event.wait()
        except BaseException:
            if not self.queue.remove(key, waiter) and waiter.granted:
                self.release()  # granted as we were cancelled: pass it on
            raise
        if self._on_wait is not None:
            self._on_wait(key, trio.current_time() - t0)

    def release(self) -> None:
        """Give a slot back: to the next waiter in fair order, or free."""
        self._release()

    @asynccontextmanager
    async def slot(self, key: str, weight: int = 1) -> AsyncIterator[None]:
        """:meth:`acquire` … :meth:`release` around the block."""
        await self.acquire(key, weight)
        try:
            yield
        finally:
            self.release()

    def _release(self) -> None:
        waiter = self.queue.pop()
        if waiter is None:
            self.busy -= 1
        else:  # the slot goes straight to the next waiter: busy stays the same
            waiter.granted = True
            waiter.event.set()
