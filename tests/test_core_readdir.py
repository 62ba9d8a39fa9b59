"""Core: readdir -- ".", "..", d_type, offsets stable under changes."""

from __future__ import annotations

import errno
import os
import random
import stat

from test_core_helpers import ROOT, expect_errno, mkfile, remount


def _all(fs, ino, off=0):
    return fs.readdir(ino, off)


def test_readdir_dot_entries_and_types(memfs):
    fs = memfs
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    f = mkfile(fs, d, b"file")
    sub = fs.mkdir(d, b"sub", 0o755).ino
    s = fs.symlink(d, b"sym", b"file").ino
    p = fs.mknod(d, b"fifo", stat.S_IFIFO | 0o644).ino
    c = fs.mknod(d, b"chr", stat.S_IFCHR | 0o644, os.makedev(1, 5)).ino
    b = fs.mknod(d, b"blk", stat.S_IFBLK | 0o644, os.makedev(7, 0)).ino
    k = fs.mknod(d, b"sock", stat.S_IFSOCK | 0o644).ino
    ents = _all(fs, d)
    assert ents[0][:3] == (b".", d, 4)
    assert ents[1][:3] == (b"..", ROOT, 4)
    got = {n: (i, t) for n, i, t, _o in ents[2:]}
    assert got == {b"file": (f, 8), b"sub": (sub, 4), b"sym": (s, 10), b"fifo": (p, 1),
                   b"chr": (c, 2), b"blk": (b, 6), b"sock": (k, 12)}
    # each entry's type agrees with the inode
    for n, i, t, _o in ents:
        assert t == {stat.S_IFREG: 8, stat.S_IFDIR: 4, stat.S_IFLNK: 10, stat.S_IFIFO: 1,
                     stat.S_IFCHR: 2, stat.S_IFBLK: 6,
                     stat.S_IFSOCK: 12}[stat.S_IFMT(fs.getattr(i).mode)]
    # ".." of a subdirectory
    assert _all(fs, sub)[1][:3] == (b"..", d, 4)
    # the root's ".." is the root
    assert _all(fs, ROOT)[1][:3] == (b"..", ROOT, 4)


def test_readdir_offsets_resume(memfs):
    fs = memfs
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    for i in range(500):
        fs.mknod(d, b"name-%05d" % i, stat.S_IFREG | 0o644)
    full = _all(fs, d)
    assert len(full) == 502
    offs = [o for *_x, o in full]
    assert len(set(offs)) == len(offs)
    assert 0 not in offs
    # resuming at every returned offset gives exactly the rest
    for k in (0, 1, 2, 3, 57, 250, 499, 501):
        rest = _all(fs, d, offs[k])
        assert rest == full[k + 1:]
    # past the end: nothing
    assert _all(fs, d, offs[-1]) == []


def test_readdir_of_a_file_is_enotdir(memfs):
    f = mkfile(memfs, ROOT, b"f")
    expect_errno(errno.ENOTDIR, memfs.readdir, f, 0)
    expect_errno(errno.ENOTDIR, memfs.opendir, f)


def test_readdir_offsets_stable_under_changes(memfs):
    """Take an offset in the middle, create and delete other entries, resume:
    nothing reported twice, nothing that existed throughout skipped."""
    fs = memfs
    rng = random.Random(1234)
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    live = set()
    for i in range(400):
        n = b"e%04d-%s" % (i, b"x" * rng.randrange(0, 60))
        fs.mknod(d, n, stat.S_IFREG | 0o644)
        live.add(n)
    for _round in range(6):
        full = _all(fs, d)
        cut = rng.randrange(3, len(full) - 1)
        seen_first = [n for n, *_r in full[:cut]]
        off = full[cut - 1][3]
        # the entries we will keep untouched
        candidates = sorted(live)
        victims = set(rng.sample(candidates, 80))
        for n in victims:
            fs.unlink(d, n)
        live -= victims
        new = set()
        for j in range(120):
            n = b"new%d-%d-%s" % (_round, j, b"y" * rng.randrange(0, 100))
            fs.mknod(d, n, stat.S_IFREG | 0o644)
            new.add(n)
        live |= new
        rest = [n for n, *_r in _all(fs, d, off)]
        reported = seen_first + rest
        assert len(reported) == len(set(reported)), "an entry was reported twice"
        throughout = live - new
        missing = throughout - set(reported)
        assert not missing, f"skipped {len(missing)} entries"
        # nothing deleted is reported after the deletion
        assert not (set(rest) & victims)


def test_readdir_page_by_page_while_deleting(memfs):
    """rm -rf style: read a page, delete what was read, continue from the
    last offset; every entry is seen exactly once."""
    fs = memfs
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    want = {b"f%04d" % i for i in range(700)}
    for n in sorted(want):
        fs.mknod(d, n, stat.S_IFREG | 0o644)
    seen = []
    off = 0
    while True:
        page = [e for e in _all(fs, d, off)][:37]
        if not page:
            break
        for n, _i, _t, o in page:
            seen.append(n)
            if n not in (b".", b".."):
                fs.unlink(d, n)
            off = o
    names = [n for n in seen if n not in (b".", b"..")]
    assert sorted(names) == sorted(want)
    assert len(names) == len(set(names))
    assert [n for n, *_r in _all(fs, d)] == [b".", b".."]
    fs.rmdir(ROOT, b"d")


def test_readdir_after_remount_same_offsets(memfs):
    fs = memfs
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    for i in range(150):
        fs.mknod(d, b"%d" % i, stat.S_IFREG | 0o644)
    for i in range(0, 150, 3):
        fs.unlink(d, b"%d" % i)
    before = _all(fs, d)
    fs = remount(fs)
    assert _all(fs, d) == before
    mid = before[40][3]
    assert _all(fs, d, mid) == before[41:]
    fs.close()


def test_readdir_sees_renames_and_links(memfs):
    fs = memfs
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    f = mkfile(fs, d, b"a")
    fs.link(f, d, b"b")
    fs.rename(d, b"a", d, b"c")
    got = {n: i for n, i, _t, _o in _all(fs, d)[2:]}
    assert got == {b"b": f, b"c": f}
