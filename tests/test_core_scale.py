"""Core at scale: a directory of 20,000 entries (indexed lookup) and a file
of thousands of extents (a multi-level extent tree)."""

from __future__ import annotations

import stat
import time

from conftest import fresh_image
from pmfs.fs import FileSystem, MountOptions
from test_core_helpers import BS, ROOT, free_counts, mkfile, read_all, remount

N_ENTRIES = 20_000


class _ReadCounter:
    """Wraps img.read to count calls and bytes."""

    def __init__(self, img):
        self.img = img
        self.orig = img.read
        self.calls = 0
        self.bytes = 0

        def counting(off, n):
            self.calls += 1
            self.bytes += n
            return self.orig(off, n)
        img.read = counting

    def stop(self):
        del self.img.read


def test_directory_with_20000_entries():
    img = fresh_image(48 << 20, inodes=N_ENTRIES + 200)
    fs = FileSystem(img, MountOptions())
    d = fs.mkdir(ROOT, b"big", 0o755).ino
    inos = {}
    for i in range(N_ENTRIES):
        name = b"file-%06d" % i
        inos[name] = fs.mknod(d, name, stat.S_IFREG | 0o644).ino
    assert len(fs.listdir(d)) == N_ENTRIES
    dsize = fs.getattr(d).size
    nblocks = dsize // BS
    assert nblocks > 50
    fs = remount(fs)
    # cold: the first lookup reads the directory once and builds the index;
    # after that each lookup reads at most the entry's inode
    rc = _ReadCounter(img)
    try:
        t0 = time.monotonic()
        for name, ino in inos.items():
            assert fs.lookup(d, name).ino == ino
        elapsed = time.monotonic() - t0
    finally:
        rc.stop()
    assert elapsed < 5.0, f"20k lookups took {elapsed:.2f} s"
    # a linear scan would read ~nblocks blocks per lookup (~N * dsize bytes)
    assert rc.bytes < dsize * 3 + N_ENTRIES * 256 * 2, rc.bytes
    assert rc.calls < N_ENTRIES * 2 + nblocks * 4
    # misses are indexed too
    rc = _ReadCounter(img)
    try:
        for i in range(2000):
            try:
                fs.lookup(d, b"missing-%d" % i)
                raise AssertionError("found a missing name")
            except OSError:
                pass
    finally:
        rc.stop()
    assert rc.bytes < 64 * 1024
    # readdir lists them all once
    off = 0
    seen = set()
    while True:
        page = fs.readdir(d, off)[:500]
        if not page:
            break
        for n, i, t, o in page:
            assert n not in seen
            seen.add(n)
            off = o
    assert seen == set(inos) | {b".", b".."}
    # remove every other entry, check, remount, check
    for i in range(0, N_ENTRIES, 2):
        fs.unlink(d, b"file-%06d" % i)
    fs = remount(fs)
    got = fs.listdir(d)
    assert len(got) == N_ENTRIES // 2
    assert all(got[b"file-%06d" % i] == inos[b"file-%06d" % i]
               for i in range(1, N_ENTRIES, 2))
    fs.close()


def test_file_with_thousands_of_extents():
    img = fresh_image(64 << 20)
    fs = FileSystem(img, MountOptions())
    b0, i0 = free_counts(fs)
    f = mkfile(fs, ROOT, b"sparse")
    nblk = 8000  # every other block of 8000: 4000 extents that cannot merge
    for i in range(0, nblk, 2):
        assert fs.write(f, i * BS, (b"%07d." % i) * 512) == BS
    inode = fs.getattr(f)
    tree = fs.tree(inode)
    assert tree.count_extents() == nblk // 2
    assert inode.depth >= 2, "expected a multi-level extent tree"
    nodes = len(list(tree.node_blocks()))
    assert nodes >= (nblk // 2) // 254
    assert inode.blocks == nblk // 2 + nodes
    assert b0 - free_counts(fs)[0] == inode.blocks
    assert inode.size == (nblk - 1) * BS

    def check(fs, upto):
        for i in range(0, upto, 2):
            assert bytes(fs.read(f, i * BS, BS)) == (b"%07d." % i) * 512, i
            if i + 1 < upto - 1:
                assert bytes(fs.read(f, (i + 1) * BS, BS)) == bytes(BS)
        # one read across many extents and holes
        big = bytes(fs.read(f, 0, 64 * BS))
        for i in range(64):
            exp = (b"%07d." % i) * 512 if i % 2 == 0 else bytes(BS)
            assert big[i * BS:(i + 1) * BS] == exp

    check(fs, nblk - 1)
    fs = remount(fs)
    check(fs, nblk - 1)
    assert fs.tree(fs.getattr(f)).count_extents() == nblk // 2
    # truncate in the middle
    half = nblk // 2 + 1  # keep blocks 0..half-1 (block half-1 = 4000 is data)
    fs.setattr(f, size=half * BS - 100)
    inode = fs.getattr(f)
    tree = fs.tree(inode)
    kept_extents = len([i for i in range(0, half, 2)])
    assert tree.count_extents() == kept_extents
    nodes = len(list(tree.node_blocks()))
    assert inode.blocks == kept_extents + nodes
    assert b0 - free_counts(fs)[0] == inode.blocks
    assert bytes(fs.read(f, (half - 1) * BS, BS)) == ((b"%07d." % (half - 1)) * 512)[:BS - 100]
    check(fs, half - 1)
    fs = remount(fs)
    assert fs.tree(fs.getattr(f)).count_extents() == kept_extents
    assert b0 - free_counts(fs)[0] == fs.getattr(f).blocks
    # fill the holes in part of the range
    for i in range(1, 200, 2):
        fs.write(f, i * BS, b"h" * BS)
    assert fs.tree(fs.getattr(f)).count_extents() <= kept_extents + 100
    got = bytes(fs.read(f, 0, 200 * BS))
    for i in range(200):
        exp = (b"%07d." % i) * 512 if i % 2 == 0 else b"h" * BS
        assert got[i * BS:(i + 1) * BS] == exp, i
    assert b0 - free_counts(fs)[0] == fs.getattr(f).blocks
    fs.unlink(ROOT, b"sparse")
    assert free_counts(fs) == (b0, i0)
    fs = remount(fs)
    assert free_counts(fs) == (b0, i0)
    fs.close()


def test_punch_every_other_block_of_a_contiguous_file():
    """Punching splits one extent into thousands (nodes are allocated while
    blocks are freed); then everything is freed again."""
    img = fresh_image(32 << 20)
    fs = FileSystem(img, MountOptions())
    b0, i0 = free_counts(fs)
    n = 3000
    data = b"".join(bytes([i & 0xFF]) * BS for i in range(n))
    f = mkfile(fs, ROOT, b"f", data)
    assert fs.tree(fs.getattr(f)).count_extents() <= 2
    for i in range(1, n, 2):
        fs.fallocate(f, 3, i * BS, BS)
    inode = fs.getattr(f)
    tree = fs.tree(inode)
    assert tree.count_extents() == n // 2
    assert inode.depth >= 1
    nodes = len(list(tree.node_blocks()))
    assert inode.blocks == n // 2 + nodes
    assert b0 - free_counts(fs)[0] == inode.blocks
    got = read_all(fs, f)
    for i in range(n):
        exp = bytes([i & 0xFF]) * BS if i % 2 == 0 else bytes(BS)
        assert got[i * BS:(i + 1) * BS] == exp, i
    fs = remount(fs)
    assert read_all(fs, f) == got
    fs.setattr(f, size=0)
    assert fs.getattr(f).blocks == 0
    assert fs.getattr(f).depth == 0
    assert free_counts(fs)[0] == b0
    fs.close()


def _fragmented(fs, name, nblk):
    f = mkfile(fs, ROOT, name)
    for i in range(0, nblk, 2):
        fs.write(f, i * BS, b"%07d." % i)
    return f


def _expect_every_other(fs, f, nblk, filler):
    got = bytes(fs.read(f, 0, nblk * BS))
    for i in range(nblk):
        blk = got[i * BS:(i + 1) * BS]
        if i % 2 == 0:
            exp = b"%07d." % i
            assert blk[:8] == exp, i
            rest = blk[8:]
        else:
            rest = blk
        assert rest in (bytes(len(rest)), filler * len(rest)), i


def test_fallocate_over_a_fragmented_file():
    """fallocate(0, 0, 32 MiB) over a sparse file of 4000 one-block extents
    on a file system with 12,000 free blocks: only 4000 blocks are needed.
    Linux allocates them; pmfs tries one transaction, which does not fit in
    the log (TxTooLarge) and reports ENOSPC."""
    img = fresh_image(64 << 20)
    fs = FileSystem(img, MountOptions())
    nblk = 8000
    f = _fragmented(fs, b"f", nblk)
    b1, _ = free_counts(fs)
    assert b1 > 3 * (nblk // 2)
    blocks1 = fs.getattr(f).blocks
    err = None
    try:
        fs.fallocate(f, 0, 0, nblk * BS)
    except OSError as e:
        err = e
    # whatever happened, the file and the counts are consistent
    _expect_every_other(fs, f, nblk, b"\0")
    assert b1 - free_counts(fs)[0] == fs.getattr(f).blocks - blocks1
    fs = remount(fs)
    _expect_every_other(fs, f, nblk, b"\0")
    assert err is None, f"fallocate failed: {err!r}"
    assert fs.getattr(f).blocks >= nblk
    fs.close()


def test_large_write_over_a_fragmented_file():
    """One 32 MiB write filling 4000 holes of a fragmented file (the core's
    interface takes writes of any size): it must succeed, not fail with
    ENOSPC because its transaction outgrew the log."""
    img = fresh_image(64 << 20)
    fs = FileSystem(img, MountOptions())
    nblk = 8000
    f = _fragmented(fs, b"f", nblk)
    b1, _ = free_counts(fs)
    blocks1 = fs.getattr(f).blocks
    err = None
    try:
        n = fs.write(f, 0, b"y" * (nblk * BS))
        assert 0 < n <= nblk * BS
    except OSError as e:
        err = e
    assert b1 - free_counts(fs)[0] == fs.getattr(f).blocks - blocks1
    if err is not None:
        # a write that reports an error must not have changed the file
        got = bytes(fs.read(f, 0, 8))
        assert err is None, (f"write failed: {err!r}; the file's existing blocks were "
                             f"overwritten all the same (block 0 starts {got!r})")
    assert bytes(fs.read(f, 0, n)) == b"y" * n
    fs.close()
