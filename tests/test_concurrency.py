"""Load and concurrency through a real mount.

Many processes work on one mount at once: creates, renames and unlinks in
shared directories, contended names, directory moves, mkdir/rmdir races,
writers to distinct files and to one file (disjoint and overlapping
ranges), readers during writes, readdir during churn, open-unlink races.
Each test checks that nothing deadlocks (every wait has a deadline), that
nothing is lost (the final tree equals what the workers' own logs imply)
and that fsck.pmfs -f -n finds the image clean after unmount.  The last
test runs tools/soak for 15 s.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import multiprocessing
import os
import random
import struct
import subprocess
import sys
import time

import pytest

from conftest import PmfsMount, fuse_available, mkfs, prog

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(240)]

CTX = multiprocessing.get_context("fork")
WORKER_TIMEOUT = 120  # seconds: a worker pool not done by then is deadlocked
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def fsck_clean(image: str) -> None:
    r = subprocess.run([prog("fsck.pmfs"), "-f", "-n", image], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"fsck.pmfs -f -n: rc {r.returncode}\n{r.stdout}\n{r.stderr}"


@contextlib.contextmanager
def mounted(shm_dir: str, size: str = "256M", options: str = ""):
    """A fresh image mounted; on the way out: unmounted, no traceback in the
    daemon log, fsck clean."""
    if not fuse_available():
        pytest.fail("FUSE is not available")
    image = os.path.join(shm_dir, "fs.img")
    mkfs(image, size)
    m = PmfsMount(image, os.path.join(shm_dir, "mnt"), options)
    m.mount()
    ok = False
    try:
        yield m
        ok = True
    finally:
        m.unmount()
    log = m.log_text()
    assert "Traceback" not in log, f"daemon logged a traceback:\n{log}"
    if ok:
        fsck_clean(image)


def run_workers(fn, argsets, timeout: float = WORKER_TIMEOUT) -> list:
    """Run fn(*args) for every args in its own process, all at once; results
    in order.  A worker still running after `timeout` is a deadlock."""
    pool = CTX.Pool(len(argsets))
    try:
        res = pool.starmap_async(fn, argsets)
        try:
            out = res.get(timeout)
        except multiprocessing.TimeoutError:
            pytest.fail(f"workers did not finish in {timeout} s: deadlock or livelock")
        pool.close()
        pool.join()
        return out
    finally:
        pool.terminate()


def _wrap(q, key, fn, args):
    try:
        q.put((key, True, fn(*args)))
    except BaseException:
        import traceback
        q.put((key, False, traceback.format_exc()))


class Procs:
    """Processes that share (by fork) values such as a stop flag."""

    def __init__(self):
        self.q = CTX.Queue()
        self.procs = []
        self.results = {}

    def start(self, key, fn, *args) -> None:
        p = CTX.Process(target=_wrap, args=(self.q, key, fn, args), daemon=True)
        p.start()
        self.procs.append(p)

    def wait(self, keys, timeout: float = WORKER_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while not set(keys) <= set(self.results):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"processes {sorted(set(keys) - set(self.results))} did not "
                            f"finish in {timeout} s: deadlock")
            try:
                key, ok, res = self.q.get(timeout=min(left, 1.0))
            except Exception:
                continue
            assert ok, f"process {key} failed:\n{res}"
            self.results[key] = res
        return {k: self.results[k] for k in keys}

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join()


def read_file(p: str) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def tree(base: str) -> dict:
    """{relative path: content (files) or None (directories)}."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for n in dirnames:
            out[os.path.relpath(os.path.join(dirpath, n), base)] = None
        for n in filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, base)] = read_file(p)
    return out


def errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno))


# ---------------------------------------------------------------------------
# names: creates, renames, unlinks in shared directories
# ---------------------------------------------------------------------------

SHARED_DIRS = ["d0", "d1", "d2", "d3"]


def _names_worker(base: str, wid: int, nops: int, seed: int) -> dict:
    """Own names (prefix w<id>_) in shared directories; returns the model
    {relative path: content} and checks its own view of each directory."""
    rng = random.Random(seed)
    model: dict[str, bytes] = {}
    serial = 0
    for i in range(nops):
        op = rng.random()
        if op < 0.35 or not model:
            serial += 1
            rel = f"{rng.choice(SHARED_DIRS)}/w{wid}_{serial}"
            data = f"{rel} v0 ".encode() * rng.randint(1, 300)
            with open(os.path.join(base, rel), "xb") as f:
                f.write(data)
            model[rel] = data
        elif op < 0.6:
            src = rng.choice(sorted(model))
            serial += 1
            dst = f"{rng.choice(SHARED_DIRS)}/w{wid}_{serial}"
            if rng.random() < 0.3 and len(model) > 1:
                dst = rng.choice(sorted(model))  # replace one of my own files
            os.rename(os.path.join(base, src), os.path.join(base, dst))
            if src != dst:
                model[dst] = model.pop(src)
        elif op < 0.8:
            rel = rng.choice(sorted(model))
            os.unlink(os.path.join(base, rel))
            del model[rel]
        elif op < 0.9:
            rel = rng.choice(sorted(model))
            data = f"{rel} v{i} ".encode() * rng.randint(0, 100)
            with open(os.path.join(base, rel), "wb") as f:
                f.write(data)
            model[rel] = data
        else:
            d = rng.choice(SHARED_DIRS)
            mine = sorted(n for n in os.listdir(os.path.join(base, d))
                          if n.startswith(f"w{wid}_"))
            want = sorted(r.split("/")[1] for r in model if r.startswith(d + "/"))
            assert mine == want, f"worker {wid}: listing of {d} {mine} != model {want}"
        if rng.random() < 0.1 and model:
            rel = rng.choice(sorted(model))
            assert read_file(os.path.join(base, rel)) == model[rel], rel
    return model


def test_parallel_creates_renames_unlinks_in_shared_dirs(shm_dir):
    with mounted(shm_dir) as m:
        base = m.path
        for d in SHARED_DIRS:
            os.mkdir(os.path.join(base, d))
        models = run_workers(_names_worker, [(base, w, 400, 1000 + w) for w in range(6)])
        want = {d: None for d in SHARED_DIRS}
        want["lost+found"] = None
        for mdl in models:
            want.update(mdl)
        got = tree(base)
        assert sorted(got) == sorted(want)
        bad = [k for k in want if got[k] != want[k]]
        assert bad == [], bad[:10]
        for d in SHARED_DIRS:
            assert os.stat(os.path.join(base, d)).st_nlink == 2
        assert sum(len(mdl) for mdl in models) > 100
        m.unmount()
        m.mount()
        assert tree(base) == got


# ---------------------------------------------------------------------------
# contended names: exactly one winner
# ---------------------------------------------------------------------------

def _barrier(bdir: str, wid: int, phase: int, nworkers: int, timeout: float = 60) -> None:
    """Wait until every worker has finished `phase` (marker files outside
    the mount)."""
    open(os.path.join(bdir, f"{phase}.{wid}"), "w").close()
    deadline = time.monotonic() + timeout
    while sum(1 for f in os.listdir(bdir) if f.startswith(f"{phase}.")) < nworkers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"barrier {phase}: the other workers never came")
        time.sleep(0.005)


def _contend_worker(base: str, wid: int, n: int, seed: int, bdir: str,
                    nworkers: int) -> dict:
    """Every worker races every other for each name, phase by phase (all
    create, then all link and rename, then all unlink and rmdir): a name
    renamed away in phase 2 must not be created again by a worker still in
    phase 1, hence the barriers."""
    rng = random.Random(seed)
    order = list(range(n))
    log = {"created": [], "mkdir": [], "renamed": [], "unlinked": [], "rmdir": [],
           "linked": [], "errors": []}

    def attempt(kind, fn, ok_errnos):
        try:
            fn()
            return True
        except OSError as e:
            if e.errno not in ok_errnos:
                log["errors"].append(f"{kind}: {errname(e)}")
            return False

    rng.shuffle(order)
    for i in order:
        def create(i=i):
            fd = os.open(os.path.join(base, "f", f"n{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                         0o644)
            os.write(fd, b"%d" % wid)
            os.close(fd)
        if attempt("create", create, (errno.EEXIST,)):
            log["created"].append(i)
        if attempt("mkdir", lambda i=i: os.mkdir(os.path.join(base, "d", f"n{i}")),
                   (errno.EEXIST,)):
            log["mkdir"].append(i)
    _barrier(bdir, wid, 1, nworkers)
    rng.shuffle(order)
    for i in order:
        if attempt("link", lambda i=i: os.link(os.path.join(base, "f", f"n{i}"),
                                               os.path.join(base, "l", f"n{i}")),
                   (errno.EEXIST, errno.ENOENT)):
            log["linked"].append(i)
        if attempt("rename", lambda i=i: os.rename(os.path.join(base, "f", f"n{i}"),
                                                   os.path.join(base, "g", f"n{i}.{wid}")),
                   (errno.ENOENT,)):
            log["renamed"].append(i)
    _barrier(bdir, wid, 2, nworkers)
    rng.shuffle(order)
    for i in order:
        for w in range(8):
            if attempt("unlink", lambda i=i, w=w: os.unlink(
                    os.path.join(base, "g", f"n{i}.{w}")), (errno.ENOENT,)):
                log["unlinked"].append((i, w))
        if attempt("rmdir", lambda i=i: os.rmdir(os.path.join(base, "d", f"n{i}")),
                   (errno.ENOENT,)):
            log["rmdir"].append(i)
    return log


def test_contended_names_have_exactly_one_winner(shm_dir):
    n = 150
    with mounted(shm_dir) as m:
        base = m.path
        for d in "fdgl":
            os.mkdir(os.path.join(base, d))
        bdir = os.path.join(shm_dir, "barrier")
        os.mkdir(bdir)
        logs = run_workers(_contend_worker, [(base, w, n, 7 * w, bdir, 6) for w in range(6)])
        assert [e for lg in logs for e in lg["errors"]] == []
        for kind in ("created", "mkdir", "renamed", "rmdir"):
            got = sorted(i for lg in logs for i in lg[kind])
            assert got == list(range(n)), f"{kind}: not exactly one winner per name"
        unl = sorted(x for lg in logs for x in lg["unlinked"])
        assert len(unl) == n and len(set(unl)) == n
        # who renamed name i is who unlinked it: the renamed name is unique
        renamer = {i: w for w, lg in enumerate(logs) for i in lg["renamed"]}
        assert dict(unl) == renamer
        # the hard links: exactly one per name that existed when tried, and
        # they keep the creator's content
        creator = {i: w for w, lg in enumerate(logs) for i in lg["created"]}
        linked = sorted(i for lg in logs for i in lg["linked"])
        assert len(linked) == len(set(linked))
        for i in linked:
            p = os.path.join(base, "l", f"n{i}")
            assert read_file(p) == b"%d" % creator[i]
            assert os.stat(p).st_nlink == 1
        assert sorted(os.listdir(os.path.join(base, "l"))) == sorted(f"n{i}" for i in linked)
        for d in "fdg":
            assert os.listdir(os.path.join(base, d)) == []
        assert os.stat(os.path.join(base, "d")).st_nlink == 2


# ---------------------------------------------------------------------------
# rename races between directories
# ---------------------------------------------------------------------------

TOKEN_DIRS = ["a", "b", "c", "d", "e"]


def _token_worker(base: str, ntok: int, nops: int, seed: int) -> list:
    """Move tokens between directories, guessing where they are; returns the
    successful moves (token, from, to)."""
    rng = random.Random(seed)
    moves = []
    for _ in range(nops):
        t = rng.randrange(ntok)
        src, dst = rng.sample(TOKEN_DIRS, 2)
        try:
            os.rename(os.path.join(base, src, f"t{t}"), os.path.join(base, dst, f"t{t}"))
            moves.append((t, src, dst))
        except FileNotFoundError:
            pass
    return moves


def test_rename_races_between_directories(shm_dir):
    """Tokens move between directories: each ends in exactly one place with
    its content, and the successful moves of each token form a path from
    its first directory to its last (no move lost or doubled)."""
    ntok = 40
    with mounted(shm_dir) as m:
        base = m.path
        for d in TOKEN_DIRS:
            os.mkdir(os.path.join(base, d))
        for t in range(ntok):
            with open(os.path.join(base, "a", f"t{t}"), "wb") as f:
                f.write(b"token %d\n" % t)
        logs = run_workers(_token_worker, [(base, ntok, 800, 50 + w) for w in range(6)])
        where = {}
        for d in TOKEN_DIRS:
            for n in os.listdir(os.path.join(base, d)):
                assert n not in where, f"{n} in two directories"
                where[n] = d
                assert read_file(os.path.join(base, d, n)) == b"token %s\n" % n[1:].encode()
        assert sorted(where) == sorted(f"t{t}" for t in range(ntok))
        total = 0
        for t in range(ntok):
            bal = {d: 0 for d in TOKEN_DIRS}
            for lg in logs:
                for tok, src, dst in lg:
                    if tok == t:
                        bal[src] -= 1
                        bal[dst] += 1
                        total += 1
            want = {d: 0 for d in TOKEN_DIRS}
            want["a"] -= 1
            want[where[f"t{t}"]] += 1
            assert bal == want, f"token {t}: moves do not add up"
        assert total > 500


def _dirmove_worker(base: str, ndirs: int, nops: int, seed: int) -> int:
    rng = random.Random(seed)
    ok = 0
    for _ in range(nops):
        paths = {}
        for dirpath, dirnames, _f in os.walk(base):
            for n in dirnames:
                if n.startswith("D"):
                    paths[n] = os.path.join(dirpath, n)
        if len(paths) < 2:
            continue  # the walk can miss directories moved while it runs
        a, b = rng.sample(sorted(paths), 2)
        dst = base if rng.random() < 0.2 else paths[b]
        try:
            os.rename(paths[a], os.path.join(dst, a))
            ok += 1
        except OSError as e:
            # stale guesses and the kernel's loop check
            assert e.errno in (errno.ENOENT, errno.EINVAL, errno.ENOTEMPTY, errno.EEXIST,
                               errno.EBUSY), errname(e)
    return ok


def test_directory_moves_never_make_loops(shm_dir):
    ndirs = 10
    with mounted(shm_dir) as m:
        base = m.path
        for i in range(ndirs):
            os.mkdir(os.path.join(base, f"D{i}"))
            with open(os.path.join(base, f"D{i}", "id"), "w") as f:
                f.write(str(i))
        oks = run_workers(_dirmove_worker, [(base, ndirs, 150, w) for w in range(5)])
        assert sum(oks) > 50
        found = {}
        for dirpath, dirnames, filenames in os.walk(base):
            name = os.path.basename(dirpath)
            if name.startswith("D"):
                assert name not in found
                found[name] = dirpath
                assert filenames == ["id"]
                assert read_file(os.path.join(dirpath, "id")) == name[1:].encode()
                subs = [n for n in dirnames if n.startswith("D")]
                assert os.stat(dirpath).st_nlink == 2 + len(subs)
        assert sorted(found) == sorted(f"D{i}" for i in range(ndirs))
        top = [n for n in os.listdir(base) if n.startswith("D")]
        assert os.stat(base).st_nlink == 2 + len(top) + 1  # + lost+found
        for p in found.values():  # ".." of each names its real parent
            assert os.stat(os.path.join(p, "..")).st_ino == \
                os.stat(os.path.dirname(p)).st_ino


# ---------------------------------------------------------------------------
# mkdir/rmdir races
# ---------------------------------------------------------------------------

def _mkdir_worker(base: str, wid: int, k: int, nops: int, seed: int) -> dict:
    rng = random.Random(seed)
    mk = [0] * k
    rm = [0] * k
    files = 0
    for _ in range(nops):
        j = rng.randrange(k)
        p = os.path.join(base, f"x{j}")
        r = rng.random()
        if r < 0.4:
            try:
                os.mkdir(p)
                mk[j] += 1
            except FileExistsError:
                pass
        elif r < 0.8:
            try:
                os.rmdir(p)
                rm[j] += 1
            except OSError as e:
                assert e.errno in (errno.ENOENT, errno.ENOTEMPTY), errname(e)
        else:
            f = os.path.join(p, f"f{wid}")
            try:
                fd = os.open(f, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
            except FileNotFoundError:
                continue
            os.write(fd, b"x")
            os.close(fd)
            os.mkdir(f + ".d")
            assert os.listdir(f + ".d") == []
            os.rmdir(f + ".d")
            os.unlink(f)  # the directory cannot go while the file is in it
            files += 1
    return {"mk": mk, "rm": rm, "files": files}


def test_mkdir_rmdir_races(shm_dir):
    k = 6
    with mounted(shm_dir) as m:
        base = m.path
        res = run_workers(_mkdir_worker, [(base, w, k, 500, 300 + w) for w in range(6)])
        exist = set(os.listdir(base)) - {"lost+found"}
        for j in range(k):
            made = sum(r["mk"][j] for r in res)
            removed = sum(r["rm"][j] for r in res)
            assert made - removed == (1 if f"x{j}" in exist else 0), (j, made, removed)
        assert sum(r["files"] for r in res) > 50
        for n in exist:
            assert os.listdir(os.path.join(base, n)) == []
            assert os.stat(os.path.join(base, n)).st_nlink == 2
        assert os.stat(base).st_nlink == 2 + len(exist) + 1


# ---------------------------------------------------------------------------
# writers: distinct files, one file with disjoint ranges, overlapping writes
# ---------------------------------------------------------------------------

def _pattern(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(16) * (n // 16) + rng.randbytes(n % 16)


def _file_worker(path: str, nops: int, seed: int) -> bytes:
    rng = random.Random(seed)
    model = bytearray()
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        for _ in range(nops):
            r = rng.random()
            if r < 0.6:
                off = rng.randrange(0, 2 << 20)
                data = _pattern(rng, rng.choice([1, 100, 4096, 5000, 65536, 300_000]))
                assert os.pwrite(fd, data, off) == len(data)
                if off + len(data) > len(model):
                    model.extend(bytes(off + len(data) - len(model)))
                model[off:off + len(data)] = data
            elif r < 0.75:
                size = rng.randrange(0, 2 << 20)
                os.ftruncate(fd, size)
                if size < len(model):
                    del model[size:]
                else:
                    model.extend(bytes(size - len(model)))
            elif r < 0.8:
                os.fsync(fd)
            else:
                off = rng.randrange(0, max(1, len(model)))
                n = rng.randrange(1, 200_000)
                assert os.pread(fd, n, off) == bytes(model[off:off + n])
        assert os.fstat(fd).st_size == len(model)
    finally:
        os.close(fd)
    assert read_file(path) == model
    return bytes(model)


def test_parallel_writers_to_distinct_files(shm_dir):
    with mounted(shm_dir, "512M") as m:
        paths = [os.path.join(m.path, f"file{w}") for w in range(6)]
        models = run_workers(_file_worker, [(p, 150, 77 + w) for w, p in enumerate(paths)])
        for p, mdl in zip(paths, models):
            assert read_file(p) == mdl
        m.unmount()
        m.mount()
        for p, mdl in zip(paths, models):
            assert read_file(p) == mdl


RANGE = 50_001  # not a multiple of the page size: neighbours share pages


def _range_worker(path: str, wid: int, nops: int, seed: int) -> tuple:
    rng = random.Random(seed)
    lo = wid * RANGE
    mine = bytearray(RANGE)
    written = bytearray(RANGE)  # 1 where this worker wrote
    fd = os.open(path, os.O_WRONLY)
    maxend = 0
    try:
        for i in range(nops):
            a = rng.randrange(0, RANGE)
            b = min(RANGE, a + rng.choice([1, 7, 512, 4096, 4097, 20000, RANGE]))
            data = _pattern(rng, b - a)
            assert os.pwrite(fd, data, lo + a) == b - a
            mine[a:b] = data
            written[a:b] = b"\1" * (b - a)
            maxend = max(maxend, lo + b)
    finally:
        os.close(fd)
    return bytes(mine), bytes(written), maxend


def test_one_file_disjoint_ranges(shm_dir):
    """Each worker owns a byte range of one file (ranges share pages); the
    file grows concurrently.  Every range ends exactly as its owner wrote
    it, everything never written reads as zeros, and the size is right."""
    nw = 6
    with mounted(shm_dir) as m:
        p = os.path.join(m.path, "shared")
        open(p, "wb").close()
        res = run_workers(_range_worker, [(p, w, 300, 900 + w) for w in range(nw)])
        data = read_file(p)
        assert len(data) == max(r[2] for r in res)
        for w, (mine, written, _e) in enumerate(res):
            got = data[w * RANGE:(w + 1) * RANGE].ljust(RANGE, b"\0")
            want = bytes(c if written[i] else 0 for i, c in enumerate(mine))
            assert got == want, f"range of worker {w} differs"
        m.unmount()
        m.mount()
        assert read_file(p) == data


PAGE = 4096
NPAGES = 96
SUB = 512


def _stamp_page(wid: int, seq: int, page: int) -> bytes:
    return struct.pack("<HHI", wid, page, seq) * (PAGE // 8)


def _overlap_worker(path: str, wid: int, nops: int, seed: int) -> list:
    """Page-aligned writes of 1..16 pages and sub-page writes of 512 bytes,
    every 8-byte word stamped (writer, page, sequence)."""
    rng = random.Random(seed)
    log = []
    fd = os.open(path, os.O_WRONLY)
    try:
        for seq in range(1, nops + 1):
            if rng.random() < 0.7:
                first = rng.randrange(NPAGES)
                n = rng.randint(1, min(16, NPAGES - first))
                buf = b"".join(_stamp_page(wid, seq, first + k) for k in range(n))
                assert os.pwrite(fd, buf, first * PAGE) == len(buf)
                log.append((seq, first, n))
            else:  # a write smaller than a page, in the second half of the file
                slot = rng.randrange(NPAGES * PAGE // SUB)
                buf = struct.pack("<HHI", wid, 0xFFFF, seq) * (SUB // 8)
                assert os.pwrite(fd, buf, NPAGES * PAGE + slot * SUB) == SUB
                log.append((seq, -1 - slot, 1))
    finally:
        os.close(fd)
    return log


def test_one_file_overlapping_writes_are_atomic(shm_dir):
    """Overlapping writes from many processes: every page (and every 512-byte
    sub-page write) holds exactly one write's data, and no two overlapping
    writes are both visible in their common pages (each write atomic)."""
    nw = 6
    with mounted(shm_dir) as m:
        p = os.path.join(m.path, "shared")
        with open(p, "wb") as f:
            f.write(bytes(2 * NPAGES * PAGE))
        logs = run_workers(_overlap_worker, [(p, w, 400, 40 + w) for w in range(nw)])
        data = read_file(p)
        assert len(data) == 2 * NPAGES * PAGE
        writes = {}
        for w, lg in enumerate(logs):
            for seq, first, n in lg:
                writes[(w, seq)] = (first, n)
        page_of = {}
        for pg in range(NPAGES):
            blk = data[pg * PAGE:(pg + 1) * PAGE]
            words = set(struct.unpack_from("<%dQ" % (PAGE // 8), blk))
            assert len(words) == 1, f"page {pg} mixes {len(words)} writes"
            wid, page, seq = struct.unpack("<HHI", blk[:8])
            if (wid, page, seq) == (0, 0, 0):
                continue  # never written
            assert page == pg
            first, n = writes[(wid, seq)]
            assert first <= pg < first + n, f"page {pg}: stamp of a write elsewhere"
            page_of[pg] = (wid, seq)
        for slot in range(NPAGES * PAGE // SUB):
            blk = data[NPAGES * PAGE + slot * SUB:NPAGES * PAGE + (slot + 1) * SUB]
            assert len(set(struct.unpack_from("<%dQ" % (SUB // 8), blk))) == 1, \
                f"sub-page write {slot} torn"
            wid, tag, seq = struct.unpack("<HHI", blk[:8])
            if (wid, tag, seq) != (0, 0, 0):
                assert tag == 0xFFFF and writes[(wid, seq)] == (-1 - slot, 1)
        # atomicity across pages: of two overlapping writes, at most one is
        # visible in their intersection
        visible = {}
        for pg, ws in page_of.items():
            visible.setdefault(ws, set()).add(pg)
        vis = list(visible)
        for i, x in enumerate(vis):
            fx, nx = writes[x]
            for y in vis[i + 1:]:
                fy, ny = writes[y]
                common = set(range(max(fx, fy), min(fx + nx, fy + ny)))
                if common:
                    assert not (visible[x] & common and visible[y] & common), \
                        f"writes {x} and {y} interleaved in pages {sorted(common)}"
        assert len(page_of) > NPAGES // 2


REGION_PAGES = 16  # one FUSE request (64 KiB)


def _region(version: int) -> bytes:
    return b"".join(struct.pack("<IHH", version, pg, 0xA5A5) * (PAGE // 8)
                    for pg in range(REGION_PAGES))


def _writer(path: str, nwrites: int, started, done) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        for v in range(1, nwrites + 1):
            started.value = v
            assert os.pwrite(fd, _region(v), 0) == REGION_PAGES * PAGE
            done.value = v
    finally:
        os.close(fd)
    return nwrites


def _reader(path: str, direct: bool, stop, started, done) -> dict:
    """Reads the region while it is rewritten: every word is one the writer
    wrote, its version no older than the last write finished before the read
    and no newer than the last one begun after it, versions per page never go
    back, and (O_DIRECT, served by the daemon) a whole read is one version."""
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    buf = mmap.mmap(-1, REGION_PAGES * PAGE)
    last = [0] * REGION_PAGES
    reads = 0
    problems = []
    try:
        while not stop.value and len(problems) < 5:
            lo = done.value
            n = os.preadv(fd, [buf], 0)
            hi = started.value
            assert n == REGION_PAGES * PAGE
            reads += 1
            mv = memoryview(buf)
            seen = set()
            for pg in range(REGION_PAGES):
                words = set(struct.iter_unpack("<IHH", mv[pg * PAGE:(pg + 1) * PAGE]))
                for v, p, tag in words:
                    if p != pg or tag != 0xA5A5 or not lo <= v <= hi:
                        problems.append(f"page {pg}: word {(v, p, tag)} outside "
                                        f"[{lo}, {hi}]")
                vs = {v for v, _p, _t in words}
                if min(vs) < last[pg]:
                    problems.append(f"page {pg} went back from {last[pg]} to {min(vs)}")
                last[pg] = max(vs)
                seen |= vs
            if direct and len(seen) != 1:
                problems.append(f"O_DIRECT read saw versions {sorted(seen)}")
            mv.release()
    finally:
        os.close(fd)
        buf.close()
    return {"reads": reads, "problems": problems}


def test_readers_see_old_or_new_data_during_writes(shm_dir):
    with mounted(shm_dir) as m:
        p = os.path.join(m.path, "region")
        with open(p, "wb") as f:
            f.write(_region(0))
        started = CTX.Value("l", 0, lock=False)
        done = CTX.Value("l", 0, lock=False)
        stop = CTX.Value("b", 0, lock=False)
        procs = Procs()
        try:
            for i, d in enumerate((False, False, True)):
                procs.start(f"reader{i}", _reader, p, d, stop, started, done)
            procs.start("writer", _writer, p, 1500, started, done)
            try:
                assert procs.wait(["writer"])["writer"] == 1500
            finally:
                stop.value = 1
            results = procs.wait([f"reader{i}" for i in range(3)]).values()
        finally:
            procs.close()
        for r in results:
            assert r["problems"] == []
            assert r["reads"] > 20
        assert read_file(p) == _region(1500)


# ---------------------------------------------------------------------------
# readdir during churn, open-unlink races
# ---------------------------------------------------------------------------

def _churn_worker(base: str, wid: int, nops: int, seed: int) -> int:
    rng = random.Random(seed)
    live = []
    for i in range(nops):
        if live and rng.random() < 0.5:
            os.unlink(os.path.join(base, "dir", live.pop(rng.randrange(len(live)))))
        else:
            n = f"churn{wid}_{i}_" + "x" * rng.randrange(0, 120)
            open(os.path.join(base, "dir", n), "w").close()
            live.append(n)
    for n in live:
        os.unlink(os.path.join(base, "dir", n))
    return nops


def _lister(base: str, stable: int, stop) -> dict:
    listings = 0
    problems = []
    want = {f"stable{i}" for i in range(stable)}
    while not stop.value and len(problems) < 5:
        names = os.listdir(os.path.join(base, "dir"))
        st = [n for n in names if n.startswith("stable")]
        if len(st) != len(set(st)) or set(st) != want:
            problems.append(f"listing has {len(st)} stable names, {len(set(st))} distinct "
                            f"(want {stable})")
        if len(names) != len(set(names)):
            problems.append("a name listed twice")
        listings += 1
    return {"listings": listings, "problems": problems}


def test_readdir_during_churn(shm_dir):
    """Names that exist during the whole listing are returned exactly once,
    however many others come and go (POSIX readdir)."""
    stable = 400
    with mounted(shm_dir) as m:
        base = m.path
        os.mkdir(os.path.join(base, "dir"))
        for i in range(stable):
            open(os.path.join(base, "dir", f"stable{i}"), "w").close()
        stop = CTX.Value("b", 0, lock=False)
        procs = Procs()
        try:
            for i in range(2):
                procs.start(f"lister{i}", _lister, base, stable, stop)
            for w in range(3):
                procs.start(f"churn{w}", _churn_worker, base, w, 800, w)
            try:
                procs.wait([f"churn{w}" for w in range(3)])
            finally:
                stop.value = 1
            results = procs.wait(["lister0", "lister1"]).values()
        finally:
            procs.close()
        for r in results:
            assert r["problems"] == []
            assert r["listings"] > 3
        assert sorted(os.listdir(os.path.join(base, "dir"))) == \
            sorted(f"stable{i}" for i in range(stable))


def _open_unlink_worker(base: str, wid: int, nops: int, seed: int) -> int:
    """Create, open, unlink while open (by this or another process), keep
    using the file through the descriptor, close."""
    rng = random.Random(seed)
    done = 0
    for i in range(nops):
        p = os.path.join(base, f"o{wid}_{i}")
        data = _pattern(rng, rng.randint(1, 200_000))
        fd = os.open(p, os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            # also unlink a neighbour's file, if it is there (it may be open)
            other = os.path.join(base, f"o{(wid + 1) % 4}_{i}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(other)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
            os.pwrite(fd, b"tail", len(data))
            assert os.pread(fd, len(data) + 4, 0) == data + b"tail"
            assert os.fstat(fd).st_nlink == 0
            done += 1
        finally:
            os.close(fd)
    return done


def test_open_unlink_races_leak_nothing(shm_dir):
    with mounted(shm_dir) as m:
        s0 = os.statvfs(m.path)
        res = run_workers(_open_unlink_worker, [(m.path, w, 150, w) for w in range(4)])
        assert sum(res) == 600
        assert sorted(os.listdir(m.path)) == ["lost+found"]
        # the last references go with the kernel's FORGETs, which follow
        # asynchronously: wait for the counters to come back, then compare
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            s1 = os.statvfs(m.path)
            if (s1.f_ffree, s1.f_bfree) == (s0.f_ffree, s0.f_bfree):
                break
            time.sleep(0.1)
        assert (s1.f_ffree, s1.f_bfree) == (s0.f_ffree, s0.f_bfree), "inodes/blocks leaked"
        m.unmount()
        m.mount()
        s2 = os.statvfs(m.path)
        assert (s2.f_ffree, s2.f_bfree) == (s0.f_ffree, s0.f_bfree)


# ---------------------------------------------------------------------------
# a full file system under concurrent writers
# ---------------------------------------------------------------------------

def _fill_worker(base: str, wid: int, seed: int) -> dict:
    """Write files until ENOSPC; every byte a write acknowledged must be
    there.  Returns {name: (seed byte, acknowledged size)}."""
    rng = random.Random(seed)
    files = {}
    k = 0
    full = 0
    while full < 3:
        k += 1
        name = f"w{wid}_{k}"
        b = rng.randrange(1, 256)
        try:
            fd = os.open(os.path.join(base, name), os.O_CREAT | os.O_WRONLY, 0o644)
        except OSError as e:
            assert e.errno == errno.ENOSPC, errname(e)
            full += 1
            continue
        size = 0
        try:
            for _ in range(rng.randint(1, 40)):
                chunk = bytes([b]) * rng.choice([1, 4095, 4096, 65536, 300_000])
                try:
                    n = os.write(fd, chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, errname(e)
                    full += 1
                    break
                size += n
                if n < len(chunk):
                    full += 1
                    break
        finally:
            os.close(fd)
        files[name] = (b, size)
    return files


def test_concurrent_writers_fill_the_file_system(shm_dir):
    """Writers race into ENOSPC: every acknowledged byte is kept, nothing
    else appears, all space comes back after removal, fsck is clean."""
    with mounted(shm_dir, "16M") as m:
        s0 = os.statvfs(m.path)
        res = run_workers(_fill_worker, [(m.path, w, 60 + w) for w in range(4)])
        s1 = os.statvfs(m.path)
        assert s1.f_bfree < s0.f_bfree // 20  # it was really full
        for files in res:
            for name, (b, size) in files.items():
                data = read_file(os.path.join(m.path, name))
                assert len(data) == size and data == bytes([b]) * size, name
        m.unmount()
        m.mount()
        for files in res:
            for name, (b, size) in files.items():
                assert os.stat(os.path.join(m.path, name)).st_size == size
                os.unlink(os.path.join(m.path, name))
        deadline = time.monotonic() + 30
        while os.statvfs(m.path).f_bfree != s0.f_bfree and time.monotonic() < deadline:
            time.sleep(0.1)
        s2 = os.statvfs(m.path)
        assert (s2.f_bfree, s2.f_ffree) == (s0.f_bfree, s0.f_ffree)


# ---------------------------------------------------------------------------
# shared mappings, the sync option
# ---------------------------------------------------------------------------

MAP_PAGES = 64


def _mmap_worker(path: str, wid: int, nw: int, rounds: int) -> int:
    """Write this worker's pages (every nw-th) through a shared mapping."""
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, MAP_PAGES * PAGE, mmap.MAP_SHARED)
        try:
            for r in range(1, rounds + 1):
                for pg in range(wid, MAP_PAGES, nw):
                    mm[pg * PAGE:(pg + 1) * PAGE] = struct.pack("<II", r, pg) * (PAGE // 8)
                if r % 10 == 0:
                    mm.flush()
            mm.flush()
        finally:
            mm.close()
    finally:
        os.close(fd)
    return rounds


def test_shared_mappings_written_by_many_processes(shm_dir):
    nw = 4
    with mounted(shm_dir) as m:
        p = os.path.join(m.path, "mapped")
        with open(p, "wb") as f:
            f.truncate(MAP_PAGES * PAGE)
        run_workers(_mmap_worker, [(p, w, nw, 60) for w in range(nw)])
        want = b"".join(struct.pack("<II", 60, pg) * (PAGE // 8) for pg in range(MAP_PAGES))
        assert read_file(p) == want
        m.unmount()
        m.mount()
        assert read_file(p) == want


def test_disjoint_ranges_with_the_sync_option(shm_dir):
    nw = 4
    with mounted(shm_dir, options="sync") as m:
        p = os.path.join(m.path, "shared")
        open(p, "wb").close()
        res = run_workers(_range_worker, [(p, w, 150, 500 + w) for w in range(nw)])
        data = read_file(p)
        assert len(data) == max(r[2] for r in res)
        for w, (mine, written, _e) in enumerate(res):
            got = data[w * RANGE:(w + 1) * RANGE].ljust(RANGE, b"\0")
            assert got == bytes(c if written[i] else 0 for i, c in enumerate(mine))


# ---------------------------------------------------------------------------
# a crash under concurrent load: nothing acknowledged is lost
# ---------------------------------------------------------------------------

def _ack_worker(base: str, wid: int, seed: int, logpath: str) -> None:
    """Single-system-call operations, each logged (outside pmfs) before it
    starts and after it returned, until the daemon dies under it."""
    rng = random.Random(seed)
    logf = open(logpath, "w", buffering=1)
    names: list[str] = []
    k = 0
    fd = os.open(os.path.join(base, f"data{wid}"), os.O_CREAT | os.O_WRONLY, 0o644)
    logf.write(json.dumps(["done", "open"]) + "\n")
    try:
        while True:
            k += 1
            r = rng.random()
            if r < 0.35 or not names:
                op = ["symlink", f"s{wid}_{k}", f"target {wid} {k} " + "x" * rng.randrange(300)]
            elif r < 0.5:
                op = ["rename", rng.choice(names), f"s{wid}_{k}"]
            elif r < 0.65:
                op = ["unlink", rng.choice(names)]
            elif r < 0.75:
                op = ["mkdir", f"d{wid}_{k}"]
            else:
                off = rng.randrange(0, 1 << 20)
                op = ["pwrite", off, rng.randrange(1, 256), rng.choice([1, 4096, 10000])]
            logf.write(json.dumps(["begin", *op]) + "\n")
            try:
                if op[0] == "symlink":
                    os.symlink(op[2], os.path.join(base, op[1]))
                    names.append(op[1])
                elif op[0] == "rename":
                    os.rename(os.path.join(base, op[1]), os.path.join(base, op[2]))
                    names.remove(op[1])
                    names.append(op[2])
                elif op[0] == "unlink":
                    os.unlink(os.path.join(base, op[1]))
                    names.remove(op[1])
                elif op[0] == "mkdir":
                    os.mkdir(os.path.join(base, op[1]))
                else:
                    os.pwrite(fd, bytes([op[2]]) * op[3], op[1])
            except OSError:
                return  # the daemon is gone
            logf.write(json.dumps(["done"]) + "\n")
    finally:
        logf.close()
        with contextlib.suppress(OSError):
            os.close(fd)


def _replay(lines) -> tuple[list, list]:
    """(states after every acknowledged op, the state with the op in flight
    applied too, if any) for one worker's log."""
    names: dict[str, str] = {}
    dirs: set[str] = set()
    data = bytearray()

    def apply(op):
        if op[0] == "symlink":
            names[op[1]] = op[2]
        elif op[0] == "rename":
            names[op[2]] = names.pop(op[1])
        elif op[0] == "unlink":
            del names[op[1]]
        elif op[0] == "mkdir":
            dirs.add(op[1])
        else:
            off, b, n = op[1], op[2], op[3]
            if off + n > len(data):
                data.extend(bytes(off + n - len(data)))
            data[off:off + n] = bytes([b]) * n

    def snap():
        return (dict(names), set(dirs), bytes(data))
    pending = None
    for line in lines:
        if line[0] == "begin":
            pending = line[1:]
        elif line[0] == "done" and pending is not None:
            apply(pending)
            pending = None
    acked = snap()
    if pending is None:
        return acked, None
    apply(pending)
    return acked, snap()


CRASH_CYCLES = 1  # more for a longer run


def test_crash_under_concurrent_load_loses_nothing_acknowledged(shm_dir):
    """SIGKILL the daemon while 4 processes create, rename, unlink, mkdir and
    write: after recovery each worker's objects are exactly what its
    acknowledged operations made (plus, maybe, the one in flight)."""
    nw = 4
    if not fuse_available():
        pytest.fail("FUSE is not available")
    image = os.path.join(shm_dir, "fs.img")
    mkfs(image, "128M")
    m = PmfsMount(image, os.path.join(shm_dir, "mnt"))
    for cycle in range(CRASH_CYCLES):
        m.mount()
        base = os.path.join(m.path, f"c{cycle}")
        os.mkdir(base)
        logs = [os.path.join(shm_dir, f"log{cycle}_{w}") for w in range(nw)]
        procs = Procs()
        try:
            for w in range(nw):
                procs.start(w, _ack_worker, base, w, 10 * cycle + w, logs[w])
            time.sleep(2.5)
            m.kill()
            procs.wait(list(range(nw)), timeout=60)
        finally:
            procs.close()
            m.kill()
        m.mount()
        try:
            bad = []
            for w in range(nw):
                with open(logs[w]) as f:
                    lines = [json.loads(x) for x in f if x.endswith("\n")]
                acked, inflight = _replay(lines)
                assert len(lines) > 20, "the worker hardly ran"
                names, dirs = {}, set()
                for n in os.listdir(base):
                    p = os.path.join(base, n)
                    if n.startswith(f"s{w}_"):
                        names[n] = os.readlink(p)
                    elif n.startswith(f"d{w}_"):
                        dirs.add(n)
                data = read_file(os.path.join(base, f"data{w}"))
                got = (names, dirs, data)
                if got != acked and got != inflight:
                    bad.append(f"worker {w}: state after the crash is neither the "
                               f"acknowledged one nor that plus the op in flight "
                               f"{lines[-1]}")
            assert bad == []
        finally:
            m.unmount()
        fsck_clean(image)
    assert "Traceback" not in m.log_text()


# ---------------------------------------------------------------------------
# the soak tool, briefly
# ---------------------------------------------------------------------------

def test_soak_short_run(shm_dir):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "soak"), "--seconds", "15",
                        "--workers", "4", "--image-size", "256M", "--seed", "11",
                        "--workdir", os.path.join(shm_dir, "soak")],
                       capture_output=True, text=True, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "errors: 0" in out and "fsck: clean" in out, out
    ops = int(out.split("operations: ")[1].split()[0])
    assert ops > 1000, out
