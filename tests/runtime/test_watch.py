"""The loop of every watch RPC (runtime/watch.py): pages with `more` are read back to back, each read gets the
cursor the page before it returned, a caught-up watch waits on the Listener and reads again when woken (a
NOTIFY, or a wake-up that came while it was still reading) or after its poll interval, and an error from a
read ends the watch with it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from fabrica_svc.runtime.notify import Listener
from fabrica_svc.runtime.watch import Page, watch
from procs import wait_for

CHANNEL = "fabrica_test_watch"
#: A poll interval no test waits out: whatever these watches read again sooner, a wake-up made them.
NEVER = 600.0


class Pages:
    """A `read(cursor)` that returns the given pages in turn and records each cursor it was called with.

    A page may be a callable, called at read time (to act while the read is in progress)."""

    def __init__(self, *pages: Page[str, int] | Callable[[], Page[str, int]]):
        self.pages = list(pages)
        self.cursors: list[int] = []

    async def __call__(self, cursor: int) -> Page[str, int]:
        self.cursors.append(cursor)
        page = self.pages.pop(0)
        return page() if callable(page) else page


@contextlib.asynccontextmanager
async def watching(listener: Listener, read: Any, cursor: int, **kwargs: Any) -> AsyncIterator[AsyncIterator[str]]:
    async with contextlib.aclosing(watch(listener, read, cursor, **kwargs)) as messages:
        yield messages


async def take(messages: AsyncIterator[str], n: int) -> list[str]:
    async with asyncio.timeout(10):
        return [await anext(messages) for _ in range(n)]


async def test_pages_with_more_are_read_back_to_back_then_the_watch_waits_for_a_wake_up() -> None:
    listener = Listener("postgresql://unused", CHANNEL, poll_interval=NEVER)
    read = Pages(Page(["a", "b"], 1, more=True), Page([], 2, more=True), Page(["c"], 3), Page(["d"], 4))
    async with watching(listener, read, 0) as messages:
        assert await take(messages, 3) == ["a", "b", "c"]
        assert read.cursors == [0, 1, 2] and listener.woken == 0
        next_message = asyncio.create_task(anext(messages))
        await wait_for(lambda: listener.waiting == 1, what="the caught-up watch waiting on the listener")
        assert read.cursors == [0, 1, 2]  # it waits, it does not read again
        listener.wake_all()  # what a NOTIFY does
        async with asyncio.timeout(10):
            assert await next_message == "d"
    assert read.cursors == [0, 1, 2, 3] and listener.woken == 1


async def test_a_wake_up_while_reading_is_not_lost() -> None:
    listener = Listener("postgresql://unused", CHANNEL, poll_interval=NEVER)

    def notified_during_the_read() -> Page[str, int]:
        listener.wake_all()  # a commit notified after the watch took its token, before it waits
        return Page([], 5)

    read = Pages(notified_during_the_read, Page(["e"], 6))
    async with watching(listener, read, 4) as messages:
        assert await take(messages, 1) == ["e"]
    assert read.cursors == [4, 5] and listener.woken == 1


@pytest.mark.parametrize("listener_poll, watch_poll", [(NEVER, 0.01), (0.01, None)])
async def test_a_caught_up_watch_reads_again_after_its_poll_interval(listener_poll: float,
                                                                   watch_poll: float | None) -> None:
    """The poll interval is the watch's own, or else the listener's."""
    listener = Listener("postgresql://unused", CHANNEL, poll_interval=listener_poll)
    read = Pages(Page(["a"], 1), Page([], 1), Page(["b"], 2))
    async with watching(listener, read, 0, poll_interval=watch_poll) as messages:
        assert await take(messages, 2) == ["a", "b"]
    assert read.cursors == [0, 1, 1] and listener.woken == 0  # only timeouts ended the waits


async def test_an_error_from_a_read_ends_the_watch() -> None:
    listener = Listener("postgresql://unused", CHANNEL, poll_interval=NEVER)

    def refused() -> Page[str, int]:
        raise LookupError("cursor 1 is gone")

    read = Pages(Page(["a"], 1, more=True), refused)
    async with watching(listener, read, 0) as messages:
        assert await take(messages, 1) == ["a"]
        with pytest.raises(LookupError, match="cursor 1 is gone"):
            await anext(messages)
        with pytest.raises(StopAsyncIteration):
            await anext(messages)


async def test_a_notify_wakes_a_watch_over_a_table(database_url: str) -> None:
    """End to end with a listening Listener: rows committed with a NOTIFY reach the watch, each exactly once,
    and nothing but the NOTIFY can have woken it (the poll interval is never waited out)."""
    # The watch reads on a connection of its own: the NOTIFY can wake it before the writer's COMMIT returns.
    conn, reader = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    listener = Listener(database_url, CHANNEL, poll_interval=NEVER)
    try:
        await conn.execute("CREATE TABLE items (id bigint PRIMARY KEY)")

        async def read(after: int) -> Page[int, int]:
            ids = [r["id"] for r in await reader.fetch("SELECT id FROM items WHERE id > $1 ORDER BY id LIMIT 2", after)]
            return Page(ids, ids[-1] if ids else after, more=len(ids) == 2)

        await listener.start()
        await wait_for(listener.connected.is_set, what="the listener connected")
        async with contextlib.aclosing(watch(listener, read, 0)) as ids:
            first = asyncio.create_task(anext(ids))
            await wait_for(lambda: listener.waiting == 1, what="the watch waiting on the listener")
            async with conn.transaction():
                await conn.execute("INSERT INTO items SELECT generate_series(1, 5)")
                await conn.execute(f"NOTIFY {CHANNEL}")
            async with asyncio.timeout(10):
                got = [await first] + [await anext(ids) for _ in range(4)]
            assert got == [1, 2, 3, 4, 5]
            later = asyncio.create_task(anext(ids))
            await wait_for(lambda: listener.waiting == 1, what="the watch caught up and waiting again")
            later.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await later
        assert listener.notifications == 1 and listener.woken == 1 and listener.connects == 1
    finally:
        await listener.stop()
        await reader.close()
        await conn.close()
