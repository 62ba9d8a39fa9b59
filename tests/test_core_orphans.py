"""Core: inodes that lose their last name while open or looked up (orphans),
freed at the last release/forget -- or at the next mount after a crash."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from conftest import fresh_image
from pmfs.fs import FileSystem, MountOptions
from test_core_helpers import (BS, ROOT, crash_mount, expect_errno, free_counts, mkfile,
                               read_all, remount)


@pytest.mark.parametrize("hold", ["open", "ref"])
def test_unlinked_open_file_lives_until_last_user(memfs, hold):
    fs = memfs
    b0, i0 = free_counts(fs)
    f = mkfile(fs, ROOT, b"f", b"A" * (5 * BS))
    if hold == "open":
        fs.open(f, os.O_RDWR)
    else:
        fs.ref(f)
    fs.unlink(ROOT, b"f")
    expect_errno(errno.ENOENT, fs.lookup, ROOT, b"f")
    assert f in fs.orphans()
    a = fs.getattr(f)
    assert a.nlink == 0
    # still readable and writable
    assert read_all(fs, f) == b"A" * (5 * BS)
    assert fs.write(f, 5 * BS, b"B" * (3 * BS)) == 3 * BS
    assert read_all(fs, f) == b"A" * (5 * BS) + b"B" * (3 * BS)
    fs.setattr(f, size=BS)
    assert read_all(fs, f) == b"A" * BS
    fs.setxattr(f, b"user.x", b"1")
    assert free_counts(fs)[0] < b0
    # a second holder keeps it alive when the first goes
    fs.open(f, os.O_RDONLY)
    if hold == "open":
        fs.release(f)
    else:
        fs.forget(f)
    assert fs.getattr(f).nlink == 0
    assert read_all(fs, f) == b"A" * BS
    fs.release(f)
    # now everything is back
    expect_errno(errno.ENOENT, fs.getattr, f)
    assert fs.orphans() == []
    assert free_counts(fs) == (b0, i0)
    fs = remount(fs)
    assert free_counts(fs) == (b0, i0)
    fs.close()


def test_link_of_orphan_is_enoent(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f", b"x")
    fs.open(f)
    fs.unlink(ROOT, b"f")
    expect_errno(errno.ENOENT, fs.link, f, ROOT, b"back")
    fs.release(f)


def test_forget_with_count(memfs):
    fs = memfs
    b0, i0 = free_counts(fs)
    f = mkfile(fs, ROOT, b"f", b"x" * 100)
    fs.ref(f, 3)
    fs.unlink(ROOT, b"f")
    fs.forget(f, 2)
    assert read_all(fs, f) == b"x" * 100
    fs.forget(f, 1)
    expect_errno(errno.ENOENT, fs.getattr, f)
    assert free_counts(fs) == (b0, i0)


def test_open_and_ref_together(memfs):
    fs = memfs
    b0, i0 = free_counts(fs)
    f = mkfile(fs, ROOT, b"f", b"x" * 100)
    fs.ref(f)
    fs.open(f)
    fs.unlink(ROOT, b"f")
    fs.forget(f)
    assert read_all(fs, f) == b"x" * 100  # still open
    fs.release(f)
    expect_errno(errno.ENOENT, fs.getattr, f)
    assert free_counts(fs) == (b0, i0)


def test_crash_while_orphaned_frees_at_mount(memfs):
    fs = memfs
    b0, i0 = free_counts(fs)
    keep = mkfile(fs, ROOT, b"keep", b"K" * 3000)
    kb, ki = free_counts(fs)
    f = mkfile(fs, ROOT, b"f", b"A" * (20 * BS))
    fs.setxattr(f, b"user.x", b"y")
    fs.open(f)
    fs.unlink(ROOT, b"f")
    assert fs.orphans() == [f]
    # power cut now
    fs2 = crash_mount(fs)
    assert fs2.orphans() == []
    expect_errno(errno.ENOENT, fs2.getattr, f)
    assert free_counts(fs2) == (kb, ki)
    assert read_all(fs2, keep) == b"K" * 3000
    fs2.close()
    # the original goes on and frees it at release
    fs.release(f)
    assert free_counts(fs) == (kb, ki)
    fs.unlink(ROOT, b"keep")
    assert free_counts(fs) == (b0, i0)


def test_several_orphans_crash(memfs):
    fs = memfs
    b0, i0 = free_counts(fs)
    inos = []
    for i in range(6):
        f = mkfile(fs, ROOT, b"f%d" % i, bytes([i]) * (i * 3000 + 1))
        fs.open(f)
        inos.append(f)
    for i in (3, 0, 5, 1, 4, 2):
        fs.unlink(ROOT, b"f%d" % i)
    assert sorted(fs.orphans()) == sorted(inos)
    # release some; the list stays consistent
    fs.release(inos[0])
    fs.release(inos[4])
    assert sorted(fs.orphans()) == sorted(set(inos) - {inos[0], inos[4]})
    fs2 = crash_mount(fs)
    assert fs2.orphans() == []
    assert free_counts(fs2) == (b0, i0)
    fs2.close()
    for i in (1, 2, 3, 5):
        fs.release(inos[i])
    assert fs.orphans() == []
    assert free_counts(fs) == (b0, i0)


def test_clean_unmount_frees_orphans(memfs):
    fs = memfs
    b0, i0 = free_counts(fs)
    f = mkfile(fs, ROOT, b"f", b"x" * 9000)
    fs.open(f)
    fs.unlink(ROOT, b"f")
    fs = remount(fs)  # unmount while still "open"
    assert fs.orphans() == []
    assert free_counts(fs) == (b0, i0)
    fs.close()


def test_rmdir_of_referenced_dir(memfs):
    fs = memfs
    b0, i0 = free_counts(fs)
    root_n = fs.getattr(ROOT).nlink
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    # give it a block, then empty it
    for i in range(50):
        fs.mknod(d, b"%03d" % i, stat.S_IFREG | 0o644)
    for i in range(50):
        fs.unlink(d, b"%03d" % i)
    fs.ref(d)
    fs.rmdir(ROOT, b"d")
    assert fs.getattr(ROOT).nlink == root_n
    assert fs.getattr(d).nlink == 0
    assert d in fs.orphans()
    # crash now: freed at mount
    fs2 = crash_mount(fs)
    expect_errno(errno.ENOENT, fs2.getattr, d)
    assert free_counts(fs2) == (b0, i0)
    assert fs2.orphans() == []
    fs2.close()
    fs.forget(d)
    expect_errno(errno.ENOENT, fs.getattr, d)
    assert free_counts(fs) == (b0, i0)


def test_rename_over_open_file(memfs):
    fs = memfs
    b0, i0 = free_counts(fs)
    a = mkfile(fs, ROOT, b"a", b"new")
    v = mkfile(fs, ROOT, b"victim", b"old" * 5000)
    fs.open(v, os.O_RDWR)
    fs.rename(ROOT, b"a", ROOT, b"victim")
    assert fs.lookup(ROOT, b"victim").ino == a
    assert fs.getattr(v).nlink == 0
    assert read_all(fs, v) == b"old" * 5000
    assert v in fs.orphans()
    fs.write(v, 0, b"still writable")
    fs2 = crash_mount(fs)
    expect_errno(errno.ENOENT, fs2.getattr, v)
    assert read_all(fs2, a) == b"new"
    assert fs2.orphans() == []
    fs2.close()
    fs.release(v)
    expect_errno(errno.ENOENT, fs.getattr, v)
    assert fs.orphans() == []
    fs.unlink(ROOT, b"victim")
    assert free_counts(fs) == (b0, i0)


def test_rename_over_referenced_empty_dir(memfs):
    fs = memfs
    b0, i0 = free_counts(fs)
    src = fs.mkdir(ROOT, b"src", 0o755).ino
    dst = fs.mkdir(ROOT, b"dst", 0o755).ino
    fs.ref(dst)
    fs.rename(ROOT, b"src", ROOT, b"dst")
    assert fs.getattr(dst).nlink == 0
    assert dst in fs.orphans()
    fs.forget(dst)
    expect_errno(errno.ENOENT, fs.getattr, dst)
    fs.rmdir(ROOT, b"dst")
    assert fs.lookup(ROOT, b"lost+found")
    assert free_counts(fs) == (b0, i0)
    del src


def test_exchange_does_not_orphan(memfs):
    fs = memfs
    a = mkfile(fs, ROOT, b"a", b"A")
    b = mkfile(fs, ROOT, b"b", b"B")
    fs.open(a)
    fs.rename(ROOT, b"a", ROOT, b"b", 2)
    assert fs.orphans() == []
    fs.release(a)
    assert read_all(fs, a) == b"A" and read_all(fs, b) == b"B"


def test_hard_link_unlink_while_open_no_orphan(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f", b"x")
    fs.link(f, ROOT, b"g")
    fs.open(f)
    fs.unlink(ROOT, b"f")
    assert fs.orphans() == []
    fs.release(f)
    assert read_all(fs, fs.lookup(ROOT, b"g").ino) == b"x"


def test_large_orphan_freed():
    """A file with a multi-level extent tree, unlinked while open, freed at
    release -- and, after a crash instead, at mount."""
    img = fresh_image(64 << 20)
    fs = FileSystem(img, MountOptions())
    b0, i0 = free_counts(fs)
    f = mkfile(fs, ROOT, b"big")
    # every other block: thousands of extents, a multi-level tree
    for i in range(0, 6000, 2):
        fs.write(f, i * BS, b"%8d" % i)
    assert fs.tree(fs.getattr(f)).count_extents() == 3000
    fs.open(f)
    fs.unlink(ROOT, b"big")
    fs2 = crash_mount(fs)
    assert free_counts(fs2) == (b0, i0)
    assert fs2.orphans() == []
    fs2.close()
    fs.release(f)
    assert free_counts(fs) == (b0, i0)
    fs = remount(fs)
    assert free_counts(fs) == (b0, i0)
    fs.close()
