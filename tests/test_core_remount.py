"""Core: everything persists across an unmount + mount (and a crash after
sync) bit-exact: names, types, attributes, nanosecond times, data, holes,
symlinks, devices, hard links, xattrs, readdir order and offsets."""

from __future__ import annotations

import os
import stat

from test_core_helpers import (BS, ROOT, crash_mount, free_counts, mkfile, remount,
                               snapshot_tree)
from pmfs.fs import Ctx


def _populate(fs):
    d = fs.mkdir(ROOT, b"dir", 0o750).ino
    sub = fs.mkdir(d, b"sub", 0o2775).ino
    fs.setattr(sub, gid=321)
    mkfile(fs, ROOT, b"empty")
    mkfile(fs, ROOT, b"small", b"hello world\n")
    big = mkfile(fs, d, b"big", bytes(range(256)) * 1000)
    sparse = mkfile(fs, d, b"sparse")
    fs.write(sparse, 5 * BS + 7, b"island")
    fs.write(sparse, 300 * BS, b"far")
    fs.setattr(sparse, size=400 * BS + 3)
    pre = mkfile(fs, d, b"prealloc", b"p")
    fs.fallocate(pre, 1, 0, 10 * BS)
    punched = mkfile(fs, d, b"punched", b"Q" * (6 * BS))
    fs.fallocate(punched, 3, BS + 10, 3 * BS)
    trunc = mkfile(fs, d, b"trunc", b"T" * (3 * BS))
    fs.setattr(trunc, size=BS + 5)
    fs.setattr(trunc, size=2 * BS)
    fs.symlink(ROOT, b"short-link", b"dir/big")
    fs.symlink(d, b"long-link", b"/".join([b"component"] * 300)[:4000])
    fs.mknod(ROOT, b"fifo", stat.S_IFIFO | 0o600)
    fs.mknod(ROOT, b"sock", stat.S_IFSOCK | 0o666)
    fs.mknod(ROOT, b"chr", stat.S_IFCHR | 0o620, os.makedev(136, 4))
    fs.mknod(ROOT, b"blk", stat.S_IFBLK | 0o660, os.makedev(259, 1 << 12))
    fs.link(big, ROOT, b"hardlink-to-big")
    fs.link(big, sub, b"another")
    fs.create(sub, b"n" * 255, 0o4755, Ctx(uid=42, gid=43))
    fs.create(sub, "ünïcødé-名前".encode(), 0o600)
    fs.setxattr(big, b"user.comment", b"a big file")
    fs.setxattr(big, b"trusted.bin", bytes(range(256)))
    fs.setxattr(d, b"user.dir", b"")
    fs.setxattr(ROOT, b"security.selinux", b"system_u:object_r:x:s0\0")
    fs.setattr(big, atime=1_600_000_000_123_456_789, mtime=1_500_000_000_987_654_321)
    fs.setattr(trunc, atime=-5, mtime=7)
    fs.setattr(pre, uid=65534, gid=65533, mode=0o6751)
    # a directory with holes in its record layout
    many = fs.mkdir(ROOT, b"many", 0o755).ino
    for i in range(300):
        fs.mknod(many, b"entry-%d" % i, stat.S_IFREG | 0o644)
    for i in range(0, 300, 7):
        fs.unlink(many, b"entry-%d" % i)
    # an overwrite: times updated lazily
    fs.write(fs.lookup(ROOT, b"small").ino, 0, b"H")
    return many


def test_everything_persists_across_remount(memfs):
    fs = memfs
    many = _populate(fs)
    before = snapshot_tree(fs)
    counts = free_counts(fs)
    listing = fs.readdir(many, 0)
    fs = remount(fs)
    assert snapshot_tree(fs) == before
    assert free_counts(fs) == counts
    assert fs.readdir(many, 0) == listing
    # and once more
    fs = remount(fs)
    assert snapshot_tree(fs) == before
    fs.close()


def test_everything_persists_across_crash_after_sync(memfs):
    fs = memfs
    _populate(fs)
    before = snapshot_tree(fs)
    fs.sync()
    fs2 = crash_mount(fs)
    assert snapshot_tree(fs2) == before
    assert free_counts(fs2) == free_counts(fs)
    fs2.close()


def test_metadata_durable_without_sync(memfs):
    """Every metadata operation is durable on return: a crash right after
    (no sync, no close) keeps names, sizes, links and xattrs."""
    fs = memfs
    _populate(fs)
    before = snapshot_tree(fs)
    fs2 = crash_mount(fs)
    after = snapshot_tree(fs2)
    assert set(after) == set(before)
    for path, desc in before.items():
        got = after[path]
        for k in desc:
            if k in ("atime", "mtime", "ctime"):
                continue  # overwrites and reads update times lazily
            assert got[k] == desc[k], (path, k)
    fs2.close()


def test_image_unchanged_by_idle_remount(memfs):
    """Mounting and unmounting without changes alters nothing but the
    superblock (mount counters and times)."""
    fs = memfs
    _populate(fs)
    snapshot_tree(fs)  # the first reads set atimes (relatime)
    fs.close()
    img = fs.img
    sb_end = fs.sb.wal_start * BS  # the superblock replicas
    a = bytes(img.data[sb_end:])
    from pmfs.fs import FileSystem, MountOptions
    fs2 = FileSystem(img, MountOptions())
    snap = snapshot_tree(fs2)  # reads (atime already newer: relatime keeps it)
    fs2.close()
    b = bytes(img.data[sb_end:])
    assert a == b, "an idle mount changed the image outside the superblock"
    fs3 = FileSystem(img, MountOptions())
    assert snapshot_tree(fs3) == snap
    fs3.close()
