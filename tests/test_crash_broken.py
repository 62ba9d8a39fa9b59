"""The crash explorer catches real bugs: deliberately broken variants of the
core (monkeypatched here, never edited) each produce violations, and the
same workloads are clean on the real code.

* a removed flush (of the log record; of the in-place stores);
* data persisted after the pointer to it (the data fence ignored, the file
  data stored after the commit);
* a rename done as two transactions (link + unlink);
* an fsync that makes nothing durable;
* fallocate's data part out of order (a punch zeroing whole blocks in
  place; a zero range whose new size is committed before its zeroing);
* a recovery that moves the log tail before its replay is durable.
"""

from __future__ import annotations

import pytest

from pmfs import crashtest as ct
from pmfs.fs import FileSystem
from pmfs.layout import BLOCK_SIZE
from pmfs.wal import WAL

CFG = ct.CI_CONFIG


def run(text: str, cfg: ct.Config = CFG) -> ct.WorkloadResult:
    return ct.run_workload(ct.parse_workload(text), cfg)


def kinds(r: ct.WorkloadResult) -> set:
    return {v.kind for v in r.violations}


@pytest.fixture
def clean():
    """Assert that workloads are clean on the real code first."""
    def check(*texts):
        for t in texts:
            r = run(t)
            assert r.nviolations == 0, "\n\n".join(v.format() for v in r.violations)
    return check


# --------------------------------------------------------------------------
# a removed flush
# --------------------------------------------------------------------------

_log_and_apply = WAL._log_and_apply


def _without_flush(which):
    def broken(self, tx, entries):
        img = self.img
        real = img.flush

        def flush(off, n):
            in_log = self.area_off <= off < self.area_off + self.area_size
            if (which == "record") == in_log:
                return  # the flush is gone
            real(off, n)
        img.flush = flush
        try:
            _log_and_apply(self, tx, entries)
        finally:
            del img.flush
    return broken


WORKLOADS = ("mkdir B/D", "rename A/foo B/new", "creat A/new; link A/new B/l",
             "unlink A/foo")


def test_removed_flush_of_the_log_record(monkeypatch, clean):
    clean(*WORKLOADS)
    monkeypatch.setattr(WAL, "_log_and_apply", _without_flush("record"))
    for t in WORKLOADS:
        r = run(t)
        # crash states expose it: in-place stores durable, the record not
        assert "state" in kinds(r), t
        # and so does the pmemcheck-style check
        assert "pending" in kinds(r), t
        r = run(t, ct.Config(pending_check=False))
        assert kinds(r) == {"state"}, t
        v = next(v for v in r.violations if v.kind == "state")
        assert v.point > 0 and v.lines and "reproduce:" in v.format()


def test_removed_flush_of_in_place_stores(monkeypatch):
    """With one transaction, recovery replays its durable record, so no crash
    state shows the lost in-place stores: only the end-of-operation check
    does.  Once a later commit has moved the log tail past that record, the
    loss shows in crash states too."""
    monkeypatch.setattr(WAL, "_log_and_apply", _without_flush("in-place"))
    for t in ("mkdir B/D", "rename A/foo B/new", "unlink A/foo", "setxattr A/C user.k v"):
        r = run(t)
        assert kinds(r) == {"pending"}, (t, [v.format() for v in r.violations])
        assert "never flushed" in r.violations[0].format()
    for t in ("creat A/new; link A/new B/l", "mkdir B/D; rmdir A/C"):
        r = run(t)
        assert kinds(r) == {"pending", "state"}, t
        assert all(v.where.startswith("end of trace") or "op 1" in v.where
                   for v in r.violations if v.kind == "state"), t


# --------------------------------------------------------------------------
# data persisted after the pointer to it
# --------------------------------------------------------------------------


def _no_data_fence(self, tx, entries):
    tx.data_fence = False
    return _log_and_apply(self, tx, entries)


DATA_WORKLOADS = ("write A/bar 100 300 1", "write A/foo 5000 300 1",
                  "write B/baz 9192 100 1", "write B/baz 1010 50 1", "creat B/new; "
                  "write B/new 0 5000 2", "truncate B/baz 2000")


def test_data_fence_ignored(monkeypatch, clean):
    clean(*DATA_WORKLOADS)
    monkeypatch.setattr(WAL, "_log_and_apply", _no_data_fence)
    for t in DATA_WORKLOADS:
        r = run(t)
        assert "state" in kinds(r), t
    # what it looks like: the size (metadata) is there, the data is not
    r = run("write A/foo 5000 300 1")
    text = r.violations[0].format()
    assert "A/foo: bytes 5000..5300 hold" in text and "A/foo: size 5300, expected 5000" in text
    # the whole log record became durable before the data (a store subset)
    assert any(v.state_kind in ("stores", "inflight") for v in r.violations)


def test_data_written_after_the_commit(monkeypatch, clean):
    clean(*DATA_WORKLOADS[:4])
    copy_in = FileSystem._copy_in
    write = FileSystem.write

    def late_copy(self, off, data, segs):
        self.__dict__.setdefault("_late", []).append((off, bytes(data), segs))

    def late_write(self, ino, off, data):
        n = write(self, ino, off, data)
        for o, d, s in self.__dict__.pop("_late", []):
            copy_in(self, o, d, s)  # after the transaction committed
        return n
    monkeypatch.setattr(FileSystem, "_copy_in", late_copy)
    monkeypatch.setattr(FileSystem, "write", late_write)
    monkeypatch.setattr(WAL, "_log_and_apply", _no_data_fence)
    for t in DATA_WORKLOADS[:4]:
        r = run(t)
        assert "state" in kinds(r), t
        assert any("hold" in m for v in r.violations for m in v.message), t
    # an overwrite is not durable before fsync anyway: no promise is broken
    assert run("write A/foo 100 200 1").nviolations == 0
    r = run("write A/foo 100 200 1; fsync A/foo")
    assert r.nviolations == 0  # the late copy still precedes fsync's fence


# --------------------------------------------------------------------------
# a rename done as two transactions
# --------------------------------------------------------------------------


def test_rename_in_two_transactions(monkeypatch, clean):
    texts = ("rename A/foo B/new", "rename A/foo B/baz", "rename A/bar A/new")
    clean(*texts)
    rename = FileSystem.rename

    def two_tx(self, parent, name, newparent, newname, flags=0):
        if flags:
            return rename(self, parent, name, newparent, newname, flags)
        ino = self.lookup(parent, name).ino
        try:
            self.lookup(newparent, newname)
            self.unlink(newparent, newname)
        except FileNotFoundError:
            pass
        self.link(ino, newparent, newname)
        self.unlink(parent, name)
    monkeypatch.setattr(FileSystem, "rename", two_tx)
    for t in texts:
        r = run(t)
        assert kinds(r) == {"state"}, t
        msgs = "\n".join(m for v in r.violations for m in v.message)
        assert "differs from before the operation" in msgs
        assert "differs from after the operation" in msgs


# --------------------------------------------------------------------------
# fsync and recovery
# --------------------------------------------------------------------------


def test_fsync_that_does_nothing(monkeypatch, clean):
    texts = ("write A/foo 100 200 1; fsync A/foo", "write A/foo 4000 200 1; fdatasync A/foo")
    clean(*texts)
    monkeypatch.setattr(FileSystem, "fsync", lambda self, ino, datasync=False: None)
    for t in texts:
        r = run(t)
        assert kinds(r) == {"state", "pending"}, t
        assert any("earlier writes to the file are not durable" in m
                   for v in r.violations for m in v.message)
        st = [v for v in r.violations if v.kind == "state"]
        assert all("after op 1" in v.where for v in st)


def test_recovery_that_moves_the_tail_too_early(monkeypatch, clean):
    """Only crashing the recovery itself shows this one."""
    texts = ("mkdir B/D", "rename A/foo B/new")
    clean(*texts)
    recover = WAL.recover

    def broken(self):
        img = self.img
        real = img.fence
        first = [True]

        def fence():
            if first[0]:  # the fence between replay and tail move is gone
                first[0] = False
                return
            real()
        img.fence = fence
        try:
            return recover(self)
        finally:
            del img.fence
    monkeypatch.setattr(WAL, "recover", broken)
    for t in texts:
        r = run(t)
        assert r.nviolations, t
        assert all(v.phase.startswith("recovery of event") for v in r.violations), t
        assert run(t, ct.Config(recovery="none")).nviolations == 0


# --------------------------------------------------------------------------
# fallocate's data part done out of order
# --------------------------------------------------------------------------

# A/foo: 5,000 bytes, durable; the punch is one whole block, the zero range grows it
PUNCH = "falloc A/foo punch 0 4096"
ZERO = "falloc A/foo zero 1000 9000"
#: broken variants produce many violations, each a full check: a cheaper look
QUICK = ct.Config(k=1, recovery="none", new_work=False)


def _zero_in_place(fs, inode, off, end):
    """Zero the mapped part of [off, end) of `inode` in place (flushed, not fenced)."""
    lb0, lb1 = off // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
    for s, k, p in fs.tree(inode).map_range(lb0, lb1 - lb0 + 1):
        if p:
            a, b = max(off, s * BLOCK_SIZE), min(end, (s + k) * BLOCK_SIZE)
            fs.img.zero(p * BLOCK_SIZE + a - s * BLOCK_SIZE, b - a, drain=False)


def test_punch_zeroing_whole_blocks_in_place(monkeypatch, clean):
    """Only the partial blocks at the edges of a punched range may be seen
    half-zeroed after a crash; the whole blocks go in the transaction."""
    clean(PUNCH)
    punch = FileSystem._punch

    def zero_first(self, inode, off, end):
        _zero_in_place(self, inode, off, end)
        punch(self, inode, off, end)
    monkeypatch.setattr(FileSystem, "_punch", zero_first)
    r = run(PUNCH, QUICK)
    assert kinds(r) == {"state"}, [v.format() for v in r.violations]
    assert any("A/foo: bytes" in m for v in r.violations for m in v.message)


def test_zero_range_size_before_its_zeroing(monkeypatch, clean):
    """A zero range that grows the file must not show the new size before
    the old bytes of the range are durably zero."""
    clean(ZERO)
    fallocate = FileSystem.fallocate

    def size_first(self, ino, mode, off, length):
        if not mode & 0x10:
            return fallocate(self, ino, mode, off, length)
        fallocate(self, ino, mode & ~0x10, off, length)  # blocks and size
        _zero_in_place(self, self.iget(ino), off, off + length)
        self.img.fence()
    monkeypatch.setattr(FileSystem, "fallocate", size_first)
    r = run(ZERO, QUICK)
    assert "state" in kinds(r), [v.format() for v in r.violations]
    assert any("A/foo: bytes" in m for v in r.violations for m in v.message)
