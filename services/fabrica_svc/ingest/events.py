"""Ingest's LISTEN on ``fabrica_ingest_events``, fanned out to every WatchTagEvents watcher.

Any replica's write transaction notifies the channel at commit. The hub is the runtime's
:class:`~fabrica_svc.runtime.notify.Listener` (half-open detection, reconnect with the retry policy, a
wake-up of every watcher after each reconnect) with ingest's defaults: watchers also wake every
``poll_interval`` seconds whatever happens, the connection is checked as often, and `on_lost` is called when
it drops (the app ends idle streams with it). A watcher takes `current()` before it queries, then waits on it.
"""

from __future__ import annotations

from collections.abc import Callable

from ..runtime.notify import Listener
from .store import EVENTS_CHANNEL


class EventHub(Listener):
    def __init__(self, dsn: str, *, poll_interval: float = 2.0, channel: str = EVENTS_CHANNEL,
                 on_lost: Callable[[str], None] | None = None):
        super().__init__(dsn, channel, poll_interval=poll_interval, check_interval=poll_interval, on_lost=on_lost,
                         application_name="fabrica-ingest-listen")

    #: The name ingest's servicer uses for :meth:`Listener.token`.
    current = Listener.token
