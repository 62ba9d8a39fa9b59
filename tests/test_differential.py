"""Differential testing: pmfs through FUSE against a kernel tmpfs directory.

A hypothesis state machine drives random sequences of file-system
operations, with real system calls, through a directory on a pmfs mount
and a directory on /dev/shm (kernel tmpfs), and compares every result
(return values, errnos, file contents, sizes, positions, modes, owners,
link counts, xattrs, directory listings, symlink targets) plus, after every
step, the two whole trees.  Not compared, because they legitimately differ:
inode numbers, st_blocks, directory st_size, statvfs numbers (only their
sanity), and timestamps except (a) the exact values set by utimensat and
(b) "updated to now" where POSIX requires an update (write, truncate to a
new size, create, mkdir, unlink, rename, link, chmod, chown, xattr
changes): what tmpfs updated, pmfs must have updated.

The operation vocabulary, the engine and the tree comparison live in
tools/difftest (the long mode, with remounts and crash-recoveries), which
is also run here in a bounded form.

Between examples both trees are removed and pmfs's free inode and block
counts must come back to where they were (no leaked orphans or blocks).
"""

from __future__ import annotations

import errno
import importlib.machinery
import importlib.util
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition,
                                 rule, run_state_machine_as_test)

from conftest import SHM, PmfsMount, fuse_available, mkfs

pytestmark = pytest.mark.fuse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIFFTEST = os.path.join(ROOT, "tools", "difftest")


def _load_difftest():
    loader = importlib.machinery.SourceFileLoader("pmfs_difftest", DIFFTEST)
    spec = importlib.util.spec_from_loader("pmfs_difftest", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


dt = _load_difftest()

#: PMFS_DIFF_SHRINK=1 lets hypothesis shrink a failure to a minimal
#: sequence (slow: minutes); CI reports the unshrunk sequence.
SHRINK = os.environ.get("PMFS_DIFF_SHRINK") == "1"
PHASES = (Phase.explicit, Phase.generate) + ((Phase.shrink,) if SHRINK else ())
#: PMFS_DIFF_SCALE=N multiplies the number of examples (longer local runs)
SCALE = float(os.environ.get("PMFS_DIFF_SCALE", "1"))

PATH = st.sampled_from(dt.PATHS)
DIRPATH = st.sampled_from(("",) + dt.PATHS)
FOLLOW = st.sampled_from((0, 1))
HANDLE = st.integers(0, dt.MAX_HANDLES - 1)


short = dt.short


def _free(path):
    s = os.statvfs(path)
    return s.f_bfree, s.f_ffree


class Env:
    """One pmfs mount and one tmpfs directory shared by all examples."""

    def __init__(self, mnt: str, ref: str):
        self.mnt = mnt
        self.ref = ref
        self.a_root = os.path.join(mnt, "t")
        self.b_root = os.path.join(ref, "t")
        self.baseline = _free(mnt)
        self.examples = 0
        self.steps = 0

    def settle(self, timeout: float = 3.0):
        """Wait until the free counts are back at the baseline (the kernel
        sends release and forget asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            now = _free(self.mnt)
            if now == self.baseline or time.monotonic() > deadline:
                return now
            time.sleep(0.02)


def make_machine(env: Env, mount: PmfsMount):
    class DiffMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.eng = dt.Engine(env.a_root, env.b_root)
            self.eng.reset()
            env.examples += 1

        def do(self, name, *args):
            env.steps += 1
            msg = self.eng.apply(name, *args)
            if msg:
                raise AssertionError(self.report(short(msg)))

        def report(self, msg):
            ops = "\n".join("  " + short(" ".join(map(repr, o))) for o in self.eng.history)
            tail = mount.log_text().splitlines()[-15:]
            return (f"{msg}\noperations of this example:\n{ops}\n"
                    f"daemon log (tail):\n  " + "\n  ".join(tail))

        def h(self, i):
            return self.eng.handles[i % len(self.eng.handles)]

        # -- files and descriptors ------------------------------------------
        @precondition(lambda self: len(self.eng.handles) < dt.MAX_HANDLES)
        @rule(path=PATH, flags=st.sampled_from(dt.OPEN_FLAGS),
              mode=st.sampled_from(dt.CREATE_MODES))
        def open(self, path, flags, mode):
            self.do("open", path, flags, mode)

        @precondition(lambda self: len(self.eng.handles) < dt.MAX_HANDLES)
        @rule(path=PATH, seed=st.sampled_from(dt.SEEDS), n=st.sampled_from(dt.LENGTHS))
        def open_unlink(self, path, seed, n):
            self.do("open_unlink", path, seed, n)

        @precondition(lambda self: self.eng.handles)
        @rule(i=HANDLE)
        def close(self, i):
            self.do("close", self.h(i))

        @precondition(lambda self: self.eng.handles)
        @rule(i=HANDLE, seed=st.sampled_from(dt.SEEDS), n=st.sampled_from(dt.LENGTHS))
        def write(self, i, seed, n):
            self.do("write", self.h(i), seed, n)

        @precondition(lambda self: self.eng.handles)
        @rule(i=HANDLE, off=st.sampled_from(dt.OFFSETS), seed=st.sampled_from(dt.SEEDS),
              n=st.sampled_from(dt.LENGTHS))
        def pwrite(self, i, off, seed, n):
            self.do("pwrite", self.h(i), off, seed, n)

        @precondition(lambda self: self.eng.handles)
        @rule(i=HANDLE, n=st.sampled_from(dt.LENGTHS))
        def read(self, i, n):
            self.do("read", self.h(i), n)

        @precondition(lambda self: self.eng.handles)
        @rule(i=HANDLE, off=st.sampled_from(dt.OFFSETS), n=st.sampled_from(dt.LENGTHS))
        def pread(self, i, off, n):
            self.do("pread", self.h(i), off, n)

        @precondition(lambda self: self.eng.handles)
        @rule(i=HANDLE, off=st.sampled_from(dt.OFFSETS), whence=st.sampled_from(dt.WHENCES))
        def lseek(self, i, off, whence):
            self.do("lseek", self.h(i), off, whence)

        @precondition(lambda self: self.eng.handles)
        @rule(i=HANDLE, size=st.sampled_from(dt.SIZES))
        def ftruncate(self, i, size):
            self.do("ftruncate", self.h(i), size)

        @precondition(lambda self: self.eng.handles)
        @rule(i=HANDLE, data=st.booleans())
        def fsync(self, i, data):
            self.do("fdatasync" if data else "fsync", self.h(i))

        @precondition(lambda self: self.eng.handles)
        @rule(i=HANDLE)
        def fstat(self, i):
            self.do("fstat", self.h(i))

        @precondition(lambda self: self.eng.handles)
        @rule(i=HANDLE, mode=st.sampled_from(dt.CHMOD_MODES))
        def fchmod(self, i, mode):
            self.do("fchmod", self.h(i), mode)

        @precondition(lambda self: self.eng.handles)
        @rule(i=HANDLE, atime=st.sampled_from(dt.TIMES_NS), mtime=st.sampled_from(dt.TIMES_NS))
        def futime(self, i, atime, mtime):
            self.do("futime", self.h(i), atime, mtime)

        @precondition(lambda self: self.eng.handles)
        @rule(i=HANDLE, name=st.integers(0, len(dt.XATTR_NAMES) - 1),
              value=st.integers(0, len(dt.XATTR_VALUES) - 1),
              flags=st.sampled_from(dt.XATTR_FLAGS))
        def fsetxattr(self, i, name, value, flags):
            self.do("fsetxattr", self.h(i), name, value, flags)

        @precondition(lambda self: self.eng.handles)
        @rule(i=HANDLE, name=st.integers(0, len(dt.XATTR_NAMES) - 1))
        def fremovexattr(self, i, name):
            self.do("fremovexattr", self.h(i), name)

        # -- names --------------------------------------------------------------
        @rule(path=PATH, size=st.sampled_from(dt.SIZES))
        def truncate(self, path, size):
            self.do("truncate", path, size)

        @rule(path=PATH, follow=st.booleans())
        def stat(self, path, follow):
            self.do("stat" if follow else "lstat", path)

        @rule(path=DIRPATH)
        def listdir(self, path):
            self.do("listdir", path)

        @rule(path=PATH, mode=st.sampled_from(dt.CREATE_MODES))
        def mkdir(self, path, mode):
            self.do("mkdir", path, mode)

        @rule(path=PATH)
        def rmdir(self, path):
            self.do("rmdir", path)

        @rule(path=PATH)
        def unlink(self, path):
            self.do("unlink", path)

        @rule(src=PATH, dst=PATH, follow=FOLLOW)
        def link(self, src, dst, follow):
            self.do("link", src, dst, follow)

        @rule(dest=st.sampled_from(dt.TARGETS), path=PATH)
        def symlink(self, dest, path):
            self.do("symlink", dest, path)

        @rule(path=PATH)
        def readlink(self, path):
            self.do("readlink", path)

        @rule(src=PATH, dst=PATH)
        def rename(self, src, dst):
            self.do("rename", src, dst)

        @rule(src=PATH, dst=PATH, flags=st.sampled_from(dt.RENAME_FLAGS))
        def renameat2(self, src, dst, flags):
            self.do("renameat2", src, dst, flags)

        @rule(path=PATH, mode=st.sampled_from(dt.CHMOD_MODES))
        def chmod(self, path, mode):
            self.do("chmod", path, mode)

        @rule(path=PATH, uid=st.sampled_from(dt.UIDS), gid=st.sampled_from(dt.GIDS),
              follow=FOLLOW)
        def chown(self, path, uid, gid, follow):
            self.do("chown", path, uid, gid, follow)

        @rule(path=PATH, atime=st.sampled_from(dt.TIMES_NS), mtime=st.sampled_from(dt.TIMES_NS),
              follow=FOLLOW)
        def utime(self, path, atime, mtime, follow):
            self.do("utime", path, atime, mtime, follow)

        @rule(path=PATH, name=st.integers(0, len(dt.XATTR_NAMES) - 1),
              value=st.integers(0, len(dt.XATTR_VALUES) - 1),
              flags=st.sampled_from(dt.XATTR_FLAGS), follow=FOLLOW)
        def setxattr(self, path, name, value, flags, follow):
            self.do("setxattr", path, name, value, flags, follow)

        @rule(path=PATH, name=st.integers(0, len(dt.XATTR_NAMES) - 1), follow=FOLLOW)
        def getxattr(self, path, name, follow):
            self.do("getxattr", path, name, follow)

        @rule(path=PATH, follow=FOLLOW)
        def listxattr(self, path, follow):
            self.do("listxattr", path, follow)

        @rule(path=PATH, name=st.integers(0, len(dt.XATTR_NAMES) - 1), follow=FOLLOW)
        def removexattr(self, path, name, follow):
            self.do("removexattr", path, name, follow)

        @rule(path=PATH, mode=st.sampled_from(dt.CREATE_MODES))
        def mkfifo(self, path, mode):
            self.do("mkfifo", path, mode)

        @rule(path=PATH, kind=st.sampled_from(dt.NODE_KINDS),
              mode=st.sampled_from(dt.CREATE_MODES))
        def mknod(self, path, kind, mode):
            self.do("mknod", path, kind, mode)

        @rule(path=DIRPATH)
        def statvfs(self, path):
            self.do("statvfs", path)

        # -- whole trees ------------------------------------------------------------
        @invariant()
        def trees_match(self):
            msg = self.eng.check_tree()
            if msg:
                raise AssertionError(self.report(short(msg)))

        def teardown(self):
            self.eng.close_all()
            dt.wipe(env.a_root)
            dt.wipe(env.b_root)
            got = env.settle()
            assert got == env.baseline, self.report(
                f"free (blocks, inodes) after removing everything: {got}, before the "
                f"example: {env.baseline}: pmfs leaked "
                f"{env.baseline[0] - got[0]} block(s) and {env.baseline[1] - got[1]} inode(s)")

    return DiffMachine


def _run_machine(m: PmfsMount, ref: str, examples: int, steps: int):
    env = Env(m.path, ref)
    machine = make_machine(env, m)
    examples = max(1, int(examples * SCALE))
    t0 = time.monotonic()
    try:
        run_state_machine_as_test(machine, settings=settings(
            max_examples=examples, stateful_step_count=steps, derandomize=True,
            database=None, deadline=None, phases=PHASES, print_blob=False,
            suppress_health_check=list(HealthCheck)))
    finally:
        print(f"{env.examples} examples, {env.steps} operations in "
              f"{time.monotonic() - t0:.1f} s")
    assert m.proc is not None and m.proc.poll() is None, "the pmfs daemon died"


@pytest.fixture
def ref_dir():
    d = tempfile.mkdtemp(prefix="pmfs-ref-", dir=SHM)
    yield d
    dt.wipe(d)


def test_differential_against_tmpfs(pmfs_mount, ref_dir):
    """Default mount options (kernel attribute and entry caching on)."""
    _run_machine(pmfs_mount, ref_dir, examples=200, steps=50)


def test_differential_uncached(shm_dir, ref_dir):
    """attr_timeout=0,entry_timeout=0: every stat and lookup reaches pmfs, so
    what the kernel caches cannot hide a wrong answer from the daemon."""
    if not fuse_available():
        pytest.fail("FUSE is not available (/dev/fuse, fusermount3)")
    image = os.path.join(shm_dir, "fs.img")
    mkfs(image, "128M")
    m = PmfsMount(image, os.path.join(shm_dir, "mnt"), "attr_timeout=0,entry_timeout=0")
    m.mount()
    try:
        _run_machine(m, ref_dir, examples=60, steps=50)
    finally:
        m.unmount()
    assert "Traceback" not in m.log_text(), m.log_text()


def test_difftest_long_mode_bounded():
    """tools/difftest (the long mode) in a CI-sized run: 2,000 operations
    with two clean remounts, one SIGKILL crash-recovery after fsyncing
    everything and two SIGKILLs at random moments while operations run (the
    recovered tree must be the reference tree from just before or just
    after the operation in flight), plus the final remount, with
    `fsck.pmfs -n -f` after each; every tree, free-space and daemon-log
    check of the long mode applies."""
    workdir = tempfile.mkdtemp(prefix="pmfs-difftest-ci-", dir=SHM)
    try:
        r = subprocess.run([sys.executable, DIFFTEST, "--seed", "1", "--ops", "2000",
                            "--remount-every", "900", "--crash-every", "1700",
                            "--kill-under-load", "2", "--fsck",
                            "--image-size", "128M", "--workdir", workdir, "-q"],
                           capture_output=True, text=True, timeout=600)
        out = r.stdout + r.stderr
        summary = [line for line in out.splitlines() if line.startswith("difftest: seed")]
        assert summary, f"no summary from difftest:\n{out[-5000:]}"
        assert r.returncode == 0, f"difftest found mismatches (exit {r.returncode}):\n" \
                                  f"{out[-12000:]}"
        # remounts at 900 and 1800, the crash at 1700 (800 operations in the
        # log it recovers), two kills under load, and the final remount
        assert "2000 operations" in summary[0], out[-5000:]
        assert "3 remount(s), 3 crash-recover(ies)" in summary[0], out[-5000:]
    finally:
        subprocess.run(["fusermount3", "-u", "-z", os.path.join(workdir, "mnt")],
                       capture_output=True)
        dt.wipe(workdir)


# ---------------------------------------------------------------------------
# concurrency, big directories, readdir during changes, a full file system
# ---------------------------------------------------------------------------


def test_concurrent_subtrees(pmfs_mount, ref_dir):
    """Four threads each run random operations in their own subtree, so
    pmfs serves interleaved requests; every result and every subtree must
    still match the same operations on tmpfs."""
    baseline = _free(pmfs_mount.path)
    engines = [dt.Engine(os.path.join(pmfs_mount.path, f"c{i}"),
                         os.path.join(ref_dir, f"c{i}")) for i in range(4)]
    for e in engines:
        e.reset()
    errors = []

    def worker(i, eng):
        rng = random.Random(1000 + i)
        try:
            for k in range(1200):
                o = dt.random_op(rng, eng.handles)
                msg = eng.apply(*o)
                if msg is None and k % 40 == 39:
                    msg = eng.check_tree()
                if msg:
                    errors.append(f"thread {i}, op {k}: {short(msg)}\n  history: " + short(
                        " | ".join(" ".join(map(repr, o)) for o in eng.history[-30:])))
                    return
        except Exception as e:  # report, do not hang the other threads
            errors.append(f"thread {i}: {e!r}")

    threads = [threading.Thread(target=worker, args=(i, e)) for i, e in enumerate(engines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "a worker hangs"
    assert not errors, "\n".join(errors)
    for e in engines:
        assert e.check_tree() is None, short(e.mismatches[-1])
        e.close_all()
        dt.wipe(e.a.root)
        dt.wipe(e.b.root)
    env = Env(pmfs_mount.path, ref_dir)
    env.baseline = baseline
    assert env.settle() == baseline, "blocks or inodes leaked"


def _names(n: int, salt: str) -> list[str]:
    rng = random.Random(salt)
    out = []
    for i in range(n):
        length = rng.choice((1, 2, 8, 30, 100, 200, 255))
        base = f"{salt}{i}-"
        out.append((base + "n" * length)[:max(length, len(base))][:255])
    return out


def _churn_directory(root: str) -> None:
    """Many entries of every name length; deletions make holes that later
    insertions must reuse; renames within and across directories."""
    d = os.path.join(root, "big")
    other = os.path.join(root, "other")
    os.mkdir(d)
    os.mkdir(other)
    names = _names(1000, "x")
    for i, n in enumerate(names):
        p = os.path.join(d, n)
        if i % 10 == 0:
            os.mkdir(p)
        elif i % 10 == 1:
            os.symlink(n, p)
        else:
            with open(p, "wb") as f:
                f.write(n.encode()[: i % 50])
    for i, n in enumerate(names):
        if i % 3 == 0:
            p = os.path.join(d, n)
            (os.rmdir if i % 10 == 0 else os.unlink)(p)
    for n in _names(300, "y"):
        with open(os.path.join(d, n), "wb") as f:
            f.write(b"y")
    for i, n in enumerate(names):
        if i % 7 == 2 and i % 3:
            os.rename(os.path.join(d, n), os.path.join(d, "r" + n[:250]))
        elif i % 11 == 5 and i % 3:
            os.rename(os.path.join(d, n), os.path.join(other, n))


def test_big_directory(pmfs_mount, ref_dir):
    a = os.path.join(pmfs_mount.path, "t")
    b = os.path.join(ref_dir, "t")
    for r in (a, b):
        os.mkdir(r)
        _churn_directory(r)
    sa, sb = dt.snapshot(a), dt.snapshot(b)
    assert not dt.diff_snapshots(sa, sb), "\n".join(dt.diff_snapshots(sa, sb)[:30])
    pmfs_mount.unmount()
    pmfs_mount.mount()
    sa = dt.snapshot(a)
    assert not dt.diff_snapshots(sa, sb), "after remount:\n" + "\n".join(
        dt.diff_snapshots(sa, sb)[:30])
    # and empty again: everything can be removed, the space comes back
    dt.wipe(a)
    assert os.listdir(pmfs_mount.path) == ["lost+found"]


def _readdir_during_changes(d: str) -> dict:
    """Iterate a directory while deleting and adding entries; POSIX: every
    entry neither removed nor added meanwhile is returned exactly once."""
    names = sorted(os.listdir(d))
    rng = random.Random(7)
    removed, added, seen = set(), set(), []
    with os.scandir(d) as it:
        for k, e in enumerate(it):
            seen.append(e.name)
            if k % 25 == 10:
                for n in rng.sample([n for n in names if n not in removed], 8):
                    os.unlink(os.path.join(d, n))
                    removed.add(n)
                for j in range(8):
                    n = f"new-{k}-{j}-" + "q" * rng.choice((1, 50, 200))
                    open(os.path.join(d, n), "w").close()
                    added.add(n)
    stable = set(names) - removed
    dup = sorted(n for n in set(seen) if seen.count(n) > 1)
    missing = sorted(stable - set(seen))
    bogus = sorted(set(seen) - set(names) - added)
    return {"duplicates": dup, "missing": missing, "never existed": bogus}


def test_readdir_while_the_directory_changes(pmfs_mount, ref_dir):
    for root in (os.path.join(ref_dir, "t"), os.path.join(pmfs_mount.path, "t")):
        os.mkdir(root)
        for n in _names(700, "z"):
            open(os.path.join(root, n), "w").close()
        res = _readdir_during_changes(root)
        assert res == {"duplicates": [], "missing": [], "never existed": []}, \
            f"{'pmfs' if root.startswith(pmfs_mount.path) else 'tmpfs'}: {res}"


def test_full_file_system(shm_dir):
    """ENOSPC: writes stop short at the last free block, nothing leaks, and
    freeing brings every block and inode back (also after a remount)."""
    image = os.path.join(shm_dir, "small.img")
    mkfs(image, "24M", "-N", "512")
    m = PmfsMount(image, os.path.join(shm_dir, "mnt"))
    m.mount()
    try:
        root = m.path
        keep = os.path.join(root, "keep")
        with open(keep, "wb") as f:
            f.write(b"k" * 10000)
        base = _free(root)
        # inodes: create empty files until the inode table is full
        many = os.path.join(root, "many")  # removed after: its blocks come back
        os.mkdir(many)
        made = []
        while True:
            q = os.path.join(many, f"e{len(made)}")
            try:
                open(q, "w").close()
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
            made.append(q)
            assert len(made) < 2000, "more files than inodes"
        assert os.statvfs(root).f_ffree == 0, "ENOSPC with free inodes left"
        assert len(made) >= 400
        for q in made:
            os.unlink(q)
        os.rmdir(many)
        env = Env(root, root)
        env.baseline = base
        assert env.settle() == base, "blocks or inodes not given back after inode ENOSPC"
        # blocks: one file grows until the data area is full
        p = os.path.join(root, "fill")
        written = 0
        chunk = bytes(range(256)) * 4096  # 1 MiB
        fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    n = os.write(fd, chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
                assert n > 0
                written += n
                if n < len(chunk):
                    # a short write; the next one must fail with ENOSPC
                    with pytest.raises(OSError) as e:
                        os.write(fd, chunk)
                    assert e.value.errno == errno.ENOSPC
                    break
        finally:
            os.close(fd)
        assert written > 10 << 20
        assert os.stat(p).st_size == written
        s = os.statvfs(root)
        assert s.f_bavail * s.f_frsize < 1 << 20, "ENOSPC with free space left"
        with open(p, "rb") as f:
            data = f.read()
        assert len(data) == written and data == (chunk * (written // len(chunk) + 1))[:written]
        # metadata operations work or fail cleanly while full
        for i in range(50):
            try:
                os.mkdir(os.path.join(root, f"d{i}"))
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
        for i in range(50):
            if os.path.isdir(os.path.join(root, f"d{i}")):
                os.rmdir(os.path.join(root, f"d{i}"))
        os.unlink(p)
        env = Env(root, root)
        env.baseline = base
        assert env.settle() == base, "blocks or inodes not given back after ENOSPC"
        m.unmount()
        m.mount()
        assert _free(root) == base
        with open(keep, "rb") as f:
            assert f.read() == b"k" * 10000
    finally:
        m.unmount()
    log = m.log_text()
    assert "Traceback" not in log, log
