"""pmfs._accel (the C loops of a commit) against the pure-Python code it
replaces: the same line maps, the same log entries, the same record bytes.

`./setup.sh install` builds the module, so these tests fail (not skip) when
it is missing -- unless PMFS_NO_ACCEL=1 asks for the pure-Python path on
purpose, in which case there is nothing to compare.
"""

from __future__ import annotations

import ctypes
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmfs import accel, layout, wal
from pmfs.layout import WAL_REC_MAGIC, encode_wal_record, verify_wal_record, wal_record_header
from pmfs.pmem import MemoryImage

if os.environ.get("PMFS_NO_ACCEL"):
    pytest.skip("PMFS_NO_ACCEL=1: the pure-Python path was asked for", allow_module_level=True)

C = accel.ACCEL
SIZE = 64 * 64  # 64 cache lines


def test_accel_is_built():
    assert C is not None, accel.describe()
    assert accel.describe().startswith("C")


class _Wal:
    def __init__(self, img):
        self.img = img
        self.active = None


def _image(seed: int) -> MemoryImage:
    img = MemoryImage(SIZE)
    img.buf[:] = random.Random(seed).randbytes(SIZE)
    return img


writes = st.lists(
    st.tuples(st.integers(0, SIZE - 1), st.integers(0, 300), st.sampled_from(["bytes", "bytearray", "memoryview"])),
    max_size=12)


@settings(max_examples=300, deadline=None)
@given(writes=writes, seed=st.integers(0, 2**32 - 1))
def test_tx_write_and_diff_match_python(writes, seed):
    img = _image(seed)
    py = wal.Transaction(_Wal(img))
    c_lines: dict = {}
    rnd = random.Random(seed)
    for off, n, kind in writes:
        n = min(n, SIZE - off)
        # sometimes write back what is there: lines that end up unchanged
        data = bytes(img.buf[off:off + n]) if rnd.random() < 0.3 else rnd.randbytes(n)
        data = {"bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(data)}[kind]
        py.write(off, data)
        C.tx_write(c_lines, img.buf, off, data)
    assert c_lines == py.lines
    assert all(type(v) is bytearray and len(v) == 64 for v in c_lines.values())
    with pytest.MonkeyPatch.context() as m:
        m.setattr(wal, "_diff_lines", None)
        want = py.entries()
    got = C.diff_lines(c_lines, img.buf)
    assert [(o, bytes(d)) for o, d in got] == [(o, bytes(d)) for o, d in want]


def test_tx_write_rejects_what_python_rejects():
    img = _image(1)
    lines: dict = {}
    for off, n in ((-1, 4), (SIZE - 2, 4), (SIZE, 1)):
        with pytest.raises(ValueError):
            C.tx_write(lines, img.buf, off, b"x" * n)
    C.tx_write(lines, img.buf, SIZE, b"")  # empty: nothing to check, like Python
    assert lines == {}
    with pytest.raises(TypeError):
        C.tx_write({5: b"not a bytearray"}, img.buf, 5 * 64, b"x")
    # a buffer ending inside a line: the line's rest cannot be read from it
    short = bytearray(SIZE - 10)
    with pytest.raises(ValueError):
        C.tx_write(lines, short, SIZE - 64, b"x")
    assert lines == {}
    with pytest.raises(TypeError):
        C.diff_lines({5: bytearray(10)}, img.buf)
    with pytest.raises(ValueError):
        C.diff_lines({64: bytearray(64)}, img.buf)  # line 64 is past the end


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(st.tuples(st.integers(0, 2**40), st.binary(max_size=300)), max_size=8),
       txid=st.integers(1, 2**63), fsseed=st.integers(0, 2**64 - 1))
def test_wal_record_matches_python(entries, txid, fsseed):
    assert layout._wal_record_c is C.wal_record  # the layouts agree: C packs
    got = encode_wal_record(fsseed, txid, entries)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(layout, "_wal_record_c", None)
        want = encode_wal_record(fsseed, txid, entries)
    assert bytes(got) == bytes(want)
    kind, rtxid, length, nent, csum = wal_record_header(got)
    assert (kind, rtxid, length, nent) == (0, txid, len(got), len(entries))
    assert verify_wal_record(fsseed, got, txid, csum)


def test_wal_record_bad_entries():
    with pytest.raises(TypeError):
        C.wal_record(WAL_REC_MAGIC, 1, [(0, b"x", 3)])
    with pytest.raises(TypeError):
        C.wal_record(WAL_REC_MAGIC, 1, [(0, 42)])
    with pytest.raises(OverflowError):
        C.wal_record(WAL_REC_MAGIC, -1, [])


def test_store_flush_checks_its_arguments():
    img = MemoryImage(SIZE)
    calls = []
    cb = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t)(lambda a, n: calls.append(n))
    ptr = ctypes.cast(cb, ctypes.c_void_p).value
    anchor = ctypes.c_char.from_buffer(img.data)
    addr = ctypes.addressof(anchor)
    with pytest.raises(ValueError):  # the address must be the buffer's
        C.store_flush(img.buf, addr + 64, ptr, [(0, b"x")], 256)
    with pytest.raises(ValueError):
        C.store_flush(img.buf, addr, ptr, [(SIZE - 1, b"xy")], 256)
    with pytest.raises(ValueError):
        C.store_flush(img.buf, addr, 0, [(0, b"x")], 256)
    C.store_flush(img.buf, addr, ptr, [(0, b"ab"), (1000, b"cd")], 256)
    assert bytes(img.buf[0:2]) == b"ab" and bytes(img.buf[1000:1002]) == b"cd"
    assert calls == [2, 2]
    del anchor


def test_commits_use_the_c_transaction():
    """A file system on a mapped image commits through pmfs._accel; the
    crash explorer's tracked image (reads attributed in Python) never does."""
    from pmfs.crashtest import TrackImage
    img = MemoryImage(SIZE)
    w = wal.WAL.__new__(wal.WAL)
    w.img = img
    assert type(w._tx_class("x")) is wal._MappedTransaction
    w.img = TrackImage(bytearray(SIZE))
    assert type(w._tx_class("x")) is wal.Transaction


def _workload(fs) -> None:
    """Every kind of metadata commit, and data: the same calls, the same
    results, whichever commit path runs them."""
    root = 1
    d = fs.mkdir(root, b"d", 0o755)
    files = [fs.create(d.ino, b"f%03d" % i, 0o644).ino for i in range(40)]
    for i, ino in enumerate(files):
        fs.write(ino, i * 1000, bytes([i]) * (100 + 97 * i))
    fs.symlink(d.ino, b"ln", b"f000")
    fs.link(files[1], root, b"hard")
    fs.setxattr(files[2], b"user.a", b"x" * 300)
    fs.setattr(files[3], size=5 << 20)
    fs.setattr(files[4], size=10)
    fs.fallocate(files[5], 0, 0, 1 << 20)
    for i in range(0, 40, 3):
        fs.rename(d.ino, b"f%03d" % i, root, b"r%03d" % i)
    for i in (i for i in range(1, 40, 4) if i % 3):
        fs.unlink(d.ino, b"f%03d" % i)
        fs.forget(files[i], 1)  # (never looked up: a no-op unless orphaned)
    fs.mkdir(d.ino, b"sub", 0o700)
    fs.rmdir(d.ino, b"sub")
    fs.removexattr(files[2], b"user.a")


def test_whole_operations_write_the_same_image_in_c_and_in_python(monkeypatch):
    """Two copies of one formatted image, the same workload with the clock
    stopped: the C commit path and the pure-Python one must leave the
    images byte for byte equal (log area included)."""
    import time

    from pmfs.fs import FileSystem, MountOptions
    from conftest import fresh_image

    base = fresh_image(32 << 20)
    images = {}
    for path in ("C", "Python"):
        img = MemoryImage(base.size)
        img.buf[:] = base.buf
        ticks = iter(range(10**9))
        with monkeypatch.context() as m:
            m.setattr(time, "time_ns", lambda: 1_700_000_000_000_000_000 + next(ticks))
            m.setattr(time, "time", lambda: 1_700_000_000.0)
            if path == "Python":
                m.setattr(layout, "_wal_record_c", None)
                m.setattr(wal, "_diff_lines", None)
                m.setattr(wal, "ACCEL", None)
            fs = FileSystem(img, MountOptions())
            expected = wal._MappedTransaction if path == "C" else wal.Transaction
            assert type(fs.wal.begin("probe")) is expected
            fs.wal.abort(fs.wal.active)
            _workload(fs)
            fs.close()
        images[path] = bytes(img.buf)
    assert images["C"] != bytes(base.buf)
    assert images["C"] == images["Python"]
