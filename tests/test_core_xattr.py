"""Core: extended attributes."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from test_core_helpers import ROOT, expect_errno, free_counts, mkfile, remount

XATTR_CREATE = 1
XATTR_REPLACE = 2


def test_set_get_list_remove(memfs):
    fs = memfs
    b0, _ = free_counts(fs)
    f = mkfile(fs, ROOT, b"f", b"data")
    assert fs.listxattr(f) == []
    expect_errno(errno.ENODATA, fs.getxattr, f, b"user.a")
    fs.setxattr(f, b"user.a", b"1")
    fs.setxattr(f, b"user.b", b"")
    fs.setxattr(f, b"trusted.t", b"\x00\xff" * 10)
    fs.setxattr(f, b"security.s", b"sec")
    assert fs.getxattr(f, b"user.a") == b"1"
    assert fs.getxattr(f, b"user.b") == b""
    assert fs.getxattr(f, b"trusted.t") == b"\x00\xff" * 10
    assert sorted(fs.listxattr(f)) == [b"security.s", b"trusted.t", b"user.a", b"user.b"]
    assert free_counts(fs)[0] == b0 - 2  # one data block, one xattr block
    # replace a value (longer, then shorter)
    fs.setxattr(f, b"user.a", b"a much longer value than before")
    assert fs.getxattr(f, b"user.a") == b"a much longer value than before"
    fs.setxattr(f, b"user.a", b"s")
    assert fs.getxattr(f, b"user.a") == b"s"
    assert len(fs.listxattr(f)) == 4
    fs.removexattr(f, b"user.a")
    expect_errno(errno.ENODATA, fs.getxattr, f, b"user.a")
    expect_errno(errno.ENODATA, fs.removexattr, f, b"user.a")
    assert sorted(fs.listxattr(f)) == [b"security.s", b"trusted.t", b"user.b"]
    for k in (b"user.b", b"trusted.t", b"security.s"):
        fs.removexattr(f, k)
    assert fs.listxattr(f) == []
    assert free_counts(fs)[0] == b0 - 1  # the xattr block is freed with the last one
    assert fs.getattr(f).blocks == 1


def test_create_and_replace_flags(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f")
    expect_errno(errno.ENODATA, fs.setxattr, f, b"user.x", b"v", XATTR_REPLACE)
    assert fs.listxattr(f) == []
    fs.setxattr(f, b"user.x", b"v1", XATTR_CREATE)
    expect_errno(errno.EEXIST, fs.setxattr, f, b"user.x", b"v2", XATTR_CREATE)
    assert fs.getxattr(f, b"user.x") == b"v1"
    fs.setxattr(f, b"user.x", b"v3", XATTR_REPLACE)
    assert fs.getxattr(f, b"user.x") == b"v3"


def test_namespaces_and_name_errors(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f")
    for name in (b"system.posix_acl_access", b"system.foo", b"foo.bar", b"user",
                 b"other", b"USER.x", b"osx.x"):
        expect_errno(errno.EOPNOTSUPP, fs.setxattr, f, name, b"v")
    expect_errno(errno.EINVAL, fs.setxattr, f, b"", b"v")
    expect_errno(errno.EINVAL, fs.setxattr, f, b"user.", b"v")
    expect_errno(errno.ERANGE, fs.setxattr, f, b"user." + b"n" * 251, b"v")
    fs.setxattr(f, b"user." + b"n" * 250, b"v")  # 255 bytes: fine
    assert fs.getxattr(f, b"user." + b"n" * 250) == b"v"
    assert fs.listxattr(f) == [b"user." + b"n" * 250]


def test_get_and_remove_in_unsupported_namespace(memfs):
    """getxattr/removexattr of an unknown namespace: EOPNOTSUPP on ext4 and
    tmpfs (there is no handler for the prefix), not ENODATA."""
    fs = memfs
    f = mkfile(fs, ROOT, b"f")
    fs.setxattr(f, b"user.present", b"1")
    expect_errno(errno.EOPNOTSUPP, fs.getxattr, f, b"foo.bar")
    expect_errno(errno.EOPNOTSUPP, fs.getxattr, f, b"system.foo")
    expect_errno(errno.EOPNOTSUPP, fs.removexattr, f, b"foo.bar")


def test_value_size_limits(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f")
    expect_errno(errno.E2BIG, fs.setxattr, f, b"user.big", b"x" * (65536 + 1))
    expect_errno(errno.E2BIG, fs.setxattr, f, b"user.big", b"x" * (1 << 20))
    # 64 KiB is within the VFS limit but does not fit in one block
    expect_errno(errno.ENOSPC, fs.setxattr, f, b"user.big", b"x" * 65536)
    assert fs.listxattr(f) == []
    # as much as one block holds
    fs.setxattr(f, b"user.a", b"a" * 3000)
    fs.setxattr(f, b"user.b", b"b" * 1000)
    expect_errno(errno.ENOSPC, fs.setxattr, f, b"user.c", b"c" * 200)
    # a failed set changes nothing
    assert sorted(fs.listxattr(f)) == [b"user.a", b"user.b"]
    assert fs.getxattr(f, b"user.a") == b"a" * 3000
    # replacing with a value that makes the total too big fails, too
    expect_errno(errno.ENOSPC, fs.setxattr, f, b"user.b", b"b" * 2000)
    assert fs.getxattr(f, b"user.b") == b"b" * 1000
    # shrinking one makes room
    fs.setxattr(f, b"user.a", b"a")
    fs.setxattr(f, b"user.c", b"c" * 2000)
    assert fs.getxattr(f, b"user.c") == b"c" * 2000


def test_fill_block_exactly(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f")
    # 4096 - 32 header = 4064; an entry costs 4 + len(name) + len(value)
    name = b"user.fill"
    fs.setxattr(f, name, b"v" * (4064 - 4 - len(name)))
    assert len(fs.getxattr(f, name)) == 4064 - 4 - len(name)
    expect_errno(errno.ENOSPC, fs.setxattr, f, b"user.z", b"")
    fs = remount(fs)
    assert len(fs.getxattr(f, name)) == 4064 - 4 - len(name)
    fs.close()


@pytest.mark.parametrize("kind", ["symlink", "fifo", "chr", "sock"])
def test_user_xattr_on_special_files(memfs, kind):
    """Linux: user.* is only for regular files and directories -- setting or
    removing one elsewhere is EPERM, reading one is ENODATA; trusted.* works."""
    fs = memfs
    if kind == "symlink":
        ino = fs.symlink(ROOT, b"n", b"target").ino
    else:
        fmt = {"fifo": stat.S_IFIFO, "chr": stat.S_IFCHR, "sock": stat.S_IFSOCK}[kind]
        ino = fs.mknod(ROOT, b"n", fmt | 0o644, os.makedev(1, 7)).ino
    expect_errno(errno.EPERM, fs.setxattr, ino, b"user.x", b"v")
    expect_errno(errno.ENODATA, fs.getxattr, ino, b"user.x")
    fs.setxattr(ino, b"trusted.x", b"v")
    assert fs.getxattr(ino, b"trusted.x") == b"v"
    assert fs.listxattr(ino) == [b"trusted.x"]


def test_remove_user_xattr_on_symlink_is_eperm(memfs):
    """lremovexattr(symlink, "user.x"): EPERM on ext4 and tmpfs (the VFS
    permission check comes before the lookup), not ENODATA."""
    fs = memfs
    s = fs.symlink(ROOT, b"s", b"target").ino
    expect_errno(errno.EPERM, fs.removexattr, s, b"user.x")


def test_xattrs_on_directories(memfs):
    fs = memfs
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    fs.setxattr(d, b"user.dir", b"yes")
    fs.setxattr(ROOT, b"trusted.root", b"r")
    assert fs.getxattr(d, b"user.dir") == b"yes"
    fs = remount(fs)
    assert fs.getxattr(d, b"user.dir") == b"yes"
    assert fs.getxattr(ROOT, b"trusted.root") == b"r"
    fs.close()


def test_xattrs_survive_remount_and_are_freed(memfs):
    fs = memfs
    b0, i0 = free_counts(fs)
    f = mkfile(fs, ROOT, b"f", b"x")
    vals = {b"user.%d" % i: bytes([i]) * (i * 7) for i in range(30)}
    for k, v in vals.items():
        fs.setxattr(f, k, v)
    fs = remount(fs)
    assert {k: fs.getxattr(f, k) for k in fs.listxattr(f)} == vals
    fs.removexattr(f, b"user.3")
    del vals[b"user.3"]
    fs = remount(fs)
    assert {k: fs.getxattr(f, k) for k in fs.listxattr(f)} == vals
    fs.unlink(ROOT, b"f")
    assert free_counts(fs) == (b0, i0)  # the xattr block went with the inode
    fs.close()


def test_xattr_ctime(memfs):
    import time
    fs = memfs
    f = mkfile(fs, ROOT, b"f")
    c = fs.getattr(f).ctime
    m = fs.getattr(f).mtime
    time.sleep(0.001)
    fs.setxattr(f, b"user.a", b"1")
    c2 = fs.getattr(f).ctime
    assert c2 > c
    time.sleep(0.001)
    fs.removexattr(f, b"user.a")
    assert fs.getattr(f).ctime > c2
    assert fs.getattr(f).mtime == m


def test_xattr_enospc_on_full_fs(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f")
    g = mkfile(fs, ROOT, b"g")
    free = free_counts(fs)[0]
    fs.fallocate(g, 0, 0, free * 4096)
    assert free_counts(fs)[0] == 0
    expect_errno(errno.ENOSPC, fs.setxattr, f, b"user.a", b"1")
    assert fs.listxattr(f) == []
    fs.setattr(g, size=0)
    fs.setxattr(f, b"user.a", b"1")
    assert fs.getxattr(f, b"user.a") == b"1"


def test_create_and_replace_together(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f")
    expect_errno(errno.ENODATA, fs.setxattr, f, b"user.a", b"1", XATTR_CREATE | XATTR_REPLACE)
    fs.setxattr(f, b"user.a", b"1")
    expect_errno(errno.EEXIST, fs.setxattr, f, b"user.a", b"2", XATTR_CREATE | XATTR_REPLACE)
    assert fs.getxattr(f, b"user.a") == b"1"
