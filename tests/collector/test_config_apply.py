"""The collector follows the config service (real server, embedded Postgres): changes are applied without
restarting other PLCs, in order (the old poller of a changed PLC is stopped, the change is applied, only
then do readings of the new definition arrive, and none of the old one after), the applied revision and
per-PLC errors are reported, and the last configuration on disk keeps the collector polling while the
config service is away."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from fabrica.collector.v1 import collector_service_pb2 as cpb
from fabrica.collector.v1 import collector_service_pb2_grpc as cpb_grpc
from fabrica.config.v1 import config_service_pb2 as pb
from fabrica.config.v1 import config_service_pb2_grpc as pb_grpc
from fabrica.config.v1 import plc_pb2
from google.protobuf import field_mask_pb2

from fabrica_svc.collector import supervisor as supervisor_module
from fabrica_svc.collector.poller import Poller
from fabrica_svc.plcsim import Simulator

from .support import (GOOD, app_of, collector_settings, free_port, mb_tag, modbus_plc, readings, s7_plc, s7_tag,
                      start_collector, start_config, value_of, wait_for)

T = plc_pb2


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    clock = FakeClock()
    async with Simulator(seed=6, clock=clock) as s:
        clock.t += 40.0
        s.refresh()
        yield s


def new_tag(name: str, address: int, data_type: int = T.DATA_TYPE_UINT16, **fields) -> T.Tag:
    tag = mb_tag(name, address, data_type, **fields)
    tag.ClearField("id")  # the config service assigns ids
    return tag


def update(plc: T.Plc, *paths: str) -> pb.UpdatePlcRequest:
    return pb.UpdatePlcRequest(plc=plc, update_mask=field_mask_pb2.FieldMask(paths=list(paths)))


class Timeline:
    """What the collector does, in the order it does it: each reading with the poller that emitted it (pollers
    are numbered as they are created), and each configuration change when the supervisor has applied it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, str, int | T.Plc | object]] = []
        numbers = itertools.count(1)
        events = self.events

        class Numbered(Poller):  # the real poller; it only notes what it emits
            def __init__(self, plc: T.Plc, make_driver, emit, **kwargs) -> None:  # noqa: ANN001
                number = next(numbers)

                def noted(reading) -> None:  # noqa: ANN001
                    events.append(("reading", plc.id, number, reading))
                    emit(reading)

                super().__init__(plc, make_driver, noted, **kwargs)
                self.number = number

        monkeypatch.setattr(supervisor_module, "Poller", Numbered)

    def follow(self, supervisor: supervisor_module.PlcSupervisor) -> None:
        upsert = supervisor.upsert

        async def noted(plc: T.Plc) -> None:
            await upsert(plc)
            self.events.append(("applied", plc.id, 0, plc))

        supervisor.upsert = noted  # type: ignore[method-assign]

    def of(self, plc_id: str, since: int = 0) -> list[tuple[str, int, object]]:
        """The events of one PLC from index `since` on: ("reading", poller number, reading) or
        ("applied", 0, plc)."""
        return [(kind, n, what) for kind, p, n, what in self.events[since:] if p == plc_id]


async def test_changes_apply_without_restarting_other_plcs_in_order_and_changed_tags_stop_in_old_form(
    database_url: str, sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeline = Timeline(monkeypatch)
    config = await start_config(database_url)
    settings = collector_settings(tmp_path, FABRICA_CONFIG_ADDR=config.address)
    collector = None
    try:
        async with grpc.aio.insecure_channel(config.address) as channel:
            stub = pb_grpc.ConfigServiceStub(channel)
            press = (await stub.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc(
                "press", sim.modbus_port, [new_tag("state", 3)], interval=0.05, integrity=0.2)))).plc
            s7 = (await stub.CreatePlc(pb.CreatePlcRequest(plc=s7_plc(
                "press-s7", sim.s7_port, [s7_tag("temperature", 2, T.DATA_TYPE_FLOAT32, tag_id=0)],
                interval=0.05)))).plc
            collector = await start_collector(settings)
            app = app_of(collector)
            timeline.follow(app.supervisor)
            state_id, s7_id = press.tags[0].id, s7.tags[0].id
            await wait_for(lambda: app.watcher.revision == s7.revision and readings(app, state_id)
                           and readings(app, s7_id), what="the snapshot applied and polled")
            untouched = app.supervisor.pollers["press-s7"]
            old = app.supervisor.pollers["press"]
            starts = list(app.supervisor.starts)

            # A tag added through the config service: the press's poller is replaced. Its old poller's
            # readings end before the change is applied; the new poller's, with the new tag, begin after.
            plc = T.Plc()
            plc.CopyFrom(press)
            plc.tags.append(new_tag("count", 0, T.DATA_TYPE_UINT32))
            since = len(timeline.events)
            press = (await stub.UpdatePlc(update(plc, "tags"))).plc
            count_id = next(t.id for t in press.tags if t.name == "count")
            await wait_for(lambda: app.watcher.revision == press.revision, what="the change applied")
            new = app.supervisor.pollers["press"]
            await wait_for(lambda: new.polls >= 5 and readings(app, count_id), what="the new poller polling")
            assert new is not old and not old.running
            events = timeline.of("press", since)
            applied = events.index(("applied", 0, press))
            assert {n for _, n, _ in events[:applied]} <= {old.number}
            assert {n for _, n, _ in events[applied + 1:]} == {new.number}, "a reading of the old poller after the change"
            first = next(r for *_, r in events[applied + 1:] if r.tag_id == count_id)
            assert first.quality == GOOD and value_of(first) == sim.plant.snapshot.production_count
            assert readings(app, count_id)[0] == first

            # Only the changed PLC was restarted.
            assert app.supervisor.pollers["press-s7"] is untouched
            assert app.supervisor.starts == [*starts, "press"]

            # The same tag (same name, same id) moved to another address and type: uint16 at 3 -> float32 at 4.
            plc.CopyFrom(press)
            changed = next(t for t in plc.tags if t.name == "state")
            changed.modbus.address = 4
            changed.data_type = T.DATA_TYPE_FLOAT32
            old, since = new, len(timeline.events)
            press = (await stub.UpdatePlc(update(plc, "tags"))).plc
            assert next(t.id for t in press.tags if t.name == "state") == state_id
            await wait_for(lambda: app.watcher.revision == press.revision, what="the change applied")
            await wait_for(lambda: len([r for r in readings(app, state_id) if r.value.HasField("double_value")]) >= 3,
                           what="three integrity reports in the new form")
            new = app.supervisor.pollers["press"]
            events = timeline.of("press", since)
            applied = events.index(("applied", 0, press))
            assert {n for _, n, _ in events[:applied]} <= {old.number} and not old.running
            after = [r for _, n, r in events[applied + 1:]]
            assert {n for _, n, _ in events[applied + 1:]} == {new.number}, "a reading of the old poller after the change"
            assert {r.value.WhichOneof("kind") for r in after if r.tag_id == state_id} == {"double_value"}
            forms = [r.value.WhichOneof("kind") for r in readings(app, state_id)]
            switch = forms.index("double_value")
            assert set(forms[:switch]) == {"uint_value"} and set(forms[switch:]) == {"double_value"}
            assert value_of(readings(app, state_id)[-1]) == pytest.approx(sim.plant.snapshot.temperature, rel=1e-6)

            # A PLC that cannot be reached: the config service hears about it.
            ghost = (await stub.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc(
                "ghost", free_port(), [new_tag("x", 0)], interval=0.05)))).plc

            async def reported() -> pb.ListCollectorsResponse | None:
                listed = await stub.ListCollectors(pb.ListCollectorsRequest())
                mine = [c for c in listed.collectors if c.id == "cell-1"]
                if not mine or mine[0].applied_revision != ghost.revision:
                    return None
                statuses = {s.plc_id: s for s in mine[0].plc_statuses}
                return statuses if "ghost" in statuses and statuses["ghost"].error else None

            statuses = await wait_for(reported, what="the status report with the ghost's error")
            assert "cannot connect" in statuses["ghost"].error and not statuses["ghost"].connected
            assert statuses["press"].connected and statuses["press"].error == ""

            # Deleting a PLC stops it; disabling another stops it too, leaving the last one alone.
            await stub.DeletePlc(pb.DeletePlcRequest(id="ghost"))
            plc.CopyFrom(press)
            plc.enabled = False
            press = (await stub.UpdatePlc(update(plc, "enabled"))).plc
            await wait_for(lambda: app.watcher.revision == press.revision, what="delete and disable applied")
            assert set(app.supervisor.pollers) == {"press-s7"} and app.supervisor.pollers["press-s7"] is untouched
            assert sorted(app.supervisor.definitions) == ["press", "press-s7"]
    finally:
        if collector is not None:
            await collector.stop(grace=0)
        await config.stop(grace=0)


async def test_the_last_configuration_on_disk_keeps_polling_while_config_is_away_and_the_watch_resumes_after_it(
    database_url: str, sim: Simulator, tmp_path: Path
) -> None:
    config = await start_config(database_url)
    port = config.port  # it comes back on the same address
    settings = collector_settings(tmp_path, FABRICA_CONFIG_ADDR=config.address)
    collector = None
    try:
        async with grpc.aio.insecure_channel(config.address) as channel:
            stub = pb_grpc.ConfigServiceStub(channel)
            press = (await stub.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc(
                "press", sim.modbus_port, [new_tag("state", 3)], interval=0.05)))).plc
            collector = await start_collector(settings)
            await wait_for(lambda: app_of(collector).watcher.revision == press.revision, what="applied")
            await collector.stop(grace=0)
            collector = None
        await config.stop(grace=0)

        # Config is gone: the collector starts from what it kept.
        collector = await start_collector(settings)
        app = app_of(collector)
        state_id = press.tags[0].id
        await wait_for(lambda: readings(app, state_id), what="polling from the stored configuration")
        async with grpc.aio.insecure_channel(collector.address) as channel:
            status = await cpb_grpc.CollectorServiceStub(channel).GetStatus(cpb.GetStatusRequest())
        assert status.applied_revision == press.revision and [p.plc_id for p in status.plcs] == ["press"]
        assert not app.watcher.connected

        # Config is back (same address): the watch resumes after the stored revision, without a snapshot.
        config = await start_config(database_url, port)
        async with grpc.aio.insecure_channel(config.address) as channel:
            stub = pb_grpc.ConfigServiceStub(channel)
            plc = T.Plc()
            plc.CopyFrom(press)
            plc.tags.append(new_tag("count", 0, T.DATA_TYPE_UINT32))
            press = (await stub.UpdatePlc(update(plc, "tags"))).plc
            await wait_for(lambda: app.watcher.revision == press.revision, timeout=15, what="the change after the outage")
        count_id = next(t.id for t in press.tags if t.name == "count")
        await wait_for(lambda: readings(app, count_id), what="the new tag polled")
        assert app.watcher.snapshots == 0
    finally:
        if collector is not None:
            await collector.stop(grace=0)
        await config.stop(grace=0)
