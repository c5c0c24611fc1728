"""Modbus replies checked against their requests: nothing the device did not say about what was asked is a reading.

pymodbus 3.16 matches a reply with its request loosely: a reply whose unit id differs is skipped only when
the request's unit id is not 0, one whose transaction id differs only when neither id is 0; a skipped reply
then looks like a timeout, and a protocol id other than 0 stalls the frame until the timeout. It decodes a
read reply from its byte count alone, so a reply carrying more (or fewer) bytes than its byte count says
is taken as far as the byte count goes, and coils are padded to whole bytes. Here every reply is framed
and checked strictly, whatever the ids:

* the framers (`StrictSocketFramer` for Modbus TCP, `StrictRtuFramer` for RTU on a serial line or over TCP)
  turn every complete frame that does not match the request into a `RejectedReply`, which pymodbus hands
  back as the response at once (no timeout): a different transaction id, protocol id or (Modbus TCP) unit
  id, or an RTU frame failing its CRC, is `COMMUNICATION` (the stream is out of step: the driver
  reconnects); a frame whose byte count disagrees with its length, or that cannot be decoded, is `DECODE`.
  On an RTU bus a reply from another unit is skipped instead (the late answer of the device asked before);
  if the device asked does not answer, the timeout's error names it.
* `check_read_reply` then compares the reply with what was asked: the function code, and the number of
  registers (or the bytes of bits) — a reply shorter or longer than asked is `DECODE`.

`install` puts the strict framer into a pymodbus client. The drivers raise CommunicationError for
`COMMUNICATION` and DeviceError for `DECODE` (drivers.py), so the poller reports
QUALITY_COMMUNICATION_FAILURE and QUALITY_DECODE_FAILURE with these reasons.
"""

from __future__ import annotations

from pymodbus.client.base import ModbusBaseClient
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU, ModbusPDU

COMMUNICATION = "communication"
DECODE = "decode"

#: Function codes of the read requests, and whether their replies carry bits.
READ_FUNCTIONS = {1: True, 2: True, 3: False, 4: False}
#: The longest Modbus PDU (function code + data), and the MBAP length field's bounds (unit id + PDU).
MAX_PDU = 253
_MIN_MBAP_LENGTH, _MAX_MBAP_LENGTH = 2, MAX_PDU + 1


class RejectedReply(ModbusPDU):
    """A reply that does not answer the request. Carries the request's ids, so pymodbus passes it on."""

    function_code = 0

    def __init__(self, kind: str, reason: str, dev_id: int, transaction_id: int):
        super().__init__(dev_id=dev_id, transaction_id=transaction_id)
        self.kind = kind
        self.reason = reason

    def isError(self) -> bool:  # noqa: N802 - pymodbus's name
        return True


def _pdu_problem(frame: bytes) -> str:
    """Why a PDU's own layout is inconsistent, or "" (read replies: the byte count against the bytes that follow)."""
    function = frame[0]
    if function & 0x80:
        return "" if len(frame) == 2 else f"exception reply of {len(frame)} bytes, expected 2"
    if function in READ_FUNCTIONS:
        if len(frame) < 2:
            return "read reply without a byte count"
        count, data = frame[1], len(frame) - 2
        if count != data:
            return f"byte count {count} but {data} data bytes follow"
        if not READ_FUNCTIONS[function] and count % 2:
            return f"odd byte count {count} in a register reply"
    return ""


class _Strict:
    """The checks both framers share; `_frame` is the framing-specific part."""

    decoder: DecodePDU
    _checks_tid = True

    def _frame(self, data: bytes) -> tuple[int, int, int, bytes, str]:
        """(bytes used or 0 to wait for more, unit id, transaction id, PDU, framing problem)."""
        raise NotImplementedError

    _skips_other_units = False
    #: The last reply skipped because it came from another unit (RTU), for the timeout's error text.
    skipped = ""

    def handleFrame(self, data: bytes, exp_devid: int, exp_tid: int) -> tuple[int, ModbusPDU | None]:  # noqa: N802
        offset = 0
        for _ in range(len(data)):  # each turn consumes at least one byte
            used, pdu = self._one(data[offset:], exp_devid, exp_tid)
            offset += used
            if pdu is not None or not used or offset >= len(data):
                return offset, pdu
        return offset, None

    def _one(self, data: bytes, exp_devid: int, exp_tid: int) -> tuple[int, ModbusPDU | None]:
        used, dev_id, tid, pdu_bytes, problem = self._frame(data)
        if not used:
            return 0, None

        def reject(kind: str, reason: str) -> tuple[int, ModbusPDU]:
            return used, RejectedReply(kind, reason, exp_devid, exp_tid)

        if problem:
            return reject(COMMUNICATION, problem)
        if self._checks_tid and tid != exp_tid:
            return reject(COMMUNICATION, f"reply for transaction {tid}, expected {exp_tid}")
        if dev_id != exp_devid:
            reason = f"reply from unit {dev_id}, expected unit {exp_devid}"
            if self._skips_other_units:
                self.skipped = reason
                return used, None
            return reject(COMMUNICATION, reason)
        if problem := _pdu_problem(pdu_bytes):
            return reject(DECODE, problem)
        try:
            pdu = self.decoder.decode(pdu_bytes)
        except Exception as exc:  # noqa: BLE001 - any failure to decode is a bad reply, not a crash
            return reject(DECODE, f"undecodable reply (function {pdu_bytes[0]}): {exc}")
        if pdu is None:
            return reject(DECODE, f"undecodable reply (function {pdu_bytes[0]})")
        pdu.dev_id, pdu.transaction_id = dev_id, tid
        return used, pdu


class StrictSocketFramer(_Strict, FramerSocket):
    """Modbus TCP (MBAP) framing that checks transaction id, protocol id and unit id of every reply."""

    def _frame(self, data: bytes) -> tuple[int, int, int, bytes, str]:
        if len(data) < 7:
            return 0, 0, 0, b"", ""
        tid = int.from_bytes(data[0:2], "big")
        pid = int.from_bytes(data[2:4], "big")
        length = int.from_bytes(data[4:6], "big")
        dev_id = data[6]
        if not _MIN_MBAP_LENGTH <= length <= _MAX_MBAP_LENGTH:
            # Nothing tells where such a frame ends: take everything there is.
            return len(data), dev_id, tid, b"", f"reply with MBAP length {length} (valid: 2 to {_MAX_MBAP_LENGTH})"
        end = 6 + length
        if len(data) < end:
            return 0, 0, 0, b"", ""
        problem = f"reply with protocol id {pid}, expected 0" if pid else ""
        return end, dev_id, tid, data[7:end], problem


class StrictRtuFramer(_Strict, FramerRTU):
    """RTU framing that reports a frame failing its CRC and checks the unit id of every reply (RTU has no
    transaction id).

    A reply from another unit is skipped, not a failure: on a shared bus it is most likely the late answer
    of the device asked before (whose request timed out), and the device asked now may still answer. If it
    does not, the timeout's error names the reply skipped (`skipped`).
    """

    _checks_tid = False
    _skips_other_units = True

    def _frame(self, data: bytes) -> tuple[int, int, int, bytes, str]:
        # pymodbus's RTU decode, but returning where the frame ends (it consumes all there is).
        for start in range(len(data)):
            if len(data) - start < self.MIN_SIZE:
                return 0, 0, 0, b"", ""
            if not (pdu_class := self.decoder.lookupPduClass(data[start:])):
                continue  # not a frame's start: skip a byte of noise
            if not (size := pdu_class.calculateRtuFrameSize(data[start:])) or len(data) < start + size:
                return 0, 0, 0, b"", ""  # wait for the rest
            end = start + size
            if not FramerRTU.check_CRC(data[start:end - 2], int.from_bytes(data[end - 2:end], "big")):
                return len(data), 0, 0, b"", "reply failed its CRC check"
            return end, data[start], 0, data[start + 1:end - 2], ""
        return 0, 0, 0, b"", ""


def install(client: ModbusBaseClient) -> ModbusBaseClient:
    """Replace the framer of `client` (socket or RTU) by its strict version; returns the client."""
    ctx = client.ctx
    strict = StrictRtuFramer if isinstance(ctx.framer, FramerRTU) else StrictSocketFramer
    ctx.framer = strict(ctx.framer.decoder)
    return client


def check_read_reply(response: ModbusPDU, function: int, count: int) -> tuple[str, str] | None:
    """(kind, reason) when `response` is not a full answer to reading `count` items with `function`; else None.

    An exception reply of the same function passes (the caller reports the exception).
    """
    if isinstance(response, RejectedReply):
        return response.kind, response.reason
    got = response.function_code & 0x7F
    if got != function:
        return COMMUNICATION, f"reply for function {got}, expected {function}"
    if response.isError():
        return None
    if READ_FUNCTIONS[function]:
        expected = (count + 7) // 8
        got_bytes = len(response.bits) // 8
        if got_bytes != expected:
            return DECODE, f"reply carries {got_bytes} bytes of bits, asked for {count} bits ({expected} bytes)"
        return None
    n = len(response.registers)
    if n != count:
        return DECODE, f"reply carries {n} registers ({2 * n} bytes), asked for {count} ({2 * count} bytes)"
    return None
