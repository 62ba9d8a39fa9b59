"""Core: lookup, creating and removing names (mknod, mkdir, symlink, link,
unlink, rmdir), with the errno Linux gives for every failure."""

from __future__ import annotations

import errno
import os
import stat
import time

import pytest

from pmfs.fs import Ctx
from test_core_helpers import (ROOT, expect_errno, free_counts, mkfile, names, read_all,
                               remount)


# ----------------------------------------------------------------------
# lookup
# ----------------------------------------------------------------------
def test_lookup_dot_and_dotdot(memfs):
    fs = memfs
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    sub = fs.mkdir(d, b"sub", 0o755).ino
    assert fs.lookup(ROOT, b".").ino == ROOT
    assert fs.lookup(ROOT, b"..").ino == ROOT  # the root's parent is itself
    assert fs.lookup(d, b".").ino == d
    assert fs.lookup(d, b"..").ino == ROOT
    assert fs.lookup(sub, b"..").ino == d
    assert fs.lookup(sub, b".").ino == sub
    assert fs.lookup(d, b"sub").ino == sub


def test_lookup_missing_is_enoent(memfs):
    fs = memfs
    expect_errno(errno.ENOENT, fs.lookup, ROOT, b"nothere")
    f = mkfile(memfs, ROOT, b"f")
    fs.unlink(ROOT, b"f")
    expect_errno(errno.ENOENT, fs.lookup, ROOT, b"f")
    del f


def test_lookup_under_a_file_is_enotdir(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"file", b"x")
    expect_errno(errno.ENOTDIR, fs.lookup, f, b"x")
    expect_errno(errno.ENOTDIR, fs.lookup, f, b".")
    expect_errno(errno.ENOTDIR, fs.lookup, f, b"..")
    s = fs.symlink(ROOT, b"sym", b"file").ino
    expect_errno(errno.ENOTDIR, fs.lookup, s, b"x")


def test_lookup_of_a_free_inode_is_enoent(memfs):
    fs = memfs
    expect_errno(errno.ENOENT, fs.getattr, 500)
    expect_errno(errno.ENOENT, fs.lookup, 500, b"x")


def test_name_length_limits(memfs):
    fs = memfs
    n255 = b"n" * 255
    n256 = b"n" * 256
    # exactly 255 bytes works for every create kind and lookup
    f = fs.create(ROOT, n255, 0o644).ino
    assert fs.lookup(ROOT, n255).ino == f
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    assert fs.mkdir(d, n255, 0o755).ino == fs.lookup(d, n255).ino
    s = fs.mkdir(ROOT, b"s", 0o755).ino
    assert fs.symlink(s, n255, b"t").ino == fs.lookup(s, n255).ino
    l = fs.mkdir(ROOT, b"l", 0o755).ino
    fs.link(f, l, n255)
    assert fs.lookup(l, n255).ino == f
    # multi-byte names are counted in bytes
    u = ("\u00e9" * 127).encode()  # 254 bytes
    fs.create(ROOT, u, 0o644)
    assert fs.lookup(ROOT, u).ino
    expect_errno(errno.ENAMETOOLONG, fs.create, ROOT, u + "\u00e9".encode(), 0o644)
    # 256 bytes: ENAMETOOLONG everywhere
    expect_errno(errno.ENAMETOOLONG, fs.lookup, ROOT, n256)
    expect_errno(errno.ENAMETOOLONG, fs.create, ROOT, n256, 0o644)
    expect_errno(errno.ENAMETOOLONG, fs.mknod, ROOT, n256, stat.S_IFIFO | 0o644)
    expect_errno(errno.ENAMETOOLONG, fs.mkdir, ROOT, n256, 0o755)
    expect_errno(errno.ENAMETOOLONG, fs.symlink, ROOT, n256, b"t")
    expect_errno(errno.ENAMETOOLONG, fs.link, f, ROOT, n256)
    expect_errno(errno.ENAMETOOLONG, fs.unlink, ROOT, n256)
    expect_errno(errno.ENAMETOOLONG, fs.rmdir, ROOT, n256)
    expect_errno(errno.ENAMETOOLONG, fs.rename, ROOT, n255, ROOT, n256)
    m255 = b"m" * 255
    fs.rename(ROOT, n255, d, m255)
    fs.rename(d, m255, ROOT, n255)
    assert fs.lookup(ROOT, n255).ino == f
    # the long names survive a remount
    fs = remount(fs)
    assert fs.lookup(ROOT, n255).ino == f
    assert fs.lookup(l, n255).ino == f
    assert fs.readlink(fs.lookup(s, n255).ino) == b"t"
    assert n255 in names(fs, ROOT)
    fs.close()


# ----------------------------------------------------------------------
# mknod / mkdir / symlink
# ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt,rdev,dtype", [
    (stat.S_IFREG, 0, 8), (stat.S_IFIFO, 0, 1), (stat.S_IFSOCK, 0, 12),
    (stat.S_IFCHR, os.makedev(1, 3), 2), (stat.S_IFBLK, os.makedev(8, 17), 6),
])
def test_mknod_kinds(memfs, fmt, rdev, dtype):
    fs = memfs
    p_before = fs.getattr(ROOT)
    pm, pc, pn = p_before.mtime, p_before.ctime, p_before.nlink
    time.sleep(0.001)
    ino = fs.mknod(ROOT, b"node", fmt | 0o640, rdev).ino
    a = fs.getattr(ino)
    assert stat.S_IFMT(a.mode) == fmt
    assert stat.S_IMODE(a.mode) == 0o640
    assert a.nlink == 1
    assert a.size == 0
    assert a.rdev == rdev
    assert a.uid == 0 and a.gid == 0
    assert fs.lookup(ROOT, b"node").ino == ino
    ents = {n: (i, t) for n, i, t, _o in fs.readdir(ROOT, 0)}
    assert ents[b"node"] == (ino, dtype)
    p = fs.getattr(ROOT)
    assert p.nlink == pn  # only directories add to the parent's link count
    assert p.mtime > pm and p.ctime > pc
    fs = remount(fs)
    a = fs.getattr(ino)
    assert stat.S_IFMT(a.mode) == fmt and a.rdev == rdev
    fs.close()


def test_mknod_owner_from_context(memfs):
    fs = memfs
    ctx = Ctx(uid=1234, gid=5678)
    ino = fs.mknod(ROOT, b"f", stat.S_IFREG | 0o600, 0, ctx).ino
    a = fs.getattr(ino)
    assert (a.uid, a.gid) == (1234, 5678)
    d = fs.mkdir(ROOT, b"d", 0o700, ctx).ino
    assert (fs.getattr(d).uid, fs.getattr(d).gid) == (1234, 5678)
    s = fs.symlink(ROOT, b"s", b"f", ctx).ino
    assert (fs.getattr(s).uid, fs.getattr(s).gid) == (1234, 5678)


def test_mknod_of_a_directory_is_refused(memfs):
    expect_errno(errno.EPERM, memfs.mknod, ROOT, b"d", stat.S_IFDIR | 0o755)
    expect_errno(errno.ENOENT, memfs.lookup, ROOT, b"d")


def test_mkdir(memfs):
    fs = memfs
    root_nlink = fs.getattr(ROOT).nlink
    before = fs.getattr(ROOT)
    pm, pc = before.mtime, before.ctime
    time.sleep(0.001)
    d = fs.mkdir(ROOT, b"d", 0o1751).ino
    a = fs.getattr(d)
    assert stat.S_ISDIR(a.mode)
    assert stat.S_IMODE(a.mode) == 0o1751
    assert a.nlink == 2
    p = fs.getattr(ROOT)
    assert p.nlink == root_nlink + 1
    assert p.mtime > pm and p.ctime > pc
    assert names(fs, d) == []
    sub = fs.mkdir(d, b"sub", 0o755).ino
    assert fs.getattr(d).nlink == 3
    assert fs.getattr(sub).nlink == 2
    ents = {n: (i, t) for n, i, t, _o in fs.readdir(d, 0)}
    assert ents[b"."] == (d, 4) and ents[b".."] == (ROOT, 4) and ents[b"sub"] == (sub, 4)
    fs = remount(fs)
    assert fs.getattr(d).nlink == 3
    assert fs.getattr(ROOT).nlink == root_nlink + 1
    assert fs.lookup(sub, b"..").ino == d
    fs.close()


def test_setgid_directory_inheritance(memfs):
    fs = memfs
    ctx = Ctx(uid=1000, gid=1000, groups=(1000,))
    sg = fs.mkdir(ROOT, b"sg", 0o2777).ino
    fs.setattr(sg, gid=4242)
    assert fs.getattr(sg).mode & stat.S_ISGID
    f = fs.create(sg, b"f", 0o644, ctx).ino
    assert fs.getattr(f).gid == 4242  # the directory's group, not the caller's
    assert fs.getattr(f).uid == 1000
    assert not fs.getattr(f).mode & stat.S_ISGID
    sub = fs.mkdir(sg, b"sub", 0o755, ctx).ino
    assert fs.getattr(sub).gid == 4242
    assert fs.getattr(sub).mode & stat.S_ISGID  # subdirectories inherit the bit
    assert stat.S_IMODE(fs.getattr(sub).mode) == 0o2755
    # ... and pass it on
    subsub = fs.mkdir(sub, b"subsub", 0o700, ctx).ino
    assert fs.getattr(subsub).gid == 4242
    assert fs.getattr(subsub).mode & stat.S_ISGID
    n = fs.mknod(sub, b"fifo", stat.S_IFIFO | 0o644, 0, ctx).ino
    assert fs.getattr(n).gid == 4242
    s = fs.symlink(sub, b"sym", b"x", ctx).ino
    assert fs.getattr(s).gid == 4242
    # a plain directory: the caller's group, no setgid bit
    plain = fs.mkdir(ROOT, b"plain", 0o777).ino
    g = fs.create(plain, b"g", 0o644, ctx).ino
    assert fs.getattr(g).gid == 1000
    pd = fs.mkdir(plain, b"pd", 0o755, ctx).ino
    assert fs.getattr(pd).gid == 1000 and not fs.getattr(pd).mode & stat.S_ISGID


def test_setgid_file_of_own_group_keeps_the_bit(memfs):
    """Linux (inode_init_owner / mode_strip_sgid) only strips S_ISGID from a
    new file in a *setgid* directory whose group the caller is not in.  A
    non-root caller creating a 02755 file in an ordinary directory keeps the
    bit: the file's group is the caller's own (checked on tmpfs and ext4).
    The FUSE adapter passes no supplementary groups."""
    fs = memfs
    pub = fs.mkdir(ROOT, b"pub", 0o777).ino
    ctx = Ctx(uid=1000, gid=1000)
    f = fs.create(pub, b"f", 0o2755, ctx).ino
    a = fs.getattr(f)
    assert a.gid == 1000
    assert stat.S_IMODE(a.mode) == 0o2755


def test_setgid_dir_strips_sgid_for_outsider(memfs):
    """In a setgid directory owned by a group the (non-root) caller is not in,
    a new group-executable file loses S_ISGID (Linux inode_init_owner; tmpfs
    and ext4 agree); without group-exec the bit stays."""
    fs = memfs
    sg = fs.mkdir(ROOT, b"sg", 0o2777).ino
    fs.setattr(sg, gid=4242)
    ctx = Ctx(uid=1000, gid=1000)
    g = fs.create(sg, b"g", 0o2755, ctx).ino
    assert fs.getattr(g).gid == 4242
    assert stat.S_IMODE(fs.getattr(g).mode) == 0o755
    h = fs.create(sg, b"h", 0o2745, ctx).ino
    assert stat.S_IMODE(fs.getattr(h).mode) == 0o2745
    # a member of the group keeps it
    member = Ctx(uid=1000, gid=1000, groups=(4242,))
    k = fs.create(sg, b"k", 0o2755, member).ino
    assert stat.S_IMODE(fs.getattr(k).mode) == 0o2755


@pytest.mark.parametrize("target", [b"a", b"x" * 127, b"y" * 128])
def test_symlink_inline(memfs, target):
    fs = memfs
    free_b, _ = free_counts(fs)
    s = fs.symlink(ROOT, b"s", target).ino
    a = fs.getattr(s)
    assert stat.S_ISLNK(a.mode)
    assert stat.S_IMODE(a.mode) == 0o777
    assert a.size == len(target)
    assert a.nlink == 1
    assert fs.readlink(s) == target
    assert free_counts(fs)[0] == free_b  # stored in the inode: no block
    assert a.blocks == 0
    ents = {n: (i, t) for n, i, t, _o in fs.readdir(ROOT, 0)}
    assert ents[b"s"] == (s, 10)
    fs = remount(fs)
    assert fs.readlink(s) == target
    fs.close()


@pytest.mark.parametrize("n", [129, 1000, 4095])
def test_symlink_long(memfs, n):
    fs = memfs
    target = bytes((i % 250) + 1 for i in range(n)).replace(b"/", b"_")
    free_b, _ = free_counts(fs)
    s = fs.symlink(ROOT, b"s", target).ino
    assert fs.readlink(s) == target
    assert fs.getattr(s).size == n
    assert free_counts(fs)[0] == free_b - 1
    fs = remount(fs)
    assert fs.readlink(s) == target
    fs.unlink(ROOT, b"s")
    assert free_counts(fs)[0] == free_b
    fs.close()


def test_symlink_errors(memfs):
    fs = memfs
    expect_errno(errno.ENAMETOOLONG, fs.symlink, ROOT, b"s", b"x" * 4096)
    expect_errno(errno.ENOENT, fs.symlink, ROOT, b"s", b"")
    expect_errno(errno.ENOENT, fs.lookup, ROOT, b"s")


def test_readlink_of_non_symlink_is_einval(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f", b"data")
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    p = fs.mknod(ROOT, b"p", stat.S_IFIFO | 0o644).ino
    for ino in (f, d, p, ROOT):
        expect_errno(errno.EINVAL, fs.readlink, ino)


def test_eexist_for_every_create_kind(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"file", b"keep")
    d = fs.mkdir(ROOT, b"dir", 0o755).ino
    fs.symlink(ROOT, b"sym", b"file")
    for name in (b"file", b"dir", b"sym", b".", b".."):
        expect_errno(errno.EEXIST, fs.create, ROOT, name, 0o644)
        expect_errno(errno.EEXIST, fs.mknod, ROOT, name, stat.S_IFIFO | 0o644)
        expect_errno(errno.EEXIST, fs.mknod, ROOT, name, stat.S_IFCHR | 0o644, 5)
        expect_errno(errno.EEXIST, fs.mkdir, ROOT, name, 0o755)
        expect_errno(errno.EEXIST, fs.symlink, ROOT, name, b"t")
        expect_errno(errno.EEXIST, fs.link, f, ROOT, name)
    # nothing changed
    assert read_all(fs, f) == b"keep"
    assert fs.getattr(f).nlink == 1
    assert fs.lookup(ROOT, b"dir").ino == d
    assert fs.readlink(fs.lookup(ROOT, b"sym").ino) == b"file"


def test_create_in_a_file_is_enotdir(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f")
    expect_errno(errno.ENOTDIR, fs.create, f, b"x", 0o644)
    expect_errno(errno.ENOTDIR, fs.mkdir, f, b"x", 0o755)
    expect_errno(errno.ENOTDIR, fs.symlink, f, b"x", b"t")
    expect_errno(errno.ENOTDIR, fs.link, f, f, b"x")
    expect_errno(errno.ENOTDIR, fs.unlink, f, b"x")
    expect_errno(errno.ENOTDIR, fs.rmdir, f, b"x")


# ----------------------------------------------------------------------
# link
# ----------------------------------------------------------------------
def test_link_counts_and_data(memfs):
    fs = memfs
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    f = mkfile(fs, ROOT, b"f", b"shared data")
    c0 = fs.getattr(f).ctime
    time.sleep(0.001)
    dm = fs.getattr(d).mtime
    assert fs.link(f, d, b"g").ino == f
    a = fs.getattr(f)
    assert a.nlink == 2
    assert a.ctime > c0
    assert fs.getattr(d).mtime > dm
    assert fs.getattr(d).nlink == 2  # a file link does not change the dir's count
    fs.link(f, ROOT, b"h")
    assert fs.getattr(f).nlink == 3
    assert fs.lookup(d, b"g").ino == f
    ents = {n: (i, t) for n, i, t, _o in fs.readdir(d, 0)}
    assert ents[b"g"] == (f, 8)
    time.sleep(0.001)
    c1 = fs.getattr(f).ctime
    fs.unlink(ROOT, b"f")
    assert fs.getattr(f).nlink == 2
    assert fs.getattr(f).ctime > c1
    assert read_all(fs, f) == b"shared data"
    fs.unlink(ROOT, b"h")
    assert fs.getattr(f).nlink == 1
    assert read_all(fs, fs.lookup(d, b"g").ino) == b"shared data"
    fs = remount(fs)
    assert fs.getattr(f).nlink == 1
    assert read_all(fs, f) == b"shared data"
    fs.close()


def test_link_errors(memfs):
    fs = memfs
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    f = mkfile(fs, ROOT, b"f")
    mkfile(fs, ROOT, b"g")
    expect_errno(errno.EPERM, fs.link, d, ROOT, b"d2")
    expect_errno(errno.EPERM, fs.link, ROOT, d, b"r")
    expect_errno(errno.EEXIST, fs.link, f, ROOT, b"g")
    expect_errno(errno.EEXIST, fs.link, f, ROOT, b"f")
    assert fs.getattr(f).nlink == 1
    assert fs.getattr(d).nlink == 2


def test_link_of_other_kinds(memfs):
    fs = memfs
    s = fs.symlink(ROOT, b"s", b"target").ino
    fs.link(s, ROOT, b"s2")
    assert fs.getattr(s).nlink == 2
    assert fs.readlink(fs.lookup(ROOT, b"s2").ino) == b"target"
    p = fs.mknod(ROOT, b"p", stat.S_IFIFO | 0o600).ino
    fs.link(p, ROOT, b"p2")
    assert fs.getattr(p).nlink == 2


# ----------------------------------------------------------------------
# unlink / rmdir
# ----------------------------------------------------------------------
def test_unlink(memfs):
    fs = memfs
    b0, i0 = free_counts(fs)
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    f = mkfile(fs, d, b"f", b"z" * 10000)
    before = fs.getattr(d)
    pm, pc, pn = before.mtime, before.ctime, before.nlink
    time.sleep(0.001)
    fs.unlink(d, b"f")
    a = fs.getattr(d)
    assert a.mtime > pm and a.ctime > pc and a.nlink == pn
    expect_errno(errno.ENOENT, fs.lookup, d, b"f")
    expect_errno(errno.ENOENT, fs.getattr, f)  # freed: nobody holds it
    assert names(fs, d) == []
    expect_errno(errno.ENOENT, fs.unlink, d, b"f")
    fs.rmdir(ROOT, b"d")
    assert free_counts(fs) == (b0, i0)


def test_unlink_errors(memfs):
    fs = memfs
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    expect_errno(errno.ENOENT, fs.unlink, ROOT, b"missing")
    expect_errno(errno.EISDIR, fs.unlink, ROOT, b"d")
    expect_errno(errno.EISDIR, fs.unlink, d, b".")
    expect_errno(errno.EISDIR, fs.unlink, d, b"..")
    assert fs.lookup(ROOT, b"d").ino == d


def test_unlink_other_kinds(memfs):
    fs = memfs
    b0, i0 = free_counts(fs)
    fs.symlink(ROOT, b"s", b"x" * 3000)
    fs.symlink(ROOT, b"t", b"short")
    fs.mknod(ROOT, b"p", stat.S_IFIFO | 0o600)
    fs.mknod(ROOT, b"c", stat.S_IFCHR | 0o600, os.makedev(4, 1))
    fs.mknod(ROOT, b"k", stat.S_IFSOCK | 0o600)
    for n in (b"s", b"t", b"p", b"c", b"k"):
        fs.unlink(ROOT, n)
    assert free_counts(fs) == (b0, i0)
    assert names(fs, ROOT) == [b"lost+found"]


def test_rmdir(memfs):
    fs = memfs
    b0, i0 = free_counts(fs)
    root_n = fs.getattr(ROOT).nlink
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    sub = fs.mkdir(d, b"sub", 0o755).ino
    assert fs.getattr(d).nlink == 3
    before = fs.getattr(d)
    pm, pc = before.mtime, before.ctime
    time.sleep(0.001)
    fs.rmdir(d, b"sub")
    a = fs.getattr(d)
    assert a.nlink == 2
    assert a.mtime > pm and a.ctime > pc
    expect_errno(errno.ENOENT, fs.getattr, sub)
    fs.rmdir(ROOT, b"d")
    assert fs.getattr(ROOT).nlink == root_n
    assert free_counts(fs) == (b0, i0)


def test_rmdir_errors(memfs):
    fs = memfs
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    mkfile(fs, d, b"f")
    mkfile(fs, ROOT, b"file")
    sub = fs.mkdir(ROOT, b"e", 0o755).ino
    fs.mkdir(sub, b"inner", 0o755)
    expect_errno(errno.ENOTEMPTY, fs.rmdir, ROOT, b"d")
    expect_errno(errno.ENOTEMPTY, fs.rmdir, ROOT, b"e")  # only a subdirectory in it
    expect_errno(errno.ENOTDIR, fs.rmdir, ROOT, b"file")
    expect_errno(errno.ENOENT, fs.rmdir, ROOT, b"missing")
    expect_errno(errno.EINVAL, fs.rmdir, d, b".")
    expect_errno(errno.ENOTEMPTY, fs.rmdir, d, b"..")
    assert fs.lookup(ROOT, b"d").ino == d
    # emptied, it goes
    fs.unlink(d, b"f")
    fs.rmdir(ROOT, b"d")
    expect_errno(errno.ENOENT, fs.lookup, ROOT, b"d")


def test_rmdir_of_directory_that_had_many_entries(memfs):
    """A directory grown to several blocks and emptied again is empty."""
    fs = memfs
    b0, i0 = free_counts(fs)
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    for i in range(300):
        fs.mknod(d, b"entry-with-a-longish-name-%04d" % i, stat.S_IFREG | 0o644)
    assert fs.getattr(d).size >= 2 * 4096
    expect_errno(errno.ENOTEMPTY, fs.rmdir, ROOT, b"d")
    for i in range(300):
        fs.unlink(d, b"entry-with-a-longish-name-%04d" % i)
    assert names(fs, d) == []
    fs.rmdir(ROOT, b"d")
    assert free_counts(fs) == (b0, i0)


def test_operations_in_a_removed_directory(memfs):
    fs = memfs
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    fs.ref(d)
    fs.rmdir(ROOT, b"d")
    a = fs.getattr(d)
    assert a.nlink == 0
    expect_errno(errno.ENOENT, fs.create, d, b"x", 0o644)
    expect_errno(errno.ENOENT, fs.mkdir, d, b"x", 0o755)
    expect_errno(errno.ENOENT, fs.lookup, d, b"x")
    assert [n for n, *_ in fs.readdir(d, 0)] == [b".", b".."]
    fs.forget(d)
    expect_errno(errno.ENOENT, fs.getattr, d)


# ----------------------------------------------------------------------
# statfs
# ----------------------------------------------------------------------
def test_statfs_counts(memfs):
    fs = memfs
    s0 = fs.statfs()
    assert s0["f_namemax"] == 255
    assert s0["f_bsize"] == 4096
    assert s0["f_files"] == fs.inode_count - 1
    assert s0["f_blocks"] == fs.total_blocks - fs.data_start
    assert 0 < s0["f_bfree"] <= s0["f_blocks"]
    assert s0["f_bavail"] == s0["f_bfree"]
    assert 0 < s0["f_ffree"] < s0["f_files"]
    f = mkfile(fs, ROOT, b"f")
    s1 = fs.statfs()
    assert s1["f_ffree"] == s0["f_ffree"] - 1
    assert s1["f_bfree"] == s0["f_bfree"]
    fs.write(f, 0, b"a" * (10 * 4096))
    s2 = fs.statfs()
    assert s2["f_bfree"] == s0["f_bfree"] - 10
    assert fs.getattr(f).blocks == 10
    fs.write(f, 100 * 4096, b"b")  # one block far away: a hole between
    s3 = fs.statfs()
    assert s3["f_bfree"] == s2["f_bfree"] - 1
    fs.mkdir(ROOT, b"d", 0o755)
    assert fs.statfs()["f_ffree"] == s0["f_ffree"] - 2
    fs.setattr(f, size=4096)
    assert fs.statfs()["f_bfree"] == s0["f_bfree"] - 1
    fs.unlink(ROOT, b"f")
    fs.rmdir(ROOT, b"d")
    s4 = fs.statfs()
    assert (s4["f_bfree"], s4["f_ffree"]) == (s0["f_bfree"], s0["f_ffree"])
    fs = remount(fs)
    s5 = fs.statfs()
    assert (s5["f_bfree"], s5["f_ffree"]) == (s0["f_bfree"], s0["f_ffree"])
    fs.close()


def test_statfs_matches_superblock_after_remount(memfs):
    fs = memfs
    for i in range(20):
        mkfile(fs, ROOT, b"f%d" % i, b"q" * (i * 1000))
    s = fs.statfs()
    fs.close()
    sb = fs.sb
    assert sb.free_blocks == s["f_bfree"]
    assert sb.free_inodes == s["f_ffree"]


def test_mknod_type_defaults_and_invalid_types(memfs):
    fs = memfs
    ino = fs.mknod(ROOT, b"plain", 0o640).ino  # no type bits: a regular file
    assert fs.getattr(ino).mode == stat.S_IFREG | 0o640
    expect_errno(errno.EINVAL, fs.mknod, ROOT, b"bad", 0o170000 | 0o644)
    expect_errno(errno.EINVAL, fs.mknod, ROOT, b"lnk", stat.S_IFLNK | 0o777)
    expect_errno(errno.ENOENT, fs.lookup, ROOT, b"bad")
    # rdev is only kept for devices
    f = fs.mknod(ROOT, b"reg", stat.S_IFREG | 0o644, os.makedev(3, 3)).ino
    assert fs.getattr(f).rdev == 0


def test_inode_numbers_out_of_range_and_reuse(memfs):
    fs = memfs
    expect_errno(errno.ENOENT, fs.getattr, 0)  # the orphan-list head slot
    expect_errno(errno.ENOENT, fs.getattr, fs.inode_count)
    expect_errno(errno.ENOENT, fs.getattr, 1 << 40)
    f = mkfile(fs, ROOT, b"f")
    gen = fs.getattr(f).generation
    fs.unlink(ROOT, b"f")
    # inode numbers are handed out next-fit: the freed slot is not taken
    # again at once ...
    h = mkfile(fs, ROOT, b"h")
    assert h > f
    # ... only once the allocator wraps around (as after a remount), and
    # then with a new generation (NFS handles stay unique)
    fs.ialloc.rotor = 1
    g = mkfile(fs, ROOT, b"g")
    assert g == f
    assert fs.getattr(g).generation != gen


def test_open_directory_for_writing_is_eisdir(memfs):
    fs = memfs
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    expect_errno(errno.EISDIR, fs.open, d, os.O_WRONLY)
    expect_errno(errno.EISDIR, fs.open, d, os.O_RDWR)
    assert fs.open(d, os.O_RDONLY).ino == d
    fs.release(d)
    assert fs.opens.get(d) is None
