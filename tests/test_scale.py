"""Scale through a real mount, bounded for CI (the real figures, with a
1,000,000-file image, are in docs/SCALE.md, made with tools/mkbig).

* 20,000 files in one directory, created through the mount: listing,
  lookups, remount, removal, fsck; the daemon's memory stays flat when the
  same 20,000 files are served again (caches are bounded);
* a 25,000-file image built in-process (tools/mkbig) is fsck clean,
  mounts, is served right and within a generous memory bound;
* a 2 GiB sparse file (and offsets past 4 GiB) written at a few places;
* a 64 GiB sparse image: mkfs, mount, statfs exact, files at the far end of
  the data area, fsck, without allocating the image's size in RAM.

Correctness is asserted, never time.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from conftest import PmfsMount, fuse_available, mkfs, prog

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(300)]

GiB = 1 << 30
MiB = 1 << 20


def fsck_clean(image: str) -> str:
    r = subprocess.run([prog("fsck.pmfs"), "-f", "-n", image], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"fsck.pmfs -f -n: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, ... of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if v.strip().endswith("kB"):
                out[k] = int(v.split()[0])
    return out


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture
def mount(shm_dir):
    """A factory: mount(size, options, mkfs args) -> PmfsMount, torn down."""
    if not fuse_available():
        pytest.fail("FUSE is not available")
    made = []

    def make(size="256M", options="", *args):
        image = os.path.join(shm_dir, f"fs{len(made)}.img")
        mkfs(image, size, *args)
        m = PmfsMount(image, os.path.join(shm_dir, f"mnt{len(made)}"), options)
        made.append(m)
        return m.mount()
    yield make
    for m in made:
        m.unmount()
        assert "Traceback" not in m.log_text(), m.log_text()


# ---------------------------------------------------------------------------
# 20,000 files in one directory
# ---------------------------------------------------------------------------

N = 20_000


def _stat_all(d: str, names) -> None:
    for n in names:
        os.stat(os.path.join(d, n))


def test_20000_files_in_one_directory(mount):
    m = mount("256M", "", "-N", "40000")
    d = os.path.join(m.path, "big")
    os.mkdir(d)
    names = [f"file-{i:06d}" + "x" * (i % 50) for i in range(N)]
    for i, n in enumerate(names):
        fd = os.open(os.path.join(d, n), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        if i % 97 == 0:
            os.write(fd, n.encode())
        os.close(fd)
    listed = os.listdir(d)
    assert len(listed) == N and sorted(listed) == sorted(names)
    inos = {}
    for i, n in enumerate(names):
        st = os.stat(os.path.join(d, n))
        assert st.st_size == (len(n) if i % 97 == 0 else 0)
        inos[n] = st.st_ino
    assert len(set(inos.values())) == N
    # scandir gives the same inode numbers as lookups
    assert {e.name: e.inode() for e in os.scandir(d)} == inos
    s = os.statvfs(m.path)
    assert s.f_files - s.f_ffree >= N + 3
    m.unmount()
    fsck_clean(m.image)
    # again with every stat reaching the daemon (zero kernel timeouts):
    # serving the same 20,000 files a second and third time must not grow
    # its heap (caches bounded, nothing kept per request)
    m.options = "attr_timeout=0,entry_timeout=0"
    m.mount()
    pid = m.proc.pid
    a0 = status(pid)["RssAnon"]
    assert sorted(os.listdir(d)) == sorted(names)
    for n in names:
        assert os.stat(os.path.join(d, n)).st_ino == inos[n]
    a1 = status(pid)["RssAnon"]
    _stat_all(d, names)
    os.listdir(d)
    _stat_all(d, names)
    a2 = status(pid)["RssAnon"]
    assert a1 - a0 < 100 * 1024, f"heap grew {a1 - a0} KiB for {N} files"
    assert a2 - a1 < 8 * 1024, f"heap grew {a2 - a1} KiB serving the same files again"
    rng = random.Random(3)
    for n in names[::97]:
        with open(os.path.join(d, n), "rb") as f:
            assert f.read() == n.encode()
    # remove every other name: the rest are still found, the listing is exact
    for n in names[::2]:
        os.unlink(os.path.join(d, n))
    keep = names[1::2]
    assert sorted(os.listdir(d)) == sorted(keep)
    for n in rng.sample(keep, 2000):
        assert os.stat(os.path.join(d, n)).st_ino == inos[n]
    for n in rng.sample(names[::2], 200):
        assert not os.path.exists(os.path.join(d, n))
    m.unmount()
    fsck_clean(m.image)


def test_25000_file_image_built_in_process(shm_dir):
    """tools/mkbig on a small scale: 25,000 files built with the core, fsck
    clean, mounted, found and listed; the daemon's heap stays bounded."""
    image = os.path.join(shm_dir, "big.img")
    r = subprocess.run([sys.executable,
                        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     "tools", "mkbig"), image, "--size", "2G", "--files", "15000",
                        "--per-dir", "1000", "--big-dir", "10000", "--big-file", "0"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    fsck_clean(image)
    m = PmfsMount(image, os.path.join(shm_dir, "mnt"), "attr_timeout=0,entry_timeout=0")
    m.mount()
    try:
        pid = m.proc.pid
        a0 = status(pid)["RssAnon"]
        big = os.listdir(os.path.join(m.path, "big"))
        assert len(big) == 10000 and len(set(big)) == 10000
        assert sorted(os.listdir(os.path.join(m.path, "tree"))) == \
            [f"d{i:04d}" for i in range(15)]
        for i in range(0, 15000, 3):
            p = os.path.join(m.path, "tree", f"d{i // 1000:04d}", f"f{i:07d}")
            st = os.stat(p)
            if i % 100 == 0:
                with open(p, "rb") as f:
                    assert f.read() == f"tree/d{i // 1000:04d}/f{i:07d}\n".encode()
                assert st.st_size > 0
        _stat_all(os.path.join(m.path, "big"), big)
        a1 = status(pid)["RssAnon"]
        _stat_all(os.path.join(m.path, "big"), big)
        a2 = status(pid)["RssAnon"]
        assert a1 - a0 < 256 * 1024, f"heap grew {a1 - a0} KiB serving ~15,000 files"
        assert a2 - a1 < 8 * 1024, f"heap grew {a2 - a1} KiB serving the same files again"
    finally:
        m.unmount()
    assert "Traceback" not in m.log_text()


# ---------------------------------------------------------------------------
# big sparse files
# ---------------------------------------------------------------------------

def test_2gib_sparse_file_written_at_a_few_offsets(mount):
    m = mount("64M")
    p = os.path.join(m.path, "sparse")
    size = 2 * GiB
    writes = {0: b"first", GiB - 3: b"across-1GiB", size - 4096: b"A" * 4096,
              size - 7: b"the end", 5 * GiB + 12345: b"past 4 GiB"}
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        for off, data in sorted(writes.items()):
            assert os.pwrite(fd, data, off) == len(data)
        end = max(o + len(d) for o, d in writes.items())
        st = os.fstat(fd)
        assert st.st_size == end
        assert st.st_blocks * 512 <= 16 * 4096  # a handful of blocks, not GiBs
    finally:
        os.close(fd)

    def check():
        fd = os.open(p, os.O_RDONLY)
        try:
            model = {}
            for off, data in sorted(writes.items()):
                for k, c in enumerate(data):
                    model[off + k] = c
            # every written range, with some hole around it
            for off, data in writes.items():
                lo = max(0, off - 5000)
                got = os.pread(fd, len(data) + 10000, lo)
                want = bytes(model.get(lo + k, 0) for k in range(len(got)))
                assert got == want, f"around offset {off}"
            # holes far from any write read as zeros
            for off in (MiB, 700 * MiB, GiB + MiB, 3 * GiB, 4 * GiB - 1):
                assert os.pread(fd, 65536, off) == bytes(65536)
            # reading whole 1 MiB pieces across a written block
            assert os.pread(fd, MiB, size - MiB).endswith(b"A" * 4089 + b"the end")
        finally:
            os.close(fd)
    check()
    s = os.statvfs(m.path)
    assert (s.f_blocks - s.f_bfree) * 4096 < 8 * MiB
    m.unmount()
    fsck_clean(m.image)
    m.mount()
    check()
    # shrink below the last writes, extend again: the tail reads as zeros
    os.truncate(p, GiB)
    os.truncate(p, size)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.pread(fd, 20, GiB - 3) == b"acr" + bytes(17)
        assert os.pread(fd, 4096, size - 4096) == bytes(4096)
        assert os.fstat(fd).st_size == size
    finally:
        os.close(fd)
    m.unmount()
    fsck_clean(m.image)


def test_64gib_sparse_image(mount):
    from pmfs.layout import compute_geometry
    m = mount("64G", "", "--sparse")
    img_size = 64 * GiB
    assert os.path.getsize(m.image) == img_size
    assert allocated(m.image) < 64 * MiB, f"mkfs allocated {allocated(m.image)} bytes"
    geo = compute_geometry(img_size)
    s = os.statvfs(m.path)
    assert s.f_frsize == 4096
    assert s.f_blocks == geo.total_blocks - geo.data_start
    assert s.f_files == geo.inode_count - 1
    assert s.f_blocks * 4096 > 60 * GiB
    used0 = s.f_blocks - s.f_bfree
    assert 0 < used0 < 16
    # files: many small ones, and one spanning 3 GiB sparsely
    os.mkdir(os.path.join(m.path, "d"))
    for i in range(200):
        with open(os.path.join(m.path, "d", f"f{i}"), "wb") as f:
            f.write(b"%d" % i * 1000)
    p = os.path.join(m.path, "huge")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        for off in (0, GiB, 3 * GiB - 4096):
            os.pwrite(fd, b"%d" % off * 100, off)
    finally:
        os.close(fd)
    s1 = os.statvfs(m.path)
    assert s1.f_ffree == s.f_ffree - 202
    assert 0 < s.f_bfree - s1.f_bfree < 400
    rss = status(m.proc.pid)
    # the daemon maps 64 GiB but touches little of it
    assert rss["VmRSS"] < 400 * 1024, rss
    m.unmount()
    assert allocated(m.image) < 96 * MiB
    fsck_clean(m.image)
    m.mount()
    for i in range(0, 200, 13):
        with open(os.path.join(m.path, "d", f"f{i}"), "rb") as f:
            assert f.read() == b"%d" % i * 1000
    fd = os.open(p, os.O_RDONLY)
    try:
        for off in (0, GiB, 3 * GiB - 4096):
            want = b"%d" % off * 100
            assert os.pread(fd, len(want), off) == want
        assert os.pread(fd, 4096, 2 * GiB) == bytes(4096)
    finally:
        os.close(fd)
    s2 = os.statvfs(m.path)
    assert (s2.f_bfree, s2.f_ffree) == (s1.f_bfree, s1.f_ffree)


def test_checking_a_sparse_64gib_image_allocates_nothing(shm_dir):
    """fsck.pmfs -n and pmfs-inspect only read: on a sparse image in tmpfs
    they must not turn the holes of the (mostly free) inode table into
    allocated memory -- 1/64 of the image size, 1 GiB here, 16 GiB for a
    1 TiB image.  (Reading holes through a shared mapping allocates tmpfs
    pages; pread() or SEEK_DATA/SEEK_HOLE do not.)"""
    image = os.path.join(shm_dir, "fs.img")
    mkfs(image, "64G", "--sparse")
    a0 = allocated(image)
    assert a0 < 16 * MiB
    out = fsck_clean(image)
    a1 = allocated(image)
    r = subprocess.run([prog("pmfs-inspect"), image], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    a2 = allocated(image)
    assert (a1 - a0 < 16 * MiB and a2 - a1 < 16 * MiB), \
        (f"checking allocated {(a1 - a0) >> 20} MiB (fsck.pmfs -f -n) and "
         f"{(a2 - a1) >> 20} MiB (pmfs-inspect) of the sparse image\n{out}")
