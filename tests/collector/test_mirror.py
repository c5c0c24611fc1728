"""DB mirrors between two real (simulated) S7 servers, run by a real collector: DB1 of one copied to DB2 of the
other byte for byte; nothing written while the source is down; a target that is not writable, or too small, is
refused without a single write; ProbeMirror shows what a cycle would write, and writes nothing. And config
refuses a mirror whose target is not writable, unknown, or on another collector."""

from __future__ import annotations

import struct
from pathlib import Path

import grpc
import pytest
from fabrica.collector.v1 import collector_service_pb2 as pb
from fabrica.config.v1 import config_service_pb2 as cpb
from fabrica.config.v1 import plc_pb2
from google.protobuf import field_mask_pb2

from fabrica_svc.plcsim import S7Device
from grpc_helpers import field_violations
from in_process import Server, Servers, settings_for

from .support import collector_settings, duration, s7_plc, s7_tag, store_config, wait_for

T = plc_pb2
SEED_DB1 = bytes([0b0000_0110, 0]) + struct.pack(">ffhh", 12.5, 3.25, 1234, 56)


def mirror(target: str = "lab", *, size: int = 14, target_db: int = 2, offset: int = 0,
           interval: float = 0.05) -> plc_pb2.Mirror:
    return plc_pb2.Mirror(
        name="db1-to-lab", size=size, target_plc_id=target, enabled=True, interval=duration(interval),
        source=plc_pb2.S7Range(area=T.S7_AREA_DATA_BLOCK, db_number=1, byte_offset=0),
        target=plc_pb2.S7Range(area=T.S7_AREA_DATA_BLOCK, db_number=target_db, byte_offset=offset))


def line(port: int, *mirrors: plc_pb2.Mirror) -> plc_pb2.Plc:
    plc = s7_plc("line", port, [s7_tag("count", 10, T.DATA_TYPE_INT16)], interval=0.05)
    plc.mirrors.extend(mirrors)
    return plc


def lab(port: int, plc_id: str = "lab", *, writable: bool = True) -> plc_pb2.Plc:
    plc = s7_plc(plc_id, port, [], interval=0.5)
    plc.writable = writable
    return plc


async def collector(servers: Servers, tmp_path: Path, plcs: list[plc_pb2.Plc]) -> Server:
    settings = collector_settings(tmp_path)
    store_config(settings, plcs)
    return await servers.start("collector", settings.base, config=settings)


async def mirror_status(server: Server, name: str = "db1-to-lab") -> pb.MirrorRuntimeStatus:
    status = await server.stub.GetStatus(pb.GetStatusRequest())
    return next(m for m in status.mirrors if m.name == name)


async def test_db1_is_copied_to_db2_byte_for_byte_and_nothing_is_written_while_the_source_is_down(
        servers: Servers, tmp_path: Path) -> None:
    async with S7Device({1: SEED_DB1}) as source, S7Device({2: 14}) as target:
        server = await collector(servers, tmp_path, [line(source.port, mirror()), lab(target.port)])
        await wait_for(lambda: target.block(2) == SEED_DB1, what="DB1 copied to DB2")
        first = await mirror_status(server)
        assert first.plc_id == "line" and first.target_plc_id == "lab" and first.running and not first.refused_reason
        assert first.copies >= 1 and first.bytes_copied == 14 * first.copies and first.HasField("last_copy_time")

        # The PLC program changes DB1: the copy follows.
        source.set_bytes(1, 10, struct.pack(">h", 1235))
        await wait_for(lambda: target.block(2) == source.block(1), what="the change copied")

        # The source goes down: cycles are skipped, not one write reaches the target.
        await source.stop()

        async def skipping(n: int) -> pb.MirrorRuntimeStatus | None:
            s = await mirror_status(server)
            return s if s.skipped_cycles >= n and s.last_source_error else None

        down = await wait_for(lambda: skipping(1), what="a skipped cycle")
        writes = len(target.writes)
        target.set_bytes(2, 0, b"\xaa" * 14)  # an engineer changes the target by hand
        later = await wait_for(lambda: skipping(down.skipped_cycles + 3), what="three more skipped cycles")
        assert len(target.writes) == writes and target.block(2) == b"\xaa" * 14
        assert later.copies == down.copies and later.bytes_copied == down.bytes_copied

        # Back up: copying resumes, with the source's bytes as they are now.
        await source.start()
        await wait_for(lambda: target.block(2) == source.block(1), what="copying resumed")
        back = await wait_for(lambda: _ok(server, later.copies), what="the status after the recovery")
        assert back.last_source_error == "" and back.last_target_error == ""
        assert back.bytes_copied == 14 * back.copies
        # Every write the target served was the whole block at its offset.
        assert target.writes and {(w.db_number, w.start, w.size) for w in target.writes} == {(2, 0, 14)}


async def _ok(server: Server, copies: int) -> pb.MirrorRuntimeStatus | None:
    s = await mirror_status(server)
    return s if s.copies > copies and not s.last_source_error else None


async def test_a_target_not_writable_or_too_small_is_refused_and_never_written(
        servers: Servers, tmp_path: Path) -> None:
    async with S7Device({1: SEED_DB1}) as source, S7Device({2: 14}) as locked, S7Device({2: 8}) as small:
        small_mirror = mirror("small")
        small_mirror.name = "db1-to-small"
        server = await collector(servers, tmp_path, [
            line(source.port, mirror("locked"), small_mirror),
            lab(locked.port, "locked", writable=False), lab(small.port, "small")])
        server_mirror = mirror("locked")

        async def refused() -> dict[str, pb.MirrorRuntimeStatus] | None:
            status = await server.stub.GetStatus(pb.GetStatusRequest())
            got = {m.target_plc_id: m for m in status.mirrors}
            return got if all(m.refused_reason for m in got.values()) and len(got) == 2 else None

        got = await wait_for(refused, what="both mirrors refused")
        assert "not writable" in got["locked"].refused_reason and not got["locked"].running
        assert "smaller" in got["small"].refused_reason and "DB2 bytes 0-13" in got["small"].refused_reason
        assert not got["small"].running and got["small"].copies == got["locked"].copies == 0
        assert locked.writes == [] and small.writes == []
        assert locked.reads == []  # not even probed: the definition alone refuses it
        assert small.reads and all(r.db_number == 2 for r in small.reads)

        # The dry run: what a cycle would write, and why it cannot; nothing written.
        stub = server.stub
        dry = await stub.ProbeMirror(pb.ProbeMirrorRequest(
            source_plc=line(source.port), target_plc=lab(small.port, "small"), mirror=small_mirror))
        assert not dry.ok and dry.source_bytes == SEED_DB1 and "smaller" in dry.target_error
        fine = mirror("small", size=8)
        ok = await stub.ProbeMirror(pb.ProbeMirrorRequest(
            source_plc=line(source.port), target_plc=lab(small.port, "small"), mirror=fine))
        assert ok.ok and ok.source_bytes == SEED_DB1[:8] and ok.target_bytes == bytes(8)
        assert ok.source_error == "" and ok.target_error == ""
        not_writable = await stub.ProbeMirror(pb.ProbeMirrorRequest(
            source_plc=line(source.port), target_plc=lab(locked.port, "locked", writable=False),
            mirror=server_mirror))
        assert not not_writable.ok and "not writable" in not_writable.target_error
        assert small.writes == [] and locked.writes == []

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ProbeMirror(pb.ProbeMirrorRequest(
                source_plc=line(source.port), target_plc=lab(small.port, "small"), mirror=server_mirror))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_config_refuses_a_mirror_to_a_target_that_is_not_writable_unknown_or_elsewhere(
        database_url: str, servers: Servers) -> None:
    config = (await servers.start("config", settings_for("config", database_url=database_url))).stub
    target = (await config.CreatePlc(cpb.CreatePlcRequest(plc=lab(1102, writable=False)))).plc
    assert not target.writable  # no PLC is written by default

    async def refused(plc: plc_pb2.Plc) -> dict[str, str]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await config.CreatePlc(cpb.CreatePlcRequest(plc=plc))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return field_violations(err.value)

    assert "not writable" in (await refused(line(1103, mirror())))["plc.mirrors[0].target_plc_id"]
    assert "no PLC 'nowhere'" in (await refused(line(1103, mirror("nowhere"))))["plc.mirrors[0].target_plc_id"]
    elsewhere = lab(1104, "elsewhere")
    elsewhere.collector_id = "cell-2"
    await config.CreatePlc(cpb.CreatePlcRequest(plc=elsewhere))
    assert "cell-2" in (await refused(line(1103, mirror("elsewhere"))))["plc.mirrors[0].target_plc_id"]
    no_db = mirror()
    no_db.target.db_number = 0
    assert "plc.mirrors[0].target.db_number" in await refused(line(1103, no_db))
    twice = await refused(line(1103, mirror("elsewhere"), mirror("elsewhere")))
    assert "plc.mirrors[1].name" in twice

    # Made writable, the target takes the mirror; the source carries it to its collector (WatchPlcs sends Plc).
    await config.UpdatePlc(cpb.UpdatePlcRequest(plc=plc_pb2.Plc(id="lab", writable=True),
                                                update_mask=field_mask_pb2.FieldMask(paths=["writable"])))
    created = (await config.CreatePlc(cpb.CreatePlcRequest(plc=line(1103, mirror())))).plc
    assert [m.name for m in created.mirrors] == ["db1-to-lab"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await config.UpdatePlc(cpb.UpdatePlcRequest(
            plc=line(1103, mirror("elsewhere")), update_mask=field_mask_pb2.FieldMask(paths=["mirrors"])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "plc.mirrors[0].target_plc_id" in field_violations(err.value)
    stored = (await config.GetPlc(cpb.GetPlcRequest(id="line"))).plc
    assert [m.target_plc_id for m in stored.mirrors] == ["lab"]


def test_the_rules_a_mirror_is_refused_by_without_a_device() -> None:
    from fabrica_svc.collector.mirror import refusal

    source = line(1)
    target = lab(2)
    assert refusal(source, mirror(), target) is None
    assert "not writable" in refusal(source, mirror(), lab(2, writable=False))
    assert "no PLC 'lab'" in refusal(source, mirror(), None)
    modbus = plc_pb2.Plc(id="m", collector_id="cell-1", writable=True,
                         modbus_tcp=plc_pb2.ModbusTcpConnection(host="127.0.0.1"))
    assert "not an S7 PLC" in refusal(source, mirror("m"), modbus)
    assert "not an S7 PLC" in refusal(modbus, mirror(), target)
    # Within one PLC: DB1 bytes 0-13 onto DB1 bytes 10-23 overlap; onto DB2 they do not.
    source.writable = True
    overlapping = mirror("line", target_db=1, offset=10)
    assert "overlap" in refusal(source, overlapping, None)
    assert refusal(source, mirror("line", target_db=2), None) is None
    assert refusal(source, mirror("line", target_db=1, offset=14), None) is None


async def test_a_mirror_defined_in_config_reaches_the_collector_and_runs(
        database_url: str, servers: Servers, tmp_path: Path) -> None:
    config = await servers.start("config", settings_for("config", database_url=database_url))
    async with S7Device({1: SEED_DB1}) as source, S7Device({2: 14}) as target:
        await config.stub.CreatePlc(cpb.CreatePlcRequest(plc=lab(target.port)))
        await config.stub.CreatePlc(cpb.CreatePlcRequest(plc=line(source.port, mirror())))
        settings = collector_settings(tmp_path, FABRICA_CONFIG_ADDR=config.address)
        server = await servers.start("collector", settings.base, config=settings)
        await wait_for(lambda: target.block(2) == SEED_DB1, timeout=20, what="the mirror from config copying")
        assert (await mirror_status(server)).copies >= 1
