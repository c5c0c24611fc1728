"""CollectorService, the collector's admin API: status, probing a device, previewing a tag's or a PLC's decode,
a mirror's dry run.

Requests are validated by the shared interceptor (protovalidate); the rules that relate a tag to its PLC
are checked here and answered with INVALID_ARGUMENT and field violations. A device that cannot be reached
or answers with an error is not an RPC error: the response says so in its fields.

A collector belongs to one tenant (its identity's: :func:`own_tenant`); a caller of another tenant is
answered NOT_FOUND on every RPC, as if this collector did not exist (runtime/tenancy.py).

Previews read as the poller does: the tags of a poll group planned together within the PLC's block
limits, and a block refused for an illegal address split until the tags the device lacks are found
(collector/split.py). So the preview of a tag and the poll of the same tag agree.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import grpc
from fabrica.collector.v1 import collector_service_pb2 as pb
from fabrica.collector.v1 import collector_service_pb2_grpc as pb_grpc
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import plc_pb2

from ..plcmodel import plc as model
from ..plcmodel.spec import DecodeError, ModbusTable, S7Area, TagSpec
from ..runtime import tenancy
from ..runtime.errors import FieldViolation, InvalidArgument, NotFound
from ..runtime.timefmt import duration_from_seconds, timestamp_from_ns
from .blocks import ModbusBlock
from .drivers import Block, BlockData, BusRegistry, CommunicationError, DeviceError, Driver, PlcConfigError, make_driver
from .mirror import probe as probe_mirror
from .poller import PollerStatus
from .reach import ReachPolicy
from .split import BlockRead, plan_fitting, read_block, tag_range
from .tags import compiled, tag_spec, tag_violations, to_value, value_kind

if TYPE_CHECKING:
    from ..runtime.settings import Settings
    from .config_watch import ConfigWatcher
    from .spool import Spool
    from .supervisor import PlcSupervisor
    from .uplink import Uplink


def own_tenant(settings: Settings) -> str:
    """The tenant this collector belongs to: the one its certificate names (``urn:fabrica:tenant:<code>``),
    else its token's ``tenant`` claim (its own token, read without verifying: the services verify it), else
    FABRICA_TENANT, else ``default``."""
    import jwt
    from cryptography import x509

    from ..runtime.certs import TENANT_URI

    if settings.tls is not None:
        cert = x509.load_pem_x509_certificates(settings.tls.cert_pem)[0]
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        for uri in uris:
            if uri.startswith(TENANT_URI) and tenancy.is_code(uri[len(TENANT_URI):]):
                return uri[len(TENANT_URI):]
    token = settings.token
    if not token and settings.token_file is not None:
        try:
            token = settings.token_file.read_text().strip()
        except OSError:
            token = ""
    if token:
        try:
            claim = jwt.decode(token, options={"verify_signature": False}).get("tenant")
        except jwt.PyJWTError:
            claim = None
        if isinstance(claim, str) and tenancy.is_code(claim):
            return claim
    if settings.tenant and tenancy.is_code(settings.tenant):
        return settings.tenant
    return tenancy.DEFAULT


class CollectorServicer(pb_grpc.CollectorServiceServicer):
    """The admin API over the parts the collector's app built: the status comes from the spool, the
    supervisor's pollers, the config watcher and the uplink; probes and previews share the app's RTU buses,
    so they take their turn on a bus the pollers use."""

    def __init__(self, collector_id: str, *, spool: Spool, supervisor: PlcSupervisor, watcher: ConfigWatcher,
                 uplink: Uplink, buses: BusRegistry, reach: ReachPolicy | None = None,
                 tenant: str = tenancy.DEFAULT):
        self.collector_id = collector_id
        #: The tenant this collector belongs to; callers of another are NOT_FOUND.
        self.tenant = tenant
        #: Where the caller's PLC definitions may make the collector connect (collector/reach.py).
        self.reach = reach or ReachPolicy()
        self.spool = spool
        self.supervisor = supervisor
        self.watcher = watcher
        self.uplink = uplink
        self.buses = buses

    def _admit(self) -> None:
        """NOT_FOUND for a caller of another tenant (installation-wide callers naming none, ``*``, pass)."""
        caller = tenancy.current()
        if caller is not None and caller not in (self.tenant, tenancy.ALL):
            raise NotFound(f"no collector {self.collector_id!r} in tenant {caller!r}", reason="COLLECTOR_NOT_FOUND",
                           metadata={"collector_id": self.collector_id})

    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        self._admit()
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
            _plan_of(s, status)
        for m in self.supervisor.mirrors.statuses():
            mirror = response.mirrors.add(
                plc_id=m.plc_id, name=m.name, target_plc_id=m.target_plc_id, running=m.running,
                refused_reason=m.refused_reason, copies=m.copies, bytes_copied=m.bytes_copied,
                skipped_cycles=m.skipped_cycles, last_source_error=m.last_source_error,
                last_target_error=m.last_target_error)
            if m.last_copy_ns:
                mirror.last_copy_time.CopyFrom(timestamp_from_ns(m.last_copy_ns))
        return response

    async def ProbeMirror(self, request: pb.ProbeMirrorRequest,
                          context: grpc.aio.ServicerContext) -> pb.ProbeMirrorResponse:
        self._admit()
        if request.mirror.target_plc_id != request.target_plc.id:
            raise InvalidArgument(FieldViolation("mirror.target_plc_id",
                                                 f"must be target_plc.id ({request.target_plc.id!r})"))
        self._check_reach((request.source_plc, "source_plc"), (request.target_plc, "target_plc"))
        result = await probe_mirror(request.source_plc, request.target_plc, request.mirror, self._driver)
        return pb.ProbeMirrorResponse(ok=result.ok, source_bytes=result.source_bytes,
                                      target_bytes=result.target_bytes, source_error=result.source_error,
                                      target_error=result.target_error)

    def _driver(self, plc: plc_pb2.Plc) -> Driver:
        return make_driver(plc, self.buses)

    def _check_reach(self, *plcs: tuple[plc_pb2.Plc, str]) -> None:
        """INVALID_ARGUMENT, before any connection, for a PLC that points where this collector may not go."""
        found = [v for plc, path in plcs for v in self.reach.violations(plc, path)]
        if found:
            raise InvalidArgument(found, "; ".join(f"{v.field}: {v.description}" for v in found))

    async def ProbePlc(self, request: pb.ProbePlcRequest, context: grpc.aio.ServicerContext) -> pb.ProbePlcResponse:
        self._admit()
        plc = request.plc
        self._check_reach((plc, "plc"))
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
        self._admit()
        plc, tag = request.plc, request.tag
        self._check_reach((plc, "plc"))
        tag_id = tag.id or 1  # a definition being tried out has no id yet
        violations = tag_violations(tag, plc, "tag", tag_id)
        if violations:
            raise InvalidArgument(violations)
        spec = compiled(tag, tag_id)
        companions = _companions(plc, tag, tag_id)
        limits = model.block_limits(plc)
        response = pb.PreviewDecodeResponse()
        try:
            driver = self._driver(plc)
        except PlcConfigError as exc:
            response.quality, response.error = reading_pb2.QUALITY_CONFIG_ERROR, str(exc)
            return response
        try:
            await driver.connect()
            blocks, rejected = plan_fitting(driver, [spec, *companions], limits)
            for rejected_spec, why in rejected:
                if rejected_spec.tag_id == tag_id:  # does not fit one read of this device (S7: the negotiated PDU)
                    response.quality, response.error = reading_pb2.QUALITY_CONFIG_ERROR, why
                    return response
            block = next(b for b in blocks if any(s.tag_id == tag_id for s, _ in b.tags))
            result = await read_block(driver, block, limits)
        except CommunicationError as exc:
            response.quality, response.error = reading_pb2.QUALITY_COMMUNICATION_FAILURE, str(exc)
            return response
        finally:
            await driver.dispose()
        outcome = _outcome(result, tag_id)
        if outcome.part is not None:
            response.read.CopyFrom(_range(outcome.part))
        else:
            response.read.CopyFrom(_tag_range(spec))
        if outcome.error:
            response.quality, response.error = outcome.quality, outcome.error
            return response
        assert outcome.part is not None and outcome.data is not None
        pos = dict((s.tag_id, p) for s, p in outcome.part.tags)[tag_id]
        width = tag_range(spec)[1]
        raw = outcome.data[pos:pos + width]
        if isinstance(raw, (bytes, bytearray)):
            response.raw_bytes = bytes(raw)
        elif spec.modbus_table is not None and ModbusTable(spec.modbus_table).is_bit_table:
            response.bits.extend(bool(b) for b in raw)
        else:
            response.registers.extend(raw)  # type: ignore[arg-type]
        response.quality = outcome.quality
        if outcome.value is not None:
            response.value.CopyFrom(to_value(value_kind(spec), outcome.value))
        return response

    async def PreviewPlc(self, request: pb.PreviewPlcRequest, context: grpc.aio.ServicerContext) -> pb.PreviewPlcResponse:
        self._admit()
        plc = request.plc
        model.check_plc(plc, "plc")
        self._check_reach((plc, "plc"))
        limits = model.block_limits(plc)
        # Internal ids by position: a definition being tried out may have no ids (or repeat them).
        specs = [compiled(tag, i + 1) for i, tag in enumerate(plc.tags)]
        given = {i + 1: tag.id for i, tag in enumerate(plc.tags)}
        first = plc.poll_groups[0].name if plc.poll_groups else ""
        groups: dict[str, list[TagSpec]] = {}
        for tag, spec in zip(plc.tags, specs):
            groups.setdefault(tag.poll_group or first, []).append(spec)
        response = pb.PreviewPlcResponse()
        previews = [response.tags.add(tag_id=tag.id, tag_name=tag.name) for tag in plc.tags]
        try:
            driver = self._driver(plc)
        except PlcConfigError as exc:
            response.error = str(exc)
            for preview in previews:
                preview.quality, preview.error = reading_pb2.QUALITY_CONFIG_ERROR, str(exc)
            return response
        try:
            await driver.connect()
            for group, group_specs in groups.items():
                blocks, rejected = plan_fitting(driver, group_specs, limits)
                for spec, why in rejected:
                    previews[spec.tag_id - 1].quality = reading_pb2.QUALITY_CONFIG_ERROR
                    previews[spec.tag_id - 1].error = why
                for block in blocks:
                    result = await read_block(driver, block, limits)
                    self._preview_result(response, previews, given, group, result)
        except CommunicationError as exc:
            response.error = str(exc)
            for preview in previews:
                if not preview.quality:
                    preview.quality, preview.error = reading_pb2.QUALITY_COMMUNICATION_FAILURE, str(exc)
        finally:
            await driver.dispose()
        return response

    @staticmethod
    def _preview_result(response: pb.PreviewPlcResponse, previews: list[pb.TagPreview], given: dict[int, int],
                        group: str, result: BlockRead) -> None:
        parts: list[tuple[Block, BlockData | None, str]] = [(part, data, "") for part, data in result.reads]
        parts += [(part, None, str(error)) for part, error in result.failed]
        for part, data, error in parts:
            response.reads.add(poll_group=group, range=_range(part), tag_ids=[given[s.tag_id] for s, _ in part.tags])
            decoded = part.decode(data) if data is not None else [(s, None) for s, _ in part.tags]  # type: ignore[arg-type]
            for spec, value in decoded:
                preview = previews[spec.tag_id - 1]
                preview.read.CopyFrom(_range(part))
                if data is None:
                    preview.quality, preview.error = reading_pb2.QUALITY_DECODE_FAILURE, error
                elif isinstance(value, DecodeError):
                    preview.quality, preview.error = reading_pb2.QUALITY_DECODE_FAILURE, str(value)
                else:
                    preview.quality = reading_pb2.QUALITY_GOOD
                    preview.value.CopyFrom(to_value(value_kind(spec), value))
        for spec, error in result.absent:
            preview = previews[spec.tag_id - 1]
            preview.quality, preview.error = reading_pb2.QUALITY_CONFIG_ERROR, error
            response.absent_tags.add(tag_id=given[spec.tag_id], tag_name=preview.tag_name, poll_group=group,
                                     range=_tag_range(spec), error=error)


class _Outcome:
    """What a block read says about one tag: the part it was read in, its data, value, quality and error."""

    __slots__ = ("part", "data", "value", "quality", "error")

    def __init__(self) -> None:
        self.part: Block | None = None
        self.data: BlockData | None = None
        self.value: object = None
        self.quality = reading_pb2.QUALITY_UNSPECIFIED
        self.error = ""


def _outcome(result: BlockRead, tag_id: int) -> _Outcome:
    out = _Outcome()
    for spec, error in result.absent:
        if spec.tag_id == tag_id:
            out.quality, out.error = reading_pb2.QUALITY_CONFIG_ERROR, error
            return out
    for part, exc in result.failed:
        if any(s.tag_id == tag_id for s, _ in part.tags):
            out.part, out.quality, out.error = part, reading_pb2.QUALITY_DECODE_FAILURE, str(exc)
            return out
    for part, data in result.reads:
        for spec, value in part.decode(data):  # type: ignore[arg-type]
            if spec.tag_id == tag_id:
                out.part, out.data = part, data
                if isinstance(value, DecodeError):
                    out.quality, out.error = reading_pb2.QUALITY_DECODE_FAILURE, str(value)
                else:
                    out.quality, out.value = reading_pb2.QUALITY_GOOD, value
                return out
    raise AssertionError(f"tag {tag_id} is not in the block read")


def _companions(plc: plc_pb2.Plc, tag: plc_pb2.Tag, tag_id: int) -> list[TagSpec]:
    """The PLC's other tags of the previewed tag's poll group, compiled (those that compile), with ids that
    differ from `tag_id`: the poll reads the previewed tag in a block with them."""
    first = plc.poll_groups[0].name if plc.poll_groups else ""
    group = tag.poll_group or first
    next_id = max([tag_id, *(t.id for t in plc.tags)]) + 1
    out: list[TagSpec] = []
    for other in plc.tags:
        if other.name == tag.name or (other.poll_group or first) != group:
            continue
        if tag_violations(other, plc, "tag", next_id):
            continue
        out.append(compiled(other, next_id))
        next_id += 1
    return out


def _range(block: Block) -> pb.AddressRange:
    """The addresses a block reads."""
    if isinstance(block, ModbusBlock):
        return pb.AddressRange(modbus_table=int(block.table), start=block.start, count=block.count)  # type: ignore[arg-type]
    return pb.AddressRange(s7_area=int(block.area), db_number=block.db_number, start=block.start,  # type: ignore[arg-type]
                           count=block.size)


def _tag_range(spec: TagSpec) -> pb.AddressRange:
    """The addresses of one tag."""
    start, count = tag_range(spec)
    if spec.modbus_table is not None:
        return pb.AddressRange(modbus_table=int(spec.modbus_table), start=start, count=count)  # type: ignore[arg-type]
    area = spec.s7_area or S7Area.DB
    return pb.AddressRange(s7_area=int(area), db_number=spec.db_number, start=start, count=count)  # type: ignore[arg-type]


def _plan_of(s: PollerStatus, status: pb.PlcRuntimeStatus) -> None:
    """A poller's block plan and absent tags into its runtime status."""
    for group, block in s.reads:
        status.reads.add(poll_group=group, range=_range(block), tag_ids=[spec.tag_id for spec, _ in block.tags])
    for absent in s.absent:
        status.absent_tags.add(tag_id=absent.tag_id, tag_name=absent.name, poll_group=absent.group,
                               range=_tag_range(absent.spec), error=absent.error,
                               next_retry_time=timestamp_from_ns(absent.retry_ns))
