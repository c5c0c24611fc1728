"""The store-and-forward log: every batch of readings is on local disk before it is sent to ingest.

Layout, under the collector's state folder::

    spool/00000000000000000001.seg   segments, named after their first sequence
    spool/state.json                 {"acked": A, "high_water": H, "dropped": D, "rejected_readings": R,
                                      "rejected_batches": B, "disk_error_readings": E, "epoch": P,
                                      "wire_epoch": W, "wire_shift": S, "suspicious_duplicates": U}

A segment is a run of records, one per ReadingBatch (which carries its own sequence)::

    u32 payload length | u32 CRC-32 | u64 sequence | u32 readings | i64 oldest read time (ns) | payload

little endian; the CRC covers the 24 bytes after it and the payload. The extra header fields let a
restart rebuild the index (and the backlog metrics) without parsing a single protobuf.

Durability. An append is one write() of the whole record to a file opened with O_APPEND, before the batch
is handed to the uplink: once write() returns the record is in the kernel's page cache and survives the
process being killed (SIGKILL, OOM, a crash). Against power loss a background task runs fdatasync in a
worker thread as a group commit: as soon as there is something unsynced, one fdatasync covers every record
appended so far, while appends go on; under load they coalesce by themselves, when idle each batch gets its
own. The uplink only sends records that are durable (`durable_sequence`): otherwise a power loss could
forget sequence numbers that ingest has already stored, and the collector would reuse them for new
readings, which ingest would then acknowledge as duplicates without storing them. Measured on the
development VM: write() of a 20 kB record takes about 0.01 ms, write() + fdatasync about 0.2 ms, so a
synchronous fsync per batch would also have been affordable there; on SD cards and cheap SSDs of edge
boxes an fsync takes 10 to 50 ms, which is why it is off the event loop.

The state file is written atomically (temporary file, fsync, rename, fsync of the folder) at most every
STATE_INTERVAL seconds, and always before segments are deleted: only segments whose last sequence is at or
below the persisted acknowledged sequence are deleted, so the persisted high-water mark covers every
sequence ever used and sequences keep increasing across restarts even when everything was acknowledged.
Losing the latest acknowledgements (a crash between two state writes) only means resending batches that
ingest acknowledges as duplicates.

On start the segments are scanned; a record that is cut short or fails its CRC at the end of a segment
(a torn write) is cut off with a warning; records after it are gone (their length cannot be trusted).
New records always go to a new segment.

Bounded by size: when the segments exceed `max_bytes`, the oldest segment is deleted, acknowledged or not
(policy: drop oldest; the newest data is the most useful to a plant), and its unacknowledged readings are
counted (`dropped[DROP_REASON_SPOOL_FULL]`) and logged with their sequences and read times. The unit of
dropping is a segment (max_bytes / 16, at most 8 MiB).

Every way a reading leaves the log without being acknowledged is counted by reason in `dropped` (the
reasons of the contract's `DropReason`) and kept in the state file, so the counts cover the life of the log:
the size limit (above), a batch ingest rejects for good (`reject`, called by the uplink), and an append the
disk refused (the readings never got in). A torn record cut off on start (the process or the machine died
during its write()) was never durable, so never sent nor acknowledged; its count cannot be trusted, and
it is logged, not counted.

Wire numbering. Ingest stores a batch only when its sequence is exactly one above the collector's committed
one, but the log's own sequences have holes where batches left it unsent (the size limit, a rejection). So
the uplink sends record `s` as sequence ``s - wire_shift``, and changes `wire_shift` (to close a hole) only
in a new epoch of the collector, which fences every stream of the old numbering in ingest
(collector/uplink.py). `epoch` is the collector's epoch (0: none yet; ingest gives one), `wire_epoch` the
epoch in which the current `wire_shift` was decided (batches are sent under it only once that is persisted:
:meth:`Spool.save_state`). A new log (its state lost) has no epoch, so it gets a new one: its old incarnation
is fenced.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import os
import struct
import time
import zlib
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fabrica.collector.v1.collector_service_pb2 import (
    DROP_REASON_DISK_ERROR,
    DROP_REASON_REJECTED_BY_INGEST,
    DROP_REASON_SPOOL_FULL,
)
from fabrica.common.v1 import reading_pb2

from .files import atomic_write, fsync_dir

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IIQIq")
#: Largest payload accepted when scanning: a batch holds at most 10,000 readings of at most ~1.2 kB.
MAX_PAYLOAD = 64 * 1024 * 1024
STATE_FILE = "state.json"
SEGMENT_SUFFIX = ".seg"
#: Seconds between two writes of the state file (acknowledged sequence, high-water mark).
STATE_INTERVAL = 0.5
#: Recently appended payloads kept in memory so that the uplink rarely reads them back from disk.
CACHE_BYTES = 16 * 1024 * 1024
#: Each DropReason the log counts, and its key in the state file ("dropped" is the name from before reasons).
DROP_STATE_KEYS: dict[int, str] = {
    DROP_REASON_SPOOL_FULL: "dropped",
    DROP_REASON_REJECTED_BY_INGEST: "rejected_readings",
    DROP_REASON_DISK_ERROR: "disk_error_readings",
}
_STATE_KEYS = ("acked", "high_water", "rejected_batches", *DROP_STATE_KEYS.values(), "epoch", "wire_epoch",
               "wire_shift", "new_log", "suspicious_duplicates")


def _crc(header_tail: bytes, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(header_tail))


def format_ns(ns: int) -> str:
    """A read time (ns since the epoch) for a log line: ISO 8601 in UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9 // 1000:06d}Z"


def encode_record(sequence: int, payload: bytes, readings: int, oldest_ns: int) -> bytes:
    tail = struct.pack("<QIq", sequence, readings, oldest_ns)
    return struct.pack("<II", len(payload), _crc(tail, payload)) + tail + payload


@dataclass
class _Segment:
    path: Path
    first_seq: int
    seqs: array = field(default_factory=lambda: array("Q"))
    offsets: array = field(default_factory=lambda: array("Q"))
    lengths: array = field(default_factory=lambda: array("I"))
    counts: array = field(default_factory=lambda: array("I"))
    oldest: array = field(default_factory=lambda: array("q"))
    size: int = 0

    @property
    def last_seq(self) -> int:
        return self.seqs[-1] if self.seqs else self.first_seq - 1

    def add(self, seq: int, offset: int, length: int, count: int, oldest_ns: int) -> None:
        self.seqs.append(seq)
        self.offsets.append(offset)
        self.lengths.append(length)
        self.counts.append(count)
        self.oldest.append(oldest_ns)

    def readings_after(self, seq: int) -> int:
        return sum(self.counts[bisect.bisect_right(self.seqs, seq):])


@dataclass(frozen=True)
class ScanReport:
    segments: int
    records: int
    torn_bytes: int


class Spool:
    """An append-only, size-bounded log of numbered ReadingBatch records. Use from one event loop."""

    def __init__(self, directory: Path, max_bytes: int, *, segment_bytes: int | None = None):
        if max_bytes < 4096:
            raise ValueError("max_bytes must be at least 4096")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(1024, min(8 * 1024 * 1024, max_bytes // 16))
        self.acked = 0
        self.high_water = 0
        #: Called when an acknowledgement covers every batch appended (nothing in flight: collector/batcher.py).
        self.on_drained: Callable[[], None] | None = None
        #: Readings that left the log without being acknowledged, by DropReason (since the log was created).
        self.dropped: dict[int, int] = dict.fromkeys(DROP_STATE_KEYS, 0)
        #: Batches ingest rejected for good (see `reject`).
        self.rejected_batches = 0
        #: The collector's epoch in ingest (0: none yet), the epoch in which `wire_shift` was decided, and the
        #: shift itself: record `s` goes on the wire as sequence ``s - wire_shift`` (see the module's docstring).
        self.epoch = 0
        self.wire_epoch = 0
        self.wire_shift = 0
        #: 1 for a log created empty (no state, no segments) until its first numbering is decided: nothing ingest
        #: has committed for this collector can be one of its batches (an earlier incarnation's, if any).
        self.new_log = 0
        #: Batches ingest acknowledged as duplicates the first time they were sent (counted by the uplink).
        self.suspicious_duplicates = 0
        self._state_lock = asyncio.Lock()
        self._durable = 0
        self._segments: list[_Segment] = []
        self._active: _Segment | None = None
        self._fd: int | None = None
        self._retired_fds: list[int] = []
        self._dir_dirty = False
        self._unacked_readings = 0
        self._disk_bytes = 0
        self._cache: dict[int, bytes] = {}
        self._cache_bytes = 0
        self._persisted: dict[str, int] = {}
        self._state_time = 0.0
        self._wake = asyncio.Event()
        self._durable_changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._opened = False

    # ------------------------------------------------------------------------------------------ status

    @property
    def durable_sequence(self) -> int:
        """Every record up to this sequence is on stable storage."""
        return self._durable

    @property
    def backlog_readings(self) -> int:
        """Readings appended and not acknowledged (not counting dropped ones)."""
        return self._unacked_readings

    @property
    def disk_bytes(self) -> int:
        """Bytes of the segments on disk."""
        return self._disk_bytes

    @property
    def dropped_readings(self) -> int:
        """Readings dropped for any reason (the sum of `dropped`)."""
        return sum(self.dropped.values())

    def _first_after(self, sequence: int) -> tuple[_Segment, int] | None:
        for seg in self._segments:
            i = bisect.bisect_right(seg.seqs, sequence)
            if i < len(seg.seqs):
                return seg, i
        return None

    def oldest_unacked_ns(self) -> int | None:
        """Read time (ns since the epoch) of the oldest unacknowledged reading, or None."""
        found = self._first_after(self.acked)
        return found[0].oldest[found[1]] if found else None

    def first_after(self, sequence: int) -> int | None:
        """The sequence of the first record in the log above `sequence`, durable or not, or None."""
        found = self._first_after(sequence)
        return found[0].seqs[found[1]] if found else None

    def next_sequence(self) -> int:
        return self.high_water + 1

    # ------------------------------------------------------------------------------------------ opening

    def open(self) -> ScanReport:
        """Create the folder or scan what is in it. Call once, before anything else."""
        self.directory.mkdir(parents=True, exist_ok=True)
        state = self._read_state()
        self.acked = state.get("acked", 0)
        self.high_water = state.get("high_water", 0)
        self.rejected_batches = state.get("rejected_batches", 0)
        self.epoch = state.get("epoch", 0)
        self.wire_epoch = state.get("wire_epoch", 0)
        self.wire_shift = state.get("wire_shift", 0)
        self.new_log = state.get("new_log", 0)
        self.suspicious_duplicates = state.get("suspicious_duplicates", 0)
        self.dropped = {reason: state.get(key, 0) for reason, key in DROP_STATE_KEYS.items()}
        paths = sorted(p for p in self.directory.iterdir() if p.suffix == SEGMENT_SUFFIX and p.stem.isdigit())
        records = torn = 0
        last_seq = 0
        for i, path in enumerate(paths):
            seg, cut = self._scan(path, int(path.stem), last_seq, last=i == len(paths) - 1)
            torn += cut
            if not seg.seqs:
                path.unlink()
                continue
            records += len(seg.seqs)
            last_seq = seg.last_seq
            self._segments.append(seg)
            self._disk_bytes += seg.size
        if not state and not self._segments:
            self.new_log = 1
        self.high_water = max(self.high_water, last_seq, self.acked)
        self.acked = min(self.acked, self.high_water)
        self._unacked_readings = sum(seg.readings_after(self.acked) for seg in self._segments)
        self._durable = self.high_water  # what survived a restart was read back from disk
        self._persisted = self._state()
        self._opened = True
        self._delete_acked_segments()
        report = ScanReport(len(self._segments), records, torn)
        log.info(
            "spool opened",
            extra={"directory": str(self.directory), "segments": report.segments, "records": report.records,
                   "torn_bytes": report.torn_bytes, "acked": self.acked, "high_water": self.high_water,
                   "backlog_readings": self._unacked_readings, "dropped_readings": self.dropped_readings},
        )
        return report

    def _read_state(self) -> dict[str, int]:
        path = self.directory / STATE_FILE
        try:
            raw = json.loads(path.read_text())
            return {k: int(raw.get(k, 0)) for k in _STATE_KEYS}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, AttributeError) as exc:
            # Written atomically, so this is outside damage. The segments still bound the high-water mark.
            log.error("spool state file %s is unreadable (%s); starting from the segments", path, exc)
            return {}

    def _scan(self, path: Path, first_seq: int, previous: int, *, last: bool) -> tuple[_Segment, int]:
        data = path.read_bytes()
        seg = _Segment(path, first_seq)
        pos = 0
        problem = ""
        while pos < len(data):
            if len(data) - pos < HEADER.size:
                problem = "record header cut short"
                break
            length, crc, seq, count, oldest = HEADER.unpack_from(data, pos)
            end = pos + HEADER.size + length
            if length > MAX_PAYLOAD or end > len(data):
                problem = "record cut short"
                break
            if _crc(data[pos + 8: pos + HEADER.size], data[pos + HEADER.size: end]) != crc:
                problem = "CRC mismatch"
                break
            if seq <= max(previous, seg.last_seq):
                problem = f"sequence {seq} does not increase"
                break
            seg.add(seq, pos, end - pos, count, oldest)
            pos = end
        seg.size = pos
        cut = len(data) - pos
        if cut:
            level = logging.WARNING if last else logging.ERROR
            log.log(level, "spool segment %s: %s at byte %d; cutting off the last %d bytes%s", path.name, problem, pos,
                    cut, "" if last else " (not the newest segment: outside damage)")
        # Synced even when intact: after a SIGKILL the records may still be in the page cache only, and they
        # count as durable from now on (they may be sent right away).
        with open(path, "r+b") as f:
            if cut:
                f.truncate(pos)
            os.fsync(f.fileno())
        return seg, cut

    # ------------------------------------------------------------------------------------------ append

    def append(self, sequence: int, payload: bytes, readings: int, oldest_ns: int) -> None:
        """Write one record. Raises OSError when the disk refuses (the record is then not in the log)."""
        assert self._opened, "open() first"
        if sequence <= self.high_water:
            raise ValueError(f"sequence {sequence} is not above the high-water mark {self.high_water}")
        if self._active is None or self._active.size >= self.segment_bytes:
            self._roll()
            self._start_segment(sequence)
        seg, fd = self._active, self._fd
        assert seg is not None and fd is not None
        record = encode_record(sequence, payload, readings, oldest_ns)
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            # Leave no partial record behind: later records would be unreadable after a restart.
            try:
                os.ftruncate(fd, seg.size)
            except OSError:
                self._roll()
            self.dropped[DROP_REASON_DISK_ERROR] += readings  # the caller logs it: it knows the readings
            raise
        seg.add(sequence, seg.size, len(record), readings, oldest_ns)
        seg.size += len(record)
        self._disk_bytes += len(record)
        self.high_water = sequence
        self._unacked_readings += readings
        self._cache[sequence] = payload
        self._cache_bytes += len(payload)
        while self._cache_bytes > CACHE_BYTES and self._cache:
            old = next(iter(self._cache))
            self._cache_bytes -= len(self._cache.pop(old))
        self._wake.set()
        self._enforce_limit()

    def _start_segment(self, first_seq: int) -> None:
        path = self.directory / f"{first_seq:020d}{SEGMENT_SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._active = _Segment(path, first_seq)
        self._segments.append(self._active)
        self._dir_dirty = True

    def _roll(self) -> None:
        """Stop appending to the active segment; its descriptor is synced and closed by the flusher."""
        if self._fd is not None:
            self._retired_fds.append(self._fd)
            self._wake.set()
        self._fd = None
        self._active = None

    def _enforce_limit(self) -> None:
        while self._disk_bytes > self.max_bytes and self._segments:
            if len(self._segments) == 1:
                # One segment alone over the limit (a tiny limit): stop appending to it; dropped next time.
                if self._active is self._segments[0]:
                    self._roll()
                    return
            seg = self._segments[0]
            if seg is self._active:
                self._roll()
            lost = seg.readings_after(self.acked)
            self._remove(seg)
            if lost:
                self._drop_logged(seg, lost)

    def _drop_logged(self, seg: _Segment, lost: int) -> None:
        """Count and log the unacknowledged readings of `seg`, deleted for the size limit."""
        self.dropped[DROP_REASON_SPOOL_FULL] += lost
        self._unacked_readings -= lost
        i = bisect.bisect_right(seg.seqs, self.acked)
        first, last = seg.seqs[i], seg.last_seq
        since = seg.oldest[i]
        # Readings are appended in read order: the next record kept starts where the dropped ones end.
        after = next((s.oldest[0] for s in self._segments if s.seqs), None)
        log.warning(
            "spool over its limit of %d bytes: dropped the oldest segment, %d unacknowledged readings (batches %d "
            "to %d, read from %s %s); %d dropped for the size limit since the log was created",
            self.max_bytes, lost, first, last, format_ns(since),
            f"to before {format_ns(after)}" if after is not None else "on",
            self.dropped[DROP_REASON_SPOOL_FULL],
            extra={"reason": "DROP_REASON_SPOOL_FULL", "dropped_readings": lost, "first_sequence": first,
                   "last_sequence": last, "first_read_time_ns": since},
        )

    def _remove(self, seg: _Segment) -> None:
        self._segments.remove(seg)
        self._disk_bytes -= seg.size
        for seq in seg.seqs:
            payload = self._cache.pop(seq, None)
            if payload is not None:
                self._cache_bytes -= len(payload)
        with contextlib.suppress(FileNotFoundError):
            seg.path.unlink()
        self._dir_dirty = True

    # -------------------------------------------------------------------------------------------- read

    def read_after(self, after: int, max_records: int = 64, max_bytes: int = 8 * 1024 * 1024, *,
                   durable_only: bool = True) -> list[tuple[int, bytes]]:
        """Durable records with a sequence above `after`, in order (skipping dropped ones)."""
        return [(seq, payload) for seq, payload, _ in self.read_records_after(after, max_records, max_bytes,
                                                                               durable_only=durable_only)]

    def read_records_after(self, after: int, max_records: int = 64, max_bytes: int = 8 * 1024 * 1024, *,
                           durable_only: bool = True) -> list[tuple[int, bytes, int]]:
        """Like :meth:`read_after`, with each record's number of readings (from the index): (sequence,
        payload, readings)."""
        limit = self._durable if durable_only else self.high_water
        out: list[tuple[int, bytes, int]] = []
        size = 0
        for seg in list(self._segments):
            if seg.last_seq <= after:
                continue
            i = bisect.bisect_right(seg.seqs, after)
            fd = None
            try:
                while i < len(seg.seqs) and len(out) < max_records and size < max_bytes:
                    seq = seg.seqs[i]
                    if seq > limit:
                        return out
                    payload = self._cache.get(seq)
                    if payload is None:
                        if fd is None:
                            fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
                        record = os.pread(fd, seg.lengths[i], seg.offsets[i])
                        payload = record[HEADER.size:]
                    out.append((seq, payload, seg.counts[i]))
                    size += len(payload)
                    i += 1
            except FileNotFoundError:
                continue  # dropped meanwhile
            finally:
                if fd is not None:
                    os.close(fd)
            if len(out) >= max_records or size >= max_bytes:
                break
        return out

    async def wait_durable_beyond(self, sequence: int) -> None:
        """Wait until a record above `sequence` is durable."""
        while self._durable <= sequence:
            changed = self._durable_changed
            await changed.wait()

    # --------------------------------------------------------------------------------------------- ack

    def ack(self, sequence: int) -> None:
        """Ingest has stored every batch up to `sequence`."""
        if sequence <= self.acked:
            return
        sequence = min(sequence, self.high_water)
        for seg in self._segments:
            if seg.last_seq <= self.acked:
                continue
            lo = bisect.bisect_right(seg.seqs, self.acked)
            hi = bisect.bisect_right(seg.seqs, sequence)
            self._unacked_readings -= sum(seg.counts[lo:hi])
            for seq in seg.seqs[lo:hi]:
                payload = self._cache.pop(seq, None)
                if payload is not None:
                    self._cache_bytes -= len(payload)
            if hi < len(seg.seqs):
                break
        self.acked = sequence
        self._wake.set()
        if sequence >= self.high_water and self.on_drained is not None:
            self.on_drained()

    def reject(self, sequence: int) -> tuple[bytes | None, int]:
        """Ingest will never take batch `sequence`, the first unacknowledged one: acknowledge it, and count it
        as rejected and its readings as dropped (DROP_REASON_REJECTED_BY_INGEST). Returns its payload (None
        if the size limit dropped it meanwhile) and its number of readings (0 then)."""
        if sequence <= self.acked:
            return None, 0  # settled already
        records = self.read_after(sequence - 1, max_records=1, durable_only=False)
        payload = records[0][1] if records and records[0][0] == sequence else None
        before = self._unacked_readings
        self.ack(sequence)
        readings = before - self._unacked_readings if payload is not None else 0
        self.dropped[DROP_REASON_REJECTED_BY_INGEST] += readings
        self.rejected_batches += 1
        return payload, readings

    def renumber_above(self, committed: int) -> int:
        """Ingest has stored sequences up to `committed`, beyond anything this log has used: the local state
        was lost (a replaced disk, a deleted folder). Renumber the unacknowledged batches above `committed`,
        so that ingest stores them instead of taking them for duplicates. Returns how many were renumbered.
        """
        assert committed > self.high_water
        pending = self.read_after(self.acked, max_records=2**62, max_bytes=2**62, durable_only=False)
        self._roll()
        # Every old record is below `committed`: acknowledged from now on. Their segments are deleted once
        # the state (with this acked sequence) is persisted, after the renumbered copies are written: a
        # crash in between leaves copies with fresh numbers and originals that are already acknowledged.
        self.high_water = self.acked = committed
        self._unacked_readings = 0
        for _, payload in pending:
            batch = reading_pb2.ReadingBatch.FromString(payload)
            batch.sequence = self.high_water + 1
            oldest = min((r.read_time.ToNanoseconds() for r in batch.readings), default=0)
            self.append(batch.sequence, batch.SerializeToString(), len(batch.readings), oldest)
        self._wake.set()
        log.warning("ingest has stored sequences up to %d, beyond this log's high-water mark: renumbered %d "
                    "unacknowledged batches above it", committed, len(pending))
        return len(pending)

    # ------------------------------------------------------------------------------------ housekeeping

    async def start(self) -> None:
        """Start the background group commit and state writer."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="spool-flusher")

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATE_INTERVAL):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush_async()
                await self._maybe_write_state()
            except Exception:  # keep the flusher alive whatever happens; the next round retries
                log.exception("spool housekeeping failed")

    async def _flush_async(self) -> None:
        target = self.high_water
        retired, self._retired_fds = self._retired_fds, []
        fd = self._fd
        dir_dirty, self._dir_dirty = self._dir_dirty, False
        if target > self._durable or retired or dir_dirty:
            await asyncio.to_thread(self._sync_files, fd if target > self._durable else None, retired, dir_dirty)
        self._set_durable(target)

    def _sync_files(self, fd: int | None, retired: Iterable[int], dir_dirty: bool) -> None:
        try:
            for old in retired:
                try:
                    os.fdatasync(old)
                finally:
                    os.close(old)
            if fd is not None:
                os.fdatasync(fd)
            if dir_dirty:
                fsync_dir(self.directory)
        except OSError as exc:
            # Nothing better to do: Linux may already have dropped the dirty pages, and retrying an fsync
            # reports success. Keep sending; a power loss now can lose these records.
            log.error("spool fsync failed: %s", exc)

    def _set_durable(self, target: int) -> None:
        if target > self._durable:
            self._durable = target
            changed, self._durable_changed = self._durable_changed, asyncio.Event()
            changed.set()

    def _state(self) -> dict[str, int]:
        state = {"acked": self.acked, "high_water": self.high_water, "rejected_batches": self.rejected_batches}
        state.update((key, self.dropped[reason]) for reason, key in DROP_STATE_KEYS.items())
        state.update(epoch=self.epoch, wire_epoch=self.wire_epoch, wire_shift=self.wire_shift, new_log=self.new_log,
                     suspicious_duplicates=self.suspicious_duplicates)
        return state

    def _write_state_file(self, data: bytes) -> None:
        atomic_write(self.directory / STATE_FILE, data)

    async def _maybe_write_state(self) -> None:
        if self._state() == self._persisted or time.monotonic() - self._state_time < STATE_INTERVAL:
            return
        try:
            await self.save_state()
        except OSError as exc:
            log.error("cannot write the spool state: %s", exc)

    async def save_state(self) -> None:
        """Persist the state now (atomically, synced), e.g. a new epoch or wire numbering before anything is
        sent under it. Raises OSError when the disk refuses. Writes are serialized, each of the state as it is
        when its turn comes, so an older state never lands after a newer one."""
        async with self._state_lock:
            current = self._state()
            await asyncio.to_thread(self._write_state_file, json.dumps(current).encode())
            self._state_time = time.monotonic()
            self._persisted = current
            self._delete_acked_segments()

    def _delete_acked_segments(self) -> None:
        """Delete segments acknowledged as of the persisted state (whose high-water mark covers them)."""
        acked = self._persisted["acked"]
        for seg in list(self._segments):
            if seg.last_seq > acked:
                break
            if seg is self._active:
                self._roll()
            self._remove(seg)

    def sync(self) -> None:
        """Make everything durable and persist the state now (blocking, on the loop's thread: for tests and
        tools; a running collector leaves this to its background task and to close())."""
        retired, self._retired_fds = self._retired_fds, []
        self._sync_files(self._fd, retired, True)
        self._set_durable(self.high_water)
        state = self._state()
        self._write_state_file(json.dumps(state).encode())
        self._persisted = state
        self._state_time = time.monotonic()
        self._delete_acked_segments()

    async def close(self) -> None:
        if self._task is not None:
            # Not cancelled: a cancelled round would leave its worker thread syncing descriptors that
            # the final sync below closes.
            self._closing = True
            self._wake.set()
            await self._task
            self._task = None
        if self._opened:
            self._roll()
            retired, self._retired_fds = self._retired_fds, []
            # The blocking parts in a thread, the bookkeeping (and the event waiters) on the loop.
            await asyncio.to_thread(self._sync_files, None, retired, True)
            self._set_durable(self.high_water)
            await self.save_state()
            self._opened = False
