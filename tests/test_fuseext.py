"""pmfs/fuseext.py: the handlers pyfuse3 does not register (FALLOCATE,
LSEEK, COPY_FILE_RANGE) and the capability it does not ask for
(CACHE_SYMLINKS), added to its libfuse session.

Unit tests of the parts that decide whether they can be installed (the
ELF symbol lookup, the layout check, the fallback when any of it fails,
a handler failure answered EIO), and FUSE tests of what they do:
fallocate's errors (ENOSPC, EFBIG from RLIMIT_FSIZE, EOPNOTSUPP for modes
FUSE or pmfs lack, EBADF) and durability across a SIGKILL, SEEK_DATA/
SEEK_HOLE against tmpfs, a copy_file_range served in the daemon, and
READLINK answered from the kernel's cache on noatime mounts only.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import subprocess
import sys

import pytest

import pyfuse3
from conftest import PmfsMount, mkfs
from pmfs import fuseext
from pmfs.fuseext import LL_OPS, PYFUSE3_FILLS, Extension, Unsupported, elf_symbols

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, mode: int, off: int, n: int) -> int:
    """0 or the errno of fallocate(2)."""
    return 0 if _libc.fallocate(fd, mode, off, n) == 0 else ctypes.get_errno()


# -- unit: can it be installed? -----------------------------------------------

def test_pyfuse3_has_the_symbols_the_handler_needs():
    syms = elf_symbols(pyfuse3.__file__, {"PyInit_pyfuse3", "__pyx_v_7pyfuse3_session",
                                          "__pyx_v_7pyfuse3_fuse_ops"})
    assert all(v > 0 for v in syms.values())


def test_elf_symbols_errors(tmp_path):
    with pytest.raises(Unsupported, match="no symbol nonexistent_symbol"):
        elf_symbols(pyfuse3.__file__, {"nonexistent_symbol"})
    notelf = tmp_path / "x.so"
    notelf.write_bytes(b"not an ELF file at all" * 10)
    with pytest.raises(Unsupported, match="not a 64-bit"):
        elf_symbols(str(notelf), {"x"})


def test_table_layout_matches_the_installed_libfuse_header():
    """LL_OPS is struct fuse_lowlevel_ops of the libfuse this was built
    against (the duplicate ioctl of the header's #if is one member)."""
    hdr = "/usr/include/fuse3/fuse_lowlevel.h"
    if not os.path.exists(hdr):
        pytest.skip("libfuse3-dev headers not installed")
    import re
    text = open(hdr).read()
    body = text[text.index("struct fuse_lowlevel_ops {"):]
    body = body[:body.index("\n};")]
    names = []
    for n in re.findall(r"\(\*(\w+)\)", body):
        if not names or names[-1] != n:
            names.append(n)
    assert names == LL_OPS
    assert PYFUSE3_FILLS < set(LL_OPS) and "fallocate" not in PYFUSE3_FILLS


def test_install_without_a_session_changes_nothing(caplog):
    """Outside a mount (no pyfuse3 session) install() says why and adds nothing."""
    with caplog.at_level(logging.WARNING, logger="pmfs.fuseext"):
        assert Extension(object()).install() == []
    assert "fallocate(2) and lseek(SEEK_DATA/SEEK_HOLE) stay unsupported" in caplog.text
    assert "no session" in caplog.text


def test_install_with_an_unexpected_layout_changes_nothing(monkeypatch, caplog):
    monkeypatch.setattr(fuseext, "KNOWN_FILLS", (PYFUSE3_FILLS | {"fallocate"},))
    monkeypatch.setattr(fuseext.ctypes.c_void_p, "from_address",
                        lambda addr: ctypes.c_void_p(1))  # a session "exists"
    with caplog.at_level(logging.WARNING, logger="pmfs.fuseext"):
        assert Extension(object()).install() == []
    assert "not laid out as expected" in caplog.text


def test_handler_failure_is_answered_eio(caplog):
    class Ops:
        def fallocate_errno(self, *a):
            raise RuntimeError("boom")

    replies = []

    class Lib:
        @staticmethod
        def fuse_reply_err(req, code):
            replies.append((req, code))

    ext = Extension(Ops())
    ext.libfuse = Lib()
    with caplog.at_level(logging.ERROR, logger="pmfs.fuseext"):
        ext._fallocate(1234, 5, 0, 0, 4096, None)
    assert replies == [(1234, errno.EIO)]
    assert "internal error in fallocate" in caplog.text


# -- through the mount ----------------------------------------------------------


@pytest.mark.fuse
def test_fallocate_errors_through_the_mount(pmfs_mount):
    p = os.path.join(pmfs_mount.path, "f")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert fallocate(fd, 0, 0, 1 << 20) == 0
        assert os.fstat(fd).st_size == 1 << 20
        # zero range through the mount; modes FUSE or pmfs do not have
        os.pwrite(fd, b"z" * 10000, 0)
        assert fallocate(fd, FALLOC_FL_ZERO_RANGE, 100, 5000) == 0
        assert os.pread(fd, 10000, 0) == b"z" * 100 + bytes(5000) + b"z" * 4900
        assert fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, 4096) == errno.EOPNOTSUPP  # no KEEP_SIZE
        for mode in (0x08, 0x20, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | 1):
            assert fallocate(fd, mode, 0, 4096) in (errno.EOPNOTSUPP, errno.EINVAL), mode
        # more than the file system holds: ENOSPC, nothing changed
        st = os.statvfs(pmfs_mount.path)
        assert fallocate(fd, 0, 0, (st.f_blocks + 10) * st.f_frsize) == errno.ENOSPC
        assert os.fstat(fd).st_size == 1 << 20
        assert os.statvfs(pmfs_mount.path).f_bfree == st.f_bfree
    finally:
        os.close(fd)
    # read-only descriptor: the kernel says EBADF; a directory or a fifo
    fd = os.open(p, os.O_RDONLY)
    try:
        assert fallocate(fd, 0, 0, 4096) == errno.EBADF
    finally:
        os.close(fd)
    os.mkfifo(os.path.join(pmfs_mount.path, "fifo"))
    fd = os.open(os.path.join(pmfs_mount.path, "fifo"), os.O_RDWR)
    try:
        assert fallocate(fd, 0, 0, 4096) in (errno.ESPIPE, errno.ENODEV)
    finally:
        os.close(fd)


@pytest.mark.fuse
def test_fallocate_respects_rlimit_fsize(pmfs_mount):
    """Growing a file past RLIMIT_FSIZE is EFBIG (stress-ng's fsize stressor)."""
    p = os.path.join(pmfs_mount.path, "limited")
    code = (
        "import ctypes, os, resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))\n"
        f"fd = os.open({p!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
        "ok = libc.fallocate(fd, 0, 0, 1 << 20)\n"
        "big = libc.fallocate(fd, 0, (1 << 20) - 1, 2)\n"
        "print(ok, big, ctypes.get_errno(), os.fstat(fd).st_size)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    ok, big, err, size = map(int, r.stdout.split())
    assert (ok, big, err, size) == (0, -1, errno.EFBIG, 1 << 20)


@pytest.mark.fuse
def test_fallocate_is_durable_and_fsck_clean(shm_dir):
    """What fallocate did is in the image when it returns: the daemon is
    killed (SIGKILL, no unmount), the image checks clean after recovery."""
    image = os.path.join(shm_dir, "k.img")
    mkfs(image, "64M")
    m = PmfsMount(image, os.path.join(shm_dir, "mnt")).mount()
    try:
        p = os.path.join(m.path, "f")
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(fd, b"\x11" * 100000, 0)
        assert fallocate(fd, 0, 0, 3 << 20) == 0
        assert fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192) == 0
        assert fallocate(fd, FALLOC_FL_KEEP_SIZE, 3 << 20, 1 << 20) == 0
        blocks = os.fstat(fd).st_blocks
        os.close(fd)
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(timeout=30)
    finally:
        m.unmount()
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "fsck.pmfs"), "-y",
                        image], capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 1), r.stdout + r.stderr  # 1: the log replayed
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "fsck.pmfs"), "-f",
                        "-n", image], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    m = PmfsMount(image, os.path.join(shm_dir, "mnt")).mount()
    try:
        with open(os.path.join(m.path, "f"), "rb") as f:
            data = f.read()
        assert len(data) == 3 << 20
        assert data[:4096] == b"\x11" * 4096 and data[4096:12288] == bytes(8192)
        assert data[12288:100000] == b"\x11" * (100000 - 12288)
        assert data[100000:] == bytes((3 << 20) - 100000)
        assert os.stat(os.path.join(m.path, "f")).st_blocks == blocks
    finally:
        m.unmount()


@pytest.mark.fuse
def test_seek_data_and_hole_through_the_mount_like_tmpfs(pmfs_mount, shm_dir):
    """lseek(SEEK_DATA/SEEK_HOLE) through the mount (FUSE_LSEEK) finds the
    holes tmpfs finds for the same writes (both map 4 KiB units)."""
    M = 1 << 20
    ref = os.path.join(shm_dir, "tmpfs-ref")
    os.mkdir(ref)
    offsets = [0, 1, 4095, 4096, 5000, M - 1, M, M + 4095, M + 4096, 2 * M, 3 * M - 1,
               3 * M, 4 * M]
    results = {}
    for where, root in (("tmpfs", ref), ("pmfs", pmfs_mount.path)):
        p = os.path.join(root, "sparse")
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"a" * 4096, 0)
            os.pwrite(fd, b"b" * 10, M)
            os.pwrite(fd, b"c" * 8192, 2 * M + 8192)
            os.ftruncate(fd, 3 * M)
            out = []
            for off in offsets:
                for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                    try:
                        out.append(os.lseek(fd, off, whence))
                    except OSError as e:
                        out.append(errno.errorcode[e.errno])
            results[where] = out
        finally:
            os.close(fd)
    assert results["pmfs"] == results["tmpfs"], results
    assert results["pmfs"][:4] == [0, 4096, 1, 4096]  # a hole after the first block


@pytest.mark.fuse
@pytest.mark.parametrize("atime", ["noatime", "relatime"])
def test_symlink_targets_are_cached_by_the_kernel_only_with_noatime(shm_dir, atime):
    """FUSE_CAP_CACHE_SYMLINKS (asked for at FUSE_INIT by fuseext's init
    wrapper) only on a noatime mount: there the second readlink of a
    symlink does not reach the daemon (and the atime stays as set).  On a
    relatime mount every readlink reaches the daemon, which renews an atime
    not newer than the mtime (FUSE leaves atimes to the daemon: a readlink
    answered from the kernel's cache would leave it stale).  Either way a
    new symlink under the same name is seen at once."""
    image = os.path.join(shm_dir, "s.img")
    mkfs(image, "32M")
    m = PmfsMount(image, os.path.join(shm_dir, "mnt"), options=f"debug,{atime}").mount()
    cached = atime == "noatime"
    try:
        p = os.path.join(m.path, "link")
        for target in ("target-one", "target-two"):
            os.symlink(target, p)
            for _ in range(3):
                os.utime(p, ns=(10**18, 10**18), follow_symlinks=False)
                assert os.readlink(p) == target
                renewed = os.lstat(p).st_atime_ns > 10**18 + 10**9 * 86400 * 365
                assert renewed != cached
            os.unlink(p)
        log = m.log_text()
        # one READLINK per symlink inode when cached, else one per readlink
        assert log.count("readlink(") == (2 if cached else 6), log
        assert "could not add FUSE capabilities" not in log
    finally:
        m.unmount()


@pytest.mark.fuse
def test_copy_file_range_is_one_request_in_the_daemon(shm_dir):
    """copy_file_range(2) through the mount reaches the daemon as
    FUSE_COPY_FILE_RANGE (not the kernel's READ/WRITE fallback), copies
    exactly, and what it copied is there after a remount; cp(1) gives an
    identical file."""
    image = os.path.join(shm_dir, "c.img")
    mkfs(image, "64M")
    mnt = os.path.join(shm_dir, "mnt")
    m = PmfsMount(image, mnt, options="debug").mount()
    data = os.urandom(3 << 20) + b"tail"
    try:
        src = os.path.join(mnt, "src")
        with open(src, "wb") as f:
            f.write(data)
        fi = os.open(src, os.O_RDONLY)
        fo = os.open(os.path.join(mnt, "dst"), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            done = 0
            while True:
                n = os.copy_file_range(fi, fo, 1 << 30, done, done + 10)
                if n == 0:
                    break
                done += n
        finally:
            os.close(fi)
            os.close(fo)
        assert done == len(data)
        log = m.log_text()
        assert "copy_file_range(" in log and log.count("read(") == 0, log[-2000:]
        subprocess.run(["cp", src, os.path.join(mnt, "cp")], check=True)
    finally:
        m.unmount()
    m = PmfsMount(image, mnt).mount()
    try:
        with open(os.path.join(mnt, "dst"), "rb") as f:
            assert f.read() == bytes(10) + data
        with open(os.path.join(mnt, "cp"), "rb") as f:
            assert f.read() == data
    finally:
        m.unmount()


def test_a_truncated_elf_file_is_unsupported_not_a_crash(tmp_path, monkeypatch, caplog):
    """Whatever goes wrong while looking (here: a cut-off ELF file as
    pyfuse3's module), install() logs it and the mount goes on."""
    cut = tmp_path / "cut.so"
    cut.write_bytes(open(pyfuse3.__file__, "rb").read()[:5000])
    monkeypatch.setattr(pyfuse3, "__file__", str(cut))
    with caplog.at_level(logging.WARNING, logger="pmfs.fuseext"):
        assert Extension(object()).install() == []
    assert "stay unsupported" in caplog.text
