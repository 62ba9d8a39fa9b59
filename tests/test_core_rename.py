"""Core: rename(2) and renameat2(2) (RENAME_NOREPLACE, RENAME_EXCHANGE)."""

from __future__ import annotations

import errno
import time

import pytest

from test_core_helpers import (ROOT, expect_errno, free_counts, mkfile, names, read_all,
                               remount)

NOREPLACE = 1
EXCHANGE = 2


def _dtypes(fs, d):
    return {n: (i, t) for n, i, t, _o in fs.readdir(d, 0) if n not in (b".", b"..")}


def test_rename_plain(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"a", b"data")
    before = fs.getattr(ROOT)
    pm, pc, pn = before.mtime, before.ctime, before.nlink
    c0 = fs.getattr(f).ctime
    time.sleep(0.001)
    fs.rename(ROOT, b"a", ROOT, b"b")
    expect_errno(errno.ENOENT, fs.lookup, ROOT, b"a")
    assert fs.lookup(ROOT, b"b").ino == f
    assert read_all(fs, f) == b"data"
    a = fs.getattr(ROOT)
    assert a.mtime > pm and a.ctime > pc and a.nlink == pn
    assert fs.getattr(f).ctime > c0
    assert fs.getattr(f).nlink == 1
    assert _dtypes(fs, ROOT)[b"b"] == (f, 8)
    fs = remount(fs)
    assert fs.lookup(ROOT, b"b").ino == f
    expect_errno(errno.ENOENT, fs.lookup, ROOT, b"a")
    fs.close()


def test_rename_missing_source(memfs):
    expect_errno(errno.ENOENT, memfs.rename, ROOT, b"nope", ROOT, b"x")


def test_rename_across_directories(memfs):
    fs = memfs
    d1 = fs.mkdir(ROOT, b"d1", 0o755).ino
    d2 = fs.mkdir(ROOT, b"d2", 0o755).ino
    f = mkfile(fs, d1, b"f", b"x")
    m1, m2 = fs.getattr(d1).mtime, fs.getattr(d2).mtime
    time.sleep(0.001)
    fs.rename(d1, b"f", d2, b"g")
    assert names(fs, d1) == [] and names(fs, d2) == [b"g"]
    assert fs.lookup(d2, b"g").ino == f
    assert fs.getattr(d1).mtime > m1 and fs.getattr(d2).mtime > m2
    assert fs.getattr(d1).nlink == 2 and fs.getattr(d2).nlink == 2


def test_rename_directory_updates_dotdot_and_nlinks(memfs):
    fs = memfs
    root_n = fs.getattr(ROOT).nlink
    d1 = fs.mkdir(ROOT, b"d1", 0o755).ino
    d2 = fs.mkdir(ROOT, b"d2", 0o755).ino
    sub = fs.mkdir(d1, b"sub", 0o755).ino
    fs.mkdir(sub, b"inner", 0o755)
    assert fs.getattr(d1).nlink == 3 and fs.getattr(d2).nlink == 2
    fs.rename(d1, b"sub", d2, b"moved")
    assert fs.lookup(sub, b"..").ino == d2
    assert [i for n, i, *_ in fs.readdir(sub, 0) if n == b".."] == [d2]
    assert fs.getattr(d1).nlink == 2
    assert fs.getattr(d2).nlink == 3
    assert fs.getattr(sub).nlink == 3
    assert fs.getattr(ROOT).nlink == root_n + 2
    # to the root
    fs.rename(d2, b"moved", ROOT, b"top")
    assert fs.lookup(sub, b"..").ino == ROOT
    assert fs.getattr(d2).nlink == 2
    assert fs.getattr(ROOT).nlink == root_n + 3
    fs = remount(fs)
    assert fs.lookup(sub, b"..").ino == ROOT
    assert fs.getattr(ROOT).nlink == root_n + 3
    assert fs.getattr(d1).nlink == 2 and fs.getattr(d2).nlink == 2
    fs.close()


def test_rename_replaces_a_file(memfs):
    fs = memfs
    b0, i0 = free_counts(fs)
    a = mkfile(fs, ROOT, b"a", b"A" * 9000)
    b = mkfile(fs, ROOT, b"b", b"B" * 20000)
    fs.rename(ROOT, b"a", ROOT, b"b")
    assert fs.lookup(ROOT, b"b").ino == a
    expect_errno(errno.ENOENT, fs.lookup, ROOT, b"a")
    assert read_all(fs, a) == b"A" * 9000
    expect_errno(errno.ENOENT, fs.getattr, b)  # freed
    assert free_counts(fs) == (b0 - 3, i0 - 1)


def test_rename_replaces_a_hard_linked_file(memfs):
    fs = memfs
    a = mkfile(fs, ROOT, b"a", b"A")
    b = mkfile(fs, ROOT, b"b", b"B")
    fs.link(b, ROOT, b"b2")
    c0 = fs.getattr(b).ctime
    time.sleep(0.001)
    fs.rename(ROOT, b"a", ROOT, b"b")
    assert fs.getattr(b).nlink == 1
    assert fs.getattr(b).ctime > c0
    assert read_all(fs, fs.lookup(ROOT, b"b2").ino) == b"B"
    assert fs.lookup(ROOT, b"b").ino == a


def test_rename_replaces_an_empty_dir(memfs):
    fs = memfs
    root_n = fs.getattr(ROOT).nlink
    b0, i0 = free_counts(fs)
    p1 = fs.mkdir(ROOT, b"p1", 0o755).ino
    p2 = fs.mkdir(ROOT, b"p2", 0o755).ino
    src = fs.mkdir(p1, b"src", 0o755).ino
    mkfile(fs, src, b"content", b"c")
    dst = fs.mkdir(p2, b"dst", 0o755).ino
    assert fs.getattr(p1).nlink == 3 and fs.getattr(p2).nlink == 3
    fs.rename(p1, b"src", p2, b"dst")
    assert fs.lookup(p2, b"dst").ino == src
    assert fs.lookup(src, b"..").ino == p2
    assert names(fs, src) == [b"content"]
    expect_errno(errno.ENOENT, fs.getattr, dst)
    assert fs.getattr(p1).nlink == 2
    assert fs.getattr(p2).nlink == 3
    # same parent
    e = fs.mkdir(p2, b"e", 0o755).ino
    assert fs.getattr(p2).nlink == 4
    fs.rename(p2, b"dst", p2, b"e")
    assert fs.getattr(p2).nlink == 3
    expect_errno(errno.ENOENT, fs.getattr, e)
    fs = remount(fs)
    assert fs.getattr(p2).nlink == 3 and fs.getattr(p1).nlink == 2
    assert fs.getattr(ROOT).nlink == root_n + 2
    assert free_counts(fs)[1] == i0 - 4
    fs.close()


def test_rename_type_errors(memfs):
    fs = memfs
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    full = fs.mkdir(ROOT, b"full", 0o755).ino
    mkfile(fs, full, b"x")
    full2 = fs.mkdir(ROOT, b"full2", 0o755).ino
    fs.mkdir(full2, b"subdir", 0o755)
    f = mkfile(fs, ROOT, b"f", b"file")
    expect_errno(errno.ENOTEMPTY, fs.rename, ROOT, b"d", ROOT, b"full")
    expect_errno(errno.ENOTEMPTY, fs.rename, ROOT, b"d", ROOT, b"full2")
    expect_errno(errno.ENOTDIR, fs.rename, ROOT, b"d", ROOT, b"f")
    expect_errno(errno.EISDIR, fs.rename, ROOT, b"f", ROOT, b"d")
    expect_errno(errno.EISDIR, fs.rename, ROOT, b"f", ROOT, b"full")
    # nothing moved
    assert fs.lookup(ROOT, b"d").ino == d
    assert fs.lookup(ROOT, b"f").ino == f
    assert names(fs, full) == [b"x"]


def test_rename_flags(memfs):
    fs = memfs
    a = mkfile(fs, ROOT, b"a", b"A")
    b = mkfile(fs, ROOT, b"b", b"B")
    expect_errno(errno.EEXIST, fs.rename, ROOT, b"a", ROOT, b"b", NOREPLACE)
    expect_errno(errno.EINVAL, fs.rename, ROOT, b"a", ROOT, b"b", NOREPLACE | EXCHANGE)
    expect_errno(errno.EINVAL, fs.rename, ROOT, b"a", ROOT, b"c", NOREPLACE | EXCHANGE)
    expect_errno(errno.EINVAL, fs.rename, ROOT, b"a", ROOT, b"c", 4)  # RENAME_WHITEOUT
    expect_errno(errno.EINVAL, fs.rename, ROOT, b"a", ROOT, b"c", 0x100)
    expect_errno(errno.ENOENT, fs.rename, ROOT, b"a", ROOT, b"missing", EXCHANGE)
    expect_errno(errno.ENOENT, fs.rename, ROOT, b"missing", ROOT, b"a", EXCHANGE)
    assert fs.lookup(ROOT, b"a").ino == a and fs.lookup(ROOT, b"b").ino == b
    fs.rename(ROOT, b"a", ROOT, b"c", NOREPLACE)
    assert fs.lookup(ROOT, b"c").ino == a
    expect_errno(errno.ENOENT, fs.lookup, ROOT, b"a")
    # NOREPLACE onto itself: the target exists (Linux: EEXIST)
    expect_errno(errno.EEXIST, fs.rename, ROOT, b"c", ROOT, b"c", NOREPLACE)


def test_rename_dot_names(memfs):
    fs = memfs
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    mkfile(fs, ROOT, b"f")
    expect_errno(errno.EBUSY, fs.rename, d, b".", ROOT, b"x")
    expect_errno(errno.EBUSY, fs.rename, d, b"..", ROOT, b"x")
    expect_errno(errno.EBUSY, fs.rename, ROOT, b"f", d, b".")
    expect_errno(errno.EBUSY, fs.rename, ROOT, b"f", d, b"..")


def test_exchange_file_file(memfs):
    fs = memfs
    d1 = fs.mkdir(ROOT, b"d1", 0o755).ino
    d2 = fs.mkdir(ROOT, b"d2", 0o755).ino
    a = mkfile(fs, d1, b"a", b"AAA")
    b = mkfile(fs, d2, b"b", b"BBBBBB")
    ca, cb = fs.getattr(a).ctime, fs.getattr(b).ctime
    time.sleep(0.001)
    fs.rename(d1, b"a", d2, b"b", EXCHANGE)
    assert fs.lookup(d1, b"a").ino == b
    assert fs.lookup(d2, b"b").ino == a
    assert read_all(fs, fs.lookup(d1, b"a").ino) == b"BBBBBB"
    assert fs.getattr(a).nlink == 1 and fs.getattr(b).nlink == 1
    assert fs.getattr(a).ctime > ca and fs.getattr(b).ctime > cb
    assert fs.getattr(d1).nlink == 2 and fs.getattr(d2).nlink == 2
    # in one directory
    fs.rename(d1, b"a", d1, b"a", EXCHANGE)  # with itself: nothing happens
    assert fs.lookup(d1, b"a").ino == b
    c = mkfile(fs, d1, b"c", b"C")
    fs.rename(d1, b"a", d1, b"c", EXCHANGE)
    assert fs.lookup(d1, b"a").ino == c and fs.lookup(d1, b"c").ino == b
    fs = remount(fs)
    assert fs.lookup(d1, b"a").ino == c and fs.lookup(d1, b"c").ino == b
    assert fs.lookup(d2, b"b").ino == a
    fs.close()


def test_exchange_file_dir_across_parents(memfs):
    fs = memfs
    p1 = fs.mkdir(ROOT, b"p1", 0o755).ino
    p2 = fs.mkdir(ROOT, b"p2", 0o755).ino
    f = mkfile(fs, p1, b"f", b"file")
    d = fs.mkdir(p2, b"d", 0o755).ino
    mkfile(fs, d, b"inside")
    assert fs.getattr(p1).nlink == 2 and fs.getattr(p2).nlink == 3
    fs.rename(p1, b"f", p2, b"d", EXCHANGE)
    assert fs.lookup(p1, b"f").ino == d
    assert fs.lookup(p2, b"d").ino == f
    assert fs.lookup(d, b"..").ino == p1
    assert fs.getattr(p1).nlink == 3
    assert fs.getattr(p2).nlink == 2
    assert _dtypes(fs, p1)[b"f"] == (d, 4)
    assert _dtypes(fs, p2)[b"d"] == (f, 8)
    # and back, the other way round
    fs.rename(p2, b"d", p1, b"f", EXCHANGE)
    assert fs.lookup(p2, b"d").ino == d and fs.lookup(d, b"..").ino == p2
    assert fs.getattr(p1).nlink == 2 and fs.getattr(p2).nlink == 3
    fs.rename(p1, b"f", p2, b"d", EXCHANGE)
    fs = remount(fs)
    assert fs.lookup(d, b"..").ino == p1
    assert fs.getattr(p1).nlink == 3 and fs.getattr(p2).nlink == 2
    assert names(fs, d) == [b"inside"]
    fs.close()


def test_exchange_dir_dir_across_parents(memfs):
    fs = memfs
    p1 = fs.mkdir(ROOT, b"p1", 0o755).ino
    p2 = fs.mkdir(ROOT, b"p2", 0o755).ino
    x = fs.mkdir(p1, b"x", 0o755).ino
    y = fs.mkdir(p2, b"y", 0o755).ino
    fs.mkdir(p2, b"y2", 0o755)
    mkfile(fs, x, b"in-x")
    mkfile(fs, y, b"in-y")
    n1, n2 = fs.getattr(p1).nlink, fs.getattr(p2).nlink
    assert (n1, n2) == (3, 4)
    fs.rename(p1, b"x", p2, b"y", EXCHANGE)
    assert fs.lookup(p1, b"x").ino == y
    assert fs.lookup(p2, b"y").ino == x
    assert fs.lookup(x, b"..").ino == p2
    assert fs.lookup(y, b"..").ino == p1
    assert (fs.getattr(p1).nlink, fs.getattr(p2).nlink) == (n1, n2)
    assert names(fs, fs.lookup(p1, b"x").ino) == [b"in-y"]
    fs = remount(fs)
    assert fs.lookup(x, b"..").ino == p2
    assert fs.lookup(y, b"..").ino == p1
    assert (fs.getattr(p1).nlink, fs.getattr(p2).nlink) == (n1, n2)
    fs.close()


def test_rename_into_own_subtree_is_einval(memfs):
    fs = memfs
    a = fs.mkdir(ROOT, b"a", 0o755).ino
    b = fs.mkdir(a, b"b", 0o755).ino
    c = fs.mkdir(b, b"c", 0o755).ino
    expect_errno(errno.EINVAL, fs.rename, ROOT, b"a", c, b"x")
    expect_errno(errno.EINVAL, fs.rename, ROOT, b"a", a, b"x")
    expect_errno(errno.EINVAL, fs.rename, ROOT, b"a", b, b"x")
    expect_errno(errno.EINVAL, fs.rename, a, b"b", c, b"x")
    # exchange with a descendant (either way round)
    expect_errno(errno.EINVAL, fs.rename, ROOT, b"a", b, b"c", EXCHANGE)
    expect_errno(errno.EINVAL, fs.rename, b, b"c", ROOT, b"a", EXCHANGE)
    mkfile(fs, c, b"f")
    expect_errno(errno.EINVAL, fs.rename, ROOT, b"a", c, b"f", EXCHANGE)
    expect_errno(errno.EINVAL, fs.rename, c, b"f", ROOT, b"a", EXCHANGE)
    # nothing moved
    assert fs.lookup(ROOT, b"a").ino == a
    assert fs.lookup(c, b"..").ino == b and fs.lookup(b, b"..").ino == a
    # sideways moves are fine
    fs.rename(b, b"c", ROOT, b"c")
    assert fs.lookup(c, b"..").ino == ROOT


def test_rename_file_onto_its_own_parent_dir(memfs):
    """rename("a/f", "a"): the target is an ancestor of the source; Linux
    (ext4, tmpfs) gives ENOTEMPTY before looking at the types."""
    fs = memfs
    a = fs.mkdir(ROOT, b"a", 0o755).ino
    mkfile(fs, a, b"f")
    expect_errno(errno.ENOTEMPTY, fs.rename, a, b"f", ROOT, b"a")
    assert names(fs, a) == [b"f"]


def test_rename_onto_itself_and_hard_link(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f", b"data")
    fs.link(f, ROOT, b"g")
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    fs.link(f, d, b"h")
    b0, i0 = free_counts(fs)
    fs.rename(ROOT, b"f", ROOT, b"f")
    fs.rename(ROOT, b"d", ROOT, b"d")
    assert fs.lookup(ROOT, b"d").ino == d
    # a hard link of itself: POSIX says succeed and do nothing
    fs.rename(ROOT, b"f", ROOT, b"g")
    fs.rename(ROOT, b"f", d, b"h")
    assert fs.lookup(ROOT, b"f").ino == f
    assert fs.lookup(ROOT, b"g").ino == f
    assert fs.lookup(d, b"h").ino == f
    assert fs.getattr(f).nlink == 3
    assert read_all(fs, f) == b"data"
    assert free_counts(fs) == (b0, i0)
    fs = remount(fs)
    assert fs.getattr(f).nlink == 3
    assert sorted(names(fs, ROOT)) == [b"d", b"f", b"g", b"lost+found"]
    fs.close()


def test_rename_in_removed_or_non_dir(memfs):
    fs = memfs
    f = mkfile(fs, ROOT, b"f")
    d = fs.mkdir(ROOT, b"d", 0o755).ino
    expect_errno(errno.ENOTDIR, fs.rename, f, b"x", ROOT, b"y")
    expect_errno(errno.ENOTDIR, fs.rename, ROOT, b"f", f, b"y")
    fs.ref(d)
    fs.rmdir(ROOT, b"d")
    expect_errno(errno.ENOENT, fs.rename, ROOT, b"f", d, b"y")
    assert fs.lookup(ROOT, b"f").ino == f
    fs.forget(d)


@pytest.mark.parametrize("kind", ["file", "dir", "symlink", "fifo"])
def test_rename_keeps_dtype(memfs, kind):
    fs = memfs
    import stat as st
    if kind == "file":
        ino, t = mkfile(fs, ROOT, b"x"), 8
    elif kind == "dir":
        ino, t = fs.mkdir(ROOT, b"x", 0o755).ino, 4
    elif kind == "symlink":
        ino, t = fs.symlink(ROOT, b"x", b"tgt").ino, 10
    else:
        ino, t = fs.mknod(ROOT, b"x", st.S_IFIFO | 0o644).ino, 1
    d = fs.mkdir(ROOT, b"dest", 0o755).ino
    fs.rename(ROOT, b"x", d, b"y")
    assert _dtypes(fs, d) == {b"y": (ino, t)}
    fs = remount(fs)
    assert _dtypes(fs, d) == {b"y": (ino, t)}
    fs.close()


def test_rename_many_then_remount(memfs):
    """Shuffle names around a few directories; compare against a model."""
    import random
    fs = memfs
    rng = random.Random(7)
    dirs = [ROOT] + [fs.mkdir(ROOT, b"d%d" % i, 0o755).ino for i in range(4)]
    model = {d: {} for d in dirs}
    for i in range(60):
        d = rng.choice(dirs)
        model[d][b"f%d" % i] = mkfile(fs, d, b"f%d" % i, b"%d" % i)
    for _ in range(300):
        d1 = rng.choice(dirs)
        if not model[d1]:
            continue
        n1 = rng.choice(sorted(model[d1]))
        d2 = rng.choice(dirs)
        n2 = b"f%d" % rng.randrange(80)
        if rng.random() < 0.3 and n2 in model[d2]:
            if (d1, n1) != (d2, n2):
                fs.rename(d1, n1, d2, n2, EXCHANGE)
                model[d1][n1], model[d2][n2] = model[d2][n2], model[d1][n1]
            continue
        fs.rename(d1, n1, d2, n2)
        ino = model[d1].pop(n1)
        model[d2][n2] = ino
    fs = remount(fs)
    for d in dirs:
        got = {n: i for n, i in fs.listdir(d).items() if n.startswith(b"f")}
        assert got == model[d]
        for n, i in got.items():
            assert fs.getattr(i).nlink == 1
    fs.close()


def test_ancestor_check_after_exchange(memfs):
    """After exchanging two directories their parent pointers must have
    moved: a move into what is now a descendant is refused."""
    fs = memfs
    p1 = fs.mkdir(ROOT, b"p1", 0o755).ino
    p2 = fs.mkdir(ROOT, b"p2", 0o755).ino
    x = fs.mkdir(p1, b"x", 0o755).ino
    y = fs.mkdir(p2, b"y", 0o755).ino
    fs.rename(p1, b"x", p2, b"y", EXCHANGE)  # now x is under p2, y under p1
    expect_errno(errno.EINVAL, fs.rename, ROOT, b"p2", x, b"loop")
    expect_errno(errno.EINVAL, fs.rename, ROOT, b"p1", y, b"loop")
    fs.rename(ROOT, b"p1", x, b"fine")  # p1 is not an ancestor of x any more
    assert fs.lookup(p1, b"..").ino == x
    assert fs.lookup(x, b"..").ino == p2
    assert fs.getattr(x).nlink == 3 and fs.getattr(p2).nlink == 3
