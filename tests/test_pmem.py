"""The persistence layer (pmfs/pmem.py): the same primitives on every
backend -- memory, msync (a file on ordinary storage), libpmem (a file on
/dev/shm with PMEM_IS_PMEM_FORCE=1) and the tracing wrapper."""

from __future__ import annotations

import ctypes
import os
import resource
import subprocess
import sys

import pytest

from pmfs import accel
from pmfs.pmem import (EV_FENCE, EV_FLUSH, EV_STORE, ImageError, LibpmemImage, MemoryImage,
                       MsyncImage, TracingImage, libpmem, open_image)

SIZE = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _file(dirpath: str, name: str = "img") -> str:
    path = os.path.join(dirpath, name)
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


def _need_libpmem() -> None:
    if libpmem() is None:
        pytest.fail("libpmem1 is not installed (setup.sh installs it)")


@pytest.fixture(params=["memory", "msync", "libpmem", "tracing"])
def image(request, tmp_path, shm_dir):
    kind = request.param
    if kind == "memory":
        img = MemoryImage(SIZE)
    elif kind == "tracing":
        img = TracingImage(MemoryImage(SIZE))
    elif kind == "msync":
        img = open_image(_file(str(tmp_path)), backend="msync")
        assert isinstance(img, MsyncImage)
    else:
        _need_libpmem()
        img = _open_forced(_file(shm_dir))
    yield kind, img
    img.close()


def _open_forced(path: str):
    """A LibpmemImage of `path`.  libpmem reads PMEM_IS_PMEM_FORCE when it
    loads, which in this process may have happened without it, so the
    image is mapped directly rather than through open_image's check
    (test_backend_selection_and_reporting covers that check, in a child)."""
    import mmap

    from pmfs import pmem
    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return pmem.LibpmemImage(path, fd, mm, SIZE, False)


def test_write_read_roundtrip_and_zero_copy_reads(image):
    _kind, img = image
    img.write(100, b"hello")
    view = img.read(100, 5)
    assert bytes(view) == b"hello"
    assert isinstance(view, memoryview)
    img.write(100, b"HELLO")  # a view shows later stores: no copy was made
    assert bytes(view) == b"HELLO"
    del view


def test_out_of_range_access_is_refused(image):
    _kind, img = image
    for fn in (lambda: img.read(SIZE - 2, 3), lambda: img.read(-1, 1),
               lambda: img.write(SIZE - 2, b"abc"), lambda: img.write(-8, b"x"),
               lambda: img.copy(SIZE - 1, b"ab"), lambda: img.zero(SIZE - 1, 2)):
        with pytest.raises(ValueError):
            fn()


def test_copy_and_zero_persist_ranges(image):
    kind, img = image
    data = bytes(range(256)) * 64  # 16 KiB
    img.copy(4096, data)
    assert bytes(img.read(4096, len(data))) == data
    # a slice of the source, not fenced yet: a bytes source and a memoryview
    img.copy(65536, data, drain=False, start=1000, n=3000)
    img.copy(131072, memoryview(data), drain=False, start=7, n=100)
    img.fence()
    assert bytes(img.read(65536, 3000)) == data[1000:4000]
    assert bytes(img.read(131072, 100)) == data[7:107]
    img.zero(4096 + 10, 5000)
    got = bytes(img.read(4096, len(data)))
    assert got[:10] == data[:10] and got[10:5010] == bytes(5000) and got[5010:] == data[5010:]
    img.persist(0, SIZE)
    if kind == "tracing":
        assert img.pending() == (set(), set())


def test_file_backends_reach_the_file(tmp_path, shm_dir):
    _need_libpmem()
    big = os.urandom(64 << 10)  # large enough for libpmem's non-temporal copy
    for path, img in ((p := _file(str(tmp_path), "a"), open_image(p, backend="msync")),
                      (q := _file(shm_dir, "b"), _open_forced(q))):
        img.write(8192, b"durable")
        img.persist(8192, 7)
        img.copy(65536, big)
        img.close()
        with open(path, "rb") as f:
            f.seek(8192)
            assert f.read(7) == b"durable"
            f.seek(65536)
            assert f.read(len(big)) == big


def test_msync_flush_records_pages_and_fence_syncs_them(tmp_path):
    img = open_image(_file(str(tmp_path)), backend="msync")
    img.write(5000, b"x" * 10)
    img.flush(5000, 10)
    img.flush(70000, 1)
    assert img._pending == [(5000, 5010), (70000, 70001)]
    img.fence()
    assert img._pending == []
    img.close()


def test_backend_selection_and_reporting(shm_dir, tmp_path):
    """auto picks libpmem where libpmem says pmem (forced on /dev/shm), msync
    elsewhere; every image says which backend it uses."""
    code = ("import sys; from pmfs.pmem import open_image; "
            "img = open_image(sys.argv[1]); print(img.backend, img.describe()); img.close()")
    shm_img = _file(shm_dir, "forced")
    env = dict(os.environ, PMEM_IS_PMEM_FORCE="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code, shm_img], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    if libpmem() is not None:
        assert r.stdout.startswith("libpmem libpmem backend"), r.stdout
    env.pop("PMEM_IS_PMEM_FORCE")
    r = subprocess.run([sys.executable, "-c", code, _file(str(tmp_path), "plain")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.startswith("msync msync backend"), r.stdout
    # asking for libpmem where it does not apply is a one-line error
    code = ("import sys; from pmfs.pmem import open_image, ImageError\n"
            "try: open_image(sys.argv[1], backend='libpmem')\n"
            "except ImageError as e: print('refused:', e)")
    r = subprocess.run([sys.executable, "-c", code, _file(str(tmp_path), "x")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.startswith("refused:") \
        and "PMEM_IS_PMEM_FORCE" in r.stdout, r.stdout + r.stderr
    with pytest.raises(ImageError):
        open_image(os.path.join(str(tmp_path), "missing"))


def test_libpmem_copy_from_bytes_and_other_buffers(shm_dir):
    _need_libpmem()
    img = _open_forced(_file(shm_dir))
    assert isinstance(img, LibpmemImage)
    src = os.urandom(10000)
    img.copy(0, src, drain=False, start=123, n=5000)      # pmem_memcpy_nodrain
    img.copy(20000, bytearray(src), drain=False, start=5, n=64)  # store + flush
    img.fence()
    assert bytes(img.read(0, 5000)) == src[123:5123]
    assert bytes(img.read(20000, 64)) == src[5:69]
    with pytest.raises(ValueError):
        img.copy(0, src, start=9000, n=2000)  # past the end of the source
    img.close()


@pytest.mark.skipif(accel.ACCEL is None, reason="pmfs._accel not built (PMFS_NO_ACCEL=1)")
def test_libpmem_copy_of_any_large_buffer_is_nontemporal(shm_dir):
    """With pmfs._accel, a large copy from any buffer -- a memoryview of a
    write's bytes, a bytearray -- goes to pmem_memcpy_nodrain (called here
    through a recording stand-in that does the memmove), not through a
    store and a flush of every line."""
    _need_libpmem()
    img = _open_forced(_file(shm_dir))
    calls = []

    def fake_memcpy(dst, src, n):
        calls.append((dst - img.addr, n))
        ctypes.memmove(dst, src, n)
        return dst

    cb = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_size_t)(fake_memcpy)
    img._memcpy_ptr = ctypes.cast(cb, ctypes.c_void_p).value
    flushed = []
    img._flush = lambda addr, n: flushed.append((addr - img.addr, n))
    src = os.urandom(1 << 17)
    img.copy(4096, memoryview(src)[1000:1000 + 40000], drain=False)
    img.copy(65536, bytearray(src), drain=False, start=7, n=20000)
    img.copy(200000, src, drain=False, start=5, n=100)  # small: store + flush
    img.fence()
    assert calls == [(4096, 40000), (65536, 20000)]
    assert flushed == [(200000, 100)]
    assert bytes(img.read(4096, 40000)) == src[1000:41000]
    assert bytes(img.read(65536, 20000)) == src[7:20007]
    assert bytes(img.read(200000, 100)) == src[5:105]
    for bad in (lambda: img.copy(SIZE - 16384, src, n=20000),          # past the image
                lambda: img.copy(0, memoryview(src)[:20000], start=10, n=20000)):  # source
        with pytest.raises(ValueError):
            bad()
    assert len(calls) == 2
    img.close()


def test_store_all_stores_and_flushes_every_range(image):
    kind, img = image
    ranges = [(0, b"a" * 8), (64, b"b" * 64), (300, b"c" * 20),
              (8192, b"d" * 128), (SIZE - 64, b"e" * 64)]
    img.store_all(ranges)
    for off, data in ranges:
        assert bytes(img.read(off, len(data))) == data
    if kind == "tracing":
        stored, flushed = img.pending()
        assert stored == set() and flushed == {0, 1, 4, 128, 129, SIZE // 64 - 1}
    img.fence()
    with pytest.raises(ValueError):
        img.store_all([(SIZE - 8, b"x" * 16)])


@pytest.mark.parametrize("path", ["C", "Python"])
def test_libpmem_store_all_coalesces_nearby_flushes(shm_dir, path):
    """Ranges up to four lines apart share one pmem_flush; farther ones get
    their own; every stored byte is inside a flushed range.  The same in
    pmfs._accel's loop (calling the flush function through its pointer)
    and in the Python one."""
    _need_libpmem()
    img = _open_forced(_file(shm_dir))
    calls = []

    def record(addr, n):
        calls.append((addr - img.addr, n))

    if path == "C":
        assert img._flush_ptr, "pmfs._accel is not built (./setup.sh install builds it)"
        cb = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t)(record)
        img._flush_ptr = ctypes.cast(cb, ctypes.c_void_p).value
    else:
        img._flush_ptr = None
        img._flush = record
    ranges = [(0, b"a" * 64), (128, b"b" * 64), (448, b"c" * 8),
              (4096, b"d" * 200), (65536, b"e" * 64)]
    img.store_all(ranges)
    assert calls == [(0, 456), (4096, 200), (65536, 64)]
    for off, data in ranges:
        assert bytes(img.read(off, len(data))) == data
        assert any(a <= off and off + len(data) <= a + n for a, n in calls)
    # a range before the previous one (a WAL record, then the log header
    # in front of the log area) is flushed on its own
    del calls[:]
    img.store_all([(8192, b"r" * 128), (64, b"h" * 64), (128, b"i" * 8)])
    assert calls == [(8192, 128), (64, 72)]
    img.close()


def test_tracing_records_every_store_flush_and_fence():
    inner = MemoryImage(SIZE)
    img = TracingImage(inner)
    img.write(64, b"a" * 8)
    img.write(200, b"b" * 100)  # lines 3..4
    assert img.pending() == ({1, 3, 4}, set())
    img.flush(64, 8)
    assert img.pending() == ({3, 4}, {1})
    img.copy(4096, b"c" * 64, drain=False)
    assert img.pending() == ({3, 4}, {1, 64})
    img.fence()
    assert img.pending() == ({3, 4}, set())
    img.mark("label", x=1)
    kinds = [e[0] for e in img.events]
    assert kinds == [EV_STORE, EV_STORE, EV_FLUSH, EV_STORE, EV_FLUSH, EV_FENCE, "M"]
    assert img.events[0] == (EV_STORE, 64, b"a" * 8)
    assert bytes(inner.read(200, 100)) == b"b" * 100  # stores reach the inner image
    assert img.traced and not inner.traced


def test_prefault_maps_pages_ahead_of_writes(tmp_path, shm_dir):
    """prefault is a hint with no effect on content: on a sparse file image
    it allocates the range's pages at once (one madvise), elsewhere nothing."""
    path = _file(shm_dir, "sparse")  # truncate(): a hole everywhere
    img = open_image(path, backend="msync")
    before = os.stat(path).st_blocks
    img.prefault(3 * 4096 + 100, 5 * 4096)  # rounded out to whole pages
    assert os.stat(path).st_blocks - before >= 6 * 8  # 512-byte units
    assert bytes(img.read(3 * 4096, 6 * 4096)) == bytes(6 * 4096)
    img.prefault(SIZE - 10, 1000)  # clipped at the end of the image
    img.write(4 * 4096, b"data")
    assert bytes(img.read(4 * 4096, 4)) == b"data"
    img.close()
    ro = open_image(path, readonly=True)
    ro.prefault(0, SIZE)  # read-only: nothing to do
    ro.close()
    MemoryImage(SIZE).prefault(0, SIZE)
    TracingImage(MemoryImage(SIZE)).prefault(0, 4096)


def test_prefault_kind_follows_the_file_system(tmp_path, shm_dir):
    """tmpfs maps pages writable on a read fault, so a read populate (far
    cheaper per page) serves there; anywhere else only a write populate
    spares the first store its fault."""
    from pmfs import pmem
    on_shm = open_image(_file(shm_dir, "a"), backend="msync")
    assert on_shm._populate == pmem._MADV_POPULATE_READ
    other = tmp_path / "b.img"
    with open(other, "wb") as f:
        f.truncate(SIZE)
    elsewhere = open_image(str(other), backend="msync")
    if pmem._fs_type(elsewhere.fd) != pmem._TMPFS_MAGIC:
        assert elsewhere._populate == pmem._MADV_POPULATE_WRITE
    # on tmpfs the read populate really maps the pages writable: stores to
    # them take no page fault afterwards
    on_shm.prefault(0, 64 * 4096)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(64):
        on_shm.write(i * 4096, b"x")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 8
    assert bytes(on_shm.read(63 * 4096, 1)) == b"x"
    on_shm.close()
    elsewhere.close()
