"""Block and inode allocation: persistent bitmaps with a DRAM copy.

Each bitmap is a run of bitmap blocks; a block holds 32256 bits (4032
bytes) and a trailer line with its checksum.  Bit i of a bitmap lives in
byte i // 8, bit i % 8 (LSB first) of the concatenated bit areas.  Bits
past the end of the bitmap are set (never allocatable).

The DRAM copy is the allocator's truth while mounted.  Every change is
made under a WAL transaction: allocations set bits at once (and are undone
if the transaction aborts); frees are deferred until the transaction's
commit so that a block freed and re-used in one transaction can never be
overwritten while the committed state still points at it.  At commit the
changed bytes of each touched bitmap block and its re-computed trailer go
into the transaction.
"""

from __future__ import annotations

import errno
import re

from .layout import (BITMAP_BYTES, BITS_PER_BITMAP_BLOCK, BLOCK_SIZE, encode_bitmap_trailer,
                     verify_bitmap_block)
from .pmem import Image

_NOT_FULL = re.compile(rb"[^\xff]")
_ZERO_RUN = re.compile(rb"\x00*")
_LOWEST_ZERO = bytes(next(b for b in range(8) if not (v >> b) & 1) if v != 0xFF else 8
                     for v in range(256))
_POPCOUNT = bytes(bin(v).count("1") for v in range(256))


class NoSpace(OSError):
    def __init__(self, what: str = "no space left on device"):
        super().__init__(errno.ENOSPC, what)


class Bitmap:
    """One persistent bitmap (the inode bitmap or the block bitmap)."""

    def __init__(self, img: Image, fsseed: int, start_block: int, nblocks: int, nbits: int,
                 name: str):
        self.img = img
        self.fsseed = fsseed
        self.start = start_block
        self.nblocks = nblocks
        self.nbits = nbits
        self.name = name
        self.bits = bytearray(nblocks * BITMAP_BYTES)
        self.free = 0
        # transaction state
        self._tx = None
        self._dirty: dict[int, list[int]] = {}  # bitmap block -> [lo, hi) byte range
        self._pending_free: list[tuple[int, int]] = []

    # -- media -------------------------------------------------------------
    def block_off(self, i: int) -> int:
        return (self.start + i) * BLOCK_SIZE

    def load(self) -> list[int]:
        """Read the bitmap; returns the indices of blocks that fail their checksum."""
        bad = []
        img = self.img
        for i in range(self.nblocks):
            raw = img.read(self.block_off(i), BLOCK_SIZE)
            if not verify_bitmap_block(self.fsseed, self.start + i, raw):
                bad.append(i)
            self.bits[i * BITMAP_BYTES:(i + 1) * BITMAP_BYTES] = raw[:BITMAP_BYTES]
        self._mask_tail()
        self.recount()
        return bad

    def _mask_tail(self) -> None:
        """Set the bits past nbits (they stand for nothing)."""
        n = self.nbits
        total = len(self.bits) * 8
        if n >= total:
            return
        byte = n >> 3
        if n & 7:
            self.bits[byte] |= (0xFF << (n & 7)) & 0xFF
            byte += 1
        self.bits[byte:] = b"\xff" * (len(self.bits) - byte)

    def recount(self) -> None:
        used = int.from_bytes(self.bits, "little").bit_count()
        self.free = len(self.bits) * 8 - used

    def encode_block(self, i: int) -> bytes:
        bits = self.bits[i * BITMAP_BYTES:(i + 1) * BITMAP_BYTES]
        return bytes(bits) + encode_bitmap_trailer(self.fsseed, self.start + i, bits)

    def write_all(self) -> None:
        """Write every bitmap block in place, persisted (mkfs and fsck only)."""
        for i in range(self.nblocks):
            self.img.write(self.block_off(i), self.encode_block(i))
        self.img.persist(self.block_off(0), self.nblocks * BLOCK_SIZE)

    # -- bit access --------------------------------------------------------
    def test(self, i: int) -> bool:
        return bool(self.bits[i >> 3] >> (i & 7) & 1)

    def _set_range(self, start: int, n: int, value: bool) -> int:
        """Set or clear bits [start, start+n); returns how many changed."""
        bits = self.bits
        changed = 0
        i = start
        end = start + n
        while i < end and i & 7:
            m = 1 << (i & 7)
            b = bits[i >> 3]
            if bool(b & m) != value:
                bits[i >> 3] = b ^ m
                changed += 1
            i += 1
        a, b_ = i >> 3, end >> 3
        if b_ > a:
            old = bytes(bits[a:b_])
            ones = sum(_POPCOUNT[x] for x in old) if len(old) < 64 else \
                int.from_bytes(old, "little").bit_count()
            changed += (len(old) * 8 - ones) if value else ones
            bits[a:b_] = (b"\xff" if value else b"\x00") * (b_ - a)
            i = b_ << 3
        while i < end:
            m = 1 << (i & 7)
            b = bits[i >> 3]
            if bool(b & m) != value:
                bits[i >> 3] = b ^ m
                changed += 1
            i += 1
        return changed

    def _touch(self, tx, start: int, n: int) -> None:
        """Remember that the bytes covering bits [start, start+n) changed."""
        lo_byte = start >> 3
        hi_byte = (start + n - 1 >> 3) + 1
        while lo_byte < hi_byte:
            blk = lo_byte // BITMAP_BYTES
            blk_end = (blk + 1) * BITMAP_BYTES
            a = lo_byte - blk * BITMAP_BYTES
            b = min(hi_byte, blk_end) - blk * BITMAP_BYTES
            r = self._dirty.get(blk)
            if r is None:
                self._dirty[blk] = [a, b]
            else:
                if a < r[0]:
                    r[0] = a
                if b > r[1]:
                    r[1] = b
            lo_byte = blk_end
        if self._tx is not tx:
            self._tx = tx
            tx.abort_hook(self._reset_tx)
        tx.add(("bitmap", self.name), self)

    def tx_flush(self, tx) -> None:
        """Apply deferred frees and put the touched bytes + trailers in `tx`."""
        pend = self._pending_free
        if pend:
            self._pending_free = []
            for s, n in pend:
                self.free += self._set_range(s, n, False)

            def undo(pend=pend):
                for s, n in pend:
                    self.free -= self._set_range(s, n, True)
            tx.abort_hook(undo)
        for blk, (a, b) in sorted(self._dirty.items()):
            base = blk * BITMAP_BYTES
            off = self.block_off(blk)
            tx.write(off + a, self.bits[base + a:base + b])
            tx.write(off + BITMAP_BYTES,
                     encode_bitmap_trailer(self.fsseed, self.start + blk,
                                           self.bits[base:base + BITMAP_BYTES]))
        self._dirty.clear()
        self._tx = None

    def _reset_tx(self) -> None:
        self._dirty.clear()
        self._pending_free = []
        self._tx = None

    # -- allocation ------------------------------------------------------
    def first_clear(self, i: int) -> int:
        """First clear bit at or after i, or -1."""
        bits = self.bits
        byte = i >> 3
        if byte >= len(bits):
            return -1
        b = bits[byte] | ((1 << (i & 7)) - 1)
        if b != 0xFF:
            return (byte << 3) + _LOWEST_ZERO[b]
        m = _NOT_FULL.search(bits, byte + 1)
        if m is None:
            return -1
        j = m.start()
        return (j << 3) + _LOWEST_ZERO[bits[j]]

    def run_length(self, i: int, maxlen: int) -> int:
        """Length of the run of clear bits starting at i, capped at maxlen."""
        bits = self.bits
        limit = min(self.nbits, i + maxlen)
        end = i
        while end < limit and end & 7:
            if bits[end >> 3] >> (end & 7) & 1:
                return end - i
            end += 1
        if end < limit:
            m = _ZERO_RUN.match(bits, end >> 3, limit >> 3)
            end = m.end() << 3
            while end < limit and not bits[end >> 3] >> (end & 7) & 1:
                end += 1
        return min(end, limit) - i

    def find_run(self, start: int, maxlen: int, lo: int = 0) -> tuple[int, int]:
        """The first free run at or after `start` (wrapping to `lo`)."""
        i = self.first_clear(start)
        if i < 0 or i >= self.nbits:
            i = self.first_clear(lo)
            if i < 0 or i >= self.nbits:
                return -1, 0
        return i, self.run_length(i, maxlen)

    def take(self, tx, start: int, n: int) -> None:
        """Mark [start, start+n) used (they must be free) under `tx`."""
        lo, hi = start >> 3, ((start + n - 1) >> 3) + 1
        saved = bytes(self.bits[lo:hi])
        changed = self._set_range(start, n, True)
        if changed != n:
            self.bits[lo:hi] = saved  # cannot happen unless misused
            raise AssertionError(f"{self.name}: allocating used bits {start}+{n}")
        self.free -= n
        self._touch(tx, start, n)

        def undo():
            self.free += self._set_range(start, n, False)
        tx.abort_hook(undo)

    def release(self, tx, start: int, n: int) -> None:
        """Mark [start, start+n) free when `tx` commits."""
        self._pending_free.append((start, n))
        self._touch(tx, start, n)

    def used_ranges(self, lo: int = 0, hi: int | None = None):
        """Yield (start, length) of runs of set bits in [lo, hi)."""
        hi = self.nbits if hi is None else hi
        i = lo
        while i < hi:
            if not self.test(i):
                i += self.run_length(i, hi - i)
                continue
            j = self.first_clear(i)
            j = hi if j < 0 or j > hi else j
            yield i, j - i
            i = j

    def free_runs(self, lo: int = 0, hi: int | None = None):
        """Yield (start, length) of runs of clear bits in [lo, hi)."""
        hi = self.nbits if hi is None else hi
        i = lo
        while i < hi:
            j = self.first_clear(i)
            if j < 0 or j >= hi:
                return
            n = self.run_length(j, hi - j)
            yield j, n
            i = j + n


class BlockAllocator:
    """Allocates data-area blocks; keeps files contiguous where it can."""

    def __init__(self, bitmap: Bitmap, data_start: int):
        self.bm = bitmap
        self.lo = data_start
        self.rotor = data_start

    @property
    def free(self) -> int:
        return self.bm.free

    def alloc(self, tx, n: int, goal: int | None = None,
              reserve: int = 0) -> list[tuple[int, int]]:
        """Allocate n blocks as few runs as possible, starting near `goal`.

        `reserve` blocks must stay free afterwards (so that a data write
        cannot take the last blocks its own metadata will need).
        """
        bm = self.bm
        if n <= 0:
            return []
        if n + reserve > bm.free:
            raise NoSpace()
        out = []
        left = n
        pos = goal if goal is not None and self.lo <= goal < bm.nbits else self.rotor
        # NoSpace cannot happen below (n <= free); the transaction's abort
        # hooks undo the bits taken if the caller fails later
        while left:
            s, k = bm.find_run(pos, left, self.lo)
            if s < 0:
                raise NoSpace()
            # prefer a run that holds the whole request if this one is short
            if k < left and k < 16 and left >= 16 and goal is None:
                s2, k2 = self._find_long_run(s + k, left)
                if k2 > k:
                    s, k = s2, k2
            bm.take(tx, s, k)
            if out and out[-1][0] + out[-1][1] == s:
                out[-1] = (out[-1][0], out[-1][1] + k)
            else:
                out.append((s, k))
            left -= k
            pos = s + k
        self.rotor = pos if pos < bm.nbits else self.lo
        return out

    def _find_long_run(self, start: int, want: int, tries: int = 64) -> tuple[int, int]:
        bm = self.bm
        best = (-1, 0)
        pos = start
        for _ in range(tries):
            s, k = bm.find_run(pos, want, self.lo)
            if s < 0:
                break
            if k > best[1]:
                best = (s, k)
            if k >= want:
                break
            pos = s + k
            if pos >= bm.nbits:
                break
        return best

    def free_blocks(self, tx, start: int, n: int) -> None:
        if start < self.lo or start + n > self.bm.nbits:
            raise AssertionError(f"freeing blocks {start}+{n} outside the data area")
        self.bm.release(tx, start, n)


class InodeAllocator:
    def __init__(self, bitmap: Bitmap):
        self.bm = bitmap
        self.rotor = 1

    @property
    def free(self) -> int:
        return self.bm.free

    def alloc(self, tx, goal: int | None = None) -> int:
        """A free inode number: the first at or after `goal`, or (no goal)
        after the last one allocated -- next fit, so that creating many
        files does not rescan the used part of the bitmap every time."""
        bm = self.bm
        if bm.free <= 0:
            raise OSError(errno.ENOSPC, "no free inodes")
        i = bm.first_clear(goal if goal else self.rotor)
        if i < 0 or i >= bm.nbits:
            i = bm.first_clear(1)
            if i < 0 or i >= bm.nbits:
                raise OSError(errno.ENOSPC, "no free inodes")
        bm.take(tx, i, 1)
        self.rotor = i + 1
        return i

    def free_inode(self, tx, ino: int) -> None:
        self.bm.release(tx, ino, 1)
