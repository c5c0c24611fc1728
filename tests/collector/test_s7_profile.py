"""The S7 profile "s7-press-db1" against a simulated 14-byte DB1, polled by the collector's real poller: all
seven values exact, and nothing is read past byte 13 (the device refuses such a read, as a real CPU does)."""

from __future__ import annotations

import asyncio
import struct

import pytest
import snap7
from fabrica.common.v1 import reading_pb2

from fabrica_svc.config.profiles import PROFILES
from fabrica_svc.plcsim import S7Device

from .support import settled_readings, plc_from_profile, s7_plc, value_of

#: The seed's DB1, byte by byte: bad part off, good part on, machine on; REAL current 12.5 A at 2, REAL
#: vibration 3.25 mm/s at 6; INT good counter 1234 at 10, INT bad counter -2 (a wrapped 16-bit counter) at 12.
SEED_DB1 = bytes([0b0000_0110, 0]) + struct.pack(">ffhh", 12.5, 3.25, 1234, -2)
EXPECTED = {"bad_part": False, "good_part": True, "machine_on": True, "current": 12.5, "vibration": 3.25,
            "good_count": 1234, "bad_count": -2}


def _read(port: int, start: int, size: int) -> bytearray:
    client = snap7.client.Client()
    client.connect("127.0.0.1", 0, 1, port)
    try:
        return client.db_read(1, start, size)
    finally:
        client.disconnect()


async def test_the_seed_profile_reads_all_seven_values_exactly_and_nothing_past_byte_13() -> None:
    assert len(SEED_DB1) == 14
    async with S7Device({1: SEED_DB1}) as device:
        # The simulated DB is exactly 14 bytes: a read that reaches byte 14 fails.
        assert await asyncio.to_thread(_read, device.port, 0, 14) == SEED_DB1
        with pytest.raises(Exception):
            await asyncio.to_thread(_read, device.port, 10, 5)
        del device.reads[:]

        profile = PROFILES["s7-press-db1"]
        plc = plc_from_profile(profile, "press-s7", s7=s7_plc("x", device.port, []).s7)
        got = await settled_readings(plc)

    assert set(got) == set(EXPECTED)
    for name, expected in EXPECTED.items():
        r = got[name]
        assert r.quality == reading_pb2.QUALITY_GOOD, (name, r.error)
        assert value_of(r) == expected and type(value_of(r)) is type(expected), name
    assert device.reads and all(a.db_number == 1 and a.end <= 14 for a in device.reads), device.reads
    roles = {t.name: t.role for t in profile.tags}
    assert roles["good_count"] == reading_pb2.TAG_ROLE_PRODUCTION_COUNTER
    assert roles["bad_count"] == reading_pb2.TAG_ROLE_SCRAP_COUNTER
    assert roles["machine_on"] == reading_pb2.TAG_ROLE_MACHINE_STATE
    assert {t.counter_width for t in profile.tags if t.name.endswith("_count")} == {16}
