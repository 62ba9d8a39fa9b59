"""Core: getattr/setattr -- mode, owner, size (truncate), timestamps."""

from __future__ import annotations

import errno
import os
import stat
import time
import tracemalloc

import pytest

from pmfs.fs import UTIME_NOW, UTIME_OMIT
from pmfs.layout import MAX_FILE_SIZE
from test_core_helpers import (BS, ROOT, expect_errno, free_counts, mkfile, read_all,
                               remount)

TIB = 1 << 40


def _later(fs, ino, field, old):
    v = getattr(fs.getattr(ino), field)
    assert v > old, f"{field} not updated ({v} <= {old})"
    return v


def test_root_attributes(memfs):
    a = memfs.getattr(ROOT)
    assert stat.S_ISDIR(a.mode)
    assert a.nlink == 3  # ".", its own name, lost+found's ".."
    assert memfs.getattr(2).ino == memfs.lookup(ROOT, b"lost+found").ino


@pytest.mark.parametrize("fmt", [stat.S_IFREG, stat.S_IFDIR, stat.S_IFIFO, stat.S_IFLNK,
                                 stat.S_IFCHR])
def test_chmod_keeps_type_bits(memfs, fmt):
    fs = memfs
    if fmt == stat.S_IFDIR:
        ino = fs.mkdir(ROOT, b"x", 0o755).ino
    elif fmt == stat.S_IFLNK:
        ino = fs.symlink(ROOT, b"x", b"t").ino
    else:
        ino = fs.mknod(ROOT, b"x", fmt | 0o644, 7).ino
    c0 = fs.getattr(ino).ctime
    time.sleep(0.001)
    # type bits in the argument are ignored: only the permission bits change
    fs.setattr(ino, mode=stat.S_IFREG | 0o4751)
    a = fs.getattr(ino)
    assert stat.S_IFMT(a.mode) == fmt
    assert stat.S_IMODE(a.mode) == 0o4751
    assert a.ctime > c0
    fs.setattr(ino, mode=0o7777)
    assert stat.S_IMODE(fs.getattr(ino).mode) == 0o7777
    fs.setattr(ino, mode=0)
    assert fs.getattr(ino).mode == fmt
    fs = remount(fs)
    assert fs.getattr(ino).mode == fmt
    fs.close()


def test_chown(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f")
    c0 = fs.getattr(f).ctime
    time.sleep(0.001)
    fs.setattr(f, uid=1001)
    a = fs.getattr(f)
    assert (a.uid, a.gid) == (1001, 0)
    c1 = _later(fs, f, "ctime", c0)
    time.sleep(0.001)
    fs.setattr(f, gid=2002)
    assert (fs.getattr(f).uid, fs.getattr(f).gid) == (1001, 2002)
    _later(fs, f, "ctime", c1)
    # -1 (0xFFFFFFFF) means "leave alone", as chown(2)
    fs.setattr(f, uid=0xFFFFFFFF, gid=77)
    assert (fs.getattr(f).uid, fs.getattr(f).gid) == (1001, 77)
    fs.setattr(f, uid=4000000000, gid=0xFFFFFFFF)
    assert (fs.getattr(f).uid, fs.getattr(f).gid) == (4000000000, 77)
    fs = remount(fs)
    assert (fs.getattr(f).uid, fs.getattr(f).gid) == (4000000000, 77)
    fs.close()


def test_nanosecond_times_exact(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f", b"x")
    at = 1_234_567_890_123_456_789
    mt = 987_654_321_987_654_321
    fs.setattr(f, atime=at, mtime=mt)
    a = fs.getattr(f)
    assert a.atime == at and a.mtime == mt
    # times before 1970 and far in the future
    fs.setattr(f, atime=-1_000_000_001, mtime=(1 << 62) + 7)
    a = fs.getattr(f)
    assert (a.atime, a.mtime) == (-1_000_000_001, (1 << 62) + 7)
    fs.setattr(f, atime=at, mtime=mt)
    fs = remount(fs)
    a = fs.getattr(f)
    assert a.atime == at and a.mtime == mt
    fs.close()


def test_utime_now_and_omit(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f", b"x")
    fs.setattr(f, atime=10**18, mtime=2 * 10**18 + 5)
    c0 = fs.getattr(f).ctime
    time.sleep(0.001)
    t0 = time.time_ns()
    fs.setattr(f, atime=UTIME_NOW, mtime=UTIME_OMIT)
    t1 = time.time_ns()
    a = fs.getattr(f)
    assert t0 <= a.atime <= t1
    assert a.mtime == 2 * 10**18 + 5
    assert t0 <= a.ctime <= t1 and a.ctime > c0
    fs.setattr(f, atime=UTIME_OMIT, mtime=UTIME_NOW)
    a2 = fs.getattr(f)
    assert a2.atime == a.atime
    assert a2.mtime >= t1
    # both omitted: nothing but ctime may change
    fs.setattr(f, atime=UTIME_OMIT, mtime=UTIME_OMIT)
    a3 = fs.getattr(f)
    assert (a3.atime, a3.mtime) == (a2.atime, a2.mtime)


def test_ctime_updated_on_every_change(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f", b"hello")
    c = fs.getattr(f).ctime
    ops = [
        lambda: fs.setattr(f, mode=0o600),
        lambda: fs.setattr(f, uid=5),
        lambda: fs.setattr(f, gid=6),
        lambda: fs.setattr(f, size=2),
        lambda: fs.setattr(f, size=20000),
        lambda: fs.setattr(f, atime=5, mtime=6),
        lambda: fs.write(f, 0, b"zz"),
        lambda: fs.write(f, 100000, b"end"),
        lambda: fs.link(f, ROOT, b"g"),
        lambda: fs.unlink(ROOT, b"g"),
        lambda: fs.rename(ROOT, b"f", ROOT, b"f2"),
        lambda: fs.setxattr(f, b"user.a", b"1"),
        lambda: fs.removexattr(f, b"user.a"),
        lambda: fs.fallocate(f, 0, 0, 300000),
        lambda: fs.fallocate(f, 3, 0, 8192),
    ]
    for i, op in enumerate(ops):
        time.sleep(0.001)
        op()
        c2 = fs.getattr(f).ctime
        assert c2 > c, f"operation {i} did not update ctime"
        c = c2


def test_mtime_on_data_change_only(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f", b"hello")
    m = fs.getattr(f).mtime
    time.sleep(0.001)
    fs.setattr(f, mode=0o600)
    fs.setattr(f, uid=3)
    fs.setxattr(f, b"user.x", b"y")
    assert fs.getattr(f).mtime == m
    fs.write(f, 1, b"E")
    m = _later(fs, f, "mtime", m)
    time.sleep(0.001)
    fs.setattr(f, size=1)
    m = _later(fs, f, "mtime", m)
    time.sleep(0.001)
    fs.setattr(f, size=5000)
    _later(fs, f, "mtime", m)


def test_truncate_down_and_up(memfs):
    fs = memfs
    b0, _ = free_counts(fs)
    data = bytes(range(256)) * 64  # 16 KiB: 4 blocks
    f = mkfile(fs, ROOT, b"f", data)
    assert free_counts(fs)[0] == b0 - 4
    fs.setattr(f, size=5000)
    assert fs.getattr(f).size == 5000
    assert read_all(fs, f) == data[:5000]
    assert fs.getattr(f).blocks == 2
    assert free_counts(fs)[0] == b0 - 2
    # extend: the data past the old size is gone, zeros read back
    fs.setattr(f, size=16384)
    assert fs.getattr(f).size == 16384
    got = read_all(fs, f)
    assert got[:5000] == data[:5000]
    assert got[5000:] == bytes(16384 - 5000)
    # extending does not allocate
    assert free_counts(fs)[0] == b0 - 2
    fs.setattr(f, size=0)
    assert read_all(fs, f) == b""
    assert fs.getattr(f).blocks == 0
    assert free_counts(fs)[0] == b0
    fs.setattr(f, size=3)
    assert read_all(fs, f) == b"\0\0\0"


@pytest.mark.parametrize("cut", [1, 100, 4095, 4096, 4097, 6000, 8191])
def test_truncate_down_then_extend_no_stale_bytes(memfs, cut):
    """The bytes past the new EOF in a partial last block must read as zeros
    after the file grows again (by truncate, by write past EOF, by
    fallocate)."""
    fs = memfs
    data = b"\xAA" * (3 * BS)
    for how in ("setattr", "write", "write_same_block", "fallocate", "fallocate_keep"):
        name = ("f-" + how).encode()
        f = mkfile(fs, ROOT, name, data)
        fs.setattr(f, size=cut)
        if how == "setattr":
            fs.setattr(f, size=3 * BS)
        elif how == "write":
            fs.write(f, 3 * BS - 1, b"E")
        elif how == "write_same_block":
            # a write a little past EOF, inside the old last block
            fs.write(f, min(cut + 10, 3 * BS - 1), b"E")
            fs.setattr(f, size=3 * BS)
        elif how == "fallocate":
            fs.fallocate(f, 0, 0, 3 * BS)
        else:
            fs.fallocate(f, 1, 0, 4 * BS)
            fs.setattr(f, size=3 * BS)
        got = read_all(fs, f)
        assert len(got) == 3 * BS
        assert got[:cut] == data[:cut], how
        tail = bytearray(got[cut:])
        if how == "write":
            assert tail[-1:] == b"E"
            tail = tail[:-1]
        elif how == "write_same_block":
            p = min(cut + 10, 3 * BS - 1) - cut
            assert tail[p] == ord("E")
            tail[p] = 0
        assert bytes(tail) == bytes(len(tail)), f"{how}: stale bytes past the old EOF"


def test_truncate_errors(memfs):
    fs = memfs
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    s = fs.symlink(ROOT, b"s", b"target").ino
    p = fs.mknod(ROOT, b"p", stat.S_IFIFO | 0o644).ino
    c = fs.mknod(ROOT, b"c", stat.S_IFCHR | 0o644, os.makedev(1, 3)).ino
    k = fs.mknod(ROOT, b"k", stat.S_IFSOCK | 0o644).ino
    expect_errno(errno.EISDIR, fs.setattr, d, size=0)
    expect_errno(errno.EISDIR, fs.setattr, ROOT, size=0)
    for ino in (s, p, c, k):
        expect_errno(errno.EINVAL, fs.setattr, ino, size=0)
    assert fs.readlink(s) == b"target"
    f = mkfile(fs, ROOT, b"f", b"abc")
    expect_errno(errno.EINVAL, fs.setattr, f, size=-1)
    expect_errno(errno.EFBIG, fs.setattr, f, size=16 * TIB + 1)
    expect_errno(errno.EFBIG, fs.setattr, f, size=1 << 50)
    expect_errno(errno.EFBIG, fs.setattr, f, size=1 << 63)
    assert read_all(fs, f) == b"abc"
    # a failed truncate changes nothing, not even the other attributes
    expect_errno(errno.EFBIG, fs.setattr, f, size=1 << 50, mode=0o600)
    assert stat.S_IMODE(fs.getattr(f).mode) == 0o644


def test_truncate_huge_does_not_allocate(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f", b"head")
    b0, i0 = free_counts(fs)
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        expect_errno(errno.EFBIG, fs.setattr, f, size=1 << 50)  # 1 PiB
        fs.setattr(f, size=MAX_FILE_SIZE)  # 16 TiB: the largest file
        elapsed = time.monotonic() - t0
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"truncate used {peak} bytes of memory"
    assert elapsed < 2.0
    a = fs.getattr(f)
    assert a.size == MAX_FILE_SIZE == 16 * TIB
    assert a.blocks == 1
    assert free_counts(fs) == (b0, i0)
    assert bytes(fs.read(f, 0, 4)) == b"head"
    assert bytes(fs.read(f, MAX_FILE_SIZE - 10, 100)) == bytes(10)
    assert bytes(fs.read(f, 8 * TIB, 8192)) == bytes(8192)
    assert bytes(fs.read(f, MAX_FILE_SIZE, 10)) == b""
    # a write at the very end maps one block
    assert fs.write(f, MAX_FILE_SIZE - 1, b"Z") == 1
    expect_errno(errno.EFBIG, fs.write, f, MAX_FILE_SIZE, b"Z")
    assert fs.write(f, MAX_FILE_SIZE - 2, b"XYZ") == 2  # short write up to the limit
    assert bytes(fs.read(f, MAX_FILE_SIZE - 2, 5)) == b"XY"
    assert free_counts(fs)[0] == b0 - 1
    fs = remount(fs)
    assert fs.getattr(f).size == MAX_FILE_SIZE
    assert bytes(fs.read(f, MAX_FILE_SIZE - 3, 5)) == b"\0XY"
    fs.setattr(f, size=2)
    assert read_all(fs, f) == b"he"
    assert free_counts(fs) == (b0, i0)
    fs.close()


def test_setattr_several_at_once(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f", b"x" * 10000)
    fs.setattr(f, mode=0o640, uid=11, gid=22, size=10, atime=111, mtime=222)
    a = fs.getattr(f)
    assert stat.S_IMODE(a.mode) == 0o640
    assert (a.uid, a.gid, a.size, a.atime, a.mtime) == (11, 22, 10, 111, 222)
    fs.setattr(f, size=20000, atime=333, mtime=444)
    a = fs.getattr(f)
    assert (a.size, a.atime, a.mtime) == (20000, 333, 444)
    assert read_all(fs, f) == b"x" * 10 + bytes(19990)


def test_open_trunc(memfs):
    fs = memfs
    b0, _ = free_counts(fs)
    f = mkfile(fs, ROOT, b"f", b"y" * 50000)
    m = fs.getattr(f).mtime
    time.sleep(0.001)
    # Linux truncates on O_TRUNC whatever the access mode (POSIX leaves
    # O_RDONLY|O_TRUNC unspecified; ext4 and tmpfs truncate)
    fs.open(f, os.O_RDONLY | os.O_TRUNC)
    fs.release(f)
    assert fs.getattr(f).size == 0
    fs.write(f, 0, b"y" * 50000)
    m = fs.getattr(f).mtime
    time.sleep(0.001)
    fs.open(f, os.O_WRONLY | os.O_TRUNC)
    a = fs.getattr(f)
    assert a.size == 0 and a.blocks == 0
    assert a.mtime > m
    assert free_counts(fs)[0] == b0
    assert fs.write(f, 0, b"new") == 3
    fs.release(f)
    assert read_all(fs, f) == b"new"
    # O_TRUNC of an empty file still updates mtime/ctime
    g = mkfile(fs, ROOT, b"g")
    m = fs.getattr(g).mtime
    time.sleep(0.001)
    fs.open(g, os.O_RDWR | os.O_TRUNC)
    fs.release(g)
    assert fs.getattr(g).mtime > m


def test_getattr_blocks_and_size_of_directory(memfs):
    fs = memfs
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    for i in range(200):
        fs.mknod(d, b"%0200d" % i, stat.S_IFREG | 0o644)
    a = fs.getattr(d)
    assert a.size % BS == 0 and a.size >= 200 * 200
    assert a.blocks >= a.size // BS
