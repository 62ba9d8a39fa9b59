"""Real programs on a pmfs mount: cp, diff, tar, git, sqlite, rsync, mmap,
du/find/stat, dd.

Each test runs a program the way a user would and checks the result against
the source (or against the same program run on kernel tmpfs), and where it
matters after an unmount and a mount again.  A missing program fails the
test with a message naming the package (./setup.sh installs them).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import sqlite3
import stat
import subprocess
import tempfile

import pytest

from conftest import SHM

pytestmark = pytest.mark.fuse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"rsync": "rsync", "git": "git", "setfattr": "attr", "getfattr": "attr",
            "sqlite3": "sqlite3", "tar": "tar", "cp": "coreutils", "diff": "diffutils",
            "du": "coreutils", "find": "findutils", "stat": "coreutils", "dd": "coreutils",
            "md5sum": "coreutils"}


def need(*progs: str) -> None:
    missing = [p for p in progs if shutil.which(p) is None]
    if missing:
        pytest.fail("required program(s) not installed: " + ", ".join(
            f"{p} (apt-get install {PACKAGES.get(p, p)})" for p in missing)
            + "; ./setup.sh installs them")


def run(*cmd, cwd=None, check=True, env=None, input=None, timeout=300) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, env=env,
                       input=input, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {r.returncode}\n"
                             f"stdout: {r.stdout[-4000:]}\nstderr: {r.stderr[-4000:]}")
    return r


def md5_file(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: str, times: bool = True, xattrs: bool = True, owners: bool = True,
             prefix: str = "") -> dict:
    """{path: attributes} of a tree: type, mode, size, owners, mtime (ns),
    contents (md5), symlink targets, user.* xattrs and hard-link groups."""
    out = {}
    first_name = {}

    def entry(p):
        rel = os.path.normpath(os.path.join(prefix, os.path.relpath(p, root)))
        st = os.lstat(p)
        d = {"mode": stat.filemode(st.st_mode)}
        if owners:
            d["owner"] = (st.st_uid, st.st_gid)
        if stat.S_ISREG(st.st_mode):
            d["size"] = st.st_size
            d["md5"] = md5_file(p)
            d["link_group"] = first_name.setdefault((st.st_dev, st.st_ino), rel)
        elif stat.S_ISLNK(st.st_mode):
            d["target"] = os.readlink(p)
        if times:
            d["mtime_ns"] = st.st_mtime_ns
        if xattrs and not stat.S_ISLNK(st.st_mode):
            d["xattrs"] = sorted((n, os.getxattr(p, n)) for n in os.listxattr(p)
                                 if n.startswith("user."))
        out[rel] = d

    entry(root)
    if os.path.islink(root):  # os.walk would follow it
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            entry(os.path.join(dirpath, name))
    return out


def assert_same_tree(a: dict, b: dict, what: str) -> None:
    if a == b:
        return
    lines = []
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            lines.append(f"{k}: only in the {'first' if k in a else 'second'} tree")
        elif a[k] != b[k]:
            fields = sorted(f for f in set(a[k]) | set(b[k]) if a[k].get(f) != b[k].get(f))
            lines.append(f"{k}: " + "; ".join(f"{f}: {a[k].get(f)!r} != {b[k].get(f)!r}"
                                              for f in fields))
        if len(lines) > 30:
            break
    raise AssertionError(f"{what}: {len([k for k in set(a) | set(b) if a.get(k) != b.get(k)])}"
                         f" difference(s):\n  " + "\n  ".join(lines))


def doc_subset(limit: int = 12 << 20) -> list[str]:
    """Directories of /usr/share/doc (sorted) adding up to about `limit` bytes."""
    base = "/usr/share/doc"
    if not os.path.isdir(base):
        pytest.fail("/usr/share/doc is missing")
    chosen, total = [], 0
    for name in sorted(os.listdir(base)):
        p = os.path.join(base, name)
        size = 0
        for dp, dn, fn in os.walk(p):
            for f in fn:
                try:
                    size += os.lstat(os.path.join(dp, f)).st_size
                except OSError:
                    pass
        chosen.append(name)
        total += size
        if total >= limit:
            break
    return chosen


@pytest.fixture
def scratch():
    d = tempfile.mkdtemp(prefix="pmfs-prog-", dir=SHM)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_tree(root: str) -> None:
    """A tree with every kind of file, hard links, symlinks and xattrs."""
    os.makedirs(os.path.join(root, "dir", "sub", "deep"))
    os.makedirs(os.path.join(root, "empty"))
    sizes = {"zero": 0, "one": 1, "page-1": 4095, "page": 4096, "page+1": 4097,
             "big": (1 << 20) + 3, "dir/mid": 70000, "dir/sub/deep/x": 12345}
    for i, (name, n) in enumerate(sizes.items()):
        with open(os.path.join(root, name), "wb") as f:
            f.write(hashlib.sha256(name.encode()).digest() * (n // 32) +
                    bytes((i + k) & 0xFF for k in range(n % 32)))
    with open(os.path.join(root, "sparse"), "wb") as f:
        f.truncate(5 << 20)
        f.seek(3 << 20)
        f.write(b"in the middle")
    os.link(os.path.join(root, "page"), os.path.join(root, "dir", "page-link"))
    os.link(os.path.join(root, "page"), os.path.join(root, "dir", "sub", "page-link2"))
    os.symlink("../page", os.path.join(root, "dir", "to-page"))
    os.symlink("dangling/nowhere", os.path.join(root, "dangling"))
    os.symlink("dir/sub", os.path.join(root, "to-dir"))
    os.symlink("x" * 200, os.path.join(root, "long-link"))
    os.setxattr(os.path.join(root, "one"), "user.colour", b"blue")
    os.setxattr(os.path.join(root, "big"), "user.empty", b"")
    os.setxattr(os.path.join(root, "big"), "user.bin", bytes(range(256)))
    os.setxattr(os.path.join(root, "dir"), "user.on-a-dir", b"yes")
    os.setxattr(os.path.join(root, "page"), "user.linked", b"shared by three names")
    os.chmod(os.path.join(root, "one"), 0o600)
    os.chmod(os.path.join(root, "dir", "mid"), 0o755)
    os.chmod(os.path.join(root, "empty"), 0o700)
    os.chown(os.path.join(root, "zero"), 1000, 100)
    # distinct old times with nanoseconds everywhere (deepest first, so
    # that setting a directory's time is the last change made to it)
    entries = []
    for dp, dn, fn in os.walk(root):
        entries += [os.path.join(dp, n) for n in dn + fn]
    for i, p in enumerate(sorted(entries, key=lambda p: -p.count("/")) + [root]):
        os.utime(p, ns=(1_500_000_000_000_000_000 + i * 1_000_000_007,
                        1_400_000_000_000_000_000 + i * 86_400_123_456_789),
                 follow_symlinks=False)
    os.utime(os.path.join(root, "page+1"), ns=(1_000_000_001, 1_234_567_890_123_456_789))


# ---------------------------------------------------------------------------
# cp -a, diff -r
# ---------------------------------------------------------------------------


def test_cp_a_and_diff(pmfs_mount, scratch):
    need("cp", "diff")
    m = pmfs_mount.path
    # the repository's own sources
    run("cp", "-a", os.path.join(ROOT, "pmfs"), os.path.join(m, "pmfs-src"))
    run("diff", "-r", "--no-dereference", os.path.join(ROOT, "pmfs"),
        os.path.join(m, "pmfs-src"))
    assert_same_tree(snapshot(os.path.join(ROOT, "pmfs")),
                     snapshot(os.path.join(m, "pmfs-src")), "cp -a of pmfs/")
    # a slice of /usr/share/doc (symlinks, gzip files, deep directories)
    dst = os.path.join(m, "doc")
    os.mkdir(dst)
    names = doc_subset()
    run("cp", "-a", *[os.path.join("/usr/share/doc", n) for n in names], dst)
    src_snap = {}
    for n in names:
        src_snap.update(snapshot(os.path.join("/usr/share/doc", n), prefix=n))
    got = snapshot(dst)
    got.pop(".")
    assert_same_tree(src_snap, got, "cp -a of /usr/share/doc")
    for n in names:
        run("diff", "-r", "--no-dereference", os.path.join("/usr/share/doc", n),
            os.path.join(dst, n))
    # and back out again, onto tmpfs: identical
    run("cp", "-a", dst, os.path.join(scratch, "doc"))
    back = snapshot(os.path.join(scratch, "doc"))
    back.pop(".")
    assert_same_tree(src_snap, back, "cp -a from pmfs back to tmpfs")
    # still the same after an unmount and a mount
    pmfs_mount.unmount()
    pmfs_mount.mount()
    again = snapshot(dst)
    again.pop(".")
    assert_same_tree(src_snap, again, "/usr/share/doc copy after remount")


# ---------------------------------------------------------------------------
# tar with xattrs
# ---------------------------------------------------------------------------


TAR = ["tar", "--format=posix", "--xattrs", "--xattrs-include=user.*", "--sort=name",
       "--numeric-owner"]


def test_tar_roundtrip_with_xattrs(pmfs_mount, scratch):
    need("tar", "getfattr", "setfattr")
    m = pmfs_mount.path
    src = os.path.join(scratch, "src")
    make_tree(src)
    run("setfattr", "-n", "user.tool", "-v", "setfattr", os.path.join(src, "page-1"))
    archive = os.path.join(scratch, "src.tar")
    run(*TAR, "-cf", archive, "-C", src, ".")
    # extract onto pmfs and onto tmpfs: identical trees, identical to the source
    on_pmfs = os.path.join(m, "x")
    on_tmpfs = os.path.join(scratch, "x")
    for d in (on_pmfs, on_tmpfs):
        os.mkdir(d)
        run(*TAR, "-xpf", archive, "-C", d)
    ref = snapshot(on_tmpfs)
    assert_same_tree(snapshot(src), ref, "tar extraction on tmpfs (the reference)")
    assert_same_tree(ref, snapshot(on_pmfs), "tar extraction on pmfs")
    out = run("getfattr", "-d", "-m", "user\\.", os.path.join(on_pmfs, "big")).stdout
    assert "user.bin=" in out and "user.empty" in out, out
    out = run("getfattr", "-n", "user.tool", "--only-values", os.path.join(on_pmfs, "page-1"))
    assert out.stdout == "setfattr", out
    # sparse file: holes read as zeros
    with open(os.path.join(on_pmfs, "sparse"), "rb") as f:
        data = f.read()
    want = bytearray(5 << 20)
    want[3 << 20:(3 << 20) + 13] = b"in the middle"
    assert data == want
    # create an archive on pmfs, extract it elsewhere: the same tree again
    archive2 = os.path.join(m, "from-pmfs.tar")
    run(*TAR, "-cf", archive2, "-C", on_pmfs, ".")
    out2 = os.path.join(scratch, "y")
    os.mkdir(out2)
    run(*TAR, "-xpf", archive2, "-C", out2)
    assert_same_tree(ref, snapshot(out2), "archive made on pmfs, extracted on tmpfs")
    # the archive made on pmfs lists the same members as the original
    list1 = run("tar", "-tvf", archive, "--numeric-owner").stdout.splitlines()
    list2 = run("tar", "-tvf", archive2, "--numeric-owner").stdout.splitlines()
    assert list1 == list2
    # tar -d (compare) against pmfs finds no difference
    run(*TAR, "-df", archive, "-C", on_pmfs)
    pmfs_mount.unmount()
    pmfs_mount.mount()
    assert_same_tree(ref, snapshot(on_pmfs), "tar extraction on pmfs after remount")


# ---------------------------------------------------------------------------
# git
# ---------------------------------------------------------------------------


def git(repo, *args, check=True):
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", HOME=repo, GIT_AUTHOR_DATE="2024-01-01T00:00:00Z",
               GIT_COMMITTER_DATE="2024-01-01T00:00:00Z")
    return run("git", "-c", "user.name=pmfs test", "-c", "user.email=pmfs@example.com",
               "-c", "init.defaultBranch=main", "-c", "core.fsync=all",
               "-c", "gc.auto=0", *args, cwd=repo, check=check, env=env)


def test_git_on_pmfs(pmfs_mount, scratch):
    need("git")
    m = pmfs_mount.path
    repo = os.path.join(m, "repo")
    shutil.copytree(os.path.join(ROOT, "pmfs"), os.path.join(repo, "pmfs"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "README.md"), repo)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    # the same commit made on tmpfs has the same id (content-addressed)
    ref = os.path.join(scratch, "repo")
    shutil.copytree(repo, ref, ignore=shutil.ignore_patterns(".git"))
    git(ref, "init", "-q")
    git(ref, "add", "-A")
    git(ref, "commit", "-q", "-m", "first")
    head = git(repo, "rev-parse", "HEAD").stdout.strip()
    assert head == git(ref, "rev-parse", "HEAD").stdout.strip()
    # more history: edits, a rename, a deletion, a branch and a merge
    with open(os.path.join(repo, "README.md"), "a") as f:
        f.write("\nmore text\n")
    for name in ("a.txt", "b.txt"):
        with open(os.path.join(repo, name), "w") as f:
            f.write(name * 5000)
    git(repo, "add", "a.txt", "b.txt")
    git(repo, "commit", "-q", "-m", "second")
    git(repo, "mv", "a.txt", "a-renamed.txt")
    git(repo, "rm", "-q", "b.txt")
    git(repo, "commit", "-q", "-am", "third")
    git(repo, "checkout", "-q", "-b", "side", "HEAD~1")
    with open(os.path.join(repo, "side.txt"), "w") as f:
        f.write("side\n" * 1000)
    git(repo, "add", "side.txt")
    git(repo, "commit", "-q", "-m", "side")
    git(repo, "checkout", "-q", "main")
    git(repo, "merge", "-q", "--no-edit", "side")
    git(repo, "gc", "-q", "--aggressive", "--prune=now")
    git(repo, "fsck", "--full", "--strict", "--no-dangling")
    assert git(repo, "status", "--porcelain").stdout == ""
    assert len(git(repo, "log", "--oneline").stdout.splitlines()) == 5
    # clone it out to tmpfs, and check it again after a remount
    git(scratch, "clone", "-q", repo, os.path.join(scratch, "clone"))
    assert git(os.path.join(scratch, "clone"), "rev-parse", "HEAD").stdout == \
        git(repo, "rev-parse", "HEAD").stdout
    pmfs_mount.unmount()
    pmfs_mount.mount()
    git(repo, "fsck", "--full", "--strict", "--no-dangling")
    assert git(repo, "status", "--porcelain").stdout == ""
    run("diff", "-r", os.path.join(repo, "pmfs"), os.path.join(scratch, "clone", "pmfs"))


# ---------------------------------------------------------------------------
# sqlite
# ---------------------------------------------------------------------------


def _sqlite_workload(path: str, journal: str, n: int = 600) -> tuple:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        mode = db.execute(f"PRAGMA journal_mode={journal}").fetchone()[0]
        assert mode.lower() == journal.lower(), f"journal_mode {journal} refused: {mode}"
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v BLOB)")
        for i in range(n):
            db.execute("BEGIN")
            db.execute("INSERT INTO t (k, v) VALUES (?, ?)",
                       (f"key{i}", hashlib.sha256(str(i).encode()).digest() * (1 + i % 50)))
            if i % 7 == 3:
                db.execute("UPDATE t SET v = zeroblob(3000) WHERE id = ?", (i // 2 + 1,))
            if i % 11 == 5:
                db.execute("DELETE FROM t WHERE id = ?", (i // 3 + 1,))
            db.execute("COMMIT")
        # a transaction that is rolled back leaves no trace
        db.execute("BEGIN")
        db.execute("DELETE FROM t")
        db.execute("ROLLBACK")
        # one big transaction (spills the page cache, grows the journal)
        db.execute("BEGIN")
        db.executemany("INSERT INTO t (k, v) VALUES (?, ?)",
                       ((f"bulk{i}", os.urandom(100)) for i in range(5000)))
        db.execute("COMMIT")
        db.execute("CREATE INDEX tv ON t (length(v))")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        if journal == "wal":
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return db.execute("SELECT count(*), sum(length(v)), "
                          "sum(length(k)) FROM t").fetchone()
    finally:
        db.close()


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_sqlite(pmfs_mount, scratch, journal):
    m = pmfs_mount.path
    path = os.path.join(m, f"test-{journal}.db")
    got = _sqlite_workload(path, journal)
    # the same workload on tmpfs gives the same content (deterministic parts)
    ref = _sqlite_workload(os.path.join(scratch, "ref.db"), journal)
    assert got == ref
    if journal == "wal":
        # a second connection sees the first one's commits through the
        # shared-memory index (the -shm file, mmap'ed MAP_SHARED)
        a = sqlite3.connect(path, isolation_level=None)
        b = sqlite3.connect(path, isolation_level=None)
        try:
            assert a.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            for i in range(50):
                a.execute("INSERT INTO t (k, v) VALUES (?, x'00')", (f"two{i}",))
                assert b.execute("SELECT count(*) FROM t WHERE k = ?",
                                 (f"two{i}",)).fetchone()[0] == 1
            got = b.execute("SELECT count(*), sum(length(v)), sum(length(k)) "
                            "FROM t").fetchone()
            assert os.path.exists(path + "-shm") and os.path.exists(path + "-wal")
        finally:
            a.close()
            b.close()
    pmfs_mount.unmount()
    pmfs_mount.mount()
    db = sqlite3.connect(path, isolation_level=None)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*), sum(length(v)), sum(length(k)) "
                          "FROM t").fetchone() == got
        db.execute("INSERT INTO t (k, v) VALUES ('after-remount', x'01')")
        assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    finally:
        db.close()
    if shutil.which("sqlite3"):
        out = run("sqlite3", path, "PRAGMA integrity_check; SELECT count(*) FROM t;").stdout
        assert out.split() == ["ok", str(got[0] + 1)], out


# ---------------------------------------------------------------------------
# rsync -aHAX
# ---------------------------------------------------------------------------


def test_rsync_aHAX(pmfs_mount, scratch):
    need("rsync")
    src = os.path.join(scratch, "src")
    make_tree(src)
    dst = os.path.join(pmfs_mount.path, "dst")
    r = run("rsync", "-aHAX", "--numeric-ids", src + "/", dst + "/", check=False)
    assert r.returncode == 0, f"rsync -aHAX into pmfs failed ({r.returncode}):\n{r.stderr}"
    assert_same_tree(snapshot(src), snapshot(dst), "rsync -aHAX copy")
    # hard links really are hard links
    assert os.stat(os.path.join(dst, "page")).st_nlink == 3
    assert os.stat(os.path.join(dst, "page")).st_ino == \
        os.stat(os.path.join(dst, "dir", "sub", "page-link2")).st_ino
    # a second run has nothing to do
    r = run("rsync", "-aHAXn", "--numeric-ids", "--itemize-changes", src + "/", dst + "/",
            check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"rsync wants to change an identical copy:\n{r.stdout}"
    # and neither after a remount (times, modes, xattrs, links all persisted)
    pmfs_mount.unmount()
    pmfs_mount.mount()
    r = run("rsync", "-aHAXn", "--numeric-ids", "--itemize-changes", src + "/", dst + "/",
            check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"after remount rsync wants to change:\n{r.stdout}"
    # and back out of pmfs with rsync: identical to the source
    back = os.path.join(scratch, "back")
    run("rsync", "-aHAX", "--numeric-ids", dst + "/", back + "/")
    assert_same_tree(snapshot(src), snapshot(back), "rsync -aHAX out of pmfs")


# ---------------------------------------------------------------------------
# mmap
# ---------------------------------------------------------------------------


def test_mmap_write_msync_read(pmfs_mount):
    p = os.path.join(pmfs_mount.path, "mapped")
    size = 3 * 4096 + 100
    with open(p, "wb") as f:
        f.write(b"\xee" * size)
    expect = bytearray(b"\xee" * size)
    with open(p, "r+b") as f:
        mm = mmap.mmap(f.fileno(), size)
        try:
            for off, data in ((0, b"head"), (4090, b"across-a-page-boundary"),
                              (size - 7, b"the end"), (8192, os.urandom(4096))):
                mm[off:off + len(data)] = data
                expect[off:off + len(data)] = data
            mm.flush()  # msync(MS_SYNC)
            assert os.pread(f.fileno(), size + 10, 0) == bytes(expect)
            # and the other way: write(2) is visible through the mapping
            os.pwrite(f.fileno(), b"via write", 5000)
            expect[5000:5009] = b"via write"
            assert mm[:] == bytes(expect)
        finally:
            mm.close()
    # grow the file and map the new part
    with open(p, "r+b") as f:
        f.truncate(size + 10000)
        expect += bytes(10000)
        mm = mmap.mmap(f.fileno(), size + 10000)
        try:
            assert mm[:] == bytes(expect)
            mm[size + 5000:size + 5005] = b"grown"
            expect[size + 5000:size + 5005] = b"grown"
            mm.flush()
        finally:
            mm.close()
    with open(p, "rb") as f:
        assert f.read() == bytes(expect)
    pmfs_mount.unmount()
    pmfs_mount.mount()
    with open(p, "rb") as f:
        assert f.read() == bytes(expect), "mmap writes lost after remount"
    assert os.stat(p).st_size == len(expect)


def test_mmap_private_and_readonly(pmfs_mount):
    p = os.path.join(pmfs_mount.path, "m2")
    data = os.urandom(20000)
    with open(p, "wb") as f:
        f.write(data)
    with open(p, "rb") as f:
        ro = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            assert ro[:] == data
        finally:
            ro.close()
    with open(p, "r+b") as f:
        priv = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
        try:
            priv[0:5] = b"PRIVA"
            assert priv[0:5] == b"PRIVA"
        finally:
            priv.close()
    with open(p, "rb") as f:
        assert f.read() == data, "a MAP_PRIVATE write reached the file"


# ---------------------------------------------------------------------------
# du, find, stat
# ---------------------------------------------------------------------------


def test_du_find_stat(pmfs_mount):
    need("du", "find", "stat")
    m = pmfs_mount.path
    t = os.path.join(m, "t")
    make_tree(t)
    os.mkfifo(os.path.join(t, "fifo"))
    with open(os.path.join(t, "sparse100"), "wb") as f:
        f.truncate(100 << 20)
        for off in (0, 50 << 20, (100 << 20) - 4096):
            f.seek(off)
            f.write(b"z" * 4096)
    # find -type
    counts = {}
    for dp, dn, fn in os.walk(t):
        for n in dn + fn:
            st = os.lstat(os.path.join(dp, n))
            counts[stat.S_IFMT(st.st_mode)] = counts.get(stat.S_IFMT(st.st_mode), 0) + 1
    for letter, fmt in (("f", stat.S_IFREG), ("d", stat.S_IFDIR), ("l", stat.S_IFLNK),
                        ("p", stat.S_IFIFO)):
        out = run("find", t, "-mindepth", "1", "-type", letter).stdout.split("\n")
        assert len([x for x in out if x]) == counts.get(fmt, 0), (letter, out)
    assert run("find", t, "-samefile", os.path.join(t, "page")).stdout.count("\n") == 3
    assert run("find", t, "-name", "mid", "-perm", "755").stdout.strip() == \
        os.path.join(t, "dir", "mid")
    # du: its totals are what stat(2) says (each inode counted once)
    size_sum = blocks_sum = 0
    seen = set()
    for dp, dn, fn in os.walk(t):
        for n in ["."] + dn + fn:
            st = os.lstat(os.path.join(dp, n))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                size_sum += st.st_size
                blocks_sum += st.st_blocks
    assert int(run("du", "-sb", t).stdout.split()[0]) == size_sum
    assert int(run("du", "-s", "-B512", t).stdout.split()[0]) == blocks_sum
    sp = int(run("du", "-k", os.path.join(t, "sparse100")).stdout.split()[0])
    assert 12 <= sp <= 64, f"du of a 100 MiB sparse file with 3 written blocks: {sp} KiB"
    assert int(run("du", "-b", os.path.join(t, "sparse100")).stdout.split()[0]) == 100 << 20
    big = int(run("du", "-k", os.path.join(t, "big")).stdout.split()[0])
    assert 1028 <= big <= 1040, f"du of a 1 MiB + 3 file: {big} KiB"
    # stat(1) agrees with stat(2)
    for name in ("one", "big", "dir", "dir/to-page", "fifo", "zero"):
        p = os.path.join(t, name)
        st = os.lstat(p)
        out = run("stat", "-c", "%s %h %f %u %g %Y %F", p).stdout.split(maxsplit=6)
        assert int(out[0]) == st.st_size and int(out[1]) == st.st_nlink
        assert int(out[2], 16) == st.st_mode and int(out[3]) == st.st_uid
        assert int(out[4]) == st.st_gid and int(out[5]) == st.st_mtime_ns // 10**9
    assert run("stat", "-c", "%F", os.path.join(t, "fifo")).stdout.strip() == "fifo"
    assert run("stat", "-c", "%N", os.path.join(t, "dir", "to-page")).stdout.strip().endswith(
        "-> '../page'")
    utc = dict(os.environ, TZ="UTC")
    assert run("stat", "-c", "%y", os.path.join(t, "page+1"), env=utc).stdout.strip() == \
        "2009-02-13 23:31:30.123456789 +0000"
    fs = run("stat", "-f", "-c", "%T %s %l", m).stdout.split()
    assert fs[0].startswith("fuse") and fs[1] == "4096" and fs[2] == "255", fs
    assert int(run("stat", "-c", "%b", os.path.join(t, "sparse100")).stdout) <= 128


# ---------------------------------------------------------------------------
# dd 64 MiB
# ---------------------------------------------------------------------------


def test_dd_64mib_fsync_remount(pmfs_mount, scratch):
    need("dd", "md5sum")
    src = os.path.join(scratch, "src.bin")
    with open(src, "wb") as f:
        for i in range(64):
            f.write(hashlib.sha512(str(i).encode()).digest() * (1 << 14))
    want = run("md5sum", src).stdout.split()[0]
    dst = os.path.join(pmfs_mount.path, "big.bin")
    run("dd", f"if={src}", f"of={dst}", "bs=1M", "conv=fsync", "status=none")
    assert os.stat(dst).st_size == 64 << 20
    assert run("md5sum", dst).stdout.split()[0] == want
    # a second pass with odd block sizes overwriting in place
    run("dd", f"if={src}", f"of={dst}", "bs=12345", "conv=notrunc,fsync", "status=none")
    pmfs_mount.unmount()
    pmfs_mount.mount()
    assert os.stat(dst).st_size == 64 << 20
    assert run("md5sum", dst).stdout.split()[0] == want, "64 MiB file differs after remount"
    # read back with dd too (large and small block sizes)
    for bs in ("4M", "4096", "777"):
        r = subprocess.run(["dd", f"if={dst}", f"bs={bs}", "status=none"],
                           capture_output=True)
        assert r.returncode == 0 and hashlib.md5(r.stdout).hexdigest() == want, bs


# ---------------------------------------------------------------------------
# fallocate(1) through the mount
# ---------------------------------------------------------------------------


def test_fallocate_program(pmfs_mount, scratch):
    """fallocate(1) through the mount (pyfuse3 does not forward
    FUSE_FALLOCATE; pmfs/fuseext.py adds the handler): preallocate, keep
    size, punch hole, posix_fallocate (-x) give what tmpfs gives --
    collapse and insert range fail cleanly on both -- zero range works
    (tmpfs has none), and what was done survives a remount."""
    need("fallocate")
    steps = [["-l", "1M"], ["-n", "-o", "1M", "-l", "1M"], ["-p", "-o", "4096", "-l", "8192"],
             ["-c", "-o", "0", "-l", "4096"],
             ["-i", "-o", "0", "-l", "4096"], ["-x", "-o", "0", "-l", "3M"],
             ["-p", "-o", "0", "-l", "100M"]]
    results = {}
    for where, root in (("tmpfs", scratch), ("pmfs", pmfs_mount.path)):
        q = os.path.join(root, "g")
        with open(q, "wb") as f:
            f.write(b"\xab" * 20000)
        out = []
        for args in steps:
            r = run("fallocate", *args, q, check=False)
            st = os.stat(q)
            with open(q, "rb") as f:
                data = f.read()
            # allocation differs between file systems: only "none" or "some"
            out.append((args, r.returncode, st.st_size, st.st_blocks > 0,
                        hashlib.md5(data).hexdigest()))
        results[where] = out
    assert results["pmfs"] == results["tmpfs"], results
    p = os.path.join(pmfs_mount.path, "h")
    with open(p, "wb") as f:
        f.write(b"\xcd" * 40000)
    run("fallocate", "-l", "2M", p)                   # extends, allocates
    run("fallocate", "-n", "-o", "2M", "-l", "1M", p)  # blocks past EOF
    run("fallocate", "-p", "-o", "8192", "-l", "16384", p)
    run("fallocate", "-z", "-o", "30000", "-l", "5000", p)  # zero range (tmpfs has none)
    want = (b"\xcd" * 8192 + bytes(16384) + b"\xcd" * (30000 - 24576) + bytes(5000)
            + b"\xcd" * (40000 - 35000) + bytes((2 << 20) - 40000))
    st = os.stat(p)
    assert st.st_size == 2 << 20 and st.st_blocks * 512 >= (3 << 20) - 16384
    pmfs_mount.unmount()
    pmfs_mount.mount()
    with open(p, "rb") as f:
        assert f.read() == want
    st2 = os.stat(p)
    assert (st2.st_size, st2.st_blocks) == (st.st_size, st.st_blocks)
