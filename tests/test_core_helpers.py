"""Shared helpers of the test_core_* files (no tests of its own).

The core is driven in-process: a FileSystem on a MemoryImage, operations on
inode numbers, errors as OSError with a kernel errno.
"""

from __future__ import annotations

import stat

import pytest

from pmfs.fs import FileSystem, MountOptions
from pmfs.pmem import MemoryImage

ROOT = 1
BS = 4096


def expect_errno(code: int, fn, *args, **kw):
    """Call fn and assert it fails with OSError `code` (by errno, not text)."""
    with pytest.raises(OSError) as ei:
        fn(*args, **kw)
    got = ei.value.errno
    assert got == code, f"{fn.__name__}{args!r}: errno {got} ({ei.value}), expected {code}"
    return ei.value


def mkfile(fs: FileSystem, parent: int, name: bytes, data: bytes = b"",
           mode: int = 0o644) -> int:
    ino = fs.create(parent, name, mode).ino
    if data:
        assert fs.write(ino, 0, data) == len(data)
    return ino


def read_all(fs: FileSystem, ino: int) -> bytes:
    size = fs.getattr(ino).size
    return bytes(fs.read(ino, 0, size))


def remount(fs: FileSystem) -> FileSystem:
    """Clean unmount, then mount the same image again."""
    fs.close()
    return FileSystem(fs.img, MountOptions())


def crash_mount(fs: FileSystem) -> FileSystem:
    """A power cut: a copy of the image as it is now (no close), mounted."""
    img = MemoryImage(bytes(fs.img.data))
    return FileSystem(img, MountOptions())


def free_counts(fs: FileSystem) -> tuple[int, int]:
    s = fs.statfs()
    return s["f_bfree"], s["f_ffree"]


ATTRS = ("mode", "uid", "gid", "nlink", "size", "blocks", "atime", "mtime", "ctime",
         "btime", "rdev", "generation")


def attrs(inode) -> dict:
    return {a: getattr(inode, a) for a in ATTRS}


def names(fs: FileSystem, ino: int) -> list[bytes]:
    """Names of a directory by readdir (without . and ..)."""
    return sorted(n for n, _i, _t, _o in fs.readdir(ino, 0) if n not in (b".", b".."))


def snapshot_tree(fs: FileSystem, ino: int = ROOT, path: bytes = b"/") -> dict:
    """{path: description} of everything reachable from `ino`: attributes,
    contents / targets / entries and xattrs; for bit-exact remount checks."""
    out = {}
    inode = fs.getattr(ino)
    desc = {"ino": ino}
    # contents first: reading may update atime (relatime), attributes after
    if stat.S_ISREG(inode.mode):
        desc["data"] = bytes(fs.read(ino, 0, inode.size))
    elif stat.S_ISLNK(inode.mode):
        desc["target"] = fs.readlink(ino)
    elif stat.S_ISDIR(inode.mode):
        ents = [(n, i, t) for n, i, t, _o in fs.readdir(ino, 0)]
        desc["entries"] = sorted(ents)
    desc["xattrs"] = sorted((k, fs.getxattr(ino, k)) for k in fs.listxattr(ino))
    desc.update(attrs(fs.getattr(ino)))
    out[path] = desc
    if stat.S_ISDIR(inode.mode):
        for n, i, _t, _o in fs.readdir(ino, 0):
            if n in (b".", b".."):
                continue
            out.update(snapshot_tree(fs, i, path.rstrip(b"/") + b"/" + n))
    return out
