"""Persistent bitmaps and the block / inode allocators."""

from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mkfs import make_filesystem
from pmfs import layout as L
from pmfs.alloc import Bitmap, BlockAllocator, InodeAllocator, NoSpace
from pmfs.layout import BITMAP_BYTES, BITS_PER_BITMAP_BLOCK, BLOCK_SIZE, compute_geometry
from pmfs.pmem import MemoryImage
from pmfs.superblock import SuperblockManager
from pmfs.wal import WAL

SEED = L.fs_seed(b"alloc-test-uuid!")
_CACHE: dict = {}


class Boom(Exception):
    pass


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

class Fs:
    """A formatted 8 MiB image with its WAL and both bitmaps loaded."""

    def __init__(self):
        if "fs" not in _CACHE:
            img = MemoryImage(8 << 20)
            make_filesystem(img, compute_geometry(img.size))
            _CACHE["fs"] = img.snapshot()
        self.img = MemoryImage(_CACHE["fs"])
        sb = self.sb = SuperblockManager(self.img).load()
        self.seed = L.fs_seed(sb.uuid)
        self.wal = WAL(self.img, sb.wal_start, sb.wal_blocks, self.seed)
        self.wal.recover()
        self.bbm = self.block_bitmap()
        self.ibm = self.inode_bitmap()
        assert self.bbm.load() == [] and self.ibm.load() == []
        self.balloc = BlockAllocator(self.bbm, sb.data_start)
        self.ialloc = InodeAllocator(self.ibm)

    def block_bitmap(self) -> Bitmap:
        sb = self.sb
        return Bitmap(self.img, self.seed, sb.bbitmap_start, sb.bbitmap_blocks,
                      sb.total_blocks, "block")

    def inode_bitmap(self) -> Bitmap:
        sb = self.sb
        return Bitmap(self.img, self.seed, sb.ibitmap_start, sb.ibitmap_blocks,
                      sb.inode_count, "inode")

    def reloaded(self, bm: Bitmap) -> Bitmap:
        fresh = self.block_bitmap() if bm.name == "block" else self.inode_bitmap()
        assert fresh.load() == []
        return fresh


class Raw:
    """A bare image: WAL in blocks 0..3, a bitmap of `nbits` bits in the
    blocks after it, bits [0, lo) used (like the metadata blocks)."""

    WAL_BLOCKS = 4

    def __init__(self, nbits: int, lo: int = 0):
        self.nblocks = -(-nbits // BITS_PER_BITMAP_BLOCK)
        self.start = self.WAL_BLOCKS
        key = ("raw", nbits, lo)
        if key not in _CACHE:
            img = MemoryImage((self.start + self.nblocks) * BLOCK_SIZE)
            WAL.format(img, 0, SEED)
            bm = Bitmap(img, SEED, self.start, self.nblocks, nbits, "test")
            bm._mask_tail()
            bm._set_range(0, lo, True)
            bm.write_all()
            _CACHE[key] = img.snapshot()
        self.nbits, self.lo = nbits, lo
        self.img = MemoryImage(_CACHE[key])
        self.wal = WAL(self.img, 0, self.WAL_BLOCKS, SEED)
        self.wal.recover()
        self.bm = self.new_bitmap()
        assert self.bm.load() == []

    def new_bitmap(self) -> Bitmap:
        return Bitmap(self.img, SEED, self.start, self.nblocks, self.nbits, "test")


def used_set(bm: Bitmap, lo: int, hi: int) -> set:
    return {i for i in range(lo, hi) if bm.test(i)}


def run_bits(runs) -> list:
    return [b for s, n in runs for b in range(s, s + n)]


# --------------------------------------------------------------------------
# block allocation
# --------------------------------------------------------------------------

def test_fresh_bitmaps_match_mkfs():
    f = Fs()
    sb = f.sb
    # metadata blocks and the root directory's block are used, nothing else
    assert all(f.bbm.test(b) for b in range(sb.data_start))
    used_data = used_set(f.bbm, sb.data_start, sb.total_blocks)
    assert len(used_data) == 1
    assert f.bbm.free == sb.total_blocks - sb.data_start - 1 == f.balloc.free
    # inode 0 (orphan head), 1 (root) and lost+found
    assert used_set(f.ibm, 0, sb.inode_count) == {0, 1, 2}
    assert f.ibm.free == sb.inode_count - 3 == f.ialloc.free


def test_alloc_contiguous_and_prefers_goal():
    f = Fs()
    lo = f.sb.data_start
    with f.wal.transaction() as tx:
        runs = f.balloc.alloc(tx, 40)
        assert len(runs) == 1 and runs[0][1] == 40 and runs[0][0] >= lo
        goal = runs[0][0] + 500
        assert f.balloc.alloc(tx, 7, goal=goal) == [(goal, 7)]
        # goal inside a used run: the first free block after it
        assert f.balloc.alloc(tx, 3, goal=goal + 2) == [(goal + 7, 3)]
        # a goal outside the data area is ignored
        r = f.balloc.alloc(tx, 2, goal=3)
        assert r[0][0] >= lo
    assert f.bbm.free == f.sb.total_blocks - lo - 1 - 52


def test_alloc_spans_runs_and_prefers_long_runs():
    f = Fs()
    lo, total = f.sb.data_start, f.sb.total_blocks
    base = lo + 100
    with f.wal.transaction() as tx:
        # free space: [base, base+2) and [base+3, base+5) then a long run at base+300
        for s, n in [(base + 2, 1), (base + 5, 295)]:
            f.bbm.take(tx, s, n)
        f.balloc.rotor = base
        # a big request skips the short fragments for a run that holds it all
        r = f.balloc.alloc(tx, 20)
        assert r == [(base + 300, 20)]
        # with a goal it uses the fragments near the goal, in order
        r = f.balloc.alloc(tx, 5, goal=base)
        assert r == [(base, 2), (base + 3, 2), (base + 320, 1)]
        assert sum(n for _s, n in r) == 5
    # everything allocated is used and was free before
    assert all(f.bbm.test(b) for b in range(base, base + 5))
    assert f.bbm.free == total - lo - 1 - 296 - 20 - 5


def test_alloc_wraps_to_the_start_of_the_data_area():
    f = Fs()
    lo, total = f.sb.data_start, f.sb.total_blocks
    with f.wal.transaction() as tx:
        f.balloc.rotor = total - 4
        r = f.balloc.alloc(tx, 10)
    bits = run_bits(r)
    assert len(bits) == 10 and len(set(bits)) == 10
    assert all(lo <= b < total for b in bits)
    assert bits[:4] == list(range(total - 4, total))


def test_nospace():
    f = Fs()
    free = f.bbm.free
    snap, bits = f.img.snapshot(), bytes(f.bbm.bits)
    with pytest.raises(NoSpace) as ei:
        with f.wal.transaction() as tx:
            f.balloc.alloc(tx, free + 1)
    assert ei.value.errno == errno.ENOSPC and isinstance(ei.value, OSError)
    assert f.bbm.free == free and bytes(f.bbm.bits) == bits and f.img.snapshot() == snap
    with pytest.raises(NoSpace):
        with f.wal.transaction() as tx:
            f.balloc.alloc(tx, free - 3, reserve=4)  # must leave `reserve` free
    assert f.bbm.free == free
    with f.wal.transaction() as tx:
        runs = f.balloc.alloc(tx, free - 3, reserve=3)
    assert f.bbm.free == 3
    with f.wal.transaction() as tx:
        last = f.balloc.alloc(tx, 3)
        with pytest.raises(NoSpace):
            f.balloc.alloc(tx, 1)
    assert f.bbm.free == 0
    every = run_bits(runs) + run_bits(last)
    assert len(every) == len(set(every)) == free
    # exactly the blocks that were free were handed out
    before = Fs().bbm
    assert set(every) == {b for b in range(f.sb.data_start, f.sb.total_blocks)
                          if not before.test(b)}
    assert f.reloaded(f.bbm).free == 0
    assert f.balloc.alloc(None, 0) == []


def test_deferred_free():
    f = Fs()
    with f.wal.transaction() as tx:
        (x, _n), = f.balloc.alloc(tx, 1)
    free = f.bbm.free
    with f.wal.transaction() as tx:
        f.balloc.free_blocks(tx, x, 1)
        # still used inside the transaction that frees it
        assert f.bbm.test(x) and f.bbm.free == free
        (y, _n), = f.balloc.alloc(tx, 1, goal=x)
        assert y != x
        # and not yet free on the media
        assert f.reloaded(f.bbm).test(x)
    assert not f.bbm.test(x)
    assert f.bbm.free == free  # one freed, one taken
    reloaded = f.reloaded(f.bbm)
    assert not reloaded.test(x) and reloaded.test(y)
    with f.wal.transaction() as tx:
        assert f.balloc.alloc(tx, 1, goal=x) == [(x, 1)]


def test_deferred_free_of_the_only_free_block():
    f = Fs()
    with f.wal.transaction() as tx:
        f.balloc.alloc(tx, f.bbm.free)
    assert f.bbm.free == 0
    x = f.sb.data_start + 17
    with f.wal.transaction() as tx:
        f.balloc.free_blocks(tx, x, 1)
        with pytest.raises(NoSpace):
            f.balloc.alloc(tx, 1)
    assert f.bbm.free == 1
    with f.wal.transaction() as tx:
        assert f.balloc.alloc(tx, 1) == [(x, 1)]
    assert f.bbm.free == 0


def test_free_outside_data_area_refused():
    f = Fs()
    with f.wal.transaction() as tx:
        with pytest.raises(AssertionError):
            f.balloc.free_blocks(tx, f.sb.data_start - 1, 1)
        with pytest.raises(AssertionError):
            f.balloc.free_blocks(tx, f.sb.total_blocks - 1, 2)


def test_take_of_used_bits_refused():
    f = Fs()
    free = f.bbm.free
    with pytest.raises(AssertionError, match="allocating used bits"):
        with f.wal.transaction() as tx:
            f.bbm.take(tx, f.sb.data_start - 2, 4)
    assert f.bbm.free == free
    # (the DRAM bits of the refused range are not restored exactly: see the
    # report -- Bitmap.take clears the whole range on this error path)


def test_abort_restores_dram_state():
    f = Fs()
    with f.wal.transaction() as tx:
        old = f.balloc.alloc(tx, 30)
    snap = f.img.snapshot()
    bits, free = bytes(f.bbm.bits), f.bbm.free
    ibits, ifree = bytes(f.ibm.bits), f.ibm.free
    with pytest.raises(Boom):
        with f.wal.transaction() as tx:
            f.balloc.alloc(tx, 100)
            f.balloc.alloc(tx, 5, goal=f.sb.total_blocks - 50)
            s, n = old[0]
            f.balloc.free_blocks(tx, s + 3, 10)
            f.ialloc.alloc(tx)
            f.ialloc.free_inode(tx, 2)
            assert f.bbm.free == free - 105
            raise Boom()
    assert bytes(f.bbm.bits) == bits and f.bbm.free == free
    assert bytes(f.ibm.bits) == ibits and f.ibm.free == ifree
    assert f.img.snapshot() == snap
    # nothing of the aborted transaction leaks into the next one
    with f.wal.transaction() as tx:
        f.balloc.alloc(tx, 1)
    r = f.reloaded(f.bbm)
    assert r.bits == f.bbm.bits and r.free == free - 1
    assert all(r.test(b) for b in run_bits(old))


def test_abort_after_flush_restores_deferred_frees():
    """A commit that fails after the bitmap applied its frees (TxTooLarge)."""
    from pmfs.wal import TxTooLarge
    f = Fs()
    with f.wal.transaction() as tx:
        old = f.balloc.alloc(tx, 10)
    bits, free, snap = bytes(f.bbm.bits), f.bbm.free, f.img.snapshot()
    area = (f.sb.wal_blocks - 1) * BLOCK_SIZE
    with pytest.raises(TxTooLarge):
        with f.wal.transaction() as tx:
            f.balloc.free_blocks(tx, *old[0])
            f.balloc.alloc(tx, 4)
            tx.write(f.sb.data_start * BLOCK_SIZE + 8 * BLOCK_SIZE, b"\x01" * (area // 2 + 64))
    assert bytes(f.bbm.bits) == bits and f.bbm.free == free and f.img.snapshot() == snap


def test_persisted_bitmap_reloads_identically():
    f = Fs()
    allocated = []
    for i in range(12):
        with f.wal.transaction() as tx:
            allocated += f.balloc.alloc(tx, 1 + 7 * i, goal=f.sb.data_start + 97 * i)
            if i % 3 == 2:
                s, n = allocated.pop(0)
                f.balloc.free_blocks(tx, s, n)
            f.ialloc.alloc(tx)
    for bm in (f.bbm, f.ibm):
        r = f.reloaded(bm)
        assert r.bits == bm.bits and r.free == bm.free
        for i in range(bm.nblocks):
            raw = f.img.read(bm.block_off(i), BLOCK_SIZE)
            assert L.verify_bitmap_block(f.seed, bm.start + i, raw)
            assert bytes(raw[:BITMAP_BYTES]) == bm.bits[i * BITMAP_BYTES:(i + 1) * BITMAP_BYTES]
    assert used_set(f.bbm, f.sb.data_start, f.sb.total_blocks) == \
        set(run_bits(allocated)) | used_set(Fs().bbm, f.sb.data_start, f.sb.total_blocks)


def test_flipped_bit_detected_by_load():
    f = Fs()
    for where in (0, 5, BITMAP_BYTES - 1, BITMAP_BYTES, BITMAP_BYTES + 12):
        for bit in (0, 7):
            off = f.bbm.block_off(0) + where
            f.img.data[off] ^= 1 << bit
            assert f.block_bitmap().load() == [0], (where, bit)
            f.img.data[off] ^= 1 << bit
    assert f.block_bitmap().load() == []


def test_multi_block_bitmap_and_bits_past_nbits():
    nbits = 2 * BITS_PER_BITMAP_BLOCK - 13  # not a multiple of 8
    r = Raw(nbits, lo=BITS_PER_BITMAP_BLOCK - 100)
    bm = r.bm
    assert bm.nblocks == 2
    assert bm.free == nbits - r.lo
    # every bit past nbits reads as used
    assert all(bm.test(i) for i in range(nbits, 2 * BITS_PER_BITMAP_BLOCK))
    ba = BlockAllocator(bm, r.lo)
    with r.wal.transaction() as tx:
        # a run across the block boundary
        assert ba.alloc(tx, 150) == [(r.lo, 150)]
    for i in range(2):
        assert L.verify_bitmap_block(SEED, bm.start + i, r.img.read(bm.block_off(i), BLOCK_SIZE))
    fresh = r.new_bitmap()
    assert fresh.load() == [] and fresh.bits == bm.bits
    # allocate everything: nothing at or past nbits
    with r.wal.transaction() as tx:
        runs = ba.alloc(tx, bm.free)
        with pytest.raises(NoSpace):
            ba.alloc(tx, 1)
    bits = run_bits(runs)
    assert max(bits) == nbits - 1 and min(bits) == r.lo + 150
    assert len(bits) == len(set(bits)) == nbits - r.lo - 150
    assert bm.free == 0 and bm.find_run(r.lo, 10, r.lo) == (-1, 0)
    # a damaged second block is reported by index
    r.img.data[bm.block_off(1) + 100] ^= 4
    assert r.new_bitmap().load() == [1]


def test_load_masks_clear_bits_past_nbits():
    nbits = 1003
    r = Raw(nbits)
    # write a block whose bits past nbits are clear, with a valid trailer
    bits = bytearray(BITMAP_BYTES)
    r.img.write(r.bm.block_off(0), bytes(bits) + L.encode_bitmap_trailer(SEED, r.bm.start, bits))
    bm = r.new_bitmap()
    assert bm.load() == []
    assert bm.free == nbits
    assert not bm.test(nbits - 1) and bm.test(nbits) and bm.test(BITS_PER_BITMAP_BLOCK - 1)
    ba = BlockAllocator(bm, 0)
    with r.wal.transaction() as tx:
        runs = ba.alloc(tx, nbits)
    assert run_bits(runs) == list(range(nbits))
    assert bm.run_length(0, 5000) == 0


def test_bitmap_queries():
    r = Raw(500)
    bm = r.bm
    with r.wal.transaction() as tx:
        bm.take(tx, 3, 5)
        bm.take(tx, 20, 1)
        bm.take(tx, 64, 100)
    # (Bitmap.used_ranges is not exercised: it loops forever at the first
    # clear bit -- see the report)
    assert list(bm.free_runs(0, 200)) == [(0, 3), (8, 12), (21, 43), (164, 36)]
    assert bm.first_clear(3) == 8 and bm.first_clear(64) == 164
    assert bm.run_length(8, 100) == 12 and bm.run_length(8, 5) == 5
    assert bm.run_length(490, 100) == 10  # capped at nbits
    assert bm.find_run(480, 50, 0) == (480, 20)
    assert bm.find_run(3, 50, 0) == (8, 12)


# --------------------------------------------------------------------------
# inode allocation
# --------------------------------------------------------------------------

def test_inode_allocator():
    f = Fs()
    n = f.sb.inode_count
    with f.wal.transaction() as tx:
        a = f.ialloc.alloc(tx)
        b = f.ialloc.alloc(tx)
        c = f.ialloc.alloc(tx, goal=100)
    assert (a, b, c) == (3, 4, 100)
    with f.wal.transaction() as tx:
        f.ialloc.free_inode(tx, a)
        assert f.ialloc.alloc(tx, goal=a) != a  # deferred
    with f.wal.transaction() as tx:
        assert f.ialloc.alloc(tx, goal=a) == a
    # fill up: slot 0 is never handed out, ENOSPC at the end
    got = []
    with f.wal.transaction() as tx:
        while f.ialloc.free:
            got.append(f.ialloc.alloc(tx))
        with pytest.raises(OSError) as ei:
            f.ialloc.alloc(tx)
        assert ei.value.errno == errno.ENOSPC
    assert 0 not in got and max(got) < n and len(set(got)) == len(got)
    assert f.reloaded(f.ibm).free == 0


# --------------------------------------------------------------------------
# property test against a set model
# --------------------------------------------------------------------------

P_NBITS = BITS_PER_BITMAP_BLOCK + 200
P_LO = BITS_PER_BITMAP_BLOCK - 150  # 350 allocatable bits across two blocks

ops = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.integers(1, 60),
              st.one_of(st.none(), st.integers(P_LO - 5, P_NBITS + 5))),
    st.tuples(st.just("free"), st.integers(0, 10_000), st.integers(1, 12)),
    st.tuples(st.just("commit")),
    st.tuples(st.just("abort")),
), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_allocator_matches_model(program):
    r = Raw(P_NBITS, P_LO)
    bm, wal = r.bm, r.wal
    ba = BlockAllocator(bm, P_LO)
    committed: set = set()  # used bits in [P_LO, P_NBITS) after the last commit
    tx = None

    def check():
        in_tx = (committed | tx_alloc) if tx is not None else committed
        assert bm.free == (P_NBITS - P_LO) - len(in_tx)
        assert used_set(bm, P_LO, P_NBITS) == in_tx
        assert not 0 <= bm.first_clear(0) < P_LO  # the reserved bits stay used

    tx_alloc: set = set()
    tx_free: list = []
    start_snap = start_bits = None
    for op in program:
        if tx is None:
            tx = wal.begin()
            tx_alloc, tx_free = set(), []
            start_snap, start_bits = r.img.snapshot(), bytes(bm.bits)
        if op[0] == "alloc":
            _, n, goal = op
            used = committed | tx_alloc
            avail = (P_NBITS - P_LO) - len(used)
            if n > avail:
                with pytest.raises(NoSpace):
                    ba.alloc(tx, n, goal)
            else:
                runs = ba.alloc(tx, n, goal)
                bits = run_bits(runs)
                assert len(bits) == n and len(set(bits)) == n
                assert all(P_LO <= b < P_NBITS for b in bits)
                assert not set(bits) & used  # never a used or deferred-free bit
                if goal is not None and P_LO <= goal < P_NBITS and goal not in used:
                    assert runs[0][0] == goal  # the goal is preferred
                    free_at_goal = 0
                    while goal + free_at_goal < P_NBITS and \
                            goal + free_at_goal not in used:
                        free_at_goal += 1
                    if free_at_goal >= n:
                        assert runs == [(goal, n)]  # contiguous when it fits
                tx_alloc |= set(bits)
        elif op[0] == "free":
            _, pick, n = op
            pending = {b for s, k in tx_free for b in range(s, s + k)}
            cand = sorted((committed | tx_alloc) - pending)
            if cand:
                s = cand[pick % len(cand)]
                k = 1
                while k < n and s + k in cand and s + k not in pending:
                    k += 1
                ba.free_blocks(tx, s, k)
                tx_free.append((s, k))
        elif op[0] == "commit":
            wal.commit(tx)
            tx = None
            freed = {b for s, k in tx_free for b in range(s, s + k)}
            committed = (committed | tx_alloc) - freed
            fresh = r.new_bitmap()
            assert fresh.load() == [] and fresh.bits == bm.bits and fresh.free == bm.free
        else:
            wal.abort(tx)
            tx = None
            assert bytes(bm.bits) == start_bits
            assert r.img.snapshot() == start_snap
        check()
    if tx is not None:
        wal.abort(tx)
        tx = None
        check()
