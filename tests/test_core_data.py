"""Core: file data -- read, write, holes, st_blocks, fallocate."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import fresh_image
from pmfs.fs import FileSystem, MountOptions
from test_core_helpers import (BS, ROOT, crash_mount, expect_errno, free_counts, mkfile, read_all,
                               remount)


def _pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed * 13 + (i >> 12)) & 0xFF or 1 for i in range(n))


# ----------------------------------------------------------------------
# read / write
# ----------------------------------------------------------------------
def test_read_past_eof(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f", b"0123456789")
    assert bytes(fs.read(f, 0, 100)) == b"0123456789"
    assert bytes(fs.read(f, 5, 100)) == b"56789"
    assert bytes(fs.read(f, 10, 100)) == b""
    assert bytes(fs.read(f, 1 << 40, 100)) == b""
    assert bytes(fs.read(f, 3, 0)) == b""
    e = mkfile(fs, ROOT, b"empty")
    assert bytes(fs.read(e, 0, 4096)) == b""


def test_read_write_of_non_files(memfs):
    fs = memfs
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    expect_errno(errno.EISDIR, fs.read, d, 0, 10)
    expect_errno(errno.EISDIR, fs.write, d, 0, b"x")
    s = fs.symlink(ROOT, b"s", b"t").ino
    expect_errno(errno.EINVAL, fs.write, s, 0, b"x")
    f = mkfile(fs, ROOT, b"f")
    expect_errno(errno.EINVAL, fs.write, f, -1, b"x")
    assert fs.write(f, 0, b"") == 0
    assert fs.getattr(f).size == 0


def test_write_past_eof_zero_fills_the_gap(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f", b"head")
    assert fs.write(f, 10000, b"tail") == 4
    assert fs.getattr(f).size == 10004
    got = read_all(fs, f)
    assert got == b"head" + bytes(10000 - 4) + b"tail"
    # the gap block in the middle (block 1) is a hole: not allocated
    assert fs.getattr(f).blocks == 2
    # within one block
    g = mkfile(fs, ROOT, b"g", b"ab")
    fs.write(g, 100, b"cd")
    assert read_all(fs, g) == b"ab" + bytes(98) + b"cd"


def test_overwrite_and_extend(memfs):
    fs = memfs
    data = bytearray(_pattern(3 * BS + 123))
    f = mkfile(fs, ROOT, b"f", bytes(data))
    b0, _ = free_counts(fs)
    fs.write(f, 100, b"X" * 5000)
    data[100:5100] = b"X" * 5000
    assert read_all(fs, f) == bytes(data)
    assert free_counts(fs)[0] == b0  # overwrite: no new block
    fs.write(f, len(data) - 10, b"Y" * 30)
    data[len(data) - 10:] = b"Y" * 30
    assert read_all(fs, f) == bytes(data)
    assert fs.getattr(f).size == len(data)


def test_write_spanning_holes_and_extents(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f")
    model = bytearray(10 * BS)
    for blk in (1, 4, 5, 8):
        chunk = _pattern(BS, blk)
        fs.write(f, blk * BS, chunk)
        model[blk * BS:(blk + 1) * BS] = chunk
    fs.setattr(f, size=10 * BS)
    assert fs.getattr(f).blocks == 4
    # one write across hole 0, extent 1, holes 2-3, extents 4-5, holes 6-7, extent 8
    big = _pattern(9 * BS - 200, 99)
    fs.write(f, 100, big)
    model[100:100 + len(big)] = big
    assert read_all(fs, f) == bytes(model)
    assert fs.getattr(f).blocks == 10
    f2 = fs.lookup(ROOT, b"f").ino
    fs = remount(fs)
    assert read_all(fs, f2) == bytes(model)
    fs.close()


def test_st_blocks_of_sparse_file(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f")
    assert fs.getattr(f).blocks == 0
    assert fs.st_blocks(fs.getattr(f)) == 0
    fs.write(f, 0, b"x")
    assert fs.getattr(f).blocks == 1 and fs.st_blocks(fs.getattr(f)) == 8
    fs.write(f, 1 << 30, b"y")  # 1 GiB further
    a = fs.getattr(f)
    assert a.size == (1 << 30) + 1
    assert a.blocks == 2 and fs.st_blocks(a) == 16
    fs.setattr(f, size=1 << 35)
    assert fs.getattr(f).blocks == 2
    fs.setattr(f, size=10)
    assert fs.getattr(f).blocks == 1


class _Model:
    def __init__(self):
        self.data = bytearray()

    def write(self, off, buf):
        if off > len(self.data):
            self.data.extend(bytes(off - len(self.data)))
        self.data[off:off + len(buf)] = buf

    def truncate(self, n):
        if n < len(self.data):
            del self.data[n:]
        else:
            self.data.extend(bytes(n - len(self.data)))


_ops = st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, 24 * BS), st.integers(1, 3 * BS + 17),
              st.integers(0, 255)),
    st.tuples(st.just("t"), st.integers(0, 24 * BS), st.just(0), st.just(0)),
    st.tuples(st.just("p"), st.integers(0, 24 * BS), st.integers(1, 6 * BS), st.just(0)),
    st.tuples(st.just("a"), st.integers(0, 24 * BS), st.integers(1, 6 * BS),
              st.sampled_from([0, 1])),
), min_size=1, max_size=25)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(ops=_ops)
def test_random_writes_match_model(ops):
    img = fresh_image()
    fs = FileSystem(img, MountOptions())
    b0, _ = free_counts(fs)
    f = mkfile(fs, ROOT, b"f")
    m = _Model()
    for op, off, n, arg in ops:
        if op == "w":
            buf = bytes([(arg + i) & 0xFF for i in range(n)])
            assert fs.write(f, off, buf) == n
            m.write(off, buf)
        elif op == "t":
            fs.setattr(f, size=off)
            m.truncate(off)
        elif op == "p":
            fs.fallocate(f, 3, off, n)
            end = min(off + n, len(m.data))
            if off < end:
                m.data[off:end] = bytes(end - off)
        else:
            fs.fallocate(f, arg, off, n)
            if arg == 0 and off + n > len(m.data):
                m.truncate(off + n)
        assert fs.getattr(f).size == len(m.data)
    assert read_all(fs, f) == bytes(m.data)
    # random-offset reads
    for off in range(0, len(m.data) + BS, 3001):
        assert bytes(fs.read(f, off, 5000)) == bytes(m.data[off:off + 5000])
    # blocks charged equal blocks taken from the free count
    assert b0 - free_counts(fs)[0] == fs.getattr(f).blocks
    fs = remount(fs)
    assert read_all(fs, f) == bytes(m.data)
    fs.unlink(ROOT, b"f")
    assert free_counts(fs)[0] == b0
    fs.close()


# ----------------------------------------------------------------------
# fallocate
# ----------------------------------------------------------------------
def test_fallocate_mode0_extends_and_allocates_zeros(memfs):
    fs = memfs
    b0, _ = free_counts(fs)
    f = mkfile(fs, ROOT, b"f", b"abc")
    m = fs.getattr(f).mtime
    fs.fallocate(f, 0, 0, 5 * BS + 1)
    a = fs.getattr(f)
    assert a.size == 5 * BS + 1
    assert a.blocks == 6
    assert free_counts(fs)[0] == b0 - 6
    assert a.mtime >= m
    assert read_all(fs, f) == b"abc" + bytes(5 * BS - 2)
    # inside the file: size unchanged, no new blocks
    fs.fallocate(f, 0, 100, 200)
    assert fs.getattr(f).size == 5 * BS + 1 and fs.getattr(f).blocks == 6
    # writes into preallocated blocks take no new space
    fs.write(f, 2 * BS, b"Q" * BS)
    assert free_counts(fs)[0] == b0 - 6
    # past EOF with a gap before it: the gap stays a hole
    fs.fallocate(f, 0, 10 * BS, BS)
    a = fs.getattr(f)
    assert a.size == 11 * BS and a.blocks == 7
    assert bytes(fs.read(f, 6 * BS, 4 * BS)) == bytes(4 * BS)


def test_fallocate_keep_size(memfs):
    fs = memfs
    b0, _ = free_counts(fs)
    f = mkfile(fs, ROOT, b"f", b"x" * 100)
    fs.fallocate(f, 1, 0, 8 * BS)
    a = fs.getattr(f)
    assert a.size == 100
    assert a.blocks == 8
    assert free_counts(fs)[0] == b0 - 8
    assert read_all(fs, f) == b"x" * 100
    # a later extension reads zeros from the preallocated blocks
    fs.setattr(f, size=8 * BS)
    assert read_all(fs, f) == b"x" * 100 + bytes(8 * BS - 100)
    assert free_counts(fs)[0] == b0 - 8
    # truncating down frees preallocated blocks past the new EOF
    g = mkfile(fs, ROOT, b"g", b"y" * 3000)
    fs.fallocate(g, 1, 0, 4 * BS)
    assert fs.getattr(g).blocks == 4
    fs.setattr(g, size=1)
    assert fs.getattr(g).blocks == 1
    assert read_all(fs, g) == b"y"


def test_truncate_to_same_size_frees_preallocation(memfs):
    """ext4 and tmpfs both drop KEEP_SIZE preallocation past EOF on a
    truncate to the current size (ftruncate(fd, st_size)): st_blocks 32 -> 8
    in the check on this machine."""
    fs = memfs
    b0, _ = free_counts(fs)
    g = mkfile(fs, ROOT, b"g", b"y")
    fs.fallocate(g, 1, 0, 4 * BS)
    assert fs.getattr(g).blocks == 4
    fs.setattr(g, size=1)
    assert fs.getattr(g).blocks == 1
    assert free_counts(fs)[0] == b0 - 1
    assert read_all(fs, g) == b"y"


def test_punch_hole(memfs):
    fs = memfs
    b0, _ = free_counts(fs)
    data = bytearray(_pattern(8 * BS))
    f = mkfile(fs, ROOT, b"f", bytes(data))
    assert free_counts(fs)[0] == b0 - 8
    # whole blocks 2..4
    fs.fallocate(f, 3, 2 * BS, 3 * BS)
    data[2 * BS:5 * BS] = bytes(3 * BS)
    a = fs.getattr(f)
    assert a.size == 8 * BS
    assert a.blocks == 5
    assert free_counts(fs)[0] == b0 - 5
    assert read_all(fs, f) == bytes(data)
    # partial blocks at both edges: zeroed in place, the full ones freed
    fs.fallocate(f, 3, 5 * BS + 100, 2 * BS)  # 5:100.. 7:100
    data[5 * BS + 100:7 * BS + 100] = bytes(2 * BS)
    assert read_all(fs, f) == bytes(data)
    assert fs.getattr(f).blocks == 4  # block 6 gone, 5 and 7 partly zero
    # inside one block
    fs.fallocate(f, 3, 10, 20)
    data[10:30] = bytes(20)
    assert read_all(fs, f) == bytes(data)
    assert fs.getattr(f).blocks == 4
    # over holes and past EOF: fine, size kept
    fs.fallocate(f, 3, 0, 100 * BS)
    assert fs.getattr(f).size == 8 * BS
    assert read_all(fs, f) == bytes(8 * BS)
    assert fs.getattr(f).blocks == 0
    assert free_counts(fs)[0] == b0
    fs = remount(fs)
    assert read_all(fs, f) == bytes(8 * BS)
    fs.close()


def test_punch_hole_aligned_start_partial_end(memfs):
    fs = memfs
    data = bytearray(_pattern(3 * BS))
    f = mkfile(fs, ROOT, b"f", bytes(data))
    fs.fallocate(f, 3, BS, 50)
    data[BS:BS + 50] = bytes(50)
    assert read_all(fs, f) == bytes(data)
    fs.fallocate(f, 3, 2 * BS - 50, 50)
    data[2 * BS - 50:2 * BS] = bytes(50)
    assert read_all(fs, f) == bytes(data)
    assert fs.getattr(f).blocks == 3


def test_fallocate_modes_refused(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f", b"abc")
    expect_errno(errno.EOPNOTSUPP, fs.fallocate, f, 2, 0, 10)  # PUNCH_HOLE alone
    # collapse/insert range, unshare, and punch hole with zero range
    for mode in (0x04, 0x08, 0x20, 0x40, 0x05, 0x0B, 0x12, 0x13):
        expect_errno(errno.EOPNOTSUPP, fs.fallocate, f, mode, 0, 10)
    expect_errno(errno.EINVAL, fs.fallocate, f, 0, 0, 0)
    expect_errno(errno.EINVAL, fs.fallocate, f, 0, -1, 10)
    expect_errno(errno.EFBIG, fs.fallocate, f, 0, 16 << 40, 1)
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    expect_errno(errno.EISDIR, fs.fallocate, d, 0, 0, 10)
    assert read_all(fs, f) == b"abc"


def test_fallocate_enospc(memfs):
    fs = memfs
    b0, i0 = free_counts(fs)
    f = mkfile(fs, ROOT, b"f", b"abc")
    b1, _ = free_counts(fs)
    expect_errno(errno.ENOSPC, fs.fallocate, f, 0, 0, (b0 + 10) * BS)
    expect_errno(errno.ENOSPC, fs.fallocate, f, 1, 0, (b0 + 10) * BS)
    a = fs.getattr(f)
    assert a.size == 3 and a.blocks == 1
    assert free_counts(fs)[0] == b1  # nothing leaked
    assert read_all(fs, f) == b"abc"
    # what fits works
    fs.fallocate(f, 1, 0, 100 * BS)
    assert fs.getattr(f).blocks == 100


def test_write_returns_and_reads_many_sizes(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f")
    fs.open(f, os.O_WRONLY)
    model = bytearray()
    off = 0
    for n in (1, 4095, 4096, 4097, 8191, 12289, 65536, 3, 100000):
        buf = _pattern(n, n)
        assert fs.write(f, off, buf) == n
        model[off:off + n] = buf
        off += n
    assert read_all(fs, f) == bytes(model)
    fs.release(f)  # the last close frees any speculative preallocation
    assert fs.getattr(f).blocks == -(-len(model) // BS)


def test_write_accepts_memoryview_and_bytearray(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f")
    assert fs.write(f, 0, bytearray(b"abc")) == 3
    assert fs.write(f, 3, memoryview(b"defgh")[1:3]) == 2
    assert read_all(fs, f) == b"abcef"


def test_lazy_times_cost_no_transaction_at_close_and_are_written_in_batches(memfs):
    """Time stamps kept in DRAM (an overwrite's mtime/ctime, a read's atime)
    are not written at close; flush_lazy (the 5 s housekeeping, unmount)
    writes them LAZY_BATCH inodes per transaction; a crash before that
    loses only those time stamps."""
    fs = memfs
    files = [mkfile(fs, ROOT, b"f%d" % i, b"x" * 100) for i in range(150)]
    for f in files:
        fs.setattr(f, mtime=1000, ctime=1000)
    commits = fs.wal.commits
    for f in files:
        fs.open(f, os.O_RDWR)
        assert fs.write(f, 0, b"y") == 1  # an overwrite: lazy mtime
        fs.release(f)
    assert fs.wal.commits == commits  # neither the writes nor the closes
    assert all(fs.getattr(f).mtime > 1000 for f in files)
    crashed = crash_mount(fs)
    assert [crashed.getattr(f).mtime for f in files] == [1000] * 150
    assert all(read_all(crashed, f) == b"y" + b"x" * 99 for f in files)  # the data is there
    fs.flush_lazy()
    assert fs.wal.commits == commits + 3  # 64 + 64 + 22 inodes
    assert not fs.lazy
    after = crash_mount(fs)
    assert [after.getattr(f).mtime for f in files] == [fs.getattr(f).mtime for f in files]


def test_lazy_times_are_bounded(memfs, monkeypatch):
    """More than LAZY_MAX inodes with pending times: they are written (the
    daemon's memory does not grow with the files it touched)."""
    fs = memfs
    monkeypatch.setattr(FileSystem, "LAZY_MAX", 40)
    files = [mkfile(fs, ROOT, b"f%d" % i, b"x") for i in range(100)]
    for f in files:
        fs.setattr(f, atime=1, mtime=1000)  # relatime: the next read sets atime
    for f in files:
        fs.read(f, 0, 1)
        assert len(fs.lazy) <= 40
    crashed = crash_mount(fs)
    written = sum(crashed.getattr(f).atime > 1 for f in files)
    assert written >= 100 - 40 - 1


def test_a_failing_lazy_batch_is_written_one_by_one(memfs, monkeypatch):
    fs = memfs
    files = [mkfile(fs, ROOT, b"f%d" % i, b"x") for i in range(5)]
    for f in files:
        fs.setattr(f, mtime=1000)
        fs.write(f, 0, b"z")
    calls = []
    real = fs.tx

    def tx(label):
        calls.append(label)
        if len(calls) == 1:
            raise OSError(errno.EIO, "injected")
        return real(label)
    monkeypatch.setattr(fs, "tx", tx)
    fs.flush_lazy()
    assert calls == ["inode-times"] * 6  # the batch, then each inode alone
    assert not fs.lazy
    crashed = crash_mount(fs)
    assert all(crashed.getattr(f).mtime > 1000 for f in files)


def test_relatime_and_noatime(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f", b"abc")
    fs.setattr(f, atime=1000, mtime=2000)
    fs.read(f, 0, 3)
    a1 = fs.getattr(f).atime
    assert a1 > 2000  # relatime: atime older than mtime is updated
    fs.read(f, 0, 3)
    assert fs.getattr(f).atime == a1  # newer than mtime/ctime and < 1 day: kept
    fs = remount(fs)
    assert fs.getattr(f).atime == a1  # the lazy time reached the image
    fs.close()
    img = fs.img
    fs2 = FileSystem(img, MountOptions(atime="noatime"))
    fs2.setattr(f, atime=1000, mtime=2000)
    fs2.read(f, 0, 3)
    assert fs2.getattr(f).atime == 1000
    fs2.close()


def test_write_updates_times_lazily_but_durably(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f", b"x" * 5000)
    fs.setattr(f, mtime=5)
    fs.write(f, 0, b"y")  # an overwrite: no transaction needed for data
    m = fs.getattr(f).mtime
    assert m > 5
    fs = remount(fs)
    assert fs.getattr(f).mtime == m
    assert bytes(fs.read(f, 0, 2)) == b"yx"
    fs.close()


@pytest.mark.parametrize("kind", [stat.S_IFIFO, stat.S_IFCHR, stat.S_IFSOCK])
def test_data_ops_on_special_files(memfs, kind):
    fs = memfs
    n = fs.mknod(ROOT, b"n", kind | 0o644, os.makedev(1, 1)).ino
    expect_errno(errno.EINVAL, fs.read, n, 0, 10)
    expect_errno(errno.EINVAL, fs.write, n, 0, b"x")


def test_seek_data_and_hole(memfs):
    """lseek(SEEK_DATA/SEEK_HOLE) semantics: the next data or hole offset
    at or after `off`, the implicit hole at EOF, ENXIO outside the file;
    blocks preallocated past EOF are not data of the file."""
    fs = memfs
    D, H = os.SEEK_DATA, os.SEEK_HOLE
    M = 1 << 20
    ino = mkfile(fs, ROOT, b"sparse", b"a" * BS)
    fs.write(ino, M, b"b" * 10)
    fs.setattr(ino, size=3 * M)
    fs.fallocate(ino, 0x01, 4 * M, M)  # KEEP_SIZE: blocks past EOF
    assert fs.seek(ino, 0, D) == 0 and fs.seek(ino, 100, D) == 100
    assert fs.seek(ino, 0, H) == BS and fs.seek(ino, BS - 1, H) == BS
    assert fs.seek(ino, BS, D) == M and fs.seek(ino, 5000, D) == M
    assert fs.seek(ino, M + 5, D) == M + 5
    assert fs.seek(ino, M, H) == M + BS
    assert fs.seek(ino, 2 * M, H) == 2 * M
    expect_errno(errno.ENXIO, fs.seek, ino, M + BS, D)   # only holes up to EOF
    assert fs.seek(ino, 3 * M - 1, H) == 3 * M - 1
    for off in (3 * M, 5 * M, -1):
        expect_errno(errno.ENXIO, fs.seek, ino, off, D)
        expect_errno(errno.ENXIO, fs.seek, ino, off, H)
    expect_errno(errno.EINVAL, fs.seek, ino, 0, os.SEEK_SET)
    # no hole but the one at EOF, across several extents
    full = mkfile(fs, ROOT, b"full", _pattern(20 * BS + 7))
    for i in range(0, 20, 2):  # rewrite: still one mapping, maybe many extents
        fs.write(full, i * BS, b"x")
    assert fs.seek(full, 0, H) == 20 * BS + 7 and fs.seek(full, 9 * BS, D) == 9 * BS
    # every other block mapped: the walk alternates
    alt = fs.create(ROOT, b"alt", 0o644).ino
    for i in range(0, 40, 2):
        fs.write(alt, i * BS, b"y" * BS)
    assert fs.seek(alt, 0, H) == BS and fs.seek(alt, BS, D) == 2 * BS
    assert fs.seek(alt, 38 * BS, H) == 39 * BS  # the last block is data: EOF
    # a small (inline) file is all data; an empty one has nothing
    small = mkfile(fs, ROOT, b"small", b"tiny")
    assert fs.seek(small, 0, D) == 0 and fs.seek(small, 1, H) == 4
    empty = mkfile(fs, ROOT, b"empty")
    expect_errno(errno.ENXIO, fs.seek, empty, 0, D)
    expect_errno(errno.EINVAL, fs.seek, ROOT, 0, D)


def test_fallocate_zero_range(memfs):
    """FALLOC_FL_ZERO_RANGE: the range reads as zeros and is allocated;
    the size grows unless KEEP_SIZE; mtime and ctime change; ENOSPC
    changes nothing (not even the data)."""
    fs = memfs
    f = mkfile(fs, ROOT, b"f", _pattern(10 * BS + 100))
    model = bytearray(_pattern(10 * BS + 100))
    fs.fallocate(f, 0x01 | 0x02, 3 * BS, 2 * BS)     # a hole to fill again
    model[3 * BS:5 * BS] = bytes(2 * BS)
    t0 = fs.getattr(f).mtime
    fs.fallocate(f, 0x10, 100, 6 * BS)               # partial blocks, a hole, mapped blocks
    model[100:100 + 6 * BS] = bytes(6 * BS)
    a = fs.getattr(f)
    assert read_all(fs, f) == bytes(model) and a.size == len(model)
    assert a.blocks == 11 and a.mtime > t0 and a.ctime == a.mtime
    fs.fallocate(f, 0x10 | 0x01, 10 * BS, 4 * BS)    # the tail and past EOF, keep size
    model[10 * BS:] = bytes(len(model) - 10 * BS)
    assert fs.getattr(f).size == len(model) and fs.getattr(f).blocks == 14
    assert read_all(fs, f) == bytes(model)
    fs.fallocate(f, 0x10, 12 * BS, 100)              # grows the file
    model.extend(bytes(12 * BS + 100 - len(model)))
    assert read_all(fs, f) == bytes(model)
    b0, _ = free_counts(fs)
    expect_errno(errno.ENOSPC, fs.fallocate, f, 0x10, 0, (b0 + 100) * BS)
    assert read_all(fs, f) == bytes(model) and free_counts(fs)[0] == b0
    fs.close()


def test_copy_range(memfs, monkeypatch):
    """copy_file_range(2) in the core: like a read and a write, in pieces;
    holes arrive as zeros; 0 at the source's EOF; same file, other place."""
    fs = memfs
    monkeypatch.setattr(FileSystem, "COPY_CHUNK", 3 * BS)  # several pieces
    data = _pattern(10 * BS + 123)
    src = mkfile(fs, ROOT, b"src", data)
    fs.fallocate(src, 0x01 | 0x02, 2 * BS, 2 * BS)   # a hole in the middle
    want = bytearray(data)
    want[2 * BS:4 * BS] = bytes(2 * BS)
    dst = mkfile(fs, ROOT, b"dst", b"d" * 100)
    assert fs.copy_range(src, 0, dst, 50, 100 * BS) == len(want)
    assert read_all(fs, dst) == b"d" * 50 + bytes(want)
    assert fs.copy_range(src, len(want), dst, 0, 10) == 0        # at EOF
    assert fs.copy_range(src, 5 * BS, dst, 0, 7) == 7
    assert read_all(fs, dst)[:7] == bytes(want[5 * BS:5 * BS + 7])
    # within one file, to a place the source does not cover
    assert fs.copy_range(src, 0, src, 20 * BS, BS + 1) == BS + 1
    assert read_all(fs, src)[20 * BS:] == bytes(want[:BS + 1])
    assert fs.getattr(src).size == 21 * BS + 1
    d = fs.mkdir(ROOT, b"dir", 0o755).ino
    expect_errno(errno.EISDIR, fs.copy_range, d, 0, dst, 0, 10)
    expect_errno(errno.EINVAL, fs.copy_range, src, -1, dst, 0, 10)
    # out of space part-way: a short copy; with nothing copied: ENOSPC
    b0, _ = free_counts(fs)
    big = fs.create(ROOT, b"big", 0o644).ino
    fs.setattr(big, size=(b0 + 50) * BS)
    fs.write(big, 0, b"x" * (b0 // 2) * BS)   # data, then a long hole
    out = fs.create(ROOT, b"out", 0o644).ino
    n = fs.copy_range(big, 0, out, 0, (b0 + 50) * BS)
    assert 0 < n < (b0 + 50) * BS and fs.getattr(out).size == n
    expect_errno(errno.ENOSPC, fs.copy_range, big, n, out, n, 10 * BS)


# -- speculative preallocation past EOF (appending writers) -------------------

def _append(fs, f, n, size=BS, byte=None):
    off = fs.getattr(f).size
    for i in range(n):
        data = bytes([byte if byte is not None else (off // size + i) & 0xFF]) * size
        assert fs.write(f, off + i * size, data) == size


def _appending(fs, name, n):
    """A file opened for writing and grown by n 4 KiB appends."""
    f = mkfile(fs, ROOT, name)
    fs.open(f, os.O_WRONLY)
    _append(fs, f, n)
    return f


def _fsck_clean(img):
    from pmfs.fsck import Fsck
    res = Fsck(img, real=False, force=True, out=None, headers=False).run()
    assert res.clean, res.problems


def test_appends_preallocate_past_eof_and_the_last_release_frees_it(memfs):
    fs = memfs
    b0, _ = free_counts(fs)
    f = mkfile(fs, ROOT, b"log")
    fs.open(f, os.O_WRONLY)
    _append(fs, f, 15)
    assert fs.getattr(f).blocks == 15
    _append(fs, f, 1)  # the file reaches 64 KiB: this append speculates
    a = fs.getattr(f)
    assert a.size == 16 * BS and a.blocks == 16 + 16  # as many as the file has
    assert fs.eof_blocks[f][1:] == (16, 32)
    _append(fs, f, 16)  # these fill the preallocated blocks: no allocation
    assert fs.getattr(f).blocks == 32
    _append(fs, f, 1)  # the next one doubles again
    assert fs.getattr(f).blocks == 33 + 33
    # nothing of it shows: size, data, reads past EOF, SEEK_HOLE
    size = fs.getattr(f).size
    assert size == 33 * BS
    want = b"".join(bytes([i & 0xFF]) * BS for i in range(33))
    assert read_all(fs, f) == want
    assert bytes(fs.read(f, size, 100)) == b""
    assert fs.seek(f, 0, os.SEEK_HOLE) == size
    fs.release(f)
    assert fs.getattr(f).blocks == 33
    assert f not in fs.eof_blocks
    assert free_counts(fs)[0] == b0 - 33
    assert read_all(fs, f) == want
    fs = remount(fs)
    assert fs.getattr(f).blocks == 33 and read_all(fs, f) == want
    fs.close()
    _fsck_clean(fs.img)


def test_preallocation_stays_within_bounds(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f")
    fs.open(f, os.O_WRONLY)
    _append(fs, f, 300)  # past 1 MiB: capped at eof_prealloc blocks
    a = fs.getattr(f)
    assert a.blocks - 300 <= MountOptions().eof_prealloc
    # small files and large writes get none
    g = mkfile(fs, ROOT, b"g")
    fs.open(g, os.O_WRONLY)
    _append(fs, g, 10)
    assert fs.getattr(g).blocks == 10
    h = mkfile(fs, ROOT, b"h", b"x" * (64 << 10))
    fs.open(h, os.O_WRONLY)
    assert fs.write(h, 64 << 10, b"y" * (1 << 20)) == 1 << 20
    assert fs.getattr(h).blocks == 16 + 256
    # writes that do not extend the file from within get none
    k = mkfile(fs, ROOT, b"k", b"z" * (64 << 10))
    fs.open(k, os.O_WRONLY)
    assert fs.write(k, 1 << 20, b"q") == 1  # sparse, past EOF
    assert fs.getattr(k).blocks == 17
    for ino in (f, g, h, k):
        fs.release(ino)
    assert fs.getattr(f).blocks == 300
    # and the option turns it off
    fs2 = FileSystem(fresh_image(), MountOptions(eof_prealloc=0))
    m = mkfile(fs2, ROOT, b"m")
    fs2.open(m, os.O_WRONLY)
    _append(fs2, m, 40)
    assert fs2.getattr(m).blocks == 40
    fs2.close()


def test_preallocation_never_takes_the_last_free_space():
    fs = FileSystem(fresh_image(4 << 20), MountOptions())
    f = mkfile(fs, ROOT, b"f")
    fs.open(f, os.O_WRONLY)
    free0, _ = free_counts(fs)
    n = 0
    while True:  # append until the file system is full: no short count, no leak
        try:
            assert fs.write(f, n * BS, b"a" * BS) == BS
        except OSError as e:
            assert e.errno == errno.ENOSPC
            break
        n += 1
        assert fs.getattr(f).blocks <= n + max(16, n)
    assert n >= free0 - 8  # only the extent tree's own blocks are missing
    fs.release(f)
    assert fs.getattr(f).size == n * BS
    fs.close()
    _fsck_clean(fs.img)


def test_users_blocks_past_eof_are_never_trimmed(memfs):
    fs = memfs
    f = _appending(fs, b"f", 16)
    assert fs.getattr(f).blocks == 32
    fs.fallocate(f, 1, 0, 40 * BS)  # KEEP_SIZE: the caller's blocks from now on
    fs.release(f)
    assert fs.getattr(f).blocks == 40
    # truncate up into the speculative range: blocks below the new EOF stay
    g = _appending(fs, b"g", 16)
    assert fs.getattr(g).blocks == 32
    fs.setattr(g, size=20 * BS + 1)
    assert read_all(fs, g)[16 * BS:] == bytes(4 * BS + 1)
    fs.release(g)
    assert fs.getattr(g).blocks == 21


def test_unmount_frees_the_preallocation_of_open_files(memfs):
    fs = memfs
    f = _appending(fs, b"f", 20)
    assert fs.getattr(f).blocks > 20
    fs = remount(fs)  # still open: close frees it
    assert fs.getattr(f).blocks == 20
    fs.close()
    _fsck_clean(fs.img)


def test_unlinked_file_with_preallocation_frees_everything(memfs):
    fs = memfs
    b0, i0 = free_counts(fs)
    f = _appending(fs, b"f", 20)
    assert f in fs.eof_blocks
    fs.unlink(ROOT, b"f")
    fs.release(f)
    assert free_counts(fs) == (b0, i0)
    assert f not in fs.eof_blocks  # freeing the inode dropped its record


def test_a_record_of_another_generation_never_trims(memfs):
    """The record names the inode generation it was made for: a slot freed
    and used again is never trimmed by a record it outlived."""
    fs = memfs
    g = mkfile(fs, ROOT, b"g")
    fs.fallocate(g, 1, 0, 30 * BS)  # the caller's blocks past EOF
    fs.open(g, os.O_WRONLY)
    gen = fs.getattr(g).generation
    fs.eof_blocks[g] = (gen + 1, 0, 30)  # stale: made for an earlier user of the slot
    assert fs.release(g) is False
    assert fs.getattr(g).blocks == 30 and g not in fs.eof_blocks
    fs.open(g, os.O_WRONLY)
    fs.eof_blocks[g] = (gen, 0, 30)  # the same record for this generation trims
    assert fs.release(g) is True
    assert fs.getattr(g).blocks == 0


def test_preallocation_after_a_crash_is_kept_and_never_shows(memfs):
    fs = memfs
    f = _appending(fs, b"f", 16)
    fs.fsync(f)
    fs2 = crash_mount(fs)
    a = fs2.getattr(f)
    assert a.size == 16 * BS and a.blocks == 32  # zeroed blocks past EOF, like KEEP_SIZE
    assert bytes(fs2.read(f, 0, 1 << 20)) == read_all(fs, f)
    fs2.close()
    _fsck_clean(fs2.img)


@pytest.mark.parametrize("grow", ["truncate", "write-past-gap", "fallocate"])
def test_growing_zeroes_stale_bytes_left_past_eof(memfs, grow):
    """An extending write stores its data before its size change commits:
    a crash in between leaves those bytes in blocks allocated past EOF
    (KEEP_SIZE or speculative).  Growing the file over them later must
    show zeros, not them."""
    fs = memfs
    f = mkfile(fs, ROOT, b"f", b"A" * 5000)
    fs.fallocate(f, 1, 0, 8 * BS)
    # what the crashed write left: bytes past EOF in the allocated blocks
    for s, k, p in fs.tree(fs.getattr(f)).map_range(0, 8):
        fs.img.write(p * BS, b"S" * (k * BS))
    mapped = {s: p for s, k, p in fs.tree(fs.getattr(f)).map_range(0, 8) if p}
    assert mapped
    # the file's own bytes were overwritten too by this simulation: restore them
    assert fs.write(f, 0, b"A" * 5000) == 5000
    if grow == "truncate":
        fs.setattr(f, size=8 * BS)
    elif grow == "write-past-gap":
        assert fs.write(f, 7 * BS, b"B" * BS) == BS
    else:
        fs.fallocate(f, 0, 0, 8 * BS)
    data = read_all(fs, f)
    assert data[:5000] == b"A" * 5000
    tail = data[5000:7 * BS] if grow == "write-past-gap" else data[5000:]
    assert tail == bytes(len(tail))


def test_preallocation_takes_only_the_free_run_after_the_write(memfs, monkeypatch):
    """One extent past the write or nothing: never a scatter of fragments."""
    fs = memfs
    f = mkfile(fs, ROOT, b"f")
    fs.open(f, os.O_WRONLY)
    _append(fs, f, 15)
    runs = []
    real = fs.bbm.run_length

    def short(i, maxlen):
        runs.append((i, maxlen))
        return min(real(i, maxlen), 5)
    monkeypatch.setattr(fs.bbm, "run_length", short)
    _append(fs, f, 1)
    assert runs and fs.getattr(f).blocks == 16 and f not in fs.eof_blocks
    monkeypatch.setattr(fs.bbm, "run_length", real)
    _append(fs, f, 1)
    t = fs.tree(fs.getattr(f))
    assert fs.getattr(f).blocks == 17 + 17
    assert len([seg for seg in t.map_range(0, 34) if seg[2]]) == 1  # one extent
    assert read_all(fs, f) == b"".join(bytes([i & 0xFF]) * BS for i in range(17))


def test_sparse_files_get_no_preallocation(memfs):
    """A write past EOF that the kernel splits at a page boundary makes
    its second half look like an append; the file is sparse, so nothing
    is speculated (the preallocation is sized by the blocks mapped without
    a hole before the write)."""
    fs = memfs
    f = mkfile(fs, ROOT, b"f", b"first")
    fs.open(f, os.O_RDWR)
    gib = 1 << 30
    assert fs.write(f, gib - 3, b"acr") == 3
    assert fs.write(f, gib, b"oss-1GiB") == 8  # starts at EOF: "appends"
    assert fs.getattr(f).blocks == 3 and f not in fs.eof_blocks
    # appended blocks: 15 without a hole are still under 64 KiB
    _append(fs, f, 13, byte=7)
    assert fs.getattr(f).blocks == 16 and f not in fs.eof_blocks
    _append(fs, f, 1, byte=7)  # 16 blocks without a hole: it speculates
    assert f in fs.eof_blocks and fs.getattr(f).blocks == 17 + 16
    fs.release(f)
    assert fs.getattr(f).blocks == 17
