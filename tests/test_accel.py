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
import struct

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


# -- inodes and directory records ----------------------------------------------

_INODE_FIELDS = [  # (slot, low, high) of every field Inode.encode packs
    ("mode", 0, 2**32 - 1), ("uid", 0, 2**32 - 1), ("gid", 0, 2**32 - 1),
    ("flags", 0, 2**32 - 1), ("nlink", 0, 2**32 - 1), ("generation", 0, 2**32 - 1),
    ("size", 0, 2**64 - 1), ("blocks", 0, 2**64 - 1),
    ("atime", -2**63, 2**63 - 1), ("mtime", -2**63, 2**63 - 1),
    ("ctime", -2**63, 2**63 - 1), ("btime", -2**63, 2**63 - 1),
    ("rdev", 0, 2**64 - 1), ("parent", 0, 2**64 - 1), ("xattr", 0, 2**64 - 1),
    ("orphan_next", 0, 2**64 - 1), ("orphan_prev", 0, 2**64 - 1),
    ("depth", 0, 2**16 - 1), ("count", 0, 2**16 - 1)]


def _edge_ints(lo, hi):
    return st.one_of(st.sampled_from([lo, hi, 0 if lo <= 0 <= hi else lo, 1]),
                     st.integers(lo, hi))


_inodes = st.fixed_dictionaries(
    {name: _edge_ints(lo, hi) for name, lo, hi in _INODE_FIELDS}
    | {"ino": st.integers(0, 2**40), "root": st.binary(max_size=140),
       "root_kind": st.sampled_from([bytes, bytearray, memoryview])})


def _python_paths(m):
    for name in ("_inode_encode_c", "_inode_decode_c", "_dirent_encode_c", "_dirent_block_c"):
        m.setattr(layout, name, None)


@settings(max_examples=400, deadline=None)
@given(f=_inodes, fsseed=st.integers(0, 2**64 - 1), inline=st.booleans())
def test_inode_encode_and_decode_match_python(f, fsseed, inline):
    assert layout._inode_encode_c is C.inode_encode  # the layouts agree: C packs
    f = dict(f)
    kind = f.pop("root_kind")
    f["root"] = kind(f["root"])
    f["flags"] = f["flags"] | layout.I_INLINE if inline else f["flags"] & ~layout.I_INLINE
    inode = layout.Inode(**f)
    got = inode.encode(fsseed)
    with pytest.MonkeyPatch.context() as m:
        _python_paths(m)
        want = inode.encode(fsseed)
        py_back = layout.Inode.decode(f["ino"], want, fsseed)
    assert type(got) is bytes and got == want
    back = layout.Inode.decode(f["ino"], got, fsseed)
    assert back.snapshot() == py_back.snapshot()
    assert type(back.root) is bytes
    # a flipped bit anywhere: both paths refuse the slot with the same message
    bad = bytearray(got)
    bad[hash((fsseed, f["ino"])) % layout.INODE_SIZE] ^= 1
    with pytest.raises(layout.FormatError) as c_err:
        layout.Inode.decode(f["ino"], bad, fsseed)
    with pytest.MonkeyPatch.context() as m:
        _python_paths(m)
        with pytest.raises(layout.FormatError) as py_err:
            layout.Inode.decode(f["ino"], bad, fsseed)
    assert str(c_err.value) == str(py_err.value)
    # unverified decoding of the damaged slot gives what Python gives
    with pytest.MonkeyPatch.context() as m:
        _python_paths(m)
        py_raw = layout.Inode.decode(f["ino"], bad, fsseed, verify=False).snapshot()
    assert layout.Inode.decode(f["ino"], bad, fsseed, verify=False).snapshot() == py_raw


@pytest.mark.parametrize("field,value", [("mode", -1), ("nlink", 2**32), ("size", 2**64),
                                         ("atime", 2**63), ("btime", -2**63 - 1),
                                         ("depth", 2**16), ("uid", 1.5)])
def test_inode_encode_out_of_range_raises_as_python_does(field, value):
    inode = layout.Inode(7, mode=0o100644)
    setattr(inode, field, value)
    assert C.inode_encode(1, *layout.Inode.snapshot(inode)[:-1], inode.root, layout._xxh3) is None
    with pytest.raises(struct.error):
        inode.encode(1)


def test_inode_decode_of_a_free_slot_and_bad_arguments():
    zero = bytes(layout.INODE_SIZE)
    assert layout.Inode.decode(9, zero, 5).snapshot() == layout.Inode(9, root=bytes(128)).snapshot()
    with pytest.raises(ValueError):
        C.inode_decode(zero[:100], 9, 5, True, layout._xxh3)
    with pytest.raises(ValueError):
        C.inode_decode(zero, -1, 5, True, layout._xxh3)
    with pytest.raises(ZeroDivisionError):  # the hasher's error comes through
        C.inode_decode(b"\1" * 256, 9, 5, True, lambda b, s: 1 // 0)


_names = st.binary(min_size=0, max_size=255)


@settings(max_examples=300, deadline=None)
@given(fsseed=st.integers(0, 2**64 - 1), dir_ino=st.integers(0, 2**32 - 1),
       pos=st.integers(0, 2**32 - 1), ino=st.integers(0, 2**64 - 1),
       rec_len=st.integers(0, 2**16 - 1), ftype=st.integers(0, 255), name=_names)
def test_dirent_encode_matches_python(fsseed, dir_ino, pos, ino, rec_len, ftype, name):
    got = layout.encode_dirent(fsseed, dir_ino, pos, ino, rec_len, ftype, name)
    with pytest.MonkeyPatch.context() as m:
        _python_paths(m)
        want = layout.encode_dirent(fsseed, dir_ino, pos, ino, rec_len, ftype, name)
    assert type(got) is bytes and got == want


def test_dirent_encode_out_of_range_raises_as_python_does():
    assert C.dirent_encode(1, 2, 3, 4, 16, 8, b"x" * 256, layout._xxh3) is None
    assert C.dirent_encode(1, 2, 3, 4, 2**16, 8, b"x", layout._xxh3) is None
    assert C.dirent_encode(1, 2, 3, -4, 16, 8, b"x", layout._xxh3) is None
    with pytest.raises(struct.error):
        layout.encode_dirent(1, 2, 3, 4, 16, 8, b"x" * 256)
    # beyond what C takes (a 33-bit directory inode) but valid for Python:
    # C declines and the Python path encodes it
    assert C.dirent_encode(1, 2**33, 3, 4, 24, 8, b"x", layout._xxh3) is None
    got = layout.encode_dirent(1, 2**33, 3, 4, 24, 8, b"x")
    with pytest.MonkeyPatch.context() as m:
        _python_paths(m)
        assert got == layout.encode_dirent(1, 2**33, 3, 4, 24, 8, b"x")


def _block(seed: int, fsseed: int, dir_ino: int, base: int) -> bytearray:
    """A well-formed directory block: random live and free records."""
    rnd = random.Random(seed)
    blk = bytearray(layout.BLOCK_SIZE)
    off = 0
    while off < layout.BLOCK_SIZE:
        room = layout.BLOCK_SIZE - off
        name = rnd.randbytes(rnd.randint(1, 40)).replace(b"/", b"a").replace(b"\0", b"b")
        need = layout.dirent_size(len(name))
        if room < need + 16 or rnd.random() < 0.05:
            rec = layout.encode_dirent(fsseed, dir_ino, base + off, 0, room, 0, b"")
            rl = room
        elif rnd.random() < 0.3:
            rl = need + 8 * rnd.randint(0, 3)
            rl = min(rl, room)
            rec = layout.encode_dirent(fsseed, dir_ino, base + off, 0, rl, 0, b"")
        else:
            rl = need
            rec = layout.encode_dirent(fsseed, dir_ino, base + off, rnd.randint(1, 2**40), rl,
                                       rnd.choice([4, 8, 10]), name)
        blk[off:off + len(rec)] = rec
        off += rl
    return blk


def _parse_py(fsseed, dir_ino, base, raw):
    with pytest.MonkeyPatch.context() as m:
        _python_paths(m)
        try:
            return layout.parse_dirent_block(fsseed, dir_ino, base, raw)
        except layout.FormatError as e:
            return str(e)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), fsseed=st.integers(0, 2**64 - 1),
       dir_ino=st.integers(1, 2**32 - 1), base=st.sampled_from([0, 4096, 2**31]),
       flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 7)), max_size=3),
       kind=st.sampled_from([bytes, bytearray, memoryview]))
def test_dirent_block_matches_python(seed, fsseed, dir_ino, base, flips, kind):
    assert layout._dirent_block_c is C.dirent_block
    blk = _block(seed, fsseed, dir_ino, base)
    for at, bit in flips:
        blk[at] ^= 1 << bit
    raw = kind(bytes(blk))
    want = _parse_py(fsseed, dir_ino, base, raw)
    c = C.dirent_block(fsseed, dir_ino, base, raw, layout._xxh3)
    if isinstance(want, str):  # damaged: C declines, the Python path reports
        assert c is None
        with pytest.raises(layout.FormatError, match="directory"):
            layout.parse_dirent_block(fsseed, dir_ino, base, raw)
    else:
        assert c == want
        assert layout.parse_dirent_block(fsseed, dir_ino, base, raw) == want


def test_dirent_block_header_past_the_block_is_damage_not_a_crash():
    """Records tiling to 8 bytes before the block's end: the next header
    would overrun it (this was a struct.error, not a FormatError)."""
    blk = bytearray(layout.BLOCK_SIZE)
    rec = layout.encode_dirent(3, 9, 0, 0, layout.BLOCK_SIZE - 8, 0, b"")
    blk[:len(rec)] = rec
    assert C.dirent_block(3, 9, 0, bytes(blk), layout._xxh3) is None
    for path in ("c", "python"):
        with pytest.MonkeyPatch.context() as m:
            if path == "python":
                _python_paths(m)
            with pytest.raises(layout.FormatError, match="overruns the block"):
                layout.parse_dirent_block(3, 9, 0, bytes(blk))
    with pytest.raises(ValueError):
        C.dirent_block(3, 9, 0, bytes(100), layout._xxh3)


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
    images: dict = {}
    seen: dict = {}
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
                _python_paths(m)
            fs = FileSystem(img, MountOptions())
            expected = wal._MappedTransaction if path == "C" else wal.Transaction
            assert type(fs.wal.begin("probe")) is expected
            fs.wal.abort(fs.wal.active)
            _workload(fs)
            fs.close()
            # and read back from the image (inodes and directory blocks decoded)
            fs = FileSystem(img, MountOptions())
            seen[path] = _tree(fs)
            fs.close()
        images[path] = bytes(img.buf)
    assert images["C"] != bytes(base.buf)
    assert images["C"] == images["Python"]
    assert seen["C"] == seen["Python"] and len(seen["C"]) > 30


def _tree(fs) -> dict:
    """Every name under the root with its inode's fields and data digest."""
    import hashlib

    out = {}
    todo = [(b"", 1)]
    while todo:
        path, ino = todo.pop()
        for name, child in sorted(fs.listdir(ino).items()):
            inode = fs.getattr(child)
            fields = inode.snapshot()
            digest = None
            if inode.mode & 0o170000 == 0o100000:
                digest = hashlib.sha256(fs.read(child, 0, inode.size)).hexdigest()
            out[path + b"/" + name] = (fields, digest)
            if inode.mode & 0o170000 == 0o040000:
                todo.append((path + b"/" + name, child))
    return out
