"""Proto ⇄ domain for notification targets, deliveries and forwarding targets (protos/fabrica/alarm/v1/
notify.proto), for the alarm service's servicer. Secrets are input only: never put in a message."""

from __future__ import annotations

from fabrica.alarm.v1 import notify_pb2

from ...runtime.pages import etag_of
from ...runtime.timefmt import timestamp_from_datetime
from .domain import FORWARD_HTTP, FORWARD_INGEST, Delivery, ForwardingTarget, NotificationTarget


def notification_target_from_proto(m: notify_pb2.NotificationTarget) -> NotificationTarget:
    """A new target from a (protovalidate-checked) message; output-only fields are ignored."""
    return NotificationTarget(id=m.id, url=m.url, secret=m.secret, display_name=m.display_name, enabled=m.enabled)


def notification_target_to_proto(t: NotificationTarget) -> notify_pb2.NotificationTarget:
    m = notify_pb2.NotificationTarget(
        id=t.id, display_name=t.display_name, url=t.url, enabled=t.enabled, etag=etag_of(t.revision),
        pending_deliveries=t.pending_deliveries, failed_deliveries=t.failed_deliveries, last_error=t.last_error,
    )
    for name, value in (("last_delivery_time", t.last_delivered_time), ("create_time", t.create_time),
                        ("update_time", t.update_time)):
        if value is not None:
            getattr(m, name).CopyFrom(timestamp_from_datetime(value))
    return m


def delivery_to_proto(d: Delivery) -> notify_pb2.Delivery:
    m = notify_pb2.Delivery(
        id=d.id, target_id=d.target_id, idempotency_key=d.idempotency_key, event_type=d.event_type,
        state=d.state, attempts=d.attempts, last_error=d.last_error, last_http_status=d.last_http_status,
        body=d.body,
    )
    for name, value in (("create_time", d.create_time), ("last_attempt_time", d.last_attempt_time),
                        ("delivered_time", d.delivered_time)):
        if value is not None:
            getattr(m, name).CopyFrom(timestamp_from_datetime(value))
    if d.state == notify_pb2.DELIVERY_STATE_PENDING and d.next_attempt_time is not None:
        m.next_attempt_time.CopyFrom(timestamp_from_datetime(d.next_attempt_time))
    return m


def forwarding_target_from_proto(m: notify_pb2.ForwardingTarget) -> ForwardingTarget:
    """A new forwarding target from a (protovalidate-checked) message; output-only fields are ignored."""
    kind = m.WhichOneof("destination")
    return ForwardingTarget(
        id=m.id, plc_ids=tuple(m.plc_ids), display_name=m.display_name, enabled=m.enabled,
        start_at_end=m.start_at_end,
        kind=FORWARD_HTTP if kind == "http" else FORWARD_INGEST if kind == "ingest" else 0,
        url=m.http.url, secret=m.http.secret, ingest_address=m.ingest.address, collector_id=m.ingest.collector_id,
    )


def forwarding_target_to_proto(t: ForwardingTarget) -> notify_pb2.ForwardingTarget:
    m = notify_pb2.ForwardingTarget(
        id=t.id, display_name=t.display_name, plc_ids=list(t.plc_ids), enabled=t.enabled,
        start_at_end=t.start_at_end, etag=etag_of(t.revision), cursor=t.cursor,
        forwarded_batches=t.forwarded_batches, forwarded_readings=t.forwarded_readings, last_error=t.last_error,
    )
    if t.kind == FORWARD_HTTP:
        m.http.url = t.url
    else:
        m.ingest.address, m.ingest.collector_id = t.ingest_address, t.collector_id
    for name, value in (("last_forward_time", t.last_forward_time), ("last_commit_time", t.last_commit_time),
                        ("create_time", t.create_time), ("update_time", t.update_time)):
        if value is not None:
            getattr(m, name).CopyFrom(timestamp_from_datetime(value))
    return m
