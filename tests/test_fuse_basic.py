"""Basic behaviour through a real FUSE mount."""

from __future__ import annotations

import errno
import os
import stat
import subprocess

import pytest

from conftest import PmfsMount, fuse_mounted, mkfs, prog

pytestmark = pytest.mark.fuse


def test_files_dirs_links(pmfs_mount):
    m = pmfs_mount.path
    p = os.path.join(m, "a")
    with open(p, "wb") as f:
        f.write(b"hello\n")
    with open(p, "rb") as f:
        assert f.read() == b"hello\n"
    os.mkdir(os.path.join(m, "d"))
    os.link(p, os.path.join(m, "d", "b"))
    assert os.stat(p).st_nlink == 2
    os.symlink("a", os.path.join(m, "s"))
    assert os.readlink(os.path.join(m, "s")) == "a"
    with open(os.path.join(m, "s"), "rb") as f:
        assert f.read() == b"hello\n"
    os.rename(p, os.path.join(m, "d", "c"))
    assert sorted(os.listdir(os.path.join(m, "d"))) == ["b", "c"]
    assert os.stat(os.path.join(m, "d", "b")).st_ino == os.stat(os.path.join(m, "d", "c")).st_ino
    with pytest.raises(OSError) as e:
        os.rmdir(os.path.join(m, "d"))
    assert e.value.errno == errno.ENOTEMPTY
    os.unlink(os.path.join(m, "d", "b"))
    os.unlink(os.path.join(m, "d", "c"))
    os.rmdir(os.path.join(m, "d"))
    assert sorted(os.listdir(m)) == ["lost+found", "s"]


def test_dir_nlink_and_parent_times(pmfs_mount):
    m = pmfs_mount.path
    st0 = os.stat(m)
    os.mkdir(os.path.join(m, "x"))
    os.mkdir(os.path.join(m, "x", "y"))
    assert os.stat(os.path.join(m, "x")).st_nlink == 3
    st1 = os.stat(m)
    assert st1.st_nlink == st0.st_nlink + 1
    assert st1.st_mtime_ns >= st0.st_mtime_ns and st1.st_ctime_ns >= st0.st_ctime_ns
    os.rename(os.path.join(m, "x", "y"), os.path.join(m, "y"))
    assert os.stat(os.path.join(m, "x")).st_nlink == 2
    assert os.stat(m).st_nlink == st0.st_nlink + 2
    assert os.listdir(os.path.join(m, "y", "..")) is not None


def test_statfs_counts(pmfs_mount):
    m = pmfs_mount.path
    s0 = os.statvfs(m)
    assert s0.f_bsize == 4096 and s0.f_namemax == 255
    assert s0.f_blocks > 0 and 0 < s0.f_bfree <= s0.f_blocks
    assert s0.f_files > 0 and 0 < s0.f_ffree < s0.f_files
    with open(os.path.join(m, "f"), "wb") as f:
        f.write(os.urandom(1 << 20))
    s1 = os.statvfs(m)
    assert s0.f_bfree - s1.f_bfree >= 256
    assert s0.f_ffree - s1.f_ffree == 1
    df = subprocess.run(["df", "-T", m], capture_output=True, text=True).stdout
    assert "fuse.pmfs" in df


def test_statfs_after_rm_shows_the_space_freed(pmfs_mount):
    """Unlinked inodes are freed in batches once the kernel forgets them
    (reclaim_batch); statfs frees what waits, so df after rm is exact."""
    import time
    m = pmfs_mount.path
    d = os.path.join(m, "d")
    os.mkdir(d)
    s0 = os.statvfs(m)
    dblocks0 = os.stat(d).st_blocks // 8
    for i in range(100):  # not a multiple of the batch (64)
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(b"x" * 8192)
    s1 = os.statvfs(m)
    assert s0.f_ffree - s1.f_ffree == 100 and s0.f_bfree - s1.f_bfree >= 200
    for i in range(100):
        os.unlink(os.path.join(d, f"f{i}"))
    grown = os.stat(d).st_blocks // 8 - dblocks0  # directories do not shrink
    want = (s0.f_ffree, s0.f_bfree - grown)
    # the kernel sends its FORGETs asynchronously: allow them to arrive
    deadline = time.monotonic() + 3
    while True:
        s2 = os.statvfs(m)
        if (s2.f_ffree, s2.f_bfree) == want or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (s2.f_ffree, s2.f_bfree) == want


def test_sparse_and_holes(pmfs_mount):
    p = os.path.join(pmfs_mount.path, "sparse")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"x", 10 << 20)
        st = os.fstat(fd)
        assert st.st_size == (10 << 20) + 1
        assert st.st_blocks <= 16
        assert os.pread(fd, 4096, 5 << 20) == bytes(4096)
        os.ftruncate(fd, 1 << 40)
        assert os.fstat(fd).st_size == 1 << 40
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, 1 << 50)
        assert e.value.errno == errno.EFBIG
    finally:
        os.close(fd)


def test_remount_keeps_data(shm_dir):
    image = os.path.join(shm_dir, "r.img")
    mkfs(image, "64M")
    mnt = os.path.join(shm_dir, "mnt")
    data = os.urandom(3 << 20)
    with PmfsMount(image, mnt) as m:
        with open(os.path.join(m.path, "f"), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.setxattr(os.path.join(m.path, "f"), "user.k", b"v")
        os.mkdir(os.path.join(m.path, "dir"), 0o750)
    assert not fuse_mounted(mnt)
    with PmfsMount(image, mnt) as m:
        with open(os.path.join(m.path, "f"), "rb") as f:
            assert f.read() == data
        assert os.getxattr(os.path.join(m.path, "f"), "user.k") == b"v"
        assert stat.S_IMODE(os.stat(os.path.join(m.path, "dir")).st_mode) == 0o750


def test_background_mount_returns_when_live(shm_dir):
    image = os.path.join(shm_dir, "bg.img")
    mkfs(image, "32M")
    mnt = os.path.join(shm_dir, "mnt")
    os.mkdir(mnt)
    # relative paths, started from a directory the daemon must not keep busy
    r = subprocess.run([prog("mount.pmfs"), "bg.img", "mnt"], capture_output=True, text=True,
                       timeout=30, cwd=shm_dir)
    try:
        assert r.returncode == 0, r.stderr
        assert fuse_mounted(mnt)
        assert os.listdir(mnt) == ["lost+found"]
        daemons = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if b"bg.img" in argv and any(a.endswith(b"mount.pmfs") for a in argv):
                daemons.append(cwd)
        assert daemons == ["/"]
    finally:
        subprocess.run(["fusermount3", "-u", mnt])
    # the daemon exits once unmounted, and the image is clean again
    from pmfs.pmem import ImageBusy, open_image
    from pmfs.superblock import SuperblockManager
    import time
    for _ in range(200):
        try:
            img = open_image(image, lock="exclusive")
        except ImageBusy:
            time.sleep(0.05)
            continue
        try:
            assert SuperblockManager(img).load().clean
        finally:
            img.close()
        break
    else:
        pytest.fail("daemon did not release the image")


def test_mount_errors(shm_dir):
    mnt = os.path.join(shm_dir, "mnt")
    os.mkdir(mnt)
    foreign = os.path.join(shm_dir, "foreign.img")
    with open(foreign, "wb") as f:
        f.write(os.urandom(8 << 20))
    cases = [
        ([os.path.join(shm_dir, "missing.img"), mnt], "no such file"),
        ([shm_dir, mnt], "directory"),
        ([foreign, mnt], "not a pmfs file system"),
    ]
    for args, text in cases:
        r = subprocess.run([prog("mount.pmfs"), *args], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 32, (args, r)
        assert text in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert not fuse_mounted(mnt)
    r = subprocess.run([prog("mount.pmfs"), foreign, mnt, "-o", "bogus"], capture_output=True,
                       text=True)
    assert r.returncode == 1 and "unknown mount option" in r.stderr


def test_second_mount_refused(pmfs_mount, shm_dir):
    other = os.path.join(shm_dir, "mnt2")
    os.mkdir(other)
    r = subprocess.run([prog("mount.pmfs"), pmfs_mount.image, other], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 32
    assert "already mounted" in r.stderr
    assert not fuse_mounted(other)


def test_small_appends_preallocate_and_close_frees_it(pmfs_mount):
    """A file growing by 4 KiB appends gets blocks past EOF in advance
    (st_blocks shows them while it is open); the last close frees them
    (RELEASE is asynchronous: allow it to arrive)."""
    import time
    m = pmfs_mount.path
    p = os.path.join(m, "log")
    with open(p, "wb", buffering=0) as f:
        for i in range(40):
            f.write(bytes([i]) * 4096)
        st = os.fstat(f.fileno())
        assert st.st_size == 40 * 4096
        assert st.st_blocks > 40 * 8  # preallocated past EOF
        f.flush()
    deadline = time.monotonic() + 3
    while os.stat(p).st_blocks != 40 * 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.stat(p).st_blocks == 40 * 8
    with open(p, "rb") as f:
        assert f.read() == b"".join(bytes([i]) * 4096 for i in range(40))
