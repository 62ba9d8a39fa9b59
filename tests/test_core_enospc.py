"""Core: running out of space (blocks, inodes, directory room) -- the right
errno, short writes, nothing damaged, and the file system usable again."""

from __future__ import annotations

import errno
import stat

from conftest import fresh_image
from pmfs.fs import FileSystem, MountOptions
from test_core_helpers import (BS, ROOT, crash_mount, expect_errno, free_counts, mkfile,
                               read_all, remount, snapshot_tree)

MIB = 1 << 20


def _fill_with_data(fs, parent, name, chunk=MIB):
    """Append `chunk`-byte writes until ENOSPC; returns (ino, model bytes,
    list of write results)."""
    f = mkfile(fs, parent, name)
    model = bytearray()
    results = []
    i = 0
    while True:
        buf = bytes([(i * 31 + 7) & 0xFF]) * chunk
        try:
            n = fs.write(f, len(model), buf)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            results.append("ENOSPC")
            break
        assert 0 < n <= chunk
        results.append(n)
        model += buf[:n]
        i += 1
        assert i < 10000
    return f, model, results


def test_fill_with_data(memfs):
    fs = memfs
    b0, i0 = free_counts(fs)
    keep = {}
    for i in range(5):
        keep[i] = (mkfile(fs, ROOT, b"keep%d" % i, bytes([65 + i]) * (i * 5000 + 1)),
                   bytes([65 + i]) * (i * 5000 + 1))
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    fs.symlink(d, b"long-link", b"L" * 3000)
    before = snapshot_tree(fs)
    f, model, results = _fill_with_data(fs, ROOT, b"big")
    # a short write, then ENOSPC
    assert results[-1] == "ENOSPC"
    assert isinstance(results[-2], int) and results[-2] < MIB, results[-3:]
    assert results[-2] % BS == 0
    assert free_counts(fs)[0] == 0
    assert fs.getattr(f).size == len(model)
    # every further allocating operation fails cleanly
    expect_errno(errno.ENOSPC, fs.write, f, len(model), b"x")
    expect_errno(errno.ENOSPC, fs.write, f, len(model) + 10 * MIB, b"x")
    g = mkfile(fs, ROOT, b"g")
    expect_errno(errno.ENOSPC, fs.write, g, 0, b"x")
    expect_errno(errno.ENOSPC, fs.fallocate, g, 0, 0, BS)
    expect_errno(errno.ENOSPC, fs.symlink, ROOT, b"ls", b"T" * 500)
    expect_errno(errno.ENOSPC, fs.setxattr, g, b"user.a", b"1")
    assert fs.getattr(g).size == 0 and fs.getattr(g).blocks == 0
    # overwriting allocated data needs no space
    assert fs.write(f, 0, b"overwritten") == 11
    model[:11] = b"overwritten"
    # partial last block: writing inside it works too
    if len(model) % BS:
        assert fs.write(f, len(model), b"z") == 1
        model += b"z"
    assert read_all(fs, f) == bytes(model)
    # nothing else damaged
    for ino, data in keep.values():
        assert read_all(fs, ino) == data
    fs = remount(fs)
    assert read_all(fs, f) == bytes(model)
    after = snapshot_tree(fs)
    for path, desc in before.items():
        if path in (b"/",):
            continue
        assert after[path] == desc, path
    # truncate, unlink and rename work on a full file system
    fs.rename(ROOT, b"keep0", ROOT, b"renamed-keep0")
    fs.rename(ROOT, b"keep1", d, b"moved-keep1")
    fs.setattr(f, size=len(model) // 2)
    assert free_counts(fs)[0] > 0
    assert read_all(fs, f) == bytes(model[:len(model) // 2])
    fs.unlink(ROOT, b"big")
    fs.unlink(ROOT, b"g")
    assert free_counts(fs)[0] == b0 - sum(fs.getattr(i).blocks for i, _ in keep.values()) \
        - fs.getattr(d).blocks - fs.getattr(fs.lookup(d, b"long-link").ino).blocks
    # usable again
    f2, model2, results2 = _fill_with_data(fs, ROOT, b"again")
    assert read_all(fs, f2) == bytes(model2)
    assert abs(len(model2) - len(model)) <= 4 * BS
    fs.unlink(ROOT, b"again")
    fs = remount(fs)
    assert read_all(fs, fs.lookup(ROOT, b"renamed-keep0").ino) == keep[0][1]
    assert read_all(fs, fs.lookup(d, b"moved-keep1").ino) == keep[1][1]
    fs.close()


def test_fill_inodes(memfs):
    fs = memfs
    b0, i0 = free_counts(fs)
    root_blocks = fs.getattr(ROOT).blocks
    made = []
    while True:
        try:
            made.append(fs.mknod(ROOT, b"n%05d" % len(made), stat.S_IFREG | 0o644).ino)
        except OSError as e:
            assert e.errno == errno.ENOSPC
            break
        assert len(made) <= i0
    assert len(made) == i0
    assert free_counts(fs)[1] == 0
    expect_errno(errno.ENOSPC, fs.mkdir, ROOT, b"dir", 0o755)
    expect_errno(errno.ENOSPC, fs.symlink, ROOT, b"sym", b"t")
    expect_errno(errno.ENOSPC, fs.mknod, ROOT, b"fifo", stat.S_IFIFO | 0o644)
    # the failed creates left no name behind
    for n in (b"dir", b"sym", b"fifo", b"n%05d" % len(made)):
        expect_errno(errno.ENOENT, fs.lookup, ROOT, n)
    # links need no inode
    fs.link(made[0], ROOT, b"alias")
    fs.write(made[1], 0, b"data")
    fs.rename(ROOT, b"n00002", ROOT, b"renamed")
    fs = remount(fs)
    assert free_counts(fs)[1] == 0
    assert len(fs.listdir(ROOT)) == len(made) + 2  # + lost+found + alias
    fs.unlink(ROOT, b"n00005")
    assert free_counts(fs)[1] == 1
    assert fs.mkdir(ROOT, b"dir", 0o755).ino == made[5]  # the freed slot
    assert fs.getattr(made[5]).generation >= 2
    for i, ino in enumerate(made):
        if i not in (5,):
            fs.unlink(ROOT, b"renamed" if i == 2 else b"n%05d" % i)
    fs.unlink(ROOT, b"alias")
    fs.rmdir(ROOT, b"dir")
    # directories do not shrink: only the root's new blocks stay taken
    grown = fs.getattr(ROOT).blocks - root_blocks
    assert grown > 0
    assert free_counts(fs) == (b0 - grown, i0)
    fs.close()


def test_fill_directory(memfs):
    """Hard links with long names until the directory cannot grow."""
    fs = memfs
    f = mkfile(fs, ROOT, b"target", b"shared")
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    # leave only a little room
    filler = mkfile(fs, ROOT, b"filler")
    fs.fallocate(filler, 0, 0, (free_counts(fs)[0] - 12) * BS)
    assert free_counts(fs)[0] == 12
    n = 0
    while True:
        name = b"%05d-" % n + b"x" * 249
        try:
            fs.link(f, d, name)
        except OSError as e:
            assert e.errno == errno.ENOSPC
            break
        n += 1
        assert n < 1000
    assert free_counts(fs)[0] == 0
    assert n >= 12 * 15  # 15 records of 272 bytes per block
    assert fs.getattr(f).nlink == n + 1
    expect_errno(errno.ENOENT, fs.lookup, d, b"%05d-" % n + b"x" * 249)
    # a short name still fits into the tail room of a block, or ENOSPC
    # rename within the full directory works (the old record is reused)
    fs.rename(d, b"00000-" + b"x" * 249, d, b"short")
    fs.rename(d, b"00001-" + b"x" * 249, d, b"00000-" + b"y" * 249)
    fs = remount(fs)
    assert fs.getattr(f).nlink == n + 1
    got = fs.listdir(d)
    assert len(got) == n
    assert set(got.values()) == {f}
    assert fs.lookup(d, b"short").ino == f
    for name in list(got):
        fs.unlink(d, name)
    assert fs.getattr(f).nlink == 1
    assert read_all(fs, f) == b"shared"
    fs.unlink(ROOT, b"filler")
    fs.rmdir(ROOT, b"d")
    fs.close()


def test_full_fs_write_that_needs_an_extent_node():
    """A fragmented file (its root full of extents) on a nearly full file
    system: a write whose data fits but whose new extent needs a tree node.
    Whatever the outcome (short write or ENOSPC), nothing may be lost or
    leaked and the file system stays consistent."""
    img = fresh_image(16 << 20)
    fs = FileSystem(img, MountOptions())
    f = mkfile(fs, ROOT, b"frag")
    model = bytearray()
    for i in range(7):  # 7 extents: the inode root is full
        fs.write(f, 2 * i * BS, bytes([i + 1]) * BS)
    model = bytearray(read_all(fs, f))
    assert fs.tree(fs.getattr(f)).count_extents() == 7
    filler = mkfile(fs, ROOT, b"filler")
    fs.fallocate(filler, 0, 0, (free_counts(fs)[0] - 3) * BS)
    b1, i1 = free_counts(fs)
    assert b1 == 3
    blocks1 = fs.getattr(f).blocks
    off = 100 * BS
    try:
        n = fs.write(f, off, b"N" * (3 * BS))
    except OSError as e:
        assert e.errno == errno.ENOSPC
        n = 0
    assert 0 <= n < 3 * BS
    if n:
        model += bytes(off - len(model)) + b"N" * n
    assert read_all(fs, f) == bytes(model)
    a = fs.getattr(f)
    assert a.size == len(model)
    assert b1 - free_counts(fs)[0] == a.blocks - blocks1
    fs2 = crash_mount(fs)
    assert read_all(fs2, f) == bytes(model)
    fs2.close()
    fs = remount(fs)
    assert read_all(fs, f) == bytes(model)
    assert b1 - free_counts(fs)[0] == fs.getattr(f).blocks - blocks1
    fs.unlink(ROOT, b"filler")
    # with room again the write works
    assert fs.write(f, off, b"N" * (3 * BS)) == 3 * BS
    fs.close()


def test_short_write_size_is_exact():
    """When fewer blocks are free than a write needs, the write stores what
    fits, returns that count, and the data is all there."""
    img = fresh_image(16 << 20)
    fs = FileSystem(img, MountOptions())
    filler = mkfile(fs, ROOT, b"filler")
    fs.fallocate(filler, 0, 0, (free_counts(fs)[0] - 5) * BS)
    f = mkfile(fs, ROOT, b"f", b"abc")  # 1 block
    assert free_counts(fs)[0] == 4
    buf = bytes(range(256)) * 100  # 25600 bytes: 3 + ... blocks past offset 3
    n = fs.write(f, 3, buf)
    # block 0 is mapped; 4 more blocks hold bytes up to 5 * 4096
    assert n == 5 * BS - 3
    assert read_all(fs, f) == b"abc" + buf[:n]
    assert free_counts(fs)[0] == 0
    expect_errno(errno.ENOSPC, fs.write, f, 3 + n, buf[n:])
    fs = remount(fs)
    assert read_all(fs, f) == b"abc" + buf[:n]
    fs.close()


def test_full_fs_write_needing_a_node_is_a_short_write():
    """POSIX write(2): when there is room for only part of the data, as many
    bytes as fit are written and the count returned; ENOSPC only when
    nothing fits.  Here 3 blocks are free, the write needs 3 data blocks
    plus one extent-tree node: 2 data blocks fit, so the write must return
    a short count (pmfs currently fails the whole write with ENOSPC)."""
    img = fresh_image(16 << 20)
    fs = FileSystem(img, MountOptions())
    f = mkfile(fs, ROOT, b"frag")
    for i in range(7):
        fs.write(f, 2 * i * BS, bytes([i + 1]) * BS)
    filler = mkfile(fs, ROOT, b"filler")
    fs.fallocate(filler, 0, 0, (free_counts(fs)[0] - 3) * BS)
    n = fs.write(f, 100 * BS, b"N" * (3 * BS))
    assert 0 < n < 3 * BS
    assert bytes(fs.read(f, 100 * BS, n)) == b"N" * n
    fs.close()


def _full_directory_on_full_fs(fs):
    """A directory whose only block is full (15 records of 255-byte names,
    hard links of one file) on a file system with no free block."""
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    other = fs.mkdir(ROOT, b"other", 0o755).ino
    f = mkfile(fs, other, b"f", b"payload")
    mkfile(fs, other, b"g", b"other payload")
    sub = fs.mkdir(other, b"sub", 0o755).ino
    for i in range(15):
        fs.link(f, d, b"%02d" % i + b"n" * 253)
    assert fs.getattr(d).size == BS
    filler = mkfile(fs, ROOT, b"filler")
    fs.fallocate(filler, 0, 0, free_counts(fs)[0] * BS)
    assert free_counts(fs)[0] == 0
    return d, other, f, sub


def test_failed_operations_on_full_fs_change_nothing(memfs):
    """Each operation needs a new directory block and fails with ENOSPC; the
    failed transaction must leave no trace (inodes, links, entries, counts),
    in DRAM and on the image."""
    fs = memfs
    d, other, f, sub = _full_directory_on_full_fs(fs)
    before = snapshot_tree(fs)  # reads first: atimes settle (relatime)
    before = snapshot_tree(fs)
    counts = free_counts(fs)
    expect_errno(errno.ENOSPC, fs.create, d, b"new", 0o644)
    expect_errno(errno.ENOSPC, fs.mknod, d, b"fifo", stat.S_IFIFO | 0o644)
    expect_errno(errno.ENOSPC, fs.mkdir, d, b"newdir", 0o755)
    expect_errno(errno.ENOSPC, fs.symlink, d, b"sym", b"t")
    expect_errno(errno.ENOSPC, fs.link, f, d, b"link")
    expect_errno(errno.ENOSPC, fs.rename, other, b"f", d, b"moved")
    expect_errno(errno.ENOSPC, fs.rename, other, b"sub", d, b"moved-dir")
    assert free_counts(fs) == counts
    for n in (b"new", b"fifo", b"newdir", b"sym", b"link", b"moved", b"moved-dir"):
        expect_errno(errno.ENOENT, fs.lookup, d, n)
    assert fs.lookup(other, b"f").ino == f
    assert fs.lookup(other, b"sub").ino == sub
    assert fs.lookup(sub, b"..").ino == other
    assert fs.getattr(f).nlink == 16
    assert fs.getattr(other).nlink == 3 and fs.getattr(d).nlink == 2
    # the in-memory state is what the image holds
    got = snapshot_tree(fs)
    for path, desc in before.items():
        for k in desc:
            if k in ("mtime", "ctime", "atime"):
                continue
            assert got[path][k] == desc[k], (path, k)
    fs2 = crash_mount(fs)
    assert snapshot_tree(fs2).keys() == before.keys()
    fs2.close()
    # a rename inside the full directory still works: the record is reused
    fs.rename(d, b"00" + b"n" * 253, d, b"00" + b"m" * 253)
    # and across, when the target replaces an existing entry
    g = fs.lookup(other, b"g").ino
    fs.rename(other, b"g", d, b"01" + b"n" * 253)
    assert fs.getattr(f).nlink == 15
    assert read_all(fs, fs.lookup(d, b"01" + b"n" * 253).ino) == b"other payload"
    assert fs.lookup(d, b"01" + b"n" * 253).ino == g
    fs = remount(fs)
    assert fs.lookup(d, b"00" + b"m" * 253).ino == f
    assert free_counts(fs) == counts
    fs.unlink(ROOT, b"filler")
    fs.create(d, b"new", 0o644)
    fs.mkdir(d, b"newdir", 0o755)
    assert fs.getattr(d).nlink == 3
    fs.close()
