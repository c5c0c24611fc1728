"""Webhook delivery against a real HTTP receiver on loopback: signed bodies, retries with backoff, a dead
target that never delays a live one, at least once with a stable idempotency key across a restart."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

import pytest

from fabrica_svc.alarm.notify import enqueue_notification
from fabrica_svc.alarm.notify import store
from fabrica_svc.alarm.notify.domain import (
    DELIVERY_DELIVERED,
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    NotificationTarget,
    verify_signature,
)
from fabrica_svc.alarm.notify.webhook import WebhookDispatcher
from fabrica_svc.runtime.errors import AlreadyExists, InvalidArgument
from fabrica_svc.runtime.retry import RetryPolicy
from procs import wait_for

SECRET = "s3cret-s3cret-s3cret"
#: Retries in tens of milliseconds, so the tests do not wait minutes.
FAST = RetryPolicy(initial=0.05, maximum=0.2)


def target(target_id: str, url: str, secret: str = SECRET, **kw: object) -> NotificationTarget:
    return NotificationTarget(id=target_id, url=url, secret=secret, **kw)  # type: ignore[arg-type]


async def enqueue(pool, key: str, event: dict | None = None, event_type: str = "alarm.raised") -> int:  # noqa: ANN001
    async with pool.acquire() as conn, conn.transaction():
        return await enqueue_notification(conn, idempotency_key=key, event_type=event_type,
                                          event=event if event is not None else {"alarm": key})


@pytest.fixture
async def dispatcher_factory(alarm_pool, database_url):  # noqa: ANN001, ANN201
    started: list[WebhookDispatcher] = []

    async def start(**kw: object) -> WebhookDispatcher:
        kw = {"retry": FAST, "poll_interval": 0.2, "standby_interval": 0.1, "request_timeout": 30.0, **kw}
        d = WebhookDispatcher(alarm_pool, database_url, **kw)  # type: ignore[arg-type]
        await d.start()
        started.append(d)
        return d

    yield start
    for d in started:
        await d.stop()


async def test_a_delivery_is_signed_over_its_timestamp_and_body_and_names_its_event(alarm_pool, receiver,
                                                                                    dispatcher_factory) -> None:
    await store.create_notification_target(alarm_pool, target("ops", receiver.url("/ops")))
    event = {"rule": "phase-voltage", "state": "ACTIVE_UNACKNOWLEDGED", "value": 253.1, "unit": "V"}
    assert await enqueue(alarm_pool, "alarm-event-1", event) == 1
    await dispatcher_factory()
    await wait_for(lambda: len(receiver.at("/ops")) == 1, timeout=15, what="the delivery")
    request = receiver.at("/ops")[0]
    ts = request.headers["Fabrica-Timestamp"]
    expected = "v1=" + hmac.new(SECRET.encode(), ts.encode() + b"." + request.body, hashlib.sha256).hexdigest()
    assert request.headers["Fabrica-Signature"] == expected
    assert abs(int(ts) - time.time()) < 300
    assert verify_signature(SECRET, ts, request.headers["Fabrica-Signature"], request.body, now=time.time())
    assert not verify_signature("another-secret-entirely", ts, expected, request.body, now=time.time())
    assert not verify_signature(SECRET, ts, expected, request.body + b" ", now=time.time())
    assert not verify_signature(SECRET, ts, expected, request.body, now=time.time() + 3600)  # a replay, later
    assert request.headers["Idempotency-Key"] == "alarm-event-1"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Fabrica-Event-Type"] == "alarm.raised"
    body = json.loads(request.body)
    assert body == {"idempotency_key": "alarm-event-1", "event_type": "alarm.raised", "event": event}
    await wait_for(lambda: _all_delivered(alarm_pool, "ops", 1), timeout=10, what="delivered")
    [d] = await store.list_deliveries(alarm_pool, target_id="ops")
    assert (d.attempts, d.last_http_status, d.delivered_time is not None, d.body) == (1, 200, True, request.body)


async def _state(pool, target_id: str) -> list[int]:  # noqa: ANN001
    return [d.state for d in await store.list_deliveries(pool, target_id=target_id)]


async def test_a_target_answering_500_is_retried_with_the_same_key_and_body_until_it_takes_it(
        alarm_pool, receiver, dispatcher_factory) -> None:
    await store.create_notification_target(alarm_pool, target("flaky", receiver.url("/flaky")))
    receiver.script["/flaky"] = [500, 503, 500]
    await enqueue(alarm_pool, "alarm-event-7")
    await dispatcher_factory()
    await wait_for(lambda: _all_delivered(alarm_pool, "flaky", 1), timeout=15, what="delivered")
    got = receiver.at("/flaky")
    assert len(got) == 4
    assert {r.headers["Idempotency-Key"] for r in got} == {"alarm-event-7"}
    assert len({r.body for r in got}) == 1
    assert [r.headers["Fabrica-Delivery-Attempt"] for r in got] == ["1", "2", "3", "4"]
    [d] = await store.list_deliveries(alarm_pool, target_id="flaky")
    assert (d.attempts, d.last_http_status) == (4, 200)
    assert d.last_error.startswith("HTTP 500")  # the last error met stays visible
    t = await store.get_notification_target(alarm_pool, "flaky")
    assert (t.pending_deliveries, t.failed_deliveries, t.last_delivered_time == d.delivered_time) == (0, 0, True)


async def test_a_dead_target_never_delays_a_live_one(alarm_pool, receiver, dispatcher_factory) -> None:
    """The dead target accepts the connection and never answers; the live one gets every notification
    while the dead one's first request is still hanging."""
    receiver.hanging.add("/dead")
    await store.create_notification_target(alarm_pool, target("dead", receiver.url("/dead")))
    await store.create_notification_target(alarm_pool, target("live", receiver.url("/live")))
    await dispatcher_factory()
    for n in range(5):
        await enqueue(alarm_pool, f"alarm-event-{n}")
    await wait_for(lambda: len(receiver.at("/live")) == 5, timeout=15, what="the live target's five")
    assert receiver.held.get("/dead") == 1 and len(receiver.at("/dead")) == 1
    assert [r.headers["Idempotency-Key"] for r in receiver.at("/live")] == [f"alarm-event-{n}" for n in range(5)]
    # also a refused connection (nothing listens) backs off on its own and leaves the live target alone
    await store.create_notification_target(alarm_pool, target("gone", "http://127.0.0.1:9/nothing-here"))
    await enqueue(alarm_pool, "alarm-event-5")
    await wait_for(lambda: len(receiver.at("/live")) == 6, timeout=15, what="the live target's sixth")
    await wait_for(lambda: _attempts(alarm_pool, "gone", 2), timeout=15, what="the gone target retried")
    [gone] = await store.list_deliveries(alarm_pool, target_id="gone")
    assert gone.state == DELIVERY_PENDING and gone.last_error.startswith("ConnectError")
    receiver.release()
    await wait_for(lambda: _all_delivered(alarm_pool, "dead", 6), timeout=20, what="the dead target catching up")


async def _attempts(pool, target_id: str, n: int) -> bool:  # noqa: ANN001
    return all(d.attempts >= n for d in await store.list_deliveries(pool, target_id=target_id))


async def _all_delivered(pool, target_id: str, n: int) -> bool:  # noqa: ANN001
    states = await _state(pool, target_id)
    return len(states) == n and set(states) == {DELIVERY_DELIVERED}


async def test_a_delivery_cut_by_a_restart_is_sent_again_with_the_same_idempotency_key(
        alarm_pool, receiver, dispatcher_factory) -> None:
    """The receiver got the request but the dispatcher stopped before recording any answer (a crash):
    the next dispatcher sends it again, same key, same body: at least once, and the receiver can drop it."""
    receiver.hanging.add("/slow")
    await store.create_notification_target(alarm_pool, target("slow", receiver.url("/slow")))
    await enqueue(alarm_pool, "alarm-event-42")
    first = await dispatcher_factory()
    await wait_for(lambda: receiver.held.get("/slow") == 1, timeout=15, what="the first attempt held")
    await first.stop()
    receiver.hanging.clear()
    await dispatcher_factory()
    await wait_for(lambda: _all_delivered(alarm_pool, "slow", 1), timeout=15, what="delivered after the restart")
    got = receiver.at("/slow")
    assert len(got) == 2
    assert got[0].headers["Idempotency-Key"] == got[1].headers["Idempotency-Key"] == "alarm-event-42"
    assert got[0].body == got[1].body
    [d] = await store.list_deliveries(alarm_pool, target_id="slow")
    assert d.attempts == 1  # the cut attempt never got an answer to record


async def test_a_delivery_is_given_up_after_its_last_attempt_and_the_next_one_goes(
        alarm_pool, receiver, dispatcher_factory) -> None:
    await store.create_notification_target(alarm_pool, target("strict", receiver.url("/strict")))
    receiver.script["/strict"] = [400, 400, 400]
    await enqueue(alarm_pool, "alarm-event-1")
    await enqueue(alarm_pool, "alarm-event-2")
    await dispatcher_factory(max_attempts=3)
    await wait_for(lambda: _all_settled(alarm_pool, "strict"), timeout=15, what="both settled")
    second, first = await store.list_deliveries(alarm_pool, target_id="strict")  # newest first
    assert (first.state, first.attempts, first.last_http_status) == (DELIVERY_FAILED, 3, 400)
    assert (second.state, second.attempts) == (DELIVERY_DELIVERED, 1)
    failed = await store.list_deliveries(alarm_pool, target_id="strict", state=DELIVERY_FAILED)
    assert [d.idempotency_key for d in failed] == ["alarm-event-1"]
    assert (await store.get_notification_target(alarm_pool, "strict")).failed_deliveries == 1


async def _all_settled(pool, target_id: str) -> bool:  # noqa: ANN001
    states = await _state(pool, target_id)
    return len(states) == 2 and DELIVERY_PENDING not in states


async def test_the_outbox_takes_an_event_once_per_target_only_when_its_transaction_commits(
        alarm_pool, receiver, dispatcher_factory) -> None:
    await store.create_notification_target(alarm_pool, target("a", receiver.url("/a")))
    await store.create_notification_target(alarm_pool, target("b", receiver.url("/b"), enabled=False))
    assert await enqueue(alarm_pool, "alarm-event-1") == 1  # the disabled target gets nothing
    assert await enqueue(alarm_pool, "alarm-event-1") == 0  # a replayed transition adds nothing
    async with alarm_pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        assert await enqueue_notification(conn, idempotency_key="alarm-event-2", event_type="alarm.raised",
                                          event={"x": 1}) == 1
        await tx.rollback()  # the alarm event did not commit: nor does its notification
    await dispatcher_factory()
    await wait_for(lambda: _all_delivered(alarm_pool, "a", 1), timeout=15, what="delivered")
    assert [r.headers["Idempotency-Key"] for r in receiver.at("/a")] == ["alarm-event-1"]
    # enabling a target later does not send it what was queued before it was enabled
    await store.update_notification_target(alarm_pool, "b", enabled=True)
    await enqueue(alarm_pool, "alarm-event-3")
    await wait_for(lambda: len(receiver.at("/b")) == 1 and len(receiver.at("/a")) == 2, timeout=15, what="both")
    assert receiver.at("/b")[0].headers["Idempotency-Key"] == "alarm-event-3"


async def test_one_replica_dispatches_the_other_stands_by(alarm_pool, receiver, dispatcher_factory) -> None:
    await store.create_notification_target(alarm_pool, target("ops", receiver.url("/ops")))
    a = await dispatcher_factory()
    await asyncio.wait_for(a.active.wait(), 10)
    b = await dispatcher_factory()
    await asyncio.sleep(0.5)
    assert not b.active.is_set()
    await a.stop()
    await asyncio.wait_for(b.active.wait(), 10)
    await enqueue(alarm_pool, "alarm-event-1")
    await wait_for(lambda: len(receiver.at("/ops")) == 1, timeout=15, what="delivered by the stand-by")


async def test_targets_are_checked_and_versioned(alarm_pool) -> None:
    with pytest.raises(InvalidArgument) as err:
        await store.create_notification_target(alarm_pool, target("Bad Id", "ftp://x", secret="short"))
    assert {v.field for v in err.value.violations} == {"id", "url", "secret"}
    created = await store.create_notification_target(alarm_pool, target("ops", "https://hooks.example/x"))
    assert created.revision == 1 and created.enabled
    with pytest.raises(AlreadyExists):
        await store.create_notification_target(alarm_pool, target("ops", "https://hooks.example/y"))
    updated = await store.update_notification_target(alarm_pool, "ops", url="https://hooks.example/z",
                                                     expected_revision=1)
    assert (updated.url, updated.revision, updated.secret) == ("https://hooks.example/z", 2, SECRET)
    from fabrica_svc.runtime.errors import Aborted
    with pytest.raises(Aborted):
        await store.update_notification_target(alarm_pool, "ops", enabled=False, expected_revision=1)
    with pytest.raises(InvalidArgument):
        await enqueue(alarm_pool, "has spaces")
