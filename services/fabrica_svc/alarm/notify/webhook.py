"""The webhook dispatcher: the notification outbox delivered at least once, per target, with backoff.

Of all alarm replicas, one dispatches at a time: the one holding a session advisory lock on a dedicated
connection (as production's tag-event consumer); the others stand by. Two dispatchers at once would only
mean duplicates, which the idempotency key lets receivers drop, but one is what the backoff assumes.

Each target with pending deliveries has its own worker task, which sends that target's deliveries one at a
time in the order they were queued. A target that fails (refused, timed out, not 2xx) is retried by its own
worker, waiting as the retry policy says (``WEBHOOK_RETRY``: 1 s doubling to 5 min, jittered); the other
targets' workers never wait for it: a dead target never blocks others. After ``max_attempts`` a delivery is
given up (state FAILED, visible in ListDeliveries) and the target's next one is tried. Each attempt is
recorded (attempts, last error and HTTP status, next attempt time; delivered time on success), so a restart
resumes each delivery where it stood; a crash between a receiver's 2xx and that record sends the delivery
again, with the same Idempotency-Key (at least once). The body is the one stored at enqueue, byte for byte;
the signature is computed per attempt over its timestamp and that body (domain.sign).

Tenants: the dispatcher serves every tenant's targets. It finds the targets with pending deliveries across
tenants (``tenancy.system()``); each target's worker runs in its target's tenant (``tenancy.scope``), so it
reads and records only that tenant's deliveries (target ids are unique per tenant only).

Wake-ups: enqueue_notification NOTIFYs ``OUTBOX_CHANNEL`` in the caller's transaction, so the dispatcher
looks at the outbox when the alarm event commits; it also looks every ``poll_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Callable

import asyncpg
import httpx
from opentelemetry import metrics

from ...runtime import tenancy
from ...runtime.notify import Listener
from ...runtime.retry import RetryPolicy
from ...runtime.tasks import cancel_and_wait
from . import store
from .domain import ATTEMPT_HEADER, EVENT_TYPE_HEADER, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from .schema import OUTBOX_CHANNEL

log = logging.getLogger(__name__)

#: How a failing target is retried: 1 s, 2 s, 4 s ... up to 5 minutes between attempts.
WEBHOOK_RETRY = RetryPolicy(initial=1.0, maximum=300.0)
#: Attempts before a delivery is given up: with WEBHOOK_RETRY, about an hour of trying.
MAX_ATTEMPTS = 20
DISPATCH_LOCK_KEY = zlib.crc32(b"fabrica.alarm.webhook-dispatcher") - 2**31


class WebhookDispatcher:
    """Delivers the outbox (see the module docstring). `pool` is the alarm service's pool (schema alarm),
    `dsn` its database (for the lock's and the LISTEN connection)."""

    def __init__(self, pool: asyncpg.Pool, dsn: str, *, retry: RetryPolicy = WEBHOOK_RETRY,
                 max_attempts: int = MAX_ATTEMPTS, request_timeout: float = 10.0, poll_interval: float = 5.0,
                 standby_interval: float = 2.0, lock_retry: RetryPolicy = RetryPolicy(initial=0.5, maximum=5.0),
                 clock: Callable[[], float] = time.time):
        self.pool = pool
        self.dsn = dsn
        self.retry = retry
        self.max_attempts = max_attempts
        self.request_timeout = request_timeout
        self.poll_interval = poll_interval
        self.standby_interval = standby_interval
        self.lock_retry = lock_retry
        self.clock = clock
        #: Set while this replica holds the lock and dispatches.
        self.active = asyncio.Event()
        self.listener = Listener(dsn, OUTBOX_CHANNEL, poll_interval=poll_interval, check_interval=poll_interval,
                                 application_name="fabrica-alarm-outbox-listen")
        #: The worker of each (tenant, target id).
        self._workers: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        meter = metrics.get_meter("fabrica.alarm")
        self._m_attempts = meter.create_counter(
            "fabrica_alarm_webhook_attempts", description="Webhook delivery attempts, by outcome (delivered, failed, gave_up)")

    async def start(self) -> None:
        await self.listener.start()
        self._task = asyncio.create_task(self._run(), name="alarm-webhook-dispatcher")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self.listener.stop()

    async def _run(self) -> None:
        backoff = self.lock_retry.backoff()
        standing_by = False
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=10,
                                             server_settings={"application_name": "fabrica-alarm-dispatcher"})
                if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", DISPATCH_LOCK_KEY):
                    if not standing_by:
                        log.info("another replica dispatches webhooks; standing by")
                        standing_by = True
                    await conn.close()
                    conn = None
                    await asyncio.sleep(self.standby_interval)
                    continue
                standing_by = False
                self.active.set()
                backoff.reset()
                async with httpx.AsyncClient(timeout=self.request_timeout, follow_redirects=False) as client:
                    self._client = client
                    await self._dispatch(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database went away (or a bug): drop everything, start over
                log.warning("webhook dispatcher stopped: %s; restarting", f"{type(exc).__name__}: {exc}")
            finally:
                self.active.clear()
                self._client = None
                for task in self._workers.values():
                    task.cancel()
                for task in list(self._workers.values()):
                    with contextlib.suppress(BaseException):
                        await task
                self._workers.clear()
                if conn is not None:
                    conn.terminate()  # releases the lock with the session
            await backoff.wait()

    async def _dispatch(self, conn: asyncpg.Connection) -> None:
        """While the lock's connection lives: a worker per target with pending deliveries."""
        while not conn.is_closed():
            token = self.listener.token()
            with tenancy.system():  # every tenant's targets
                pending = await store.targets_with_pending(self.pool)
            for key in pending:
                task = self._workers.get(key)
                if task is None or task.done():
                    tenant, target_id = key
                    with tenancy.scope(tenant):  # the worker (a task: it copies the context) is the target's tenant's
                        self._workers[key] = asyncio.create_task(self._target_worker(target_id),
                                                                 name=f"webhook-{tenant}-{target_id}")
            for key, task in list(self._workers.items()):
                if task.done():
                    del self._workers[key]
                    if not task.cancelled() and task.exception() is not None:
                        log.warning("webhook worker of %s (tenant %s) failed: %s", key[1], key[0], task.exception())
            await self.listener.wait(token, self.poll_interval)
            await asyncio.wait_for(conn.execute("SELECT 1"), 10)  # the lock's session is still ours

    async def _target_worker(self, target_id: str) -> None:
        """Send the target's pending deliveries in order until none is left (in the target's tenant: the task's)."""
        while True:
            found = await store.next_delivery(self.pool, target_id)
            if found is None:
                return
            delivery, url, secret, due_in = found
            if due_in > 0:  # a retry scheduled before (by this run or the last)
                await asyncio.sleep(min(due_in, self.poll_interval))
                continue  # the target may have changed meanwhile: read again
            attempt = delivery.attempts + 1
            error, status = await self._send(url, secret, delivery.body, delivery.idempotency_key,
                                             delivery.event_type, attempt)
            delivered = error == ""
            give_up = not delivered and attempt >= self.max_attempts
            backoff = self.retry.backoff()
            backoff.failures = delivery.attempts
            retry_in = 0.0 if delivered or give_up else backoff.next_delay()
            await store.record_attempt(self.pool, delivery.id, delivered=delivered, give_up=give_up, error=error,
                                       http_status=status, retry_in=retry_in)
            outcome = "delivered" if delivered else "gave_up" if give_up else "failed"
            self._m_attempts.add(1, {"outcome": outcome})
            if give_up:
                log.error("webhook delivery %d to %s given up after %d attempts: %s", delivery.id, target_id,
                          attempt, error, extra={"target_id": target_id, "idempotency_key": delivery.idempotency_key})
            elif not delivered:
                log.warning("webhook delivery %d to %s failed (attempt %d, next in %.1f s): %s", delivery.id,
                            target_id, attempt, retry_in, error, extra={"target_id": target_id})

    async def _send(self, url: str, secret: str, body: bytes, key: str, event_type: str,
                    attempt: int) -> tuple[str, int]:
        """POST one attempt; ("", status) on a 2xx, else (the error, status or 0)."""
        assert self._client is not None
        timestamp = int(self.clock())
        headers = {
            "Content-Type": "application/json",
            IDEMPOTENCY_HEADER: key,
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(secret, timestamp, body),
            EVENT_TYPE_HEADER: event_type,
            ATTEMPT_HEADER: str(attempt),
            "User-Agent": "fabrica-alarm-webhook/1",
        }
        try:
            response = await self._client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, 0
        if 200 <= response.status_code < 300:
            return "", response.status_code
        return f"HTTP {response.status_code}: {response.text[:200]}", response.status_code
