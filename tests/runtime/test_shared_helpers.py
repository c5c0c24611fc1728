"""The small shared helpers every service uses: the retry policy, page tokens and etags, time conversions."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fabrica_svc.runtime.errors import InvalidArgument
from fabrica_svc.runtime.pages import decode_int_page_token, decode_page_token, encode_page_token, etag_of
from fabrica_svc.runtime.retry import RetryPolicy
from fabrica_svc.runtime.timefmt import (optional_datetime, seconds_of, duration_from_seconds, timestamp_from_ns,
                                          timestamp_is_valid, to_datetime)
from fabrica.ingest.v1 import query_pb2


@pytest.mark.parametrize("jitter, draw, expected", [
    (0.5, 0.0, [0.25, 0.5, 1.0, 2.0, 4.0, 4.0]),
    (0.5, 1.0, [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]),
    (0.0, 0.7, [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]),
    (1.0, 0.0, [0.0] * 6),
])
def test_the_retry_policy_grows_caps_and_jitters_as_documented(jitter: float, draw: float,
                                                                 expected: list[float]) -> None:
    backoff = RetryPolicy(initial=0.5, maximum=8.0, jitter=jitter).backoff(rng=lambda: draw)
    assert [backoff.next_delay() for _ in expected] == pytest.approx(expected)
    assert backoff.failures == len(expected)
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(expected[0])


def test_the_retry_policy_stays_finite_after_very_many_failures() -> None:
    backoff = RetryPolicy(initial=0.1, maximum=5.0, multiplier=3.0).backoff(rng=lambda: 1.0)
    delays = [backoff.next_delay() for _ in range(10_000)]
    assert delays[-1] == 5.0


@pytest.mark.parametrize("kwargs", [dict(initial=0), dict(initial=2, maximum=1), dict(multiplier=0.5),
                                    dict(jitter=1.5)])
def test_a_retry_policy_that_makes_no_sense_is_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_page_tokens_round_trip_and_are_bound_to_their_query() -> None:
    token = encode_page_token("plcs:cell-1", "press-7")
    assert decode_page_token(token, "plcs:cell-1") == "press-7"
    with pytest.raises(InvalidArgument) as other:
        decode_page_token(token, "plcs:cell-2")
    assert other.value.violations[0].field == "page_token"
    for junk in ("", "!!!", "djE", encode_page_token("q", "a\0b")):
        with pytest.raises(InvalidArgument):
            decode_page_token(junk, "q")
    assert decode_int_page_token("", "orders") is None
    assert decode_int_page_token(encode_page_token("orders", "42"), "orders") == 42
    with pytest.raises(InvalidArgument):
        decode_int_page_token(encode_page_token("orders", "4x"), "orders")
    assert etag_of(7) == "r7"


def test_time_conversions() -> None:
    ts = timestamp_from_ns(1_700_000_000_123_456_789)
    assert (ts.seconds, ts.nanos) == (1_700_000_000, 123_456_789)
    assert to_datetime(ts) == datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
    assert timestamp_is_valid(253_402_300_799, 999_999_999)
    assert not timestamp_is_valid(253_402_300_800, 0) and not timestamp_is_valid(0, 1_000_000_000)
    f = query_pb2.ReadingFilter()
    assert optional_datetime(f, "start_time") is None
    f.start_time.CopyFrom(ts)
    assert optional_datetime(f, "start_time") == to_datetime(ts)
    assert seconds_of(duration_from_seconds(1.5), 9.0) == 1.5 and seconds_of(duration_from_seconds(0), 9.0) == 9.0
