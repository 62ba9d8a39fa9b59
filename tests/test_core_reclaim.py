"""Core: deferred reclaim (MountOptions.reclaim_batch).

Inodes unlinked while the kernel held them are freed when it forgets them.
With reclaim_batch > 1 they wait in a queue (still on the on-media orphan
list) and are freed N per transaction -- and whenever something needs the
space: statfs, sync, a full file system, unmount.  A crash in between
frees them at the next mount."""

from __future__ import annotations

import errno

from conftest import fresh_image
from pmfs.fs import FileSystem, MountOptions
from pmfs.fsck import check
from pmfs.pmem import MemoryImage
from test_core_helpers import BS, ROOT, expect_errno, mkfile, read_all


def batched(img=None, n=4, **kw) -> FileSystem:
    return FileSystem(img or fresh_image(**kw), MountOptions(reclaim_batch=n))


def raw_free(fs) -> tuple[int, int]:
    """Free blocks and inodes without statfs (which drains the queue)."""
    return fs.bbm.free, fs.ibm.free


def unlink_forgotten(fs, names) -> list[int]:
    """Create, look up (as the kernel would), unlink, then forget: each
    inode goes through the zombie state to the reclaim queue."""
    inos = []
    for name in names:
        ino = mkfile(fs, ROOT, name, b"z" * (3 * BS))
        fs.setxattr(ino, b"user.k", b"v")
        fs.ref(ino)
        inos.append(ino)
    for name, ino in zip(names, inos):
        fs.unlink(ROOT, name)
        fs.forget(ino)
    return inos


def assert_fsck_clean(img) -> None:
    r = check(img, repair=False, force=True)
    assert not r.problems, r.problems


def test_queue_fills_then_frees_in_one_transaction():
    fs = batched(n=4)
    free0 = raw_free(fs)
    inos = unlink_forgotten(fs, [b"a", b"b", b"c"])
    # waiting: names gone, inodes still allocated and on the orphan list
    assert fs.reclaim_queue == inos
    assert sorted(fs.orphans()) == sorted(inos)
    assert raw_free(fs)[1] == free0[1] - 3
    for name in (b"a", b"b", b"c"):
        expect_errno(errno.ENOENT, fs.lookup, ROOT, name)
    commits = fs.wal.commits
    inos += unlink_forgotten(fs, [b"d"])  # the fourth fills the batch
    assert fs.reclaim_queue == []
    assert fs.orphans() == []
    for ino in inos:
        expect_errno(errno.ENOENT, fs.getattr, ino)
    assert raw_free(fs) == free0
    # create, write, xattr and unlink of d, then one transaction for all four
    assert fs.wal.commits - commits == 5
    fs.close()
    assert_fsck_clean(fs.img)


def test_statfs_sync_and_unmount_drain():
    fs = batched(n=64)
    free0 = raw_free(fs)
    unlink_forgotten(fs, [b"a", b"b"])
    assert len(fs.reclaim_queue) == 2
    s = fs.statfs()
    assert (s["f_bfree"], s["f_ffree"]) == free0 and fs.reclaim_queue == []
    unlink_forgotten(fs, [b"c"])
    fs.sync()
    assert fs.reclaim_queue == [] and raw_free(fs) == free0
    unlink_forgotten(fs, [b"e", b"f"])
    fs.close()
    assert_fsck_clean(fs.img)
    fs2 = FileSystem(fs.img, MountOptions())
    assert fs2.orphans() == [] and raw_free(fs2) == free0
    assert fs2.stats["orphans"] == 0
    fs2.close()


def test_crash_with_queue_pending_frees_at_mount():
    fs = batched(n=64)
    keep = mkfile(fs, ROOT, b"keep", b"K" * 5000)
    free_keep = raw_free(fs)
    inos = unlink_forgotten(fs, [b"a", b"b", b"c"])
    assert len(fs.reclaim_queue) == 3
    # power cut now
    img = MemoryImage(bytes(fs.img.data))
    fs2 = FileSystem(img, MountOptions())
    assert fs2.stats["orphans"] == 3
    assert fs2.orphans() == []
    for ino in inos:
        expect_errno(errno.ENOENT, fs2.getattr, ino)
    assert raw_free(fs2) == free_keep
    assert read_all(fs2, keep) == b"K" * 5000
    fs2.close()
    assert_fsck_clean(img)


def test_full_inode_table_drains_the_queue():
    fs = batched(n=64, inodes=64)
    names = []
    i = 0
    while True:
        try:
            fs.create(ROOT, b"f%d" % i, 0o644)
        except OSError as e:
            assert e.errno == errno.ENOSPC
            break
        names.append(b"f%d" % i)
        i += 1
    assert raw_free(fs)[1] == 0
    # two of them unlinked and forgotten: waiting in the queue
    for name in names[:2]:
        ino = fs.lookup(ROOT, name).ino
        fs.ref(ino)
        fs.unlink(ROOT, name)
        fs.forget(ino)
    assert len(fs.reclaim_queue) == 2 and raw_free(fs)[1] == 0
    # a create finds no inode, frees the queue and succeeds
    fs.create(ROOT, b"new", 0o644)
    assert fs.reclaim_queue == [] and raw_free(fs)[1] == 1
    fs.close()
    assert_fsck_clean(fs.img)


def test_full_data_area_drains_before_a_short_write():
    fs = batched(n=64)
    big = mkfile(fs, ROOT, b"big")
    chunk = b"B" * (64 * BS)
    off = 0
    while True:
        n = fs.write(big, off, chunk)
        off += n
        if n < len(chunk):
            break
    # make room: a file of 100 blocks, unlinked and forgotten (queued)
    fs.setattr(big, size=off - 100 * BS)
    room = mkfile(fs, ROOT, b"room", b"R" * (100 * BS))
    fs.ref(room)
    fs.unlink(ROOT, b"room")
    fs.forget(room)
    assert fs.reclaim_queue == [room]
    free = raw_free(fs)[0]
    # a write that needs more than is free now but fits after the drain:
    # written in full, not short
    f = mkfile(fs, ROOT, b"f")
    data = b"W" * ((free + 50) * BS)
    assert fs.write(f, 0, data) == len(data)
    assert fs.reclaim_queue == []
    assert read_all(fs, f) == data
    fs.close()
    assert_fsck_clean(fs.img)


def test_release_of_last_opener_queues_too():
    fs = batched(n=2)
    f = mkfile(fs, ROOT, b"f", b"x" * BS)
    fs.open(f)
    fs.unlink(ROOT, b"f")
    fs.release(f)
    assert fs.reclaim_queue == [f]
    g = mkfile(fs, ROOT, b"g", b"y" * BS)
    fs.open(g)
    fs.unlink(ROOT, b"g")
    fs.release(g)
    assert fs.reclaim_queue == [] and fs.orphans() == []
    fs.close()
    assert_fsck_clean(fs.img)


def test_batch_too_large_for_the_log_frees_one_by_one():
    """Files with many extents: the batch's record would not fit the log,
    so they are freed one by one, each in chunks if need be."""
    fs = batched(n=3, size=64 << 20)
    free0 = raw_free(fs)
    inos = []
    for k in range(3):
        f = mkfile(fs, ROOT, b"big%d" % k)
        for i in range(0, 3000, 2):  # every other block: 1500 extents
            fs.write(f, i * BS, b"%8d" % i)
        fs.ref(f)
        inos.append(f)
    for k, f in enumerate(inos):
        fs.unlink(ROOT, b"big%d" % k)
        fs.forget(f)
    assert fs.reclaim_queue == [] and fs.orphans() == []
    assert raw_free(fs) == free0
    fs.close()
    assert_fsck_clean(fs.img)
