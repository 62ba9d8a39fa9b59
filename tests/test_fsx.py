"""An fsx-like exerciser through a real mount: random sequences of write,
read, truncate, fallocate (preallocate, keep size, punch hole, zero range), mmap read,
mmap write (msync), fsync and close/reopen on one file, checked against a model (a bytearray) after every operation, then
again after an unmount and a mount.  The file's page cache is dropped
often (POSIX_FADV_DONTNEED): files are opened with keep_cache, so most
reads would otherwise be answered by the kernel, not by the daemon.

A bounded, in-tree counterpart of long runs of xfstests' fsx (ltp/fsx.c)
against a mount: like fsx it also checks that the bytes past EOF in a
mapped last page read as zeros.  Fixed seeds: a failure names the seed and
the last operations.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random

import pytest

pytestmark = pytest.mark.fuse

PAGE = mmap.PAGESIZE
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class Fsx:
    def __init__(self, path: str, seed: int, maxlen: int, maxop: int):
        self.path = path
        self.rng = random.Random(seed)
        self.seed = seed
        self.maxlen = maxlen
        self.maxop = maxop
        self.model = bytearray()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.log: list[tuple] = []
        self.n = 0

    def fail(self, msg: str):
        tail = "\n".join(f"  {op}" for op in self.log[-12:])
        raise AssertionError(f"seed {self.seed}, op {self.n}: {msg}\nlast operations:\n{tail}")

    def data(self, n: int) -> bytes:
        # like fsx: the op number in every byte, so a misplaced byte names
        # the operation that wrote it
        tag = self.n % 251 + 1
        return bytes((tag + (i & 3)) & 0xFF for i in range(n))

    def check(self, off: int, n: int, got: bytes, how: str):
        want = bytes(self.model[off:off + n])
        if got != want:
            bad = next(i for i in range(min(len(got), len(want)) + 1)
                       if i >= len(got) or i >= len(want) or got[i] != want[i])
            self.fail(f"{how} [{off:#x}, +{n:#x}): first difference at {off + bad:#x} "
                      f"(got {got[bad:bad + 8].hex()}, want {want[bad:bad + 8].hex()}), "
                      f"{len(got)} bytes read")

    def check_size(self):
        st = os.fstat(self.fd)
        if st.st_size != len(self.model):
            self.fail(f"size {st.st_size}, expected {len(self.model)}")

    def grow_model(self, end: int):
        if end > len(self.model):
            self.model.extend(bytes(end - len(self.model)))

    # -- operations ------------------------------------------------------
    def op_write(self):
        off = self.rng.randrange(self.maxlen)
        n = min(self.rng.randrange(1, self.maxop + 1), self.maxlen - off)
        buf = self.data(n)
        self.log.append(("write", hex(off), hex(n), hex(len(self.model))))
        if os.pwrite(self.fd, buf, off) != n:
            self.fail("short write")
        self.grow_model(off + n)
        self.model[off:off + n] = buf

    def op_read(self):
        if not self.model:
            return
        off = self.rng.randrange(len(self.model))
        n = self.rng.randrange(1, self.maxop + 1)
        self.log.append(("read", hex(off), hex(n)))
        self.check(off, n, os.pread(self.fd, n, off), "read")

    def op_truncate(self):
        size = self.rng.randrange(self.maxlen + 1)
        self.log.append(("truncate", hex(len(self.model)), hex(size)))
        os.ftruncate(self.fd, size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.grow_model(size)

    def _eof_page_zero(self, mm, base: int, how: str):
        """The bytes past EOF in the last mapped page must be zero."""
        size = len(self.model)
        if size % PAGE and base <= size < base + len(mm):
            rest = mm[size - base:(size // PAGE + 1) * PAGE - base]
            if rest.count(0) != len(rest):
                self.fail(f"{how}: non-zero bytes past EOF ({size:#x}) in the last page")

    def op_mapread(self):
        if not self.model:
            return
        off = self.rng.randrange(len(self.model))
        n = min(self.rng.randrange(1, self.maxop + 1), len(self.model) - off)
        self.log.append(("mapread", hex(off), hex(n)))
        base = off - off % PAGE
        mm = mmap.mmap(self.fd, off + n - base, offset=base, prot=mmap.PROT_READ)
        try:
            self.check(off, n, mm[off - base:off - base + n], "mapread")
            self._eof_page_zero(mm, base, "mapread")
        finally:
            mm.close()

    def op_mapwrite(self):
        off = self.rng.randrange(self.maxlen)
        n = min(self.rng.randrange(1, self.maxop + 1), self.maxlen - off)
        buf = self.data(n)
        self.log.append(("mapwrite", hex(off), hex(n), hex(len(self.model))))
        if off + n > len(self.model):
            os.ftruncate(self.fd, off + n)  # a mapping cannot extend a file
            self.grow_model(off + n)
        base = off - off % PAGE
        mm = mmap.mmap(self.fd, off + n - base, offset=base)
        try:
            mm[off - base:off - base + n] = buf
            mm.flush()  # msync(MS_SYNC): the pages go to the daemon now
            self._eof_page_zero(mm, base, "mapwrite")
        finally:
            mm.close()
        self.model[off:off + n] = buf

    def op_falloc(self):
        """fallocate(2) like fsx: preallocate (mode 0, may extend the file),
        keep-size (blocks only) or punch a hole (the range reads as zeros)."""
        off = self.rng.randrange(self.maxlen)
        n = min(self.rng.randrange(1, self.maxop + 1), self.maxlen - off)
        mode = self.rng.choice((0, FALLOC_FL_KEEP_SIZE,
                                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE))
        self.log.append(("fallocate", mode, hex(off), hex(n), hex(len(self.model))))
        if _libc.fallocate(self.fd, mode, off, n) != 0:
            e = ctypes.get_errno()
            self.fail(f"fallocate(mode {mode}): {os.strerror(e)}")
        if not mode & FALLOC_FL_KEEP_SIZE:
            self.grow_model(off + n)
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            end = min(off + n, len(self.model))
            if off < end:
                self.model[off:end] = bytes(end - off)

    def op_fsync(self):
        self.log.append(("fsync",))
        os.fsync(self.fd)

    def op_dropcache(self):
        # the kernel keeps the file's pages cached (keep_cache): without
        # this, reads would mostly test the page cache, not the daemon
        self.log.append(("drop cache",))
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def op_reopen(self):
        self.log.append(("close/open",))
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR)

    OPS = (("op_write", 30), ("op_read", 20), ("op_mapread", 15), ("op_mapwrite", 15),
           ("op_truncate", 12), ("op_falloc", 8), ("op_fsync", 3), ("op_reopen", 5),
           ("op_dropcache", 25))

    def run(self, steps: int):
        names = [o for o, _w in self.OPS]
        weights = [w for _o, w in self.OPS]
        for self.n in range(1, steps + 1):
            getattr(self, self.rng.choices(names, weights)[0])()
            self.check_size()
            if self.n % 200 == 0:
                self.op_dropcache()
                self.verify_all("full check")

    def verify_all(self, how: str):
        got = os.pread(self.fd, len(self.model) + PAGE, 0)
        self.check(0, len(self.model) + PAGE, got, how)

    def close(self):
        os.close(self.fd)


# (seed, maximum file length, maximum operation length, operations):
# small files whose last page is revisited all the time, a medium one, and
# one with long operations over many blocks and holes
CASES = [(1, 3 * PAGE + 123, 1500, 1500), (2, 256 << 10, 64 << 10, 1200),
         (3, 4 << 20, 512 << 10, 500)]


@pytest.mark.parametrize("seed,maxlen,maxop,steps", CASES)
def test_fsx_like_random_ops_then_remount(pmfs_mount, seed, maxlen, maxop, steps):
    path = os.path.join(pmfs_mount.path, f"fsx{seed}")
    fx = Fsx(path, seed, maxlen, maxop)
    try:
        fx.run(steps)
        fx.verify_all("final check")
    finally:
        fx.close()
    pmfs_mount.unmount()
    pmfs_mount.mount()
    with open(path, "rb") as f:
        got = f.read()
    if got != bytes(fx.model):
        fx.n = "after remount"
        fx.check(0, len(fx.model) + 1, got, "after remount")
