"""Read planning: merge the tags of a poll group into as few block reads as the protocol allows.

A poll costs one request/response round trip per block, and on a PLC network the round trip dominates:
Modbus TCP devices answer in a few to tens of milliseconds whatever the size of the answer, serial Modbus RTU
adds the silent intervals and the device's turnaround to every request, and an S7 CPU serves communication
in slices of its scan cycle. Reading a few unused addresses inside one response is nearly free by
comparison. So the planners sort a group's tags by address and merge overlapping, adjacent and nearby ones
into blocks, within the largest request the protocol allows.

Each block knows its tags and their offsets, holds their compiled decoders, and decodes a block response
tag by tag: a tag that cannot be decoded yields its :class:`DecodeError` and does not affect the others.

:func:`plan_modbus` and :func:`plan_s7` apply a PLC's :class:`~fabrica_svc.plcmodel.plc.BlockLimits` (the
user's limits, each None keeping the protocol's) to the two planners; the drivers plan through them.

Both planners raise ValueError (its subclass :class:`TagSpecError` for an invalid tag definition) for input
they cannot plan; callers that want to report bad tags individually should screen the tags with
:func:`validate_spec` first and plan the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from fabrica_svc.collector.decode import Value, make_decoder
from fabrica_svc.plcmodel.plc import BlockLimits
from fabrica_svc.plcmodel.spec import MODBUS_ADDRESS_SPACE, DecodeError, ModbusTable, S7Area, TagSpec

__all__ = [
    "DEFAULT_MODBUS_MAX_GAP",
    "MODBUS_MAX_BITS",
    "MODBUS_MAX_REGISTERS",
    "S7_DEFAULT_MAX_BYTES",
    "ModbusBlock",
    "S7Block",
    "TagResult",
    "plan_modbus",
    "plan_modbus_reads",
    "plan_s7",
    "plan_s7_reads",
]

#: Most registers one read (function 3 or 4) may return: the response's byte count field stops at 250 bytes.
MODBUS_MAX_REGISTERS: Final = 125
#: Most coils or discrete inputs one read (function 1 or 2) may return.
MODBUS_MAX_BITS: Final = 2000
#: Default for the unused addresses a Modbus block may bridge (see :func:`plan_modbus_reads`).
DEFAULT_MODBUS_MAX_GAP: Final = 16
#: Usable payload of one S7 read with the common 240-byte PDU: 240 minus the 12-byte response header, the
#: 2-byte parameter (function, item count) and the 4-byte data item header (return code, transport size,
#: length) = 222 bytes. Larger negotiated PDUs allow more: pass PDU size - 18.
S7_DEFAULT_MAX_BYTES: Final = 222

#: What a block yields per tag: the decoded value, or the error that prevented it.
TagResult: TypeAlias = Value | DecodeError

_Decode: TypeAlias = Callable[..., Value]


def _decode_all(plan: tuple[tuple[TagSpec, int, _Decode], ...], data: Any) -> list[tuple[TagSpec, TagResult]]:
    results: list[tuple[TagSpec, TagResult]] = []
    append = results.append
    for spec, pos, decode in plan:
        try:
            append((spec, decode(data, pos)))
        except DecodeError as error:
            append((spec, error))
    return results


def _compile(tags: tuple[tuple[TagSpec, int], ...], count: int, unit: str) -> tuple[tuple[TagSpec, int, _Decode], ...]:
    """Compile a block's tags, checking that each lies inside the block."""
    plan = []
    for spec, pos in tags:
        decoder = make_decoder(spec)
        if pos < 0 or pos + decoder.width > count:
            raise ValueError(
                f"tag {spec.tag_id} at offset {pos} ({decoder.width} {unit}s) "
                f"does not fit in a block of {count} {unit}s"
            )
        plan.append((spec, pos, decoder.decode))
    return tuple(plan)


@dataclass(frozen=True, slots=True, repr=False)
class ModbusBlock:
    """One Modbus read: ``count`` registers or bits of ``table`` from address ``start``.

    Attributes:
        table: The table to read (function 1, 2, 4 or 3 for coils, discrete inputs, input and holding
            registers).
        start: First address read.
        count: Number of registers (register tables) or bits (coils, discrete inputs) read.
        tags: The tags served by this read, with each tag's offset from ``start``, sorted by offset.
    """

    table: ModbusTable
    start: int
    count: int
    tags: tuple[tuple[TagSpec, int], ...]
    _plan: tuple[tuple[TagSpec, int, _Decode], ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "table", ModbusTable(self.table))
        object.__setattr__(self, "tags", tuple(self.tags))
        if self.table is ModbusTable.UNSPECIFIED:
            raise ValueError("a Modbus block needs a table")
        if not (0 <= self.start and 1 <= self.count and self.start + self.count <= MODBUS_ADDRESS_SPACE):
            last = MODBUS_ADDRESS_SPACE - 1
            raise ValueError(f"Modbus block of {self.count} from {self.start} is outside addresses 0..{last}")
        for spec, pos in self.tags:
            if spec.modbus_table is not self.table or spec.address != self.start + pos:
                raise ValueError(
                    f"tag {spec.tag_id} ({spec.modbus_table!r} address {spec.address}) is not at offset {pos} "
                    f"of a {self.table.name} block starting at {self.start}"
                )
        unit = "bit" if self.table.is_bit_table else "register"
        object.__setattr__(self, "_plan", _compile(self.tags, self.count, unit))

    @property
    def end(self) -> int:
        """One past the last address read."""
        return self.start + self.count

    def decode(self, data: Sequence[int] | Sequence[bool]) -> list[tuple[TagSpec, TagResult]]:
        """Decode every tag of the block from the block's response.

        ``data`` is the response: register values (ints 0..65535) for register tables, bits for coils and
        discrete inputs, index 0 being address ``start``. Extra trailing items are ignored (bit reads come
        back padded to a whole byte). Returns ``(tag, value or DecodeError)`` in the order of ``tags``; a
        short response fails only the tags it does not cover.
        """
        return _decode_all(self._plan, data)

    def __repr__(self) -> str:
        ids = ", ".join(str(spec.tag_id) for spec, _ in self.tags)
        return f"ModbusBlock({self.table.name}, start={self.start}, count={self.count}, tags=[{ids}])"


@dataclass(frozen=True, slots=True, repr=False)
class S7Block:
    """One S7 read: ``size`` bytes of ``area`` (data block ``db_number`` for DBs) from byte ``start``.

    Attributes:
        area: The memory area.
        db_number: The data block for ``S7Area.DB``; 0 for the other areas.
        start: First byte read.
        size: Number of bytes read.
        tags: The tags served by this read, with each tag's offset from ``start``, sorted by offset.
    """

    area: S7Area
    db_number: int
    start: int
    size: int
    tags: tuple[tuple[TagSpec, int], ...]
    _plan: tuple[tuple[TagSpec, int, _Decode], ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "area", S7Area(self.area))
        object.__setattr__(self, "tags", tuple(self.tags))
        if self.area is S7Area.UNSPECIFIED:
            raise ValueError("an S7 block needs an area")
        if self.area is S7Area.DB and not 1 <= self.db_number <= 65535:
            raise ValueError(f"an S7 DB block needs db_number 1..65535, got {self.db_number}")
        if self.area is not S7Area.DB and self.db_number != 0:
            raise ValueError(f"db_number must be 0 for the {self.area.name} area, got {self.db_number}")
        if self.start < 0 or self.size < 1:
            raise ValueError(f"S7 block start {self.start} / size {self.size} is invalid")
        for spec, pos in self.tags:
            if _s7_key(spec) != (self.area, self.db_number) or spec.address != self.start + pos:
                raise ValueError(
                    f"tag {spec.tag_id} ({spec.s7_area!r} DB {spec.db_number} byte {spec.address}) is not at "
                    f"offset {pos} of a {self.area.name} block (DB {self.db_number}) starting at {self.start}"
                )
        object.__setattr__(self, "_plan", _compile(self.tags, self.size, "byte"))

    @property
    def end(self) -> int:
        """One past the last byte read."""
        return self.start + self.size

    def decode(self, data: bytes | bytearray | memoryview) -> list[tuple[TagSpec, TagResult]]:
        """Decode every tag of the block from the bytes read, index 0 being byte ``start``.

        Returns ``(tag, value or DecodeError)`` in the order of ``tags``; a short response fails only the
        tags it does not cover.
        """
        return _decode_all(self._plan, data)

    def __repr__(self) -> str:
        ids = ", ".join(str(spec.tag_id) for spec, _ in self.tags)
        where = f"DB{self.db_number}" if self.area is S7Area.DB else self.area.name
        return f"S7Block({where}, start={self.start}, size={self.size}, tags=[{ids}])"


# ----------------------------------------------------------------------------------------------- planning

_Span: TypeAlias = tuple[int, int, TagSpec]  # (first address, one past the last, tag)


def _merge(spans: list[_Span], limit: int, max_gap: int | None,
           no_merge: bool = False) -> list[tuple[int, int, list[TagSpec]]]:
    """Greedy merge of address spans into blocks of at most ``limit`` units.

    Spans are taken in address order; a span joins the current block when it overlaps it, touches it or
    leaves a gap of at most ``max_gap`` (None: any gap) unused units, and the grown block still fits in
    ``limit``. Otherwise it starts a new block, so a tag never straddles a block boundary. With
    ``no_merge`` a span joins only a block that already covers all its addresses (two bits of one register).
    """
    spans.sort(key=lambda span: (span[0], span[1], span[2].tag_id))
    blocks: list[tuple[int, int, list[TagSpec]]] = []
    block_start = block_end = 0
    members: list[TagSpec] = []
    for start, end, spec in spans:
        if no_merge:
            if members and end <= block_end:
                members.append(spec)
                continue
        elif (
            members
            and (max_gap is None or start - block_end <= max_gap)
            and max(block_end, end) - block_start <= limit
        ):
            block_end = max(block_end, end)
            members.append(spec)
            continue
        if members:
            blocks.append((block_start, block_end, members))
        block_start, block_end, members = start, end, [spec]
    if members:
        blocks.append((block_start, block_end, members))
    return blocks


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")


def _check_unique(specs: Iterable[TagSpec]) -> list[TagSpec]:
    listed = list(specs)
    seen: set[int] = set()
    for spec in listed:
        if spec.tag_id in seen:
            raise ValueError(f"tag {spec.tag_id} appears more than once")
        seen.add(spec.tag_id)
    return listed


def plan_modbus_reads(
    specs: Iterable[TagSpec],
    *,
    max_registers: int = MODBUS_MAX_REGISTERS,
    max_bits: int = MODBUS_MAX_BITS,
    max_gap: int = DEFAULT_MODBUS_MAX_GAP,
    no_merge: bool = False,
) -> list[ModbusBlock]:
    """Plan the fewest Modbus reads covering ``specs`` (the Modbus tags of one poll group on one device).

    Tags are grouped by table (tables are never merged: each has its own function code). Within a table,
    overlapping and adjacent tags are merged, and so are tags separated by at most ``max_gap`` unused
    addresses (registers, or bits in coil and discrete input tables). Over TCP a few spare registers are
    free compared with a second round trip; on a serial link a register costs about 2.3 ms at 9600 baud,
    so the default of 16 (about 37 ms, half that at 19200 baud) stays within the fixed cost of the request
    it saves: the request frame, the response header and CRC, two inter-frame silences and the device's
    turnaround. Some devices, however, answer a read that crosses an unmapped hole with exception 2
    (illegal data address); ``max_gap=0`` keeps every block strictly contiguous for them.

    Args:
        specs: Modbus tags with distinct tag ids.
        max_registers: Largest register read, 1..125 (lower it for devices that accept less).
        max_bits: Largest coil / discrete input read, 1..2000.
        max_gap: Most unused addresses bridged inside one block, >= 0.
        no_merge: Read every tag on its own (tags on the very same addresses still share a read).

    Returns:
        Blocks ordered by table number (coils, discrete inputs, input registers, holding registers), then
        start address.

    Raises:
        TagSpecError: a tag's definition is invalid (see :func:`validate_spec`).
        ValueError: a limit is out of range, a tag is not a Modbus tag, a tag id repeats, or a single tag
            needs more registers than ``max_registers``.
    """
    _check_int("max_registers", max_registers, 1, MODBUS_MAX_REGISTERS)
    _check_int("max_bits", max_bits, 1, MODBUS_MAX_BITS)
    _check_int("max_gap", max_gap, 0)
    by_table: dict[ModbusTable, list[_Span]] = {}
    for spec in _check_unique(specs):
        if spec.modbus_table is None:
            raise ValueError(f"tag {spec.tag_id} is not a Modbus tag (it has no modbus_table)")
        width = make_decoder(spec).width
        if width > max_registers:  # bit tables only hold 1-bit tags, which always fit
            raise ValueError(
                f"tag {spec.tag_id}: a {spec.data_type.name} of {width} registers does not fit in one read "
                f"of at most {max_registers} registers"
            )
        by_table.setdefault(spec.modbus_table, []).append((spec.address, spec.address + width, spec))

    blocks: list[ModbusBlock] = []
    for table in sorted(by_table):
        limit = max_bits if table.is_bit_table else max_registers
        for start, end, members in _merge(by_table[table], limit, max_gap, no_merge):
            tags = tuple((spec, spec.address - start) for spec in members)
            blocks.append(ModbusBlock(table, start, end - start, tags))
    return blocks


def _s7_key(spec: TagSpec) -> tuple[S7Area | None, int]:
    """(area, DB number) of a tag; the DB number only counts for the DB area."""
    return (spec.s7_area, spec.db_number if spec.s7_area is S7Area.DB else 0)


def plan_s7_reads(
    specs: Iterable[TagSpec],
    *,
    max_bytes: int = S7_DEFAULT_MAX_BYTES,
    max_gap: int | None = None,
    no_merge: bool = False,
) -> list[S7Block]:
    """Plan the fewest S7 reads covering ``specs`` (the S7 tags of one poll group on one PLC).

    Tags are grouped by area and, for DBs, by DB number; groups are never merged. Within a group, tags are
    merged as long as the block fits in ``max_bytes``, the usable payload of one read response for the
    negotiated PDU size (PDU - 18: 222 bytes for the common 240-byte PDU, 462 for 480, 942 for 960).

    Unlike Modbus maps, DBs (with absolute addressing, i.e. not "optimized") and the I/Q/M areas are
    contiguous memory without holes, and a block always ends at a tag's last byte, so bridging unused bytes
    never makes a read fail; the default ``max_gap=None`` therefore bridges any gap that fits in the PDU.
    Pass an integer to limit the unused bytes per block (0 for strictly contiguous blocks).

    Args:
        specs: S7 tags with distinct tag ids.
        max_bytes: Largest read in bytes, >= 1.
        max_gap: Most unused bytes bridged inside one block, or None for no limit but ``max_bytes``.
        no_merge: Read every tag on its own (tags on the very same bytes still share a read).

    Returns:
        Blocks ordered by area number (DB, inputs, outputs, merkers), then DB number, then start byte.

    Raises:
        TagSpecError: a tag's definition is invalid (see :func:`validate_spec`).
        ValueError: a limit is out of range, a tag is not an S7 tag, a tag id repeats, or a single tag needs
            more than ``max_bytes`` bytes.
    """
    _check_int("max_bytes", max_bytes, 1)
    if max_gap is not None:
        _check_int("max_gap", max_gap, 0)
    groups: dict[tuple[S7Area, int], list[_Span]] = {}
    for spec in _check_unique(specs):
        if spec.s7_area is None:
            raise ValueError(f"tag {spec.tag_id} is not an S7 tag (it has no s7_area)")
        width = make_decoder(spec).width
        if width > max_bytes:
            raise ValueError(
                f"tag {spec.tag_id}: a {spec.data_type.name} of {width} bytes does not fit in one read "
                f"of at most {max_bytes} bytes"
            )
        area, db_number = _s7_key(spec)
        assert area is not None
        groups.setdefault((area, db_number), []).append((spec.address, spec.address + width, spec))

    blocks: list[S7Block] = []
    for area, db_number in sorted(groups):
        for start, end, members in _merge(groups[(area, db_number)], max_bytes, max_gap, no_merge):
            tags = tuple((spec, spec.address - start) for spec in members)
            blocks.append(S7Block(area, db_number, start, end - start, tags))
    return blocks


_DEFAULT_LIMITS: Final = BlockLimits()


def plan_modbus(specs: Iterable[TagSpec], limits: BlockLimits = _DEFAULT_LIMITS) -> list[ModbusBlock]:
    """:func:`plan_modbus_reads` within a PLC's block limits (each unset one: the protocol's limit or default)."""
    return plan_modbus_reads(
        specs,
        max_registers=MODBUS_MAX_REGISTERS if limits.max_registers is None else limits.max_registers,
        max_bits=MODBUS_MAX_BITS if limits.max_bits is None else limits.max_bits,
        max_gap=DEFAULT_MODBUS_MAX_GAP if limits.max_gap is None else limits.max_gap,
        no_merge=limits.no_merge,
    )


def plan_s7(specs: Iterable[TagSpec], limits: BlockLimits = _DEFAULT_LIMITS, *,
            payload: int = S7_DEFAULT_MAX_BYTES) -> list[S7Block]:
    """:func:`plan_s7_reads` within a PLC's block limits and ``payload``, the bytes one read of the negotiated
    PDU can carry (PDU size - 18)."""
    max_bytes = payload if limits.max_s7_bytes is None else min(payload, limits.max_s7_bytes)
    return plan_s7_reads(specs, max_bytes=max_bytes, max_gap=limits.max_gap, no_merge=limits.no_merge)
