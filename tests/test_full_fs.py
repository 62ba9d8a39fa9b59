"""A full file system through the mount.

A small image (16 MiB) is filled until ENOSPC four ways: with data (dd),
with inodes (empty files), with directory entries (255-byte names in one
directory) and with extended attributes.  Each must end in ENOSPC -- never
EIO, a traceback in the daemon log, or damage -- and on the full file
system overwrite, truncate (down and up), unlink and rename must still
work; freeing space makes it usable again; `fsck.pmfs -f -n` is clean after
unmount, and a remount shows everything that was written before the
ENOSPC.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import subprocess

import pytest

from conftest import PmfsMount, fuse_available, fuse_mounted, mkfs, prog

pytestmark = pytest.mark.fuse

NAME_LEN = 255


def fsck_clean(image: str) -> None:
    r = subprocess.run([prog("fsck.pmfs"), "-f", "-n", image], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"fsck.pmfs -f -n exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "0 errors found" in r.stdout, r.stdout


def md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def enospc(fn, *args, **kw):
    with pytest.raises(OSError) as e:
        fn(*args, **kw)
    assert e.value.errno == errno.ENOSPC, f"{fn.__name__}: {e.value!r}, expected ENOSPC"


def clean_log(m: PmfsMount) -> None:
    log = m.log_text()
    assert "Traceback" not in log and " ERROR" not in log, log
    assert "0 corruption event(s)" in log or "corruption" not in log, log


@pytest.fixture
def small(shm_dir):
    """A 16 MiB image, mounted (attr/entry timeouts 0), torn down always."""
    if not fuse_available():
        pytest.fail("FUSE is not available (/dev/fuse, fusermount3)")
    image = os.path.join(shm_dir, "fs.img")
    mkfs(image, "16M")
    m = PmfsMount(image, os.path.join(shm_dir, "mnt"), "attr_timeout=0,entry_timeout=0")
    m.mount()
    try:
        yield m
    finally:
        m.unmount()
        assert not fuse_mounted(m.path)


def remount(m: PmfsMount) -> None:
    assert m.unmount() == 0
    clean_log(m)
    fsck_clean(m.image)
    m.mount()


def prefill(p: str, leave_blocks: int) -> str:
    """One file taking all but about `leave_blocks` free blocks; its md5."""
    free = os.statvfs(p).f_bfree
    size = max(0, free - leave_blocks) * 4096
    path = os.path.join(p, "ballast")
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        left = size
        while left:
            left -= f.write(chunk[:min(left, len(chunk))])
    assert os.stat(path).st_size == size
    return md5(path)


def works_when_full(p: str, victim: str) -> None:
    """Overwrite, truncate, rename and unlink on a full file system.
    `victim` is a regular file with data, which this removes; `p`/existing a
    file made before the file system filled up, which it replaces."""
    st = os.stat(victim)
    assert st.st_size >= 8192
    # overwrite inside EOF needs no block
    with open(victim, "r+b") as f:
        f.seek(100)
        f.write(b"overwritten")
        f.flush()
        os.fsync(f.fileno())
    with open(victim, "rb") as f:
        f.seek(100)
        assert f.read(11) == b"overwritten"
    # truncate up (a hole) and down
    os.truncate(victim, st.st_size + (10 << 20))
    assert os.stat(victim).st_size == st.st_size + (10 << 20)
    os.truncate(victim, 4096 + 10)
    assert os.stat(victim).st_size == 4106
    with open(victim, "rb") as f:
        f.seek(100)
        assert f.read(11) == b"overwritten"
    # rename within the directory and onto an existing name
    d = os.path.dirname(victim)
    moved = os.path.join(d, "renamed-when-full")
    os.rename(victim, moved)
    assert not os.path.exists(victim) and os.stat(moved).st_size == 4106
    other = os.path.join(p, "existing")
    assert os.path.exists(other)
    os.rename(moved, other)
    assert not os.path.exists(moved) and os.stat(other).st_size == 4106
    os.unlink(other)
    assert not os.path.exists(other)


def make_existing(p: str) -> None:
    with open(os.path.join(p, "existing"), "wb") as f:
        f.write(b"to be replaced")


def test_fill_with_data(small):
    m = small
    p = m.path
    make_existing(p)
    r = subprocess.run(["dd", "if=/dev/urandom", f"of={p}/big", "bs=1M"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "No space left on device" in r.stderr, r.stderr
    copied = int(re.search(r"^(\d+) bytes", r.stderr, re.M).group(1))
    assert copied > (12 << 20)
    assert os.stat(f"{p}/big").st_size == copied
    sv = os.statvfs(p)
    assert sv.f_bfree == 0
    h_big = md5(f"{p}/big")
    # a second writer also gets ENOSPC, and so do appends needing a block
    fd = os.open(f"{p}/more", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        enospc(os.write, fd, b"z" * 8192)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.stat(f"{p}/more").st_size == 0
    fd = os.open(f"{p}/big", os.O_WRONLY | os.O_APPEND)
    try:
        enospc(os.write, fd, b"y" * 8192)
    finally:
        os.close(fd)
    assert os.stat(f"{p}/big").st_size == copied
    assert md5(f"{p}/big") == h_big
    # what needs no block still works: a short (inline) symlink, an empty
    # directory, an empty file; a long symlink target needs a block
    os.symlink("short-target", f"{p}/inline-link")
    enospc(os.symlink, "t" * 300, f"{p}/long-link")
    assert not os.path.lexists(f"{p}/long-link")
    os.mkdir(f"{p}/empty-dir")
    os.close(os.open(f"{p}/empty-file", os.O_CREAT | os.O_WRONLY, 0o644))
    assert os.statvfs(p).f_bfree == 0
    # the file system stays sane when full, and survives a remount
    remount(m)
    assert os.stat(f"{p}/big").st_size == copied
    assert md5(f"{p}/big") == h_big
    assert os.readlink(f"{p}/inline-link") == "short-target"
    assert os.path.isdir(f"{p}/empty-dir") and os.path.getsize(f"{p}/empty-file") == 0
    works_when_full(p, f"{p}/big")
    # freeing space made it usable again
    assert os.statvfs(p).f_bfree > sv.f_blocks - 100
    r = subprocess.run(["dd", "if=/dev/zero", f"of={p}/again", "bs=1M", "count=8",
                        "conv=fsync"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    remount(m)
    assert os.stat(f"{p}/again").st_size == 8 << 20
    assert not os.path.exists(f"{p}/big")
    assert m.unmount() == 0
    clean_log(m)
    fsck_clean(m.image)


def test_fill_with_inodes(small):
    m = small
    p = m.path
    make_existing(p)
    os.mkdir(f"{p}/many")
    with open(f"{p}/data", "wb") as f:
        f.write(os.urandom(64 << 10))
    h = md5(f"{p}/data")
    n = 0
    with pytest.raises(OSError) as e:
        while True:
            os.close(os.open(f"{p}/many/f{n}", os.O_CREAT | os.O_WRONLY, 0o644))
            n += 1
    assert e.value.errno == errno.ENOSPC, repr(e.value)
    assert n > 900
    sv = os.statvfs(p)
    assert sv.f_ffree == 0
    # mkdir, symlink and mknod need an inode too
    enospc(os.mkdir, f"{p}/dir-when-full")
    enospc(os.symlink, "target", f"{p}/symlink-when-full")
    enospc(os.mknod, f"{p}/fifo-when-full", 0o600 | 0o010000)
    # a hard link needs no inode
    os.link(f"{p}/data", f"{p}/data-link")
    remount(m)
    assert len(os.listdir(f"{p}/many")) == n
    assert md5(f"{p}/data-link") == h
    works_when_full(p, f"{p}/data")
    # the rename over "existing" freed its inode: one more file, and only one
    assert os.statvfs(p).f_ffree == 1
    os.close(os.open(f"{p}/many/again", os.O_CREAT | os.O_WRONLY, 0o644))
    enospc(os.open, f"{p}/many/again2", os.O_CREAT | os.O_WRONLY, 0o644)
    os.unlink(f"{p}/many/f0")
    os.close(os.open(f"{p}/many/again2", os.O_CREAT | os.O_WRONLY, 0o644))
    enospc(os.open, f"{p}/many/again3", os.O_CREAT | os.O_WRONLY, 0o644)
    os.unlink(f"{p}/data-link")
    remount(m)
    names = set(os.listdir(f"{p}/many"))
    assert len(names) == n + 1 and {"again", "again2"} <= names and "f0" not in names
    assert names >= {f"f{i}" for i in range(1, n)}
    assert m.unmount() == 0
    clean_log(m)
    fsck_clean(m.image)


def test_fill_with_directory_entries(small):
    m = small
    p = m.path
    make_existing(p)
    h_ballast = prefill(p, 150)
    with open(f"{p}/target", "wb") as f:
        f.write(b"t" * 10000)
    os.mkdir(f"{p}/names")
    n = 0
    with pytest.raises(OSError) as e:
        while True:
            os.link(f"{p}/target", f"{p}/names/" + (f"{n:06d}").ljust(NAME_LEN, "n"))
            n += 1
    assert e.value.errno == errno.ENOSPC, repr(e.value)
    assert n > 100 * 15  # 15 records of 255-byte names per block
    assert os.statvfs(p).f_bfree == 0
    assert os.stat(f"{p}/target").st_nlink == n + 1
    # a new name in that directory also needs room
    enospc(os.open, f"{p}/names/" + "x" * NAME_LEN, os.O_CREAT | os.O_WRONLY, 0o644)
    enospc(os.mkdir, f"{p}/names/" + "y" * NAME_LEN)
    # renaming within it reuses the record's space
    a = f"{p}/names/" + "000007".ljust(NAME_LEN, "n")
    b = f"{p}/names/" + "renamed".ljust(NAME_LEN, "r")
    os.rename(a, b)
    remount(m)
    names = os.listdir(f"{p}/names")
    assert len(names) == n
    assert os.path.basename(b) in names and os.path.basename(a) not in names
    assert os.stat(f"{p}/target").st_nlink == n + 1
    assert md5(f"{p}/ballast") == h_ballast
    works_when_full(p, f"{p}/ballast")
    # the names still work; removing some makes room for new ones
    for i in range(20, 40):
        os.unlink(f"{p}/names/" + f"{i:06d}".ljust(NAME_LEN, "n"))
    os.close(os.open(f"{p}/names/" + "x" * NAME_LEN, os.O_CREAT | os.O_WRONLY, 0o644))
    remount(m)
    assert len(os.listdir(f"{p}/names")) == n - 20 + 1
    assert os.stat(f"{p}/target").st_nlink == n - 20 + 1
    assert m.unmount() == 0
    clean_log(m)
    fsck_clean(m.image)


def test_fill_one_xattr_block(small):
    """One inode's attributes share a 4 KiB block: it fills with ENOSPC."""
    m = small
    p = m.path
    f = f"{p}/attrs"
    open(f, "wb").close()
    n = 0
    with pytest.raises(OSError) as e:
        while True:
            os.setxattr(f, f"user.attr{n:04d}", b"v" * 100)
            n += 1
    assert e.value.errno == errno.ENOSPC, repr(e.value)
    assert n >= 30
    r = subprocess.run(["setfattr", "-n", "user.onemore", "-v", "x" * 100, f],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "No space left on device" in r.stderr, r.stderr
    # replacing a value with one of the same size still works
    os.setxattr(f, "user.attr0003", b"w" * 100)
    os.removexattr(f, "user.attr0000")
    os.setxattr(f, "user.attr-new", b"u" * 90)
    remount(m)
    names = set(os.listxattr(f))
    assert len(names) == n and "user.attr-new" in names and "user.attr0000" not in names
    assert os.getxattr(f, "user.attr0003") == b"w" * 100
    assert os.getxattr(f, "user.attr0005") == b"v" * 100
    assert m.unmount() == 0
    clean_log(m)
    fsck_clean(m.image)


def test_fill_with_xattrs(small):
    """Files each with a big attribute until the blocks run out."""
    m = small
    p = m.path
    make_existing(p)
    h_ballast = prefill(p, 120)
    os.mkdir(f"{p}/x")
    n = 0
    made = []
    with pytest.raises(OSError) as e:
        while True:
            path = f"{p}/x/f{n}"
            if not os.path.exists(path):
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
            os.setxattr(path, "user.big", (b"%06d" % n) * 500)
            made.append(path)
            n += 1
    assert e.value.errno == errno.ENOSPC, repr(e.value)
    assert n > 80
    assert os.statvfs(p).f_bfree == 0
    r = subprocess.run(["setfattr", "-n", "user.big", "-v", "0x" + "ab" * 1000,
                        f"{p}/ballast"], capture_output=True, text=True)
    assert r.returncode == 1 and "No space left on device" in r.stderr, r.stderr
    remount(m)
    for i, path in enumerate(made):
        assert os.getxattr(path, "user.big") == (b"%06d" % i) * 500
    assert md5(f"{p}/ballast") == h_ballast
    works_when_full(p, f"{p}/ballast")
    # space is back: attributes can be set again
    os.setxattr(f"{p}/x/f0", "user.small", b"ok")
    remount(m)
    assert os.getxattr(f"{p}/x/f0", "user.small") == b"ok"
    assert os.getxattr(f"{p}/x/f{n - 1}", "user.big") == (b"%06d" % (n - 1)) * 500
    assert m.unmount() == 0
    clean_log(m)
    fsck_clean(m.image)


def test_fill_with_fragmented_data(small):
    """ENOSPC while extent trees need new nodes: a file written every other
    block (one extent per block, so its tree grows nodes) until the blocks
    run out, then its holes; what was written before survives a remount."""
    m = small
    p = m.path
    make_existing(p)
    path = f"{p}/frag"
    written = {}
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        # even blocks up to 3000 (1500 extents), then the odd ones from 1 on:
        # the holes fill (extents merge) and the file grows on past 3000 by
        # single blocks with gaps again, until ENOSPC
        for blk in range(0, 3000, 2):
            data = (b"%08d" % blk) * 512
            assert os.pwrite(fd, data, blk * 4096) == 4096
            written[blk] = data
        blk = 1
        with pytest.raises(OSError) as e:
            while True:
                data = (b"%08d" % blk) * 512
                assert os.pwrite(fd, data, blk * 4096) == 4096
                written[blk] = data
                blk += 2
        assert e.value.errno == errno.ENOSPC, repr(e.value)
        assert blk > 3000
        os.fsync(fd)
    finally:
        os.close(fd)
    assert len(written) > 3000
    assert os.statvfs(p).f_bfree == 0

    def verify():
        with open(path, "rb") as f:
            for blk, data in written.items():
                f.seek(blk * 4096)
                assert f.read(4096) == data, f"block {blk}"
    verify()
    remount(m)
    verify()
    works_when_full(p, path)
    assert m.unmount() == 0
    clean_log(m)
    fsck_clean(m.image)
