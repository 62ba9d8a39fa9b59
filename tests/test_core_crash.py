"""Core: a crash (power cut) after fsync/sync must not change what was made
durable.  The redo log replays committed metadata records at mount; a block
that held logged metadata (an xattr block, an extent-tree node, a directory
block), was freed and then reused for file data must not be overwritten by
the replay of its old records."""

from __future__ import annotations

import errno
import stat

import pytest

from conftest import fresh_image
from pmfs.fs import FileSystem, MountOptions
from test_core_helpers import BS, ROOT, crash_mount, free_counts, mkfile, read_all


def _free_some_metadata(fs, kind):
    """Create metadata blocks of `kind` and free them again; returns the
    image blocks that held them."""
    if kind == "xattr":
        blocks = []
        for i in range(8):
            f = mkfile(fs, ROOT, b"x%d" % i)
            fs.setxattr(f, b"user.v", bytes([i + 1]) * 3000)
            blocks.append(fs.getattr(f).xattr)
        for i in range(8):
            fs.removexattr(fs.lookup(ROOT, b"x%d" % i).ino, b"user.v")
        return blocks
    if kind == "extent-nodes":
        f = mkfile(fs, ROOT, b"frag")
        for i in range(0, 2000, 2):
            fs.write(f, i * BS, b"e" * 16)
        blocks = list(fs.tree(fs.getattr(f)).node_blocks())
        assert blocks
        fs.unlink(ROOT, b"frag")
        return blocks
    if kind == "directory":
        d = fs.mkdir(ROOT, b"d", 0o755).ino
        for i in range(600):
            fs.mknod(d, b"entry-%04d-%s" % (i, b"z" * 40), stat.S_IFREG | 0o644)
        t = fs.tree(fs.getattr(d))
        blocks = [p + k for _s, n, p in t.extents() for k in range(n)]
        for i in range(600):
            fs.unlink(d, b"entry-%04d-%s" % (i, b"z" * 40))
        fs.rmdir(ROOT, b"d")
        return blocks
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["xattr", "extent-nodes", "directory"])
def test_reused_metadata_block_survives_crash(kind):
    img = fresh_image(16 << 20)
    fs = FileSystem(img, MountOptions())
    meta_blocks = _free_some_metadata(fs, kind)
    # now write file data into every free block (the freed metadata blocks
    # among them)
    f = mkfile(fs, ROOT, b"data")
    pattern = bytes(range(1, 256)) * 17  # 4335 bytes: no block looks alike
    want = bytearray()
    while True:
        chunk = (pattern * 61)[:64 * BS]
        try:
            n = fs.write(f, len(want), chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC
            break
        want += chunk[:n]
    mapped = {p + k for _s, n, p in fs.tree(fs.getattr(f)).extents() for k in range(n)}
    reused = [b for b in meta_blocks if b in mapped]
    assert reused, "the test did not manage to reuse a metadata block for data"
    assert read_all(fs, f) == bytes(want)
    fs.fsync(f)
    fs.sync()
    # power cut: mount a copy of the image as it is
    fs2 = crash_mount(fs)
    got = read_all(fs2, f)
    assert len(got) == len(want)
    bad = [i for i in range(0, len(want), BS) if got[i:i + BS] != want[i:i + BS]]
    assert not bad, (f"{len(bad)} data blocks changed by log replay after the crash "
                     f"(file blocks {[i // BS for i in bad][:8]})")
    fs2.close()
    fs.close()


def test_reused_xattr_block_minimal():
    """The smallest case: an xattr block freed, its block the only free one,
    a 4 KiB write lands in it; after a crash the file reads 'PXAT...'."""
    img = fresh_image(16 << 20)
    fs = FileSystem(img, MountOptions())
    a = mkfile(fs, ROOT, b"a")
    b = mkfile(fs, ROOT, b"b")
    filler = mkfile(fs, ROOT, b"filler")
    fs.setxattr(a, b"user.x", b"v" * 100)
    xblock = fs.getattr(a).xattr
    fs.fallocate(filler, 0, 0, free_counts(fs)[0] * BS)
    fs.removexattr(a, b"user.x")
    assert free_counts(fs)[0] == 1
    assert fs.write(b, 0, b"D" * BS) == BS
    assert fs.tree(fs.getattr(b)).lookup(0)[2] == xblock
    fs.fsync(b)
    fs2 = crash_mount(fs)
    assert bytes(fs2.read(b, 0, BS)) == b"D" * BS
    fs2.close()
    fs.close()


def test_crash_after_each_operation_keeps_earlier_data():
    """A mixed workload; after every operation a crash image must show all
    fsynced data and every completed metadata operation."""
    img = fresh_image(16 << 20)
    fs = FileSystem(img, MountOptions())
    expected = {}
    ops = 0
    for i in range(30):
        name = b"f%d" % i
        f = mkfile(fs, ROOT, name, bytes([i + 1]) * (i * 700 + 1))
        expected[name] = bytes([i + 1]) * (i * 700 + 1)
        if i % 3 == 0:
            fs.setxattr(f, b"user.a", b"A" * (i * 50))
        if i % 4 == 1 and i > 1:
            victim = sorted(n for n in expected if n != name)[0]
            fs.unlink(ROOT, victim)
            del expected[victim]
        if i % 5 == 2:
            fs.rename(ROOT, name, ROOT, name + b"-r")
            expected[name + b"-r"] = expected.pop(name)
        fs.fsync(f)
        ops += 1
        fs2 = crash_mount(fs)
        got = {n: read_all(fs2, i2) for n, i2 in fs2.listdir(ROOT).items()
               if n != b"lost+found"}
        assert got == expected, f"after operation {ops}"
        fs2.close()
    fs.close()
