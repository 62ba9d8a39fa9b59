"""What is written before an unmount is there after the next mount, bit-exact.

A populated tree (files of sizes around block boundaries, a 100 MiB sparse
file, hard links, symlinks, fifos, sockets, device nodes, xattrs, modes with
set-id and sticky bits, other owners, nanosecond timestamps) is snapshotted
in full — names, types, modes, owners, sizes, link counts, inode numbers,
st_blocks, all three timestamps, xattrs, content hashes, symlink targets —
and must be identical after: a clean unmount + mount, a read-only mount
(where every kind of write fails with EROFS and the image is not changed by a
single byte), a SIGTERM to the daemon (a clean unmount: the image is marked
clean), and a SIGKILL after fsync (crash recovery).
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import time

import pytest

from conftest import PmfsMount, fuse_mounted
from pmfs.pmem import open_image
from pmfs.superblock import SuperblockManager

pytestmark = pytest.mark.fuse

SIZES = {"empty": 0, "one": 1, "b4095": 4095, "b4096": 4096, "b4097": 4097,
         "mib3": (1 << 20) + 3, "d1/mid": 70001, "d1/d2/deep": 12288}
SPARSE_BLOCKS = (0, 7 << 20, 50 << 20, (100 << 20) - 4096)


def content(name: str, n: int) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    reps = n // len(seed) + 1
    return (seed * reps)[:n]


def sb_clean(image: str) -> bool:
    img = open_image(image, readonly=True)
    try:
        return SuperblockManager(img).load().clean
    finally:
        img.close()


def image_md5(image: str) -> str:
    h = hashlib.md5()
    with open(image, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def populate(root: str) -> None:
    os.makedirs(os.path.join(root, "d1", "d2"))
    os.mkdir(os.path.join(root, "sticky"))
    os.mkdir(os.path.join(root, "empty-dir"))
    for name, n in SIZES.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(content(name, n))
            os.fsync(f.fileno())
    with open(os.path.join(root, "sparse"), "wb") as f:
        f.truncate(100 << 20)
        for off in SPARSE_BLOCKS:
            f.seek(off)
            f.write(content(f"sparse{off}", 4096))
        os.fsync(f.fileno())
    # a file of many extents: two files written in alternation
    with open(os.path.join(root, "frag1"), "wb") as f1, \
            open(os.path.join(root, "frag2"), "wb") as f2:
        for i in range(64):
            f1.write(content(f"f1-{i}", 4096))
            f1.flush()
            f2.write(content(f"f2-{i}", 4096))
            f2.flush()
        os.fsync(f1.fileno())
        os.fsync(f2.fileno())
    os.link(os.path.join(root, "b4096"), os.path.join(root, "d1", "hard"))
    os.link(os.path.join(root, "b4096"), os.path.join(root, "d1", "d2", "hard2"))
    os.symlink("b4097", os.path.join(root, "short-link"))
    os.symlink("d1/d2/" + "x" * 300, os.path.join(root, "long-link"))
    os.symlink("../one", os.path.join(root, "d1", "up-link"))
    os.mkfifo(os.path.join(root, "fifo"), 0o640)
    os.mknod(os.path.join(root, "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(os.path.join(root, "blk"), 0o660 | stat.S_IFBLK, os.makedev(7, 42))
    os.mknod(os.path.join(root, "sock"), 0o755 | stat.S_IFSOCK)
    os.setxattr(os.path.join(root, "one"), "user.a", b"alpha")
    os.setxattr(os.path.join(root, "one"), "user.empty", b"")
    os.setxattr(os.path.join(root, "mib3"), "user.bin", bytes(range(256)) * 4)
    os.setxattr(os.path.join(root, "d1"), "user.dir", b"on a directory")
    os.setxattr(os.path.join(root, "b4096"), "trusted.t", b"trusted value")
    for i in range(20):
        os.setxattr(os.path.join(root, "b4095"), f"user.many{i:02d}", str(i).encode() * i)
    os.chown(os.path.join(root, "one"), 1000, 1000)
    os.chown(os.path.join(root, "d1", "mid"), 65534, 100)
    os.chown(os.path.join(root, "short-link"), 123, 456, follow_symlinks=False)
    os.chown(os.path.join(root, "d1"), 4242, 0)
    os.chmod(os.path.join(root, "mib3"), 0o4755)
    os.chmod(os.path.join(root, "b4097"), 0o2640)
    os.chmod(os.path.join(root, "sticky"), 0o1777)
    os.chmod(os.path.join(root, "empty"), 0o000)
    os.chmod(os.path.join(root, "d1", "d2"), 0o2750)
    # nanosecond timestamps on everything, deepest first
    entries = []
    for dp, dn, fn in os.walk(root):
        entries += [os.path.join(dp, n) for n in dn + fn]
    for i, p in enumerate(sorted(entries, key=lambda p: (-p.count("/"), p))):
        os.utime(p, ns=(1_600_000_000_000_000_000 + i * 1_000_003_001,
                        1_500_000_000_123_456_789 + i * 86_399_999_999_999),
                 follow_symlinks=False)


def snapshot(root: str, atime: bool = True) -> dict:
    """Everything stat(2) says (but st_dev) plus contents, targets, xattrs."""
    out = {}

    def entry(p):
        rel = os.path.relpath(p, root)
        st = os.lstat(p)
        d = {"mode": stat.filemode(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
             "nlink": st.st_nlink, "size": st.st_size, "ino": st.st_ino,
             "blocks": st.st_blocks, "rdev": st.st_rdev, "mtime": st.st_mtime_ns,
             "ctime": st.st_ctime_ns}
        if atime:
            d["atime"] = st.st_atime_ns
        if stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            d["sha256"] = h.hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            d["target"] = os.readlink(p)
        d["xattrs"] = sorted((n, os.getxattr(p, n, follow_symlinks=False))
                             for n in os.listxattr(p, follow_symlinks=False))
        out[rel] = d

    entry(root)
    for dp, dn, fn in os.walk(root):
        for n in sorted(dn + fn):
            entry(os.path.join(dp, n))
    return out


def atimes(root: str) -> dict:
    out = {}
    for dp, dn, fn in os.walk(root):
        for n in ["."] + dn + fn:
            p = os.path.join(dp, n)
            out[os.path.normpath(os.path.relpath(p, root))] = os.lstat(p).st_atime_ns
    return out


def assert_same(before: dict, after: dict, what: str) -> None:
    if before == after:
        return
    lines = []
    for k in sorted(set(before) | set(after)):
        if k not in before or k not in after:
            lines.append(f"{k}: {'lost' if k in before else 'appeared'}")
            continue
        for f in sorted(set(before[k]) | set(after[k])):
            if before[k].get(f) != after[k].get(f):
                lines.append(f"{k}: {f}: before {before[k].get(f)!r}, after {after[k].get(f)!r}")
    raise AssertionError(f"{what}: {len(lines)} difference(s):\n  " + "\n  ".join(lines[:40]))


def expected_contents_ok(root: str) -> None:
    """The contents are the ones written (not only equal to a snapshot)."""
    for name, n in SIZES.items():
        with open(os.path.join(root, name), "rb") as f:
            assert f.read() == content(name, n), name
    with open(os.path.join(root, "sparse"), "rb") as f:
        for off in SPARSE_BLOCKS:
            f.seek(off)
            assert f.read(4096) == content(f"sparse{off}", 4096)
        f.seek(4096)
        assert f.read(1 << 20) == bytes(1 << 20)
    with open(os.path.join(root, "frag1"), "rb") as f:
        assert f.read() == b"".join(content(f"f1-{i}", 4096) for i in range(64))


def test_tree_survives_unmount_and_mount(pmfs_mount):
    m = pmfs_mount
    root = os.path.join(m.path, "tree")
    populate(root)
    expected_contents_ok(root)
    before = snapshot(root)
    # reading every file moved the atimes (relatime): those must persist too
    read_atimes = atimes(root)
    m.unmount()
    assert sb_clean(m.image), "the image is not marked clean after fusermount3 -u"
    m.mount()
    # atimes: as they were after the reads (pmfs writes them back lazily)
    expect = {k: v | {"atime": read_atimes[k]} for k, v in before.items()}
    assert_same(expect, snapshot(root), "snapshot after unmount + mount")
    expected_contents_ok(root)
    # a second cycle with no change in between changes nothing at all
    m.unmount()
    m.mount()
    first = {k: {f: v for f, v in d.items() if f != "atime"} for k, d in before.items()}
    again = {k: {f: v for f, v in d.items() if f != "atime"}
             for k, d in snapshot(root).items()}
    assert_same(first, again, "snapshot after a second unmount + mount")


def test_atime_set_with_utime_persists(pmfs_mount):
    m = pmfs_mount
    p = os.path.join(m.path, "f")
    with open(p, "wb") as f:
        f.write(b"data")
    os.utime(p, ns=(1_111_111_111_111_111_111, 1_000_000_000_000_000_001))
    d = os.path.join(m.path, "d")
    os.mkdir(d)
    os.utime(d, ns=(1_222_222_222_222_222_222, 1_000_000_000_000_000_002))
    m.unmount()
    m.mount()
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_111_111_111_111_111_111,
                                               1_000_000_000_000_000_001)
    st = os.stat(d)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_222_222_222_222_222_222,
                                               1_000_000_000_000_000_002)


def _expect_erofs(fn, *args, **kw):
    with pytest.raises(OSError) as e:
        fn(*args, **kw)
    assert e.value.errno == errno.EROFS, f"{fn.__name__}{args}: {e.value!r}"


def test_readonly_mount(pmfs_mount):
    m = pmfs_mount
    root = os.path.join(m.path, "tree")
    populate(root)
    snap = snapshot(root)
    read_atimes = atimes(root)  # the snapshot's reads moved them (relatime)
    before = {k: v | {"atime": read_atimes[k]} for k, v in snap.items()}
    m.unmount()
    digest = image_md5(m.image)
    ro = PmfsMount(m.image, m.path, "ro")
    ro.mount()
    try:
        assert os.statvfs(m.path).f_flag & os.ST_RDONLY
        now = snapshot(root)
        # reading on a read-only mount does not move atimes
        assert_same(before, now, "snapshot on the read-only mount")
        expected_contents_ok(root)
        f = os.path.join(root, "one")
        _expect_erofs(os.open, f, os.O_WRONLY)
        _expect_erofs(os.open, f, os.O_RDWR)
        _expect_erofs(os.open, os.path.join(root, "new"), os.O_WRONLY | os.O_CREAT, 0o644)
        _expect_erofs(os.open, f, os.O_RDONLY | os.O_TRUNC)
        _expect_erofs(os.truncate, f, 0)
        _expect_erofs(os.mkdir, os.path.join(root, "newdir"))
        _expect_erofs(os.rmdir, os.path.join(root, "empty-dir"))
        _expect_erofs(os.unlink, f)
        _expect_erofs(os.rename, f, os.path.join(root, "renamed"))
        _expect_erofs(os.link, f, os.path.join(root, "linked"))
        _expect_erofs(os.symlink, "x", os.path.join(root, "sym"))
        _expect_erofs(os.mkfifo, os.path.join(root, "fifo2"))
        _expect_erofs(os.chmod, f, 0o777)
        _expect_erofs(os.chown, f, 1, 1)
        _expect_erofs(os.utime, f, ns=(1, 1))
        _expect_erofs(os.setxattr, f, "user.new", b"v")
        _expect_erofs(os.removexattr, f, "user.a")
        assert os.getxattr(f, "user.a") == b"alpha"
        assert os.listxattr(os.path.join(root, "b4095"))
        assert_same(before, snapshot(root), "snapshot after the refused writes")
    finally:
        rc = ro.unmount()
    assert rc == 0, f"read-only daemon exited with {rc}:\n{ro.log_text()}"
    assert image_md5(m.image) == digest, "a read-only mount changed the image"
    m.mount()
    assert_same(before, snapshot(root), "snapshot on the read-write mount after ro")


def test_sigterm_unmounts_cleanly(pmfs_mount):
    m = pmfs_mount
    root = os.path.join(m.path, "tree")
    populate(root)
    assert not sb_clean(m.image), "the image is marked clean while it is mounted"
    # data written without fsync: a clean shutdown must persist it too
    with open(os.path.join(root, "late"), "wb") as f:
        f.write(content("late", 123457))
    with open(os.path.join(root, "b4096"), "r+b") as f:
        f.write(b"overwritten in place")  # a data-only change (lazy mtime)
    before = snapshot(root, atime=False)
    # SIGHUP only syncs: the daemon keeps serving
    m.proc.send_signal(signal.SIGHUP)
    time.sleep(0.3)
    assert m.proc.poll() is None and fuse_mounted(m.path), "SIGHUP stopped the daemon"
    assert os.path.exists(os.path.join(root, "late"))
    m.proc.send_signal(signal.SIGTERM)
    rc = m.proc.wait(timeout=20)
    assert rc == 0, f"the daemon exited with {rc} on SIGTERM:\n{m.log_text()}"
    deadline = time.monotonic() + 5
    while fuse_mounted(m.path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not fuse_mounted(m.path), "SIGTERM did not unmount"
    m.unmount()  # reaps
    assert sb_clean(m.image), "the image is not marked clean after SIGTERM"
    log = m.log_text()
    assert "cleanly unmounted" in log and "Traceback" not in log, log
    m.mount()
    assert "was not cleanly unmounted" not in m.log_text()
    assert_same(before, snapshot(root, atime=False), "snapshot after SIGTERM + mount")
    with open(os.path.join(root, "late"), "rb") as f:
        assert f.read() == content("late", 123457)


def test_sigint_unmounts_cleanly(pmfs_mount):
    m = pmfs_mount
    p = os.path.join(m.path, "x")
    with open(p, "wb") as f:
        f.write(b"x" * 10000)
    m.proc.send_signal(signal.SIGINT)
    assert m.proc.wait(timeout=20) == 0
    m.unmount()
    assert not fuse_mounted(m.path)
    assert sb_clean(m.image)
    m.mount()
    with open(p, "rb") as f:
        assert f.read() == b"x" * 10000


def test_sigkill_after_fsync_recovers_everything(pmfs_mount):
    """A crash (SIGKILL) after fsync: recovery gives back exactly the fsynced
    state.  The workload frees metadata blocks (an xattr block, directory
    blocks, a long symlink's block) and then writes file data that the
    allocator places in those blocks again."""
    m = pmfs_mount
    root = os.path.join(m.path, "tree")
    populate(root)
    # start with an empty log, so that every transaction of the churn below
    # is still in it at the crash and replayed by recovery
    m.unmount()
    m.mount()
    # churn: metadata blocks freed and reused for file data
    churn = os.path.join(m.path, "churn")
    os.mkdir(churn)
    expect = {}
    for i in range(8):
        p = os.path.join(churn, f"f{i}")
        with open(p, "wb") as f:
            f.write(content(f"a{i}", 4096))
        os.setxattr(p, "user.big", content(f"x{i}", 3000))   # an xattr block
        os.removexattr(p, "user.big")                       # ... freed
        os.symlink("y" * 400, p + ".link")                   # a symlink block
        os.unlink(p + ".link")                               # ... freed
        with open(p, "ab") as f:                             # data appended
            f.write(content(f"b{i}", 8192))
            os.fsync(f.fileno())
        expect[p] = content(f"a{i}", 4096) + content(f"b{i}", 8192)
    big = os.path.join(churn, "bigdir")
    os.mkdir(big)
    for i in range(60):
        open(os.path.join(big, f"entry-with-a-long-name-{i:04d}-" + "z" * 60), "w").close()
    for n in os.listdir(big):
        os.unlink(os.path.join(big, n))
    os.rmdir(big)                                            # directory blocks freed
    p = os.path.join(churn, "after-dir")
    with open(p, "wb") as f:
        f.write(content("after-dir", 64 << 10))
        os.fsync(f.fileno())
    expect[p] = content("after-dir", 64 << 10)
    for dp, dn, fn in os.walk(m.path):
        for n in fn + ["."]:
            q = os.path.join(dp, n)
            if os.path.isfile(q) and not os.path.islink(q) or n == ".":
                fd = os.open(q, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
    for p, data in expect.items():
        with open(p, "rb") as f:
            assert f.read() == data, f"{p} wrong before the crash"
    before = snapshot(m.path, atime=False)
    m.kill()
    m.mount()
    assert "was not cleanly unmounted" in m.log_text()
    bad = []
    for p, data in expect.items():
        with open(p, "rb") as f:
            got = f.read()
        if got != data:
            first = next(i for i in range(min(len(got), len(data))) if got[i] != data[i]) \
                if len(got) == len(data) else None
            bad.append(f"{os.path.relpath(p, m.path)}: {len(got)} bytes, first wrong byte at "
                       f"{first}: {got[first:first + 32] if first is not None else ''!r}")
    assert not bad, "fsynced data changed by crash recovery:\n  " + "\n  ".join(bad) + \
        "\ndaemon log:\n" + m.log_text()[-3000:]
    assert_same(before, snapshot(m.path, atime=False), "snapshot after SIGKILL + recovery")
    expected_contents_ok(root)
