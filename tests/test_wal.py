"""The redo WAL: atomicity and durability of transactions under every crash
state the persistence model allows, idempotent recovery, wrap-around with
SKIP records, checkpoints, oversized and aborted transactions."""

from __future__ import annotations

import errno
import random
import struct

import pytest

from mkfs import make_filesystem
from pmfs import layout as L
from pmfs.alloc import Bitmap
from pmfs.crashsim import CrashSimulator, apply
from pmfs.layout import BLOCK_SIZE, CACHELINE, compute_geometry, fs_seed
from pmfs.pmem import EV_FENCE, EV_STORE, MemoryImage, TracingImage
from pmfs.superblock import SuperblockManager
from pmfs.wal import WAL, TxTooLarge, WalError

SIZE = L.min_image_size()
_CACHE: dict = {}


def formatted() -> bytes:
    if "img" not in _CACHE:
        img = MemoryImage(SIZE)
        make_filesystem(img, compute_geometry(SIZE), label="waltest")
        _CACHE["img"] = img.snapshot()
    return _CACHE["img"]


class Scenario:
    """A formatted image and the WAL geometry to use on it."""

    def __init__(self, wal_blocks: int | None = None):
        self.base = formatted()
        sb = SuperblockManager(MemoryImage(self.base)).load()
        self.sb = sb
        self.seed = fs_seed(sb.uuid)
        self.wal_blocks = wal_blocks or sb.wal_blocks
        # everything outside the WAL region must match the expected state
        self.lo = sb.wal_start * BLOCK_SIZE
        self.hi = (sb.wal_start + sb.wal_blocks) * BLOCK_SIZE
        self.data = sb.data_start * BLOCK_SIZE
        self.data_end = sb.total_blocks * BLOCK_SIZE

    def new_wal(self, img, recover: bool = True) -> WAL:
        w = WAL(img, self.sb.wal_start, self.wal_blocks, self.seed)
        if recover:
            w.recover()
        return w

    def same(self, image, ref) -> bool:
        lo, hi = self.lo, self.hi
        return image[:lo] == ref[:lo] and image[hi:] == ref[hi:]

    def run(self, txs, img=None):
        """Run `txs` ([[(off, data)]]) traced; returns (trace, wal, states)
        where states[j] is the image after the first j transactions."""
        inner = img or MemoryImage(self.base)
        tr = TracingImage(inner)
        w = self.new_wal(tr)
        assert not tr.events  # nothing to recover on a clean image
        states = [inner.snapshot()]
        for writes in txs:
            with w.transaction("t") as tx:
                for off, data in writes:
                    tx.write(off, data)
            states.append(inner.snapshot())
        return tr, w, states


def pattern(seed: int, n: int) -> bytes:
    r = random.Random(seed)
    return bytes(r.getrandbits(8) for _ in range(n))


def tx_ranges(writes):
    return [(off, len(d)) for off, d in writes]


def check_crashes(sc: Scenario, tr: TracingImage, states, txs, k: int = 2,
                  continue_after: bool = True, torn: bool = False) -> dict:
    """Recover every crash state of the trace and check atomicity/durability.

    torn: also every 8-byte-word prefix of each store to a line (the 8-byte
    store is the only atomicity the hardware gives)."""
    sim = (CrashSimulator(tr.initial, tr.events, torn=True, max_torn=None) if torn
           else CrashSimulator(tr.initial, tr.events))
    marks = sim.marks()
    begun = [i for i, lab, _ in marks if lab == "tx-begin"]
    logged = [i for i, lab, _ in marks if lab == "tx-logged"]
    applied = [i for i, lab, _ in marks if lab == "tx-applied"]
    assert len(logged) == len(applied) == len(begun) == len(txs)
    stats = {"states": 0, "new": 0, "skips_replayed": 0, "points": 0}
    for point, durable, crash_states in sim.states(points=sim.store_points(), k=k,
                                                   max_states=None):
        stats["points"] += 1
        n_logged = sum(1 for i in logged if i <= point)
        n_begun = sum(1 for i in begun if i < point)
        n_returned = sum(1 for i in applied if i <= point)
        allowed = [n_logged] + ([n_logged + 1] if n_begun > n_logged else [])
        for st in crash_states:
            stats["states"] += 1
            img = MemoryImage(apply(durable, st))
            w = sc.new_wal(img, recover=False)
            kinds = [kind for _p, _t, kind, _r, _l in w.scan()]
            stats["skips_replayed"] += kinds.count(L.WAL_REC_SKIP)
            w.recover()
            image = img.data
            where = f"crash before event {point} ({st.kind}, lines {st.chosen})"
            # the in-flight transaction: its ranges are all old or all new
            t = n_logged + 1
            if t <= len(txs):
                rs = tx_ranges(txs[t - 1])
                now = [bytes(image[o:o + n]) for o, n in rs]
                old = [states[t - 1][o:o + n] for o, n in rs]
                new = [states[t][o:o + n] for o, n in rs]
                assert now in (old, new), f"{where}: transaction {t} half applied"
            got = [j for j in allowed if sc.same(image, states[j])]
            assert got, (f"{where}: recovered image matches none of the states "
                         f"{allowed} ({n_logged} transactions were committed)")
            # every transaction whose commit returned is there
            assert got[0] >= n_returned, where
            if got[0] > n_logged:
                stats["new"] += 1
            assert w.pending() == 0
            assert sc.new_wal(MemoryImage(image), recover=False).pending() == 0
            if continue_after and st.kind == "durable":
                # the recovered log accepts new transactions that recover too
                off = sc.data_end - 3 * CACHELINE
                with w.transaction() as tx:
                    tx.write(off, b"after-crash")
                w2 = sc.new_wal(MemoryImage(image))
                assert bytes(w2.img.read(off, 11)) == b"after-crash", where
    return stats


# --------------------------------------------------------------------------
# crash at every store of a transaction
# --------------------------------------------------------------------------

def workload(sc: Scenario):
    d = sc.data
    B = BLOCK_SIZE
    return [
        # several ranges: inside a line, across line boundaries, another block
        [(d + 8, b"A" * 8), (d + 40, pattern(1, 100)), (d + 5 * B + 1000, pattern(2, 30))],
        # overlapping writes in one transaction (the later write wins)
        [(d + 2 * B, pattern(3, 200)), (d + 2 * B + 50, b"Z" * 60), (d + 2 * B + 10, b"q")],
        # many lines, and a write across a block boundary
        [(d + 10 * B, pattern(4, 20 * CACHELINE)), (d + 3 * B - 6, pattern(5, 12))],
        # overwrites ranges of earlier transactions; one write changes nothing
        [(d + 30, pattern(6, 64)), (d + 2 * B + 100, pattern(7, 300)),
         (d + 20 * B, bytes(64))],
        # a single 8-byte word
        [(d + 7 * B + 64, struct.pack("<Q", 0x1122334455667788))],
    ]


def test_workload_states_are_distinct():
    sc = Scenario()
    txs = workload(sc)
    _tr, _w, states = sc.run(txs)
    for j in range(1, len(states)):
        assert not sc.same(states[j], states[j - 1]), j
    # the transactions really did what they say
    final = states[-1]
    assert final[sc.data + 8:sc.data + 16] == b"A" * 8
    blk2 = sc.data + 2 * BLOCK_SIZE
    assert final[blk2 + 10:blk2 + 11] == b"q"
    assert final[blk2 + 11:blk2 + 50] == pattern(3, 200)[11:50]
    assert final[blk2 + 50:blk2 + 100] == b"Z" * 50
    assert final[blk2 + 100:blk2 + 400] == pattern(7, 300)
    assert states[2][blk2 + 50:blk2 + 110] == b"Z" * 60


@pytest.mark.parametrize("torn", [False, True], ids=["lines", "torn-words"])
def test_crash_at_every_store_all_or_nothing(torn):
    sc = Scenario()
    txs = workload(sc)
    tr, w, states = sc.run(txs)
    assert w.commits == len(txs)  # every transaction had changes
    stats = check_crashes(sc, tr, states, txs, torn=torn)
    # the exploration saw states where the in-flight record was durable
    # before its commit returned, and many torn ones
    assert stats["new"] > 0
    assert stats["states"] > 500


def test_commit_costs_two_fences():
    sc = Scenario()
    txs = workload(sc)
    tr, _w, _states = sc.run(txs)
    marks = [i for i, e in enumerate(tr.events) if e[0] == "M" and e[1] == "tx-begin"]
    marks.append(len(tr.events))
    for a, b in zip(marks, marks[1:]):
        fences = sum(1 for e in tr.events[a:b] if e[0] == EV_FENCE)
        assert fences == 2
    # the record is durable (fenced) before the first in-place store
    first_fence = next(i for i, e in enumerate(tr.events) if e[0] == EV_FENCE)
    for e in tr.events[:first_fence]:
        if e[0] == EV_STORE:
            assert sc.lo <= e[1] < sc.hi


def test_data_fence_orders_data_before_record():
    sc = Scenario()
    img = MemoryImage(sc.base)
    tr = TracingImage(img)
    w = sc.new_wal(tr)
    with w.transaction() as tx:
        tr.write(sc.data + 40 * BLOCK_SIZE, b"file data")  # unlogged data store
        tr.flush(sc.data + 40 * BLOCK_SIZE, 9)
        tx.data_fence = True
        tx.write(sc.data, b"meta")
    kinds = [e[0] for e in tr.events if e[0] != "M"]
    assert kinds[:3] == ["S", "F", EV_FENCE]  # data fenced before the log record
    assert kinds.count(EV_FENCE) == 3


def test_empty_and_unchanged_transactions_log_nothing():
    sc = Scenario()
    img = MemoryImage(sc.base)
    tr = TracingImage(img)
    w = sc.new_wal(tr)
    t0 = w.next_txid
    with w.transaction():
        pass
    with w.transaction() as tx:
        tx.write(sc.data, bytes(img.read(sc.data, 500)))  # same bytes
    assert tr.events == [] and w.commits == 0 and w.next_txid == t0


# --------------------------------------------------------------------------
# crash during recovery
# --------------------------------------------------------------------------

def _logged_image(sc: Scenario, txs):
    """The durable image right after the last transaction's record was
    fenced (its in-place stores not yet made), and the states."""
    tr, _w, states = sc.run(txs)
    sim = CrashSimulator(tr.initial, tr.events)
    last_logged = [i for i, lab, _ in sim.marks() if lab == "tx-logged"][-1]
    for _p, durable, _st in sim.states(points=[last_logged], k=0):
        return bytearray(durable), states
    raise AssertionError("no state")


def _long_log(sc: Scenario, txs, applied: int):
    """An image whose log holds every record of `txs` from the tail on, over
    the in-place state after the first `applied` of them.

    The writer moves the tail with every commit, so it never leaves more
    than two records to replay; the recovery rule (replay from the tail
    while txids follow and checksums verify) must handle any number."""
    inner = MemoryImage(sc.base)
    w = sc.new_wal(inner)
    first = (w.head_pos, w.next_txid)
    states = [inner.snapshot()]
    positions = []
    for writes in txs:
        positions.append(w.head_pos)
        with w.transaction() as tx:
            for off, data in writes:
                tx.write(off, data)
        states.append(inner.snapshot())
    w._write_header(*first)  # rewind the tail to the first record
    image = bytearray(states[applied][:sc.lo]) + bytearray(inner.data[sc.lo:sc.hi]) + \
        bytearray(states[applied][sc.hi:])
    return image, states, positions


@pytest.mark.parametrize("variant", ["reachable", "long-log-last-unapplied",
                                     "long-log-none-applied"])
def test_crash_during_recovery_is_idempotent(variant):
    sc = Scenario()
    txs = workload(sc)
    if variant == "reachable":
        image, states = _logged_image(sc, txs)
        expect = 1  # every commit moved the tail to its own record
    else:
        applied = len(txs) - 1 if variant == "long-log-last-unapplied" else 0
        image, states, _pos = _long_log(sc, txs, applied)
        expect = len(txs)
    assert not sc.same(image, states[-1])
    probe = sc.new_wal(MemoryImage(image), recover=False)
    assert probe.pending() == expect
    tr = TracingImage(MemoryImage(image))
    w = sc.new_wal(tr, recover=False)
    assert w.recover() == expect
    assert sc.same(tr.inner.data, states[-1])
    sim = CrashSimulator(tr.initial, tr.events)
    n = 0
    replays = set()
    for point, durable, crash_states in sim.states(points=sim.store_points(), k=2,
                                                   max_states=None):
        for st in crash_states:
            n += 1
            img = MemoryImage(apply(durable, st))
            w2 = sc.new_wal(img, recover=False)
            replays.add(w2.recover())
            assert sc.same(img.data, states[-1]), \
                f"recovery crashed before event {point} ({st.kind} {st.chosen}) then rerun"
            assert sc.new_wal(MemoryImage(img.data), recover=False).pending() == 0
    # crashes before the header update replay everything again, after it nothing
    assert replays == {0, expect}
    assert n > (20 if expect > 1 else 3)


# --------------------------------------------------------------------------
# circular log: wrap-around, SKIP records, checkpoints
# --------------------------------------------------------------------------

def wrap_workload(sc: Scenario, n: int, seed: int = 7):
    r = random.Random(seed)
    txs = []
    span = 60 * BLOCK_SIZE
    for i in range(n):
        writes = []
        for _ in range(r.randint(1, 3)):
            ln = r.randint(1, 200)
            off = sc.data + r.randrange(span - ln)
            writes.append((off, pattern(seed * 1000 + i * 10 + len(writes), ln)))
        txs.append(writes)
    return txs


def _skip_stores(tr):
    out = []
    for e in tr.events:
        if e[0] == EV_STORE and len(e[2]) >= L.WAL_REC.size:
            h = L.wal_record_header(e[2])
            if h and h[0] == L.WAL_REC_SKIP:
                out.append(e)
    return out


def test_wrap_around_with_skip_records_crash_states():
    sc = Scenario(wal_blocks=2)  # a 4 KiB log area: wraps every few transactions
    txs = wrap_workload(sc, 45)
    tr, w, states = sc.run(txs)
    area = (sc.wal_blocks - 1) * BLOCK_SIZE
    assert w.head_pos > 4 * area  # wrapped several times
    assert len(_skip_stores(tr)) >= 2
    stats = check_crashes(sc, tr, states, txs, continue_after=False)
    # some crash states had to replay past a SKIP record
    assert stats["skips_replayed"] > 0
    assert stats["new"] > 0


def test_recovery_after_wrap_replays_from_tail():
    sc = Scenario(wal_blocks=2)
    txs = wrap_workload(sc, 60, seed=11)
    inner = MemoryImage(sc.base)
    w = sc.new_wal(inner)
    area = (sc.wal_blocks - 1) * BLOCK_SIZE
    found_skip = False
    for i, writes in enumerate(txs):
        with w.transaction() as tx:
            for off, data in writes:
                tx.write(off, data)
        # at any moment, the on-media log replays to the current state from
        # the pre-transaction contents (the records since the tail are complete)
        probe = sc.new_wal(MemoryImage(inner.data), recover=False)
        kinds = [k for _p, _t, k, _r, _l in probe.scan()]
        found_skip |= L.WAL_REC_SKIP in kinds
        assert kinds.count(L.WAL_REC_TX) == probe.pending() == w.next_txid - w.tail_txid \
            - kinds.count(L.WAL_REC_SKIP)
        assert w.used <= area
    assert found_skip
    # a fresh WAL on the final image replays idempotently and continues
    img2 = MemoryImage(inner.data)
    w2 = sc.new_wal(img2)
    assert sc.same(img2.data, inner.data)
    assert (w2.head_pos, w2.next_txid) == (w.head_pos, w.next_txid)
    with w2.transaction() as tx:
        tx.write(sc.data, b"continued")
    assert bytes(sc.new_wal(MemoryImage(img2.data)).img.read(sc.data, 9)) == b"continued"


def test_checkpoint():
    sc = Scenario()
    img = MemoryImage(sc.base)
    w = sc.new_wal(img)
    slot0, seq0, t0 = w.hdr_slot, w.hdr_seq, w.next_txid
    for i in range(3):
        with w.transaction() as tx:
            tx.write(sc.data + i * 100, b"x%d" % i)
    # every commit moved the tail to its own record: only the last is pending
    assert sc.new_wal(MemoryImage(img.data), recover=False).pending() == 1
    assert w.used > 0 and w.checkpoints == 0
    before = img.snapshot()
    w.checkpoint()
    assert w.used == 0 and w.checkpoints == 1
    assert (w.tail_pos, w.tail_txid) == (w.head_pos, w.next_txid) == (w.head_pos, t0 + 3)
    assert w.hdr_seq == seq0 + 4  # one header per commit, one for the checkpoint
    assert w.hdr_slot == slot0  # slots alternate: 4 updates
    # only the header slot changed
    changed = [i for i in range(0, len(before), CACHELINE)
               if before[i:i + CACHELINE] != img.data[i:i + CACHELINE]]
    assert changed == [sc.lo + w.hdr_slot * CACHELINE]
    h = L.WalHeader.decode(img.read(sc.lo + w.hdr_slot * CACHELINE, CACHELINE), sc.seed,
                           w.hdr_slot)
    assert (h.seq, h.tail_pos, h.tail_txid) == (w.hdr_seq, w.head_pos, t0 + 3)
    w3 = sc.new_wal(MemoryImage(img.data), recover=False)
    assert w3.pending() == 0 and w3.recover() == 0
    # a checkpoint of an empty log writes nothing
    tr = TracingImage(img)
    w4 = sc.new_wal(tr)
    w4.checkpoint()
    assert tr.events == [] and w4.checkpoints == 0


def test_header_slots_alternate_and_torn_slot_ignored():
    sc = Scenario()
    img = MemoryImage(sc.base)
    w = sc.new_wal(img)
    slots = []
    for word in (b"one", b"two"):
        with w.transaction() as tx:
            tx.write(sc.data + len(slots) * 64, word)
        slots.append(w.hdr_slot)
    assert slots[0] != slots[1]  # each commit writes the other slot
    newest = slots[1]
    assert sc.new_wal(MemoryImage(img.data), recover=False).pending() == 1  # "two"
    # tear the newest header slot: the older one (tail at "one") is used
    buf = bytearray(img.data)
    buf[sc.lo + newest * CACHELINE + 20] ^= 0xFF
    w2 = sc.new_wal(MemoryImage(buf), recover=False)
    assert w2.pending() == 2
    assert w2.recover() == 2 and sc.same(w2.img.data, img.data)
    # tear the older one: the newest is used
    buf = bytearray(img.data)
    buf[sc.lo + (1 - newest) * CACHELINE + 20] ^= 0xFF
    assert sc.new_wal(MemoryImage(buf), recover=False).pending() == 1
    buf[sc.lo + newest * CACHELINE + 20] ^= 0xFF  # both damaged
    with pytest.raises(WalError):
        sc.new_wal(MemoryImage(buf), recover=False).recover()


# --------------------------------------------------------------------------
# oversized, aborted and misused transactions
# --------------------------------------------------------------------------

def test_tx_too_large_leaves_image_unchanged():
    sc = Scenario()
    img = MemoryImage(sc.base)
    w = sc.new_wal(img)
    with w.transaction() as tx:
        tx.write(sc.data, b"before")
    before = img.snapshot()
    state = (w.head_pos, w.next_txid, w.tail_pos, w.commits)
    area = (sc.wal_blocks - 1) * BLOCK_SIZE
    aborted = []
    committed = []
    with pytest.raises(TxTooLarge) as ei:
        with w.transaction() as tx:
            tx.abort_hook(lambda: aborted.append(1))
            tx.commit_hook(lambda: committed.append(1))
            tx.write(sc.data + BLOCK_SIZE, b"\xab" * (area // 2 + BLOCK_SIZE))
    assert ei.value.errno == errno.ENOSPC
    assert isinstance(ei.value, OSError)
    assert img.snapshot() == before
    assert (w.head_pos, w.next_txid, w.tail_pos, w.commits) == state
    assert aborted == [1] and committed == []
    assert w.active is None
    # the largest transaction that fits is fine
    with w.transaction() as tx:
        tx.write(sc.data + BLOCK_SIZE, b"\xcd" * (area // 2 - 2 * BLOCK_SIZE))
    assert bytes(img.read(sc.data + BLOCK_SIZE, 2)) == b"\xcd\xcd"


class Boom(Exception):
    pass


def test_abort_restores_image_and_dram_hooks():
    sc = Scenario()
    img = MemoryImage(sc.base)
    tr = TracingImage(img)
    w = sc.new_wal(tr)
    bm = Bitmap(tr, sc.seed, sc.sb.bbitmap_start, sc.sb.bbitmap_blocks,
                sc.sb.total_blocks, "block")
    assert bm.load() == []
    bits_before, free_before = bytes(bm.bits), bm.free
    before = img.snapshot()
    state = (w.head_pos, w.next_txid)
    calls = []
    with pytest.raises(Boom):
        with w.transaction() as tx:
            tx.abort_hook(lambda: calls.append("a1"))
            tx.abort_hook(lambda: calls.append("a2"))
            tx.commit_hook(lambda: calls.append("c"))
            tx.write(sc.data, b"never")
            assert tx.read(sc.data, 5) == b"never"  # visible inside the transaction
            bm.take(tx, sc.sb.data_start + 5, 3)
            bm.release(tx, 0, 1)
            assert bm.free == free_before - 3
            raise Boom()
    assert calls == ["a2", "a1"]  # abort hooks, newest first; no commit hook
    assert img.snapshot() == before
    assert not [e for e in tr.events if e[0] in (EV_STORE, EV_FENCE)]
    assert bytes(bm.bits) == bits_before and bm.free == free_before
    assert w.active is None and (w.head_pos, w.next_txid) == state
    # the WAL and the bitmap work normally afterwards
    with w.transaction() as tx:
        bm.take(tx, sc.sb.data_start + 1, 1)
        tx.write(sc.data, b"later")
    assert bytes(img.read(sc.data, 5)) == b"later"
    b2 = Bitmap(img, sc.seed, sc.sb.bbitmap_start, sc.sb.bbitmap_blocks,
                sc.sb.total_blocks, "block")
    assert b2.load() == [] and b2.bits == bm.bits


def test_failure_while_flushing_objects_aborts():
    sc = Scenario()
    img = MemoryImage(sc.base)
    w = sc.new_wal(img)
    before = img.snapshot()

    class Bad:
        def tx_flush(self, tx):
            tx.write(sc.data, b"half")
            raise Boom()
    aborted = []
    with pytest.raises(Boom):
        with w.transaction() as tx:
            tx.abort_hook(lambda: aborted.append(True))
            tx.write(sc.data + 100, b"other")
            tx.add("bad", Bad())
    assert aborted == [True] and img.snapshot() == before and w.active is None


def test_misuse():
    sc = Scenario()
    img = MemoryImage(sc.base)
    w = sc.new_wal(img, recover=False)
    with pytest.raises(RuntimeError, match="before recovery"):
        w.begin()
    w.recover()
    tx = w.begin()
    with pytest.raises(RuntimeError, match="nested"):
        w.begin()
    with pytest.raises(ValueError):
        tx.write(img.size - 2, b"abc")
    w.abort(tx)
    img.readonly = True
    with pytest.raises(OSError) as ei:
        w.begin()
    assert ei.value.errno == errno.EROFS


def test_objects_flushed_at_commit():
    sc = Scenario()
    img = MemoryImage(sc.base)
    w = sc.new_wal(img)
    flushed = []

    class Obj:
        def __init__(self, name, off):
            self.name, self.off = name, off

        def tx_flush(self, tx):
            flushed.append(self.name)
            tx.write(self.off, self.name.encode())
    with w.transaction() as tx:
        tx.add("a", Obj("a", sc.data))
        tx.add("b", Obj("b", sc.data + 1))
        tx.add("a", Obj("ignored", sc.data + 2))  # same key: registered once
    assert flushed == ["a", "b"]
    assert bytes(img.read(sc.data, 3)) == b"ab\0"


# --------------------------------------------------------------------------
# damaged logs
# --------------------------------------------------------------------------

def test_corrupted_record_in_the_middle_stops_replay():
    sc = Scenario()
    txs = workload(sc)[:3]
    image, states, pos = _long_log(sc, txs, 0)
    area_off = (sc.sb.wal_start + 1) * BLOCK_SIZE
    image[area_off + pos[1] + L.WAL_REC.size + L.WAL_ENT.size + 3] ^= 0x40  # tx 2's data
    img = MemoryImage(image)
    w = sc.new_wal(img, recover=False)
    assert w.pending() == 1
    assert w.recover() == 1
    assert sc.same(img.data, states[1])  # tx 1 only; tx 3 is valid but not reached
    assert not sc.same(img.data, states[3])
    t0 = sc.new_wal(MemoryImage(sc.base)).next_txid
    assert (w.tail_pos, w.tail_txid) == (pos[1], t0 + 1)
    # the next transaction takes the damaged record's place and id
    with w.transaction() as tx:
        tx.write(sc.data, b"next")
    w2 = sc.new_wal(MemoryImage(img.data))
    assert bytes(w2.img.read(sc.data, 4)) == b"next"
    assert w2.next_txid == t0 + 2


def test_record_with_wrong_txid_or_bad_length_stops_replay():
    sc = Scenario()
    txs = workload(sc)[:2]
    image, states, pos = _long_log(sc, txs, 0)
    area_off = (sc.sb.wal_start + 1) * BLOCK_SIZE
    # a record that verifies but carries the wrong txid (a stale record)
    t0 = sc.new_wal(MemoryImage(sc.base)).next_txid
    stale = L.encode_wal_record(sc.seed, t0 - 1, [(sc.data, b"stale")])
    bad = bytearray(image)
    bad[area_off + pos[1]:area_off + pos[1] + len(stale)] = stale
    img = MemoryImage(bad)
    assert sc.new_wal(img).next_txid == t0 + 1
    assert sc.same(img.data, states[1])
    # a record whose length field is not a cache-line multiple
    bad = bytearray(image)
    struct.pack_into("<I", bad, area_off + pos[1] + 16, 100)
    img = MemoryImage(bad)
    assert sc.new_wal(img, recover=False).recover() == 1


def test_record_writing_outside_the_image_is_refused():
    sc = Scenario()
    img = MemoryImage(sc.base)
    w = sc.new_wal(img)
    rec = L.encode_wal_record(sc.seed, w.next_txid, [(img.size - 8, b"0123456789abcdef")])
    area = (sc.wal_blocks - 1) * BLOCK_SIZE
    img.write((sc.sb.wal_start + 1) * BLOCK_SIZE + w.head_pos % area, rec)
    w2 = sc.new_wal(MemoryImage(img.data), recover=False)
    assert w2.pending() == 1
    with pytest.raises(L.FormatError, match="outside the image"):
        w2.recover()
