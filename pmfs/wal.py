"""The write-ahead log: atomic, durable multi-structure metadata updates.

pmfs uses **redo** logging.  A transaction collects the new contents of
every metadata byte range it changes (in DRAM; nothing is stored in place
before commit).  At commit:

1. the changed cache lines are diffed against the image and written as one
   log record -- header, entries (image offset, length, bytes) -- whose
   xxh3 checksum covers the whole record; the record is flushed and
   **one fence** makes it durable.  The checksum is the commit record: a
   torn record does not verify and is ignored by recovery.
2. the entries are stored in place and flushed, and a second fence makes
   them durable before the call returns (so no store of a finished
   operation is left unflushed or unfenced).

Why redo and not undo: an undo log needs a fence before every in-place
store (the old value must be durable first), i.e. one fence per logged
range; redo needs two fences per transaction however many ranges it
touches, and reads during the transaction never see half-done state.

The log area is circular.  Records never straddle its end (a SKIP record
pads to the end).  The header block holds two 64-byte slots with (seq,
tail position, tail txid); the newest valid slot says where recovery
starts.  Every commit moves the tail to its own record, in the same fence
epoch as the record: all earlier records are applied and fenced already,
and replaying one of them later could overwrite a block that has since
been freed and reused for file data (what jbd2 needs "revoke" records
for).  So recovery replays at most the last two records, and log space
needs no other reclamation.

Recovery replays, from the tail, every record whose txid is the next
expected one and whose checksum verifies, then fences and moves the tail.
Replay writes absolute bytes, so it is idempotent: a crash during recovery
is recovered by running it again.
"""

from __future__ import annotations

import errno
import logging

from .accel import ACCEL
from .layout import (BLOCK_SIZE, CACHELINE, WAL_REC, WAL_REC_SKIP, FormatError, WalHeader,
                     decode_wal_entries, encode_skip_record, encode_wal_header,
                     encode_wal_record,
                     verify_wal_record, wal_record_header)
from .pmem import Image

log = logging.getLogger(__name__)

_LINE_SHIFT = 6


class WalError(Exception):
    """The WAL header is unusable (fsck can reset it)."""


class TxTooLarge(OSError):
    """A transaction does not fit in the log."""

    def __init__(self, size: int, room: int):
        super().__init__(errno.ENOSPC, f"transaction of {size} bytes exceeds the log ({room})")


class Transaction:
    """An open transaction.  Use through `WAL.transaction()`."""

    __slots__ = ("wal", "lines", "objects", "queue", "on_commit", "on_abort",
                 "data_fence", "label", "meta")

    def __init__(self, wal: "WAL", label: str = ""):
        self.wal = wal
        self.lines: dict[int, bytearray] = {}
        self.objects: dict = {}
        self.queue: list = []
        self.on_commit: list = []
        self.on_abort: list = []
        self.data_fence = False
        self.label = label
        #: per-transaction state of the layers above (e.g. inode snapshots)
        self.meta: dict = {}

    # -- writes and reads ------------------------------------------------
    def write(self, off: int, data) -> None:
        """Set image bytes [off, off+len(data)) to `data` at commit."""
        n = len(data)
        if n == 0:
            return
        end = off + n
        wal = self.wal
        if off < 0 or end > wal.img.size:
            raise ValueError(f"tx write [{off}, {end}) outside the image")
        lines = self.lines
        ln = off >> _LINE_SHIFT
        if (end - 1) >> _LINE_SHIFT == ln:
            # the common case: a field, a record, a bitmap word in one line
            buf = lines.get(ln)
            if buf is None:
                base = ln << _LINE_SHIFT
                if n == CACHELINE:
                    lines[ln] = bytearray(data)
                    return
                buf = lines[ln] = bytearray(wal.img.read(base, CACHELINE))
            a = off & (CACHELINE - 1)
            buf[a:a + n] = data
            return
        if not (off | n) & (CACHELINE - 1) and type(data) is not memoryview:
            # whole lines (an inode, an extent node): no partial line to read
            i = 0
            for k in range(ln, ln + (n >> _LINE_SHIFT)):
                buf = lines.get(k)
                if buf is None:
                    lines[k] = bytearray(data[i:i + CACHELINE])
                else:
                    buf[:] = data[i:i + CACHELINE]
                i += CACHELINE
            return
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        read = wal.img.read
        p = 0
        last = (end - 1) >> _LINE_SHIFT
        while ln <= last:
            base = ln << _LINE_SHIFT
            a = off - base if off > base else 0
            b = end - base if end < base + CACHELINE else CACHELINE
            k = b - a
            buf = lines.get(ln)
            if buf is None:
                if k == CACHELINE:
                    lines[ln] = bytearray(mv[p:p + CACHELINE])
                    p += CACHELINE
                    ln += 1
                    continue
                buf = lines[ln] = bytearray(read(base, CACHELINE))
            buf[a:b] = mv[p:p + k]
            p += k
            ln += 1

    def read(self, off: int, n: int) -> bytes:
        """Image bytes as this transaction will leave them."""
        img = self.wal.img
        out = bytearray(img.read(off, n))
        if not self.lines:
            return bytes(out)
        end = off + n
        for ln in range(off >> _LINE_SHIFT, ((end - 1) >> _LINE_SHIFT) + 1):
            buf = self.lines.get(ln)
            if buf is None:
                continue
            base = ln << _LINE_SHIFT
            a = max(off, base)
            b = min(end, base + CACHELINE)
            out[a - off:b - off] = buf[a - base:b - base]
        return bytes(out)

    def add(self, key, obj) -> None:
        """Register an object whose `tx_flush(tx)` writes it at commit.

        An object registered again after it was flushed is flushed again.
        """
        if key not in self.objects:
            self.objects[key] = obj
            self.queue.append(key)

    def commit_hook(self, fn) -> None:
        self.on_commit.append(fn)

    def abort_hook(self, fn) -> None:
        self.on_abort.append(fn)

    # -- commit ----------------------------------------------------------
    def entries(self) -> list[tuple[int, bytes]]:
        """The changed cache lines, coalesced into runs: [(offset, bytes)]."""
        lines = self.lines
        if not lines:
            return []
        img = self.wal.img
        mv = img.buf  # direct slices where the image is one mapping (not an overlay)
        if mv is not None and _diff_lines is not None:
            return _diff_lines(lines, mv)
        read = img.read
        out = []
        run_start = -1
        run: list = []
        prev = -2
        for ln in sorted(lines):
            buf = lines[ln]
            base = ln << _LINE_SHIFT
            if buf == (mv[base:base + CACHELINE] if mv is not None else
                       read(base, CACHELINE)):
                continue
            if ln == prev + 1:
                run.append(buf)
            else:
                if run:
                    out.append((run_start, run[0] if len(run) == 1 else b"".join(run)))
                run_start = base
                run = [buf]
            prev = ln
        if run:
            out.append((run_start, run[0] if len(run) == 1 else b"".join(run)))
        return out


_diff_lines = ACCEL.diff_lines if ACCEL is not None else None


class _MappedTransaction(Transaction):
    """A transaction of an image mapped as one buffer, with pmfs._accel:
    `write` is the C loop (same result as Transaction.write)."""

    __slots__ = ("_buf",)

    def __init__(self, wal: "WAL", label: str = ""):
        super().__init__(wal, label)
        self._buf = wal.img.buf

    def write(self, off: int, data, _w=ACCEL.tx_write if ACCEL is not None else None) -> None:
        _w(self.lines, self._buf, off, data)


class _TxContext:
    __slots__ = ("wal", "tx", "label")

    def __init__(self, wal, label):
        self.wal = wal
        self.label = label
        self.tx = None

    def __enter__(self) -> Transaction:
        self.tx = self.wal.begin(self.label)
        return self.tx

    def __exit__(self, et, ev, tb):
        if et is None:
            self.wal.commit(self.tx)
        else:
            self.wal.abort(self.tx)
        return False


class WAL:
    """The log of one image."""

    def __init__(self, img: Image, wal_start: int, wal_blocks: int, fsseed: int):
        self.img = img
        self.fsseed = fsseed
        self.hdr_off = wal_start * BLOCK_SIZE
        self.area_off = (wal_start + 1) * BLOCK_SIZE
        self.area_size = (wal_blocks - 1) * BLOCK_SIZE
        self.hdr_seq = 0
        self.hdr_slot = 1
        self.tail_pos = 0
        self.tail_txid = 1
        self.head_pos = 0
        self.next_txid = 1
        self.active: Transaction | None = None
        self.loaded = False
        # statistics
        self.commits = 0
        self.bytes_logged = 0
        self.checkpoints = 0
        #: test hook: called with (stage, tx) at "logged" and "applied"
        self.debug_hook = None

    # -- format and header ---------------------------------------------
    @staticmethod
    def format(img: Image, wal_start: int, fsseed: int) -> None:
        """Write an empty log header (slot 0 valid, slot 1 zeroed)."""
        off = wal_start * BLOCK_SIZE
        img.write(off, WalHeader(1, 0, 1).encode(fsseed, 0))
        img.write(off + CACHELINE, bytes(CACHELINE))
        img.persist(off, 2 * CACHELINE)

    def _read_header(self) -> tuple[WalHeader, int]:
        best = None
        errs = []
        for slot in (0, 1):
            try:
                h = WalHeader.decode(self.img.read(self.hdr_off + slot * CACHELINE, CACHELINE),
                                     self.fsseed, slot)
            except FormatError as e:
                errs.append(str(e))
                continue
            if best is None or h.seq > best[0].seq:
                best = (h, slot)
        if best is None:
            raise WalError("WAL header damaged (" + "; ".join(errs) + ")")
        return best

    def _next_header(self, tail_pos: int, tail_txid: int) -> tuple[int, bytes]:
        """(offset, bytes) of the older header slot naming this tail; the
        caller stores and flushes them (no fence)."""
        slot = 1 - self.hdr_slot
        seq = self.hdr_seq + 1
        off = self.hdr_off + slot * CACHELINE
        self.hdr_slot, self.hdr_seq = slot, seq
        self.tail_pos, self.tail_txid = tail_pos, tail_txid
        return off, encode_wal_header(self.fsseed, slot, seq, tail_pos, tail_txid)

    def _stage_header(self, tail_pos: int, tail_txid: int) -> None:
        """Store and flush the older header slot (no fence)."""
        off, hdr = self._next_header(tail_pos, tail_txid)
        self.img.write(off, hdr)
        self.img.flush(off, CACHELINE)

    def _write_header(self, tail_pos: int, tail_txid: int) -> None:
        self._stage_header(tail_pos, tail_txid)
        self.img.fence()

    def reset(self) -> None:
        """Discard the log (fsck, after it has replayed what it could).

        The log area is zeroed too: with the txids starting again at 1, an
        old record of the first lap must not look like the next one."""
        self.img.zero(self.area_off, self.area_size)
        WAL.format(self.img, self.hdr_off // BLOCK_SIZE, self.fsseed)
        self.hdr_seq, self.hdr_slot = 1, 0
        self.tail_pos = self.head_pos = 0
        self.tail_txid = self.next_txid = 1
        self.loaded = True

    # -- recovery ----------------------------------------------------------
    def scan(self):
        """Yield (pos, txid, kind, raw record) of the records recovery would replay."""
        h, _slot = self._read_header()
        pos, txid = h.tail_pos, h.tail_txid
        area = self.area_size
        for _ in range(area // CACHELINE + 1):
            phys = pos % area
            if phys + WAL_REC.size > area:
                break
            hdr = wal_record_header(self.img.read(self.area_off + phys, WAL_REC.size))
            if hdr is None:
                break
            kind, rtxid, length, nent, csum = hdr
            if (rtxid != txid or length < CACHELINE or length % CACHELINE
                    or phys + length > area):
                break
            # a SKIP record's checksum covers its header line only
            raw = bytes(self.img.read(self.area_off + phys,
                                      CACHELINE if kind == WAL_REC_SKIP else length))
            if not verify_wal_record(self.fsseed, raw, txid, csum):
                break
            yield pos, txid, kind, raw, length
            pos += length
            txid += 1

    def recover(self) -> int:
        """Replay committed records; returns how many transactions were redone.

        Safe to run on a read-only image only when it finds nothing to do
        (callers check `pending()` first).
        """
        h, slot = self._read_header()
        self.hdr_seq, self.hdr_slot = h.seq, slot
        self.tail_pos, self.tail_txid = h.tail_pos, h.tail_txid
        pos, txid = h.tail_pos, h.tail_txid
        replayed = 0
        img = self.img
        for rpos, rtxid, kind, raw, length in self.scan():
            if kind != WAL_REC_SKIP:
                _k, _t, _l, nent, _c = wal_record_header(raw)
                img.mark("recover-tx", txid=rtxid)
                for off, data in decode_wal_entries(raw, nent, length):
                    if off < 0 or off + len(data) > img.size:
                        raise FormatError(f"WAL record {rtxid} writes outside the image")
                    img.write(off, data)
                    img.flush(off, len(data))
                replayed += 1
            pos, txid = rpos + length, rtxid + 1
        if (replayed or pos != h.tail_pos) and not img.readonly:
            img.fence()
            self._write_header(pos, txid)
        self.head_pos, self.next_txid = pos, txid
        self.loaded = True
        return replayed

    def pending(self) -> int:
        """How many committed transactions recovery would replay."""
        return sum(1 for _p, _t, kind, _r, _l in self.scan() if kind != WAL_REC_SKIP)

    # -- transactions ------------------------------------------------------
    def transaction(self, label: str = "") -> _TxContext:
        """``with wal.transaction() as tx:`` -- committed on normal exit."""
        return _TxContext(self, label)

    def _tx_class(self, label: str) -> Transaction:
        img = self.img
        if ACCEL is not None and img.direct_buf:
            buf = img.buf
            if buf is not None and len(buf) == img.size:
                return _MappedTransaction(self, label)
        return Transaction(self, label)

    def begin(self, label: str = "") -> Transaction:
        if not self.loaded:
            raise RuntimeError("WAL used before recovery")
        if self.active is not None:
            raise RuntimeError("nested transaction")
        if self.img.readonly:
            raise OSError(errno.EROFS, "read-only file system")
        tx = self._tx_class(label)
        self.active = tx
        return tx

    def abort(self, tx: Transaction) -> None:
        self.active = None
        for fn in reversed(tx.on_abort):
            try:
                fn()
            except Exception:
                log.exception("abort hook failed")

    def commit(self, tx: Transaction) -> None:
        try:
            objects, queue = tx.objects, tx.queue
            while queue:
                key = queue.pop(0)
                obj = objects.pop(key)
                obj.tx_flush(tx)
            entries = tx.entries()
            if entries:
                self._log_and_apply(tx, entries)
        except BaseException:
            self.abort(tx)
            raise
        self.active = None
        for fn in tx.on_commit:
            fn()

    def _log_and_apply(self, tx: Transaction, entries) -> None:
        img = self.img
        txid = self.next_txid
        rec = encode_wal_record(self.fsseed, txid, entries)
        length = len(rec)
        area = self.area_size
        if length > area // 2:
            raise TxTooLarge(length, area // 2)
        if tx.data_fence:
            img.fence()  # data before the metadata that exposes it
        traced = img.traced
        if traced:
            img.mark("tx-begin", txid=txid, op=tx.label)
        start_pos, start_txid = self.head_pos, txid
        phys = self.head_pos % area
        if phys + length > area:
            skip = area - phys
            img.write(self.area_off + phys, encode_skip_record(self.fsseed, txid, skip))
            img.flush(self.area_off + phys, CACHELINE)
            self.head_pos += skip
            txid += 1
            rec = encode_wal_record(self.fsseed, txid, entries)
            phys = 0
        # The record is stored and flushed, then the header.  The tail
        # moves to this transaction in the same fence epoch: every
        # earlier record is applied and fenced, and must never be replayed
        # again -- a block it wrote may since have been freed and reused for
        # file data (the "revoke" problem of jbd2).  If this header store is
        # lost, the previous header names the previous record, which is
        # still safe to replay (nothing it wrote can have been freed since).
        img.store_all(((self.area_off + phys, rec), self._next_header(start_pos, start_txid)))
        img.fence()
        if traced:
            img.mark("tx-logged", txid=txid, op=tx.label)
        if self.debug_hook:
            self.debug_hook("logged", tx)
        img.store_all(entries)
        img.fence()
        if traced:
            img.mark("tx-applied", txid=txid, op=tx.label)
        if self.debug_hook:
            self.debug_hook("applied", tx)
        self.head_pos += length
        self.next_txid = txid + 1
        self.commits += 1
        self.bytes_logged += length

    def checkpoint(self) -> None:
        """Move the tail past the last record: the log is empty afterwards
        (at unmount, so that the next mount replays nothing)."""
        if self.img.readonly:
            return
        if self.head_pos != self.tail_pos or self.next_txid != self.tail_txid:
            self.img.fence()
            self._write_header(self.head_pos, self.next_txid)
            self.checkpoints += 1

    @property
    def used(self) -> int:
        return self.head_pos - self.tail_pos
