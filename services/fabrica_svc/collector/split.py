"""Reading a block the device refuses because some of its addresses do not exist: split it, find the tags.

A register map may have holes (an energy meter model without per-phase power registers, a profile written
for a bigger variant), and an S7 DB may be shorter than a tag's range. The device then refuses the whole
block read with "illegal address" (Modbus exception 2; S7 return code 0x05 "invalid address"), although it has most of the addresses read. :func:`read_block` reads a planned
block; when it is refused so, the block's tags are split in two halves (in address order), each half is
planned again within the PLC's block limits and read, and halves refused again are split further, down
to single tags. A tag whose own read is refused is absent: the device does not have (all of) its
addresses, a configuration error and not a decode failure. A gap bridged between two tags can be a hole
too: then the split ends with both tags read, in two blocks. Finally, neighbouring parts that were read
and that the planner would merge again (their union is one block) are tried once as that one block, and
kept as one where the device accepts it: halving by tags cuts between tags that can be read together.

The split costs at most 2n - 1 reads for a block of n tags (about 2k·log2(n) with k absent tags), plus one
per merge tried, once: the caller keeps the blocks that were read as its plan and does not discover them
again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..plcmodel.plc import BlockLimits
from ..plcmodel.spec import ModbusTable, TagSpec, byte_count, register_count
from .drivers import Block, BlockData, DeviceError, Driver, s7_range

__all__ = ["BlockRead", "absent_error", "plan_fitting", "read_block", "tag_range"]

_TABLE_WORDS = {
    ModbusTable.COIL: ("coil", "coils"),
    ModbusTable.DISCRETE_INPUT: ("discrete input", "discrete inputs"),
    ModbusTable.INPUT_REGISTER: ("input register", "input registers"),
    ModbusTable.HOLDING_REGISTER: ("holding register", "holding registers"),
}


@dataclass
class BlockRead:
    """What reading one planned block gave.

    Attributes:
        reads: The blocks read, with their data: the planned block itself, or its parts after a split.
        failed: Parts the device refused with another error (their tags: DECODE_FAILURE).
        absent: Tags the device lacks, each with the error naming its address.
        requests: Read requests sent.
        refused: Requests the device answered with an error.
    """

    reads: list[tuple[Block, BlockData]] = field(default_factory=list)
    failed: list[tuple[Block, DeviceError]] = field(default_factory=list)
    absent: list[tuple[TagSpec, str]] = field(default_factory=list)
    requests: int = 0
    refused: int = 0

    @property
    def split(self) -> bool:
        """Whether the planned block had to be split (its parts replace it in the plan)."""
        return len(self.reads) + len(self.failed) != 1 or bool(self.absent)


def tag_range(spec: TagSpec) -> tuple[int, int]:
    """(first address, number of addresses) of a tag: registers or bits (Modbus), bytes (S7)."""
    if spec.modbus_table is not None:
        return spec.address, 1 if spec.modbus_table.is_bit_table else register_count(spec)
    return spec.address, byte_count(spec)


def absent_error(spec: TagSpec, error: DeviceError) -> str:
    """The error of a tag the device lacks, naming its address: "device has no holding register 12
    (exception 2, illegal data address)"."""
    start, count = tag_range(spec)
    if spec.modbus_table is not None:
        one, many = _TABLE_WORDS[spec.modbus_table]
        where = f"{one} {start}" if count == 1 else f"{many} {start}..{start + count - 1}"
    else:
        assert spec.s7_area is not None
        where = s7_range(spec.s7_area, spec.db_number, start, count)
    answer = error.answer or str(error)
    return f"device has no {where} ({answer})"


async def read_block(driver: Driver, block: Block, limits: BlockLimits) -> BlockRead:
    """Read `block`; split it when the device says some address in it does not exist (see the module).

    Raises CommunicationError (the caller drops the connection); other device errors are in `failed`.
    """
    out = BlockRead()
    pending: deque[Block] = deque([block])
    while pending:
        part = pending.popleft()
        out.requests += 1
        try:
            data = await driver.read(part)
        except DeviceError as exc:
            out.refused += 1
            if not exc.illegal_address:
                out.failed.append((part, exc))
            elif len(part.tags) == 1:
                (spec, _), = part.tags
                out.absent.append((spec, absent_error(spec, exc)))
            else:
                specs = [spec for spec, _ in part.tags]
                half = len(specs) // 2
                pending.extendleft(reversed(_plan(driver, specs[:half], limits) + _plan(driver, specs[half:], limits)))
            continue
        out.reads.append((part, data))
    if len(out.reads) > 1:
        out.reads = await _coalesce(driver, out, limits)
    return out


async def _coalesce(driver: Driver, out: BlockRead, limits: BlockLimits) -> list[tuple[Block, BlockData]]:
    """The parts read, with each run of neighbours the planner merges into one block read as one where the
    device accepts it (see the module)."""
    merged: list[tuple[Block, BlockData]] = []

    async def flush(run: list[tuple[Block, BlockData]]) -> None:
        if len(run) == 1:
            merged.extend(run)
            return
        (block,) = _plan(driver, [spec for part, _ in run for spec, _ in part.tags], limits)
        out.requests += 1
        try:
            merged.append((block, await driver.read(block)))
        except DeviceError:
            out.refused += 1
            merged.extend(run)

    run = [out.reads[0]]
    for item in out.reads[1:]:
        specs = [spec for part, _ in [*run, item] for spec, _ in part.tags]
        if len(_plan(driver, specs, limits)) == 1:
            run.append(item)
        else:
            await flush(run)
            run = [item]
    await flush(run)
    return merged


def _plan(driver: Driver, specs: Sequence[TagSpec], limits: BlockLimits) -> list[Block]:
    return driver.plan(specs, limits)


def plan_fitting(driver: Driver, specs: Sequence[TagSpec],
                 limits: BlockLimits) -> tuple[list[Block], list[tuple[TagSpec, str]]]:
    """The driver's plan of `specs`, leaving out each tag that does not fit one read (e.g. an S7 string
    longer than the negotiated PDU allows): (blocks, [(tag, why)])."""
    try:
        return _plan(driver, specs, limits), []
    except ValueError:
        pass
    fitting: list[TagSpec] = []
    rejected: list[tuple[TagSpec, str]] = []
    for spec in specs:
        try:
            _plan(driver, [spec], limits)
            fitting.append(spec)
        except ValueError as exc:
            rejected.append((spec, str(exc)))
    return _plan(driver, fitting, limits), rejected
