"""The daemon killed (SIGKILL) or stopped (SIGTERM) at bad moments.

* tools/killtest, bounded for CI: a mixed workload in worker processes, the
  daemon SIGKILLed at a random moment, five times; after each kill
  `fsck.pmfs -n` is clean, the remount recovers, every operation that
  returned is there bit for bit, `fsck.pmfs -f -n` is clean;
* the checker of killtest itself: a fault injected after recovery (a lost
  file, a changed byte) is reported and fails the run;
* SIGKILL again and again while the daemon starts (marks the image mounted,
  replays the log, frees orphans): every attempt leaves an image fsck
  accepts, and the last mount has everything;
* SIGTERM under load: the daemon unmounts cleanly, the image is marked
  clean, and every write that returned is there.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import PmfsMount, fuse_available, fuse_mounted, mkfs, prog
from pmfs.layout import SB_CLEAN
from pmfs.pmem import open_image
from pmfs.superblock import SuperblockManager

pytestmark = pytest.mark.fuse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLTEST = os.path.join(ROOT, "tools", "killtest")


def killtest(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    if not fuse_available():
        pytest.fail("FUSE is not available (/dev/fuse, fusermount3)")
    return subprocess.run([sys.executable, KILLTEST, *args], capture_output=True, text=True,
                          timeout=timeout)


def fsck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([prog("fsck.pmfs"), *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def superblock(image: str):
    img = open_image(image, readonly=True)
    try:
        return SuperblockManager(img).load()
    finally:
        img.close()


def no_killtest_leftovers(out: str) -> None:
    """Nothing of the run stays mounted."""
    work = [ln.rsplit(" ", 1)[1] for ln in out.splitlines()
            if ln.startswith("killtest: working in ")]
    assert len(work) == 1, out
    with open("/proc/self/mounts") as f:
        assert work[0] + "/" not in f.read(), f"killtest left a mount in {work[0]}"


# --------------------------------------------------------------------------
# killtest
# --------------------------------------------------------------------------


def test_killtest_ci():
    seed = os.environ.get("KILLTEST_SEED", str(random.randrange(1 << 31)))
    r = killtest("--seed", seed, "--rounds", "5", "--duration-per-round", "1.5",
                 "--workers", "3", "--image-size", "64M")
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"killtest --seed {seed} found violations:\n{out}"
    assert "0 violation(s)" in out, out
    assert out.count("recovery replayed") == 5, out
    returned = int(out.rsplit(" rounds, ", 1)[1].split(" operations returned")[0])
    assert returned > 200, out
    assert "Traceback" not in out
    no_killtest_leftovers(out)


@pytest.mark.parametrize("fault,expect", [("unlink", "file lost"),
                                          ("flip", "content differs"),
                                          ("intruder", "appeared")])
def test_killtest_reports_a_violation(fault, expect):
    r = killtest("--seed", "5", "--rounds", "1", "--duration-per-round", "0.5",
                 "--workers", "2", "--inject", fault)
    out = r.stdout + r.stderr
    work = [ln.rsplit(" ", 1)[1] for ln in out.splitlines()
            if ln.startswith("killtest: working in ")]
    try:
        assert r.returncode == 1, out
        injected = [ln for ln in out.splitlines() if "injected a fault" in ln]
        assert len(injected) == 1, out
        victim = injected[0].rsplit(" ", 1)[1] if fault != "intruder" else "/intruder"
        viol = [ln for ln in out.splitlines() if ln.startswith("VIOLATION")]
        assert viol and all(victim in v for v in viol), out
        assert any(expect in v for v in viol), out
        assert f"{len(viol)} violation(s)" in out
        # the evidence is kept
        assert f"kept in {work[0]}" in out
        assert os.path.exists(os.path.join(work[0], "fs.img"))
        no_killtest_leftovers(out)
    finally:
        for w in work:
            subprocess.run(["rm", "-rf", "--one-file-system", w])


def test_killtest_usage():
    r = killtest("--rounds", "0")
    assert r.returncode == 2 and "must be positive" in r.stderr, r.stderr
    r = killtest("--bogus")
    assert r.returncode == 2


def load_killtest():
    loader = importlib.machinery.SourceFileLoader("pmfs_killtest", KILLTEST)
    spec = importlib.util.spec_from_loader("pmfs_killtest", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def test_killtest_model_of_a_write_cut_short():
    """A write the kill cut short (the kernel split it at a page boundary:
    write() returned the count of the first request, the second died with
    the daemon -- or was applied just before) may leave the rest either
    way; nothing else about the file is uncertain."""
    kt = load_killtest()
    m = kt.Model("w0")
    m.apply(["create", "w0/f"], None)
    m.apply(["write", "w0/f", 0, 8192, "a"], 8192)
    m.apply(["fsync", "w0/f"], None)
    op = ["write", "w0/f", 4000, 4096, "b"]
    m.apply(op, 96)  # 4000 + 96 = 4096: the first page only
    a, b = kt.data_for("a", 8192), kt.data_for("b", 4096)
    part = a[:4000] + b[:96] + a[4096:]
    full = a[:4000] + b + a[8096:]

    def obs(data):
        return {"w0": ("d", 1, 2), "w0/f": ("f", 2, 1, data, {}, len(data))}
    assert kt.compare(m, obs(part)) == []
    assert kt.compare(m, obs(full)) == []
    # a byte neither old nor new, the first part lost, or the size changed
    bad = bytearray(full)
    bad[5000] ^= 0xFF
    assert kt.compare(m, obs(bytes(bad)))
    assert kt.compare(m, obs(a))
    assert kt.compare(m, obs(full + b"x"))
    # an operation in flight on top of the cut write: every version counts
    cands = m.uncertain(["write", "w0/f", 8192, 100, "c"])
    c = kt.data_for("c", 100)
    assert [kt.compare(x, obs(part + c)) for x in cands] == [[]]
    assert [kt.compare(x, obs(full + c)) for x in cands] == [[]]
    # a write that returned in full ends the uncertainty
    m.apply(["truncate", "w0/f", 100], None)
    assert kt.compare(m, obs(part[:100])) == []
    assert kt.compare(m, obs(full[:100] + b"\0"))


def test_killtest_model_of_fallocate_and_copy_file_range():
    """fallocate's modes and copy_file_range in killtest's model: what
    returned is exact; in flight, each byte of the target either way."""
    kt = load_killtest()
    m = kt.Model("w0")
    m.apply(["create", "w0/f"], None)
    m.apply(["create", "w0/g"], None)
    a = kt.data_for("a", 10000)
    m.apply(["write", "w0/f", 0, 10000, "a"], 10000)

    def data(p):
        return m.inodes[m.names[p][1]]["data"]
    m.apply(["fallocate", "w0/f", 1, 9000, 5000], None)      # keep size: nothing
    assert data("w0/f") == a
    m.apply(["fallocate", "w0/f", 3, 100, 200], None)        # punch
    assert data("w0/f") == a[:100] + bytes(200) + a[300:]
    m.apply(["fallocate", "w0/f", 0x11, 9990, 50], None)     # zero range, keep size
    assert data("w0/f") == a[:100] + bytes(200) + a[300:9990] + bytes(10)
    m.apply(["fallocate", "w0/f", 0x10, 9000, 2000], None)   # zero range, grows
    assert len(data("w0/f")) == 11000 and data("w0/f")[9000:] == bytes(2000)
    m.apply(["fallocate", "w0/f", 0, 12000, 1], None)        # preallocate, grows
    f = data("w0/f")
    assert f == a[:100] + bytes(200) + a[300:9000] + bytes(3001)
    # copies: a short one at the source's end, and one past it (nothing)
    m.apply(["copy", "w0/f", "w0/g", 0, 50, 400], 400)
    assert data("w0/g") == bytes(50) + f[:400]
    m.apply(["copy", "w0/f", "w0/g", 12000, 1000, 100], 1)
    assert data("w0/g") == bytes(50) + f[:400] + bytes(550) + f[12000:]
    m.apply(["copy", "w0/f", "w0/g", 20000, 5000, 100], 0)
    assert len(data("w0/g")) == 1001
    g = data("w0/g")

    def obs(fd, gd):
        return {"w0": ("d", 1, 2), "w0/f": ("f", 2, 1, fd, {}, len(fd)),
                "w0/g": ("f", 3, 1, gd, {}, len(gd))}
    assert kt.compare(m, obs(f, g)) == []
    # in flight: a punch half done (its edge zeroed in place, the rest not)
    cands = m.uncertain(["fallocate", "w0/f", 3, 5000, 5000])
    half = f[:5000] + bytes(100) + f[5100:]
    assert any(kt.compare(c, obs(half, g)) == [] for c in cands)
    assert all(kt.compare(c, obs(half[:-1], g)) for c in cands)  # never a new size
    # a copy in flight: any mix of the old and new bytes of the target
    cands = m.uncertain(["copy", "w0/f", "w0/g", 300, 0, 500])
    mix = f[300:400] + g[100:]
    assert any(kt.compare(c, obs(f, mix)) == [] for c in cands)
    assert all(kt.compare(c, obs(f, mix[:100] + b"?" + mix[101:])) for c in cands)


# --------------------------------------------------------------------------
# SIGKILL during start-up
# --------------------------------------------------------------------------


def test_sigkill_during_startup_again_and_again(shm_dir):
    if not fuse_available():
        pytest.fail("FUSE is not available (/dev/fuse, fusermount3)")
    image = os.path.join(shm_dir, "fs.img")
    mkfs(image, "64M")
    mnt = os.path.join(shm_dir, "mnt")
    m = PmfsMount(image, mnt)
    m.mount()
    keep = {}
    fds = []
    try:
        for i in range(10):
            data = os.urandom(10000 + i)
            with open(os.path.join(mnt, f"keep{i}"), "wb") as f:
                f.write(data)
            keep[f"keep{i}"] = data
        # orphans for the next mount to free: unlinked, still open, big and
        # fragmented (many extents to free)
        for i in range(3):
            p = os.path.join(mnt, f"orphan{i}")
            fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
            for b in range(0, 2000, 2):
                os.pwrite(fd, b"o" * 4096, b * 4096)
            os.unlink(p)
            fds.append(fd)
        free_before_orphans = os.statvfs(mnt).f_bfree
    finally:
        m.kill()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
    assert not superblock(image).state & SB_CLEAN
    rng = random.Random(1)
    for attempt in range(8):
        delay = rng.uniform(0.0, 0.6)
        env = dict(os.environ)
        proc = subprocess.Popen([prog("mount.pmfs"), image, mnt, "-f", "-o",
                                 f"log={image}.log"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=env)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        proc.stderr.close()
        if fuse_mounted(mnt):
            if subprocess.run(["fusermount3", "-u", mnt], capture_output=True).returncode:
                subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        assert not fuse_mounted(mnt)
        r = fsck("-n", image)
        assert r.returncode == 0 and "0 errors found" in r.stdout, \
            f"attempt {attempt} (killed after {delay:.3f} s): fsck -n exit " \
            f"{r.returncode}\n{r.stdout}{r.stderr}"
    m.mount()
    try:
        for name, data in keep.items():
            with open(os.path.join(mnt, name), "rb") as f:
                assert f.read() == data, name
        assert not [n for n in os.listdir(mnt) if n.startswith("orphan")]
        # the orphans' blocks came back
        assert os.statvfs(mnt).f_bfree >= free_before_orphans + 3 * 1000
    finally:
        assert m.unmount() == 0
    log = m.log_text()
    assert "Traceback" not in log and " ERROR" not in log, log
    r = fsck("-f", "-n", image)
    assert r.returncode == 0 and "0 errors found" in r.stdout, r.stdout + r.stderr


# --------------------------------------------------------------------------
# SIGTERM under load
# --------------------------------------------------------------------------

WRITER = r'''
import os, sys
mnt, journal = sys.argv[1], sys.argv[2]
dfd = os.open(mnt, os.O_RDONLY)  # survives a lazy unmount: no writes to the
j = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # directory below
i = 0
while True:
    try:
        fd = os.open(f"f{i % 20}", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644, dir_fd=dfd)
        try:
            os.write(fd, b"%08d\n" % i)
        finally:
            os.close(fd)
        if i % 7 == 0:
            os.rename(f"f{i % 20}", f"f{i % 20}", src_dir_fd=dfd, dst_dir_fd=dfd)
    except OSError as e:
        os.write(j, b"E %d %d\n" % (i, e.errno))
        break
    os.write(j, b"%d\n" % i)
    i += 1
'''


def test_sigterm_under_load(shm_dir):
    if not fuse_available():
        pytest.fail("FUSE is not available (/dev/fuse, fusermount3)")
    image = os.path.join(shm_dir, "fs.img")
    mkfs(image, "64M")
    mnt = os.path.join(shm_dir, "mnt")
    journal = os.path.join(shm_dir, "journal")
    m = PmfsMount(image, mnt)
    m.mount()
    w = subprocess.Popen([sys.executable, "-c", WRITER, mnt, journal])
    try:
        time.sleep(1.0)
        m.proc.send_signal(signal.SIGTERM)
        rc = m.proc.wait(timeout=30)
        w.wait(timeout=30)
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
        m.unmount()
    assert rc == 0
    assert not fuse_mounted(mnt)
    log = m.log_text()
    assert "signal 15: unmounting" in log and "cleanly unmounted" in log, log
    assert "Traceback" not in log
    sb = superblock(image)
    assert sb.state & SB_CLEAN and not sb.owner_pid
    r = fsck("-n", image)  # marked clean: the quick check
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr
    r = fsck("-f", "-n", image)
    assert r.returncode == 0 and "0 errors found" in r.stdout, r.stdout + r.stderr
    with open(journal) as f:
        lines = f.read().splitlines()
    done = [int(x) for x in lines if not x.startswith("E")]
    assert done == list(range(len(done))) and len(done) > 50
    m.mount()
    try:
        got = set()
        for k in range(20):
            p = os.path.join(mnt, f"f{k}")
            if os.path.exists(p):
                with open(p, "rb") as f:
                    got.update(int(x) for x in f.read().split())
    finally:
        assert m.unmount() == 0
    missing = set(done) - got
    assert not missing, f"returned writes lost at SIGTERM: {sorted(missing)[:10]}"
    # at most the write in flight at the signal is there besides
    assert got <= set(done) | {len(done)}
