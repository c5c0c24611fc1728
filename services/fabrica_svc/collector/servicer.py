"""CollectorService, the collector's admin API: status, probing a device, previewing a tag's decode.

Requests are validated by the shared interceptor (protovalidate); the rules that relate a tag to its PLC
are checked here and answered with INVALID_ARGUMENT and field violations. A device that cannot be reached
or answers with an error is not an RPC error: the response says so in its fields.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import grpc
from fabrica.collector.v1 import collector_service_pb2 as pb
from fabrica.collector.v1 import collector_service_pb2_grpc as pb_grpc
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import plc_pb2

from ..plcmodel.spec import DecodeError, ModbusTable
from ..runtime.errors import InvalidArgument
from ..runtime.timefmt import duration_from_seconds, timestamp_from_ns
from .drivers import BusRegistry, CommunicationError, DeviceError, Driver, PlcConfigError, make_driver
from .tags import compiled, tag_spec, tag_violations, to_value, value_kind

if TYPE_CHECKING:
    from .config_watch import ConfigWatcher
    from .spool import Spool
    from .supervisor import PlcSupervisor
    from .uplink import Uplink


class CollectorServicer(pb_grpc.CollectorServiceServicer):
    """The admin API over the parts the collector's app built: the status comes from the spool, the
    supervisor's pollers, the config watcher and the uplink; probes and previews share the app's RTU buses,
    so they take their turn on a bus the pollers use."""

    def __init__(self, collector_id: str, *, spool: Spool, supervisor: PlcSupervisor, watcher: ConfigWatcher,
                 uplink: Uplink, buses: BusRegistry):
        self.collector_id = collector_id
        self.spool = spool
        self.supervisor = supervisor
        self.watcher = watcher
        self.uplink = uplink
        self.buses = buses

    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        spool = self.spool
        response = pb.GetStatusResponse(
            collector_id=self.collector_id,
            applied_revision=self.watcher.revision,
            backlog_readings=spool.backlog_readings,
            backlog_bytes=spool.disk_bytes,
            dropped_readings=spool.dropped_readings,
            uplink_connected=self.uplink.connected,
            dropped_readings_by_reason=[pb.DroppedReadings(reason=reason, readings=count)  # type: ignore[arg-type]
                                        for reason, count in sorted(spool.dropped.items())],
            rejected_batches=spool.rejected_batches,
            suspicious_duplicates=spool.suspicious_duplicates,
        )
        oldest = spool.oldest_unacked_ns()
        if oldest:
            response.oldest_backlog_time.CopyFrom(timestamp_from_ns(oldest))
        for s in self.supervisor.statuses():
            status = response.plcs.add(plc_id=s.plc_id, connected=s.connected, error_count=s.error_count,
                                       last_error=s.error, tag_count=s.tag_count)
            if s.last_good_read_ns:
                status.last_good_read_time.CopyFrom(timestamp_from_ns(s.last_good_read_ns))
            status.read_latency.CopyFrom(duration_from_seconds(s.read_latency))
        return response

    def _driver(self, plc: plc_pb2.Plc) -> Driver:
        return make_driver(plc, self.buses)

    async def ProbePlc(self, request: pb.ProbePlcRequest, context: grpc.aio.ServicerContext) -> pb.ProbePlcResponse:
        plc = request.plc
        response = pb.ProbePlcResponse()
        try:
            driver = self._driver(plc)
        except PlcConfigError as exc:
            response.error = str(exc)
            return response
        try:
            started = time.perf_counter()
            await driver.connect()
            response.connect_latency.CopyFrom(duration_from_seconds(time.perf_counter() - started))
            response.reachable = True
            started = time.perf_counter()
            if plc.WhichOneof("connection") == "s7":
                response.device_info = await driver.device_info()
            else:
                await driver.read(self._test_block(driver, plc))
            response.read_latency.CopyFrom(duration_from_seconds(time.perf_counter() - started))
        except CommunicationError as exc:
            response.error = str(exc)
        except DeviceError as exc:  # it answered: reachable, but the test read failed
            response.error = str(exc)
        finally:
            await driver.dispose()
        return response

    @staticmethod
    def _test_block(driver: Driver, plc: plc_pb2.Plc):  # noqa: ANN205 - a Block
        """The first configured tag that can be read, else holding register 0."""
        for tag in plc.tags:
            if tag.WhichOneof("address") != "modbus":
                continue
            try:
                return driver.plan([compiled(tag, tag.id or 1)])[0]
            except ValueError:
                continue
        return driver.plan([tag_spec(plc_pb2.Tag(
            data_type=plc_pb2.DATA_TYPE_UINT16,
            modbus=plc_pb2.ModbusAddress(table=plc_pb2.MODBUS_TABLE_HOLDING_REGISTER, address=0)), 1)])[0]

    async def PreviewDecode(self, request: pb.PreviewDecodeRequest,
                            context: grpc.aio.ServicerContext) -> pb.PreviewDecodeResponse:
        plc, tag = request.plc, request.tag
        tag_id = tag.id or 1  # a definition being tried out has no id yet
        violations = tag_violations(tag, plc, "tag", tag_id)
        if violations:
            raise InvalidArgument(violations)
        spec = compiled(tag, tag_id)
        response = pb.PreviewDecodeResponse()
        try:
            driver = self._driver(plc)
        except PlcConfigError as exc:
            response.quality, response.error = reading_pb2.QUALITY_CONFIG_ERROR, str(exc)
            return response
        try:
            await driver.connect()
            try:
                block = driver.plan([spec])[0]
            except ValueError as exc:  # does not fit one read of this device (S7: the negotiated PDU)
                response.quality, response.error = reading_pb2.QUALITY_CONFIG_ERROR, str(exc)
                return response
            data = await driver.read(block)
        except CommunicationError as exc:
            response.quality, response.error = reading_pb2.QUALITY_COMMUNICATION_FAILURE, str(exc)
            return response
        except DeviceError as exc:
            response.quality, response.error = reading_pb2.QUALITY_DECODE_FAILURE, str(exc)
            return response
        finally:
            await driver.dispose()
        if isinstance(data, (bytes, bytearray)):
            response.raw_bytes = bytes(data)
        elif spec.modbus_table is not None and ModbusTable(spec.modbus_table).is_bit_table:
            response.bits.extend(bool(b) for b in data)
        else:
            response.registers.extend(data)  # type: ignore[arg-type]
        (_, result), = block.decode(data)
        if isinstance(result, DecodeError):
            response.quality, response.error = reading_pb2.QUALITY_DECODE_FAILURE, str(result)
        else:
            response.quality = reading_pb2.QUALITY_GOOD
            response.value.CopyFrom(to_value(value_kind(spec), result))
        return response
