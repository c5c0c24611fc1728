"""The loop of every watch RPC (config's WatchPlcs, production's WatchOrders, ingest's WatchTagEvents).

A watch reads a page of what changed after its cursor, sends it, and reads again at once while there may be
more; once it has caught up it waits on the service's `Listener` for a notification (or its poll timeout)
and reads again. The listener's token is taken *before* each read, so a change committed while the page is
read or sent wakes the wait at once instead of being left for the poll.

What a page is, where the cursor stands after it and when a resume is refused are each watch's own: its
`read(cursor)` says them in a `Page`. The cursor is whatever value the watch needs (a revision, an event
cursor, ``None`` for "send a snapshot first"); the loop only hands back what the last page returned.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .notify import Listener

M = TypeVar("M")
C = TypeVar("C")


@dataclass(frozen=True)
class Page(Generic[M, C]):
    """What one read of a watch gives: the messages to send, the cursor to read after next time, and whether
    to read again at once (`more`: the page may not hold everything yet) rather than wait for a change."""

    messages: Sequence[M]
    cursor: C
    more: bool = False


async def watch(listener: Listener, read: Callable[[C], Awaitable[Page[M, C]]], cursor: C, *,
                poll_interval: float | None = None) -> AsyncIterator[M]:
    """Yield the messages of ``read(cursor)``, ``read(page.cursor)``, ... for ever.

    After a page with `more` unset it waits on `listener` first, for a notification or `poll_interval`
    seconds (default: the listener's own). An exception from `read` ends the watch with it.
    """
    while True:
        token = listener.token()  # before reading, so no notification slips between the read and the wait
        page = await read(cursor)
        for message in page.messages:
            yield message
        cursor = page.cursor
        if not page.more:
            await listener.wait(token, poll_interval)
