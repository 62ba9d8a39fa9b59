"""The workloads.

I/O rows run fio (psync engine, no preallocation: `--fallocate=none`) on
one file; metadata rows are timed loops of os.* calls in this process (one
system call per operation, wall clock).  Every loop and fio job has a time
cap, so a slow system measures fewer operations instead of taking long;
the operations actually done are in the JSON (`n`, `seconds`, `capped`).

Cold and warm: "cold" rows run right after `echo 1|2|3 >
/proc/sys/vm/drop_caches` (page cache for reads, dentries and inodes for
stat), so every read or lookup reaches the daemon; "warm" rows repeat the
access at once, so whatever the system lets the kernel cache is used.
(A kernel tmpfs has nothing to drop: its cold and warm are the same.)

Each step fills one or more rows; `needs` steps prepare state (the data
file, the directory of N files) without being measured when a step runs
alone (e.g. `--only stat_cold`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from .util import BenchError, drop_caches, fadvise_dontneed, proc_cpu_seconds


@dataclass
class Params:
    seq_size: int  # sequential file (bytes)
    rand_size: int  # region of it the 4 KiB random jobs use
    fio_time: float  # seconds of each time-based fio job
    read_cap: float  # longest single pass of a read job
    write_cap: float  # longest sequential write
    files: int  # files in the one directory of the metadata rows
    small_files: int
    loop_cap: float  # longest metadata loop
    clients: int  # processes / fio jobs of the parallel rows
    image_size: int  # pmfs image


FULL = Params(seq_size=512 << 20, rand_size=64 << 20, fio_time=3.0, read_cap=6.0,
              write_cap=12.0, files=5000, small_files=2000, loop_cap=10.0, clients=4,
              image_size=2 << 30)
QUICK = Params(seq_size=8 << 20, rand_size=4 << 20, fio_time=0.3, read_cap=2.0,
               write_cap=4.0, files=200, small_files=100, loop_cap=2.0, clients=2,
               image_size=256 << 20)


@dataclass
class Row:
    id: str
    title: str
    unit: str
    step: str
    higher_is_better: bool = True
    issue: bool = False  # a row of the issue's table
    goal_c: bool = False  # goal: pmfs at or above the C passthrough


ROWS = [
    Row("seq_write", "seq write 1 MiB + fsync at end", "MB/s", "seq_write", issue=True,
        goal_c=True),
    Row("seq_read_cold", "seq read 1 MiB, cold", "MB/s", "seq_read", issue=True, goal_c=True),
    Row("seq_read_warm", "seq read 1 MiB, warm", "MB/s", "seq_read"),
    Row("rand_overwrite_fsync", "4 KiB overwrite + fsync", "ops/s", "overwrite_fsync",
        issue=True),
    Row("fsync_p50_us", "  fsync latency p50", "us", "overwrite_fsync",
        higher_is_better=False),
    Row("fsync_p99_us", "  fsync latency p99", "us", "overwrite_fsync",
        higher_is_better=False),
    Row("rand_read_cold", "4 KiB random read, cold", "ops/s", "rand_read", issue=True),
    Row("rand_read_warm", "4 KiB random read, warm", "ops/s", "rand_read"),
    Row("mixed_rw", "4 KiB random 70% read/30% write", "ops/s", "mixed_rw"),
    Row("parallel_rw", "4 KiB random 70/30, {clients} fio jobs", "ops/s", "parallel_rw"),
    Row("create", "create (open O_CREAT + close)", "ops/s", "create", issue=True,
        goal_c=True),
    Row("stat_cold", "stat, cold", "ops/s", "stat", issue=True),
    Row("stat_warm", "stat, warm", "ops/s", "stat"),
    Row("lookup_miss", "lookup of missing names", "ops/s", "lookup_miss"),
    Row("readdir", "readdir (listdir)", "entries/s", "readdir", issue=True),
    Row("rename", "rename (same directory)", "ops/s", "rename", issue=True, goal_c=True),
    Row("unlink", "unlink", "ops/s", "unlink", issue=True, goal_c=True),
    Row("small_write", "small files: create+write 4K+close", "files/s", "small_files"),
    Row("small_read", "small files: open+read+close, cold", "files/s", "small_files"),
    Row("parallel_create", "create, {clients} processes", "ops/s", "parallel_create"),
]
ROW_BY_ID = {r.id: r for r in ROWS}
STEPS = list(dict.fromkeys(r.step for r in ROWS))
GROUPS = {
    "io": [s for s in STEPS if s in ("seq_write", "seq_read", "overwrite_fsync", "rand_read",
                                     "mixed_rw", "parallel_rw")],
    "meta": [s for s in STEPS if s in ("create", "stat", "lookup_miss", "readdir", "rename",
                                       "unlink", "small_files", "parallel_create")],
    "issue": list(dict.fromkeys(r.step for r in ROWS if r.issue)),
}


def row_title(row: Row, params: Params) -> str:
    return row.title.format(clients=params.clients, files=params.files)


# -- context ------------------------------------------------------------------------

class Ctx:
    """One system's run: where to work, parameters, state between steps."""

    def __init__(self, system, root: str, params: Params, scratch: str, progress):
        self.system = system
        self.root = root
        self.p = params
        self.scratch = scratch
        self.progress = progress
        self.state: dict = {}
        self.cold_ok = True

    def say(self, msg: str) -> None:
        self.progress(f"{self.system.id}: {msg}")

    def cold(self, level: int, files=()) -> None:
        """Drop the kernel's caches (1 page cache, 2 dentries/inodes, 3 both)."""
        if drop_caches(level):
            time.sleep(0.2)  # let FORGETs and invalidations reach the daemons
            return
        self.cold_ok = False
        for f in files:  # at least the data pages of these files
            try:
                fadvise_dontneed(f)
            except OSError:
                pass


class Meter:
    """Wall time and the daemon's CPU time (all threads) around a measurement."""

    def __init__(self, ctx: Ctx):
        self.pid = ctx.system.pid

    client_cpu: float | None = None  # CPU of the client (this thread, or fio's report)

    def __enter__(self):
        self.c0 = proc_cpu_seconds(self.pid) if self.pid else None
        self.t0 = time.perf_counter()
        self.tc0 = time.thread_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.client_cpu = time.thread_time() - self.tc0
        c1 = proc_cpu_seconds(self.pid) if self.pid else None
        self.cpu = (c1 - self.c0) if (c1 is not None and self.c0 is not None) else None
        return False

    def extra(self, ops: float | None = None) -> dict:
        """daemon CPU (all threads; none for a kernel file system) and client CPU
        (user + kernel time of the calling thread, which includes the kernel's
        FUSE client side), in total and per operation."""
        d = {"wall_s": round(self.wall, 4)}
        if self.cpu is not None:
            d["daemon_cpu_s"] = round(self.cpu, 4)
            if ops:
                d["daemon_cpu_us_per_op"] = round(self.cpu / ops * 1e6, 2)
        if self.client_cpu is not None:
            d["client_cpu_s"] = round(self.client_cpu, 4)
            if ops:
                d["client_cpu_us_per_op"] = round(self.client_cpu / ops * 1e6, 2)
        return d


def res(value: float, **extra) -> dict:
    d = {"value": float(value)}
    d.update(extra)
    return d


# -- fio --------------------------------------------------------------------------

DATAFILE = "bench.seq"


def _t(seconds: float) -> str:
    return f"{max(1, int(seconds * 1000))}ms"


def fio(ctx: Ctx, tag: str, args: list[str], limit: float):
    """Run one fio job (group) in the system's directory; its JSON job and a Meter."""
    out = os.path.join(ctx.scratch, f"fio-{ctx.system.id}-{tag}.json")
    cmd = ["fio", f"--name={tag}", "--ioengine=psync", "--fallocate=none",
           "--output-format=json", f"--output={out}", f"--filename={DATAFILE}", *args]
    with Meter(ctx) as m:
        try:
            r = subprocess.run(cmd, cwd=ctx.root, capture_output=True, text=True,
                               timeout=limit + 120)
        except subprocess.TimeoutExpired:
            raise BenchError(f"fio {tag} did not finish in {limit + 120:.0f} s") from None
    m.client_cpu = None
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        raise BenchError(f"fio {tag} failed: {lines[-1] if lines else r.returncode}")
    try:
        with open(out) as f:
            text = f.read()
        job = json.loads(text[text.index("{"):])["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise BenchError(f"fio {tag}: unreadable output ({e})") from None
    if job.get("error"):
        raise BenchError(f"fio {tag}: {os.strerror(job['error'])}")
    try:  # fio's own CPU use (percent of the job's run time, all its jobs)
        secs = max(job["read"]["runtime"], job["write"]["runtime"]) / 1000
        m.client_cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * secs * \
            int(job.get("job options", {}).get("numjobs", 1))
    except (KeyError, TypeError, ValueError):
        pass
    return job, m


def _mbps(job, kind: str) -> float:
    return job[kind]["bw_bytes"] / 1e6


def _iops(job) -> float:
    return job["read"]["iops"] + job["write"]["iops"]


def _fio_extra(job, kind: str, m: Meter) -> dict:
    io = job[kind]["io_bytes"]
    secs = job[kind]["runtime"] / 1000
    ops = job[kind]["total_ios"]
    return {"bytes": io, "seconds": round(secs, 3), "n": ops, **m.extra(ops)}


def _seq_size(ctx: Ctx) -> int:
    cap = ctx.system.max_seq_size
    return min(ctx.p.seq_size, cap) if cap else ctx.p.seq_size


def write_datafile(ctx: Ctx) -> tuple:
    path = os.path.join(ctx.root, DATAFILE)
    if os.path.exists(path):
        os.unlink(path)
    size = _seq_size(ctx)
    job, m = fio(ctx, "seq_write", ["--rw=write", "--bs=1M", f"--size={size}",
                                    "--end_fsync=1", f"--runtime={_t(ctx.p.write_cap)}"],
                 ctx.p.write_cap)
    fsize = os.stat(path).st_size
    if fsize < (1 << 20):
        raise BenchError(f"the data file has only {fsize} bytes")
    ctx.state["datafile"] = (path, fsize)
    return job, m, size


def need_datafile(ctx: Ctx) -> tuple[str, int]:
    if "datafile" not in ctx.state:
        ctx.say("writing the data file (not measured)")
        write_datafile(ctx)
    return ctx.state["datafile"]


def _region(ctx: Ctx) -> int:
    _path, fsize = need_datafile(ctx)
    r = min(ctx.p.rand_size, fsize)
    return r // (1 << 20) * (1 << 20) if r >= (1 << 20) else max(4096, r // 4096 * 4096)


def step_seq_write(ctx: Ctx) -> dict:
    ctx.say("sequential write")
    job, m, size = write_datafile(ctx)
    ex = _fio_extra(job, "write", m)
    ex["file_size"] = size
    ex["capped"] = job["write"]["io_bytes"] < size
    return {"seq_write": res(_mbps(job, "write"), **ex)}


def step_seq_read(ctx: Ctx) -> dict:
    path, fsize = need_datafile(ctx)
    args = ["--rw=read", "--bs=1M", f"--size={fsize}", f"--runtime={_t(ctx.p.read_cap)}"]
    ctx.say("sequential read, cold")
    ctx.cold(1, [path])
    cold, mc = fio(ctx, "seq_read_cold", args, ctx.p.read_cap)
    ctx.say("sequential read, warm")
    warm, mw = fio(ctx, "seq_read_warm", args + ["--invalidate=0"], ctx.p.read_cap)
    return {"seq_read_cold": res(_mbps(cold, "read"), cold=ctx.cold_ok,
                                 **_fio_extra(cold, "read", mc)),
            "seq_read_warm": res(_mbps(warm, "read"), **_fio_extra(warm, "read", mw))}


def step_rand_read(ctx: Ctx) -> dict:
    path, _ = need_datafile(ctx)
    region = _region(ctx)
    ctx.say("4 KiB random read, cold")
    ctx.cold(1, [path])
    # one pass: every block once, in random order, no readahead (fio's default
    # random map and fadvise(RANDOM))
    cold, mc = fio(ctx, "rand_read_cold", ["--rw=randread", "--bs=4k", f"--size={region}",
                                           f"--runtime={_t(ctx.p.read_cap)}"],
                   ctx.p.read_cap)
    ctx.say("4 KiB random read, warm")
    fio(ctx, "rand_read_prime", ["--rw=read", "--bs=1M", f"--size={region}",
                                 "--invalidate=0", f"--runtime={_t(ctx.p.read_cap)}"],
        ctx.p.read_cap)
    warm, mw = fio(ctx, "rand_read_warm", ["--rw=randread", "--bs=4k", f"--size={region}",
                                           "--invalidate=0", "--time_based",
                                           f"--runtime={_t(ctx.p.fio_time)}"],
                   ctx.p.fio_time)
    return {"rand_read_cold": res(_iops(cold), region=region, cold=ctx.cold_ok,
                                  **_fio_extra(cold, "read", mc)),
            "rand_read_warm": res(_iops(warm), region=region,
                                  **_fio_extra(warm, "read", mw))}


def step_overwrite_fsync(ctx: Ctx) -> dict:
    region = _region(ctx)
    ctx.say("4 KiB overwrite + fsync")
    job, m = fio(ctx, "overwrite_fsync", ["--rw=randwrite", "--bs=4k", f"--size={region}",
                                          "--fsync=1", "--time_based",
                                          f"--runtime={_t(ctx.p.fio_time)}"], ctx.p.fio_time)
    out = {"rand_overwrite_fsync": res(_iops(job), region=region,
                                       **_fio_extra(job, "write", m))}
    pct = job.get("sync", {}).get("lat_ns", {}).get("percentile", {})
    for key, row in (("50.000000", "fsync_p50_us"), ("99.000000", "fsync_p99_us")):
        if key in pct:
            out[row] = res(pct[key] / 1000, n=job["sync"].get("total_ios"))
        else:
            out[row] = {"error": "fio reported no fsync latency percentiles"}
    return out


def step_mixed_rw(ctx: Ctx) -> dict:
    region = _region(ctx)
    ctx.say("4 KiB random 70/30 read/write")
    job, m = fio(ctx, "mixed_rw", ["--rw=randrw", "--rwmixread=70", "--bs=4k",
                                   f"--size={region}", "--end_fsync=1", "--time_based",
                                   f"--runtime={_t(ctx.p.fio_time)}"], ctx.p.fio_time)
    n = job["read"]["total_ios"] + job["write"]["total_ios"]
    return {"mixed_rw": res(_iops(job), region=region, n=n, **m.extra(n))}


def step_parallel_rw(ctx: Ctx) -> dict:
    region = _region(ctx)
    k = ctx.p.clients
    ctx.say(f"4 KiB random 70/30 read/write, {k} jobs")
    job, m = fio(ctx, "parallel_rw", ["--rw=randrw", "--rwmixread=70", "--bs=4k",
                                      f"--size={region}", f"--numjobs={k}",
                                      "--group_reporting", "--end_fsync=1", "--time_based",
                                      f"--runtime={_t(ctx.p.fio_time)}"], ctx.p.fio_time)
    n = job["read"]["total_ios"] + job["write"]["total_ios"]
    return {"parallel_rw": res(_iops(job), region=region, jobs=k, n=n, **m.extra(n))}


# -- metadata ------------------------------------------------------------------------

_CREATE = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC


def _loop(ctx: Ctx, fn, items, what: str):
    """Apply fn to items until done or the time cap; (done, seconds, Meter)."""
    cap = ctx.p.loop_cap
    ctx.say(what)
    done = 0
    with Meter(ctx) as m:
        t0 = time.perf_counter()
        for it in items:
            fn(it)
            done += 1
            if not done & 15 and time.perf_counter() - t0 > cap:
                break
    return done, m.wall, m


def _rate(done, secs, m, total, **extra) -> dict:
    if done == 0 or secs <= 0:
        return {"error": "no operation completed"}
    return res(done / secs, n=done, seconds=round(secs, 3), capped=done < total,
               **extra, **m.extra(done))


def _new_dir(ctx: Ctx, stem: str) -> str:
    k = ctx.state.get("dirs", 0) + 1
    ctx.state["dirs"] = k
    d = os.path.join(ctx.root, f"{stem}{k}")
    os.mkdir(d)
    return d


def _create_files(ctx: Ctx, measured: bool) -> tuple:
    d = _new_dir(ctx, "meta")
    names = [os.path.join(d, f"f{i:07d}") for i in range(ctx.p.files)]
    done, secs, m = _loop(ctx, lambda p: os.close(os.open(p, _CREATE, 0o644)), names,
                          f"create {len(names)} files" + ("" if measured else
                                                          " (not measured)"))
    ctx.state["meta"] = (d, names[:done])
    return done, secs, m, len(names)


def need_meta(ctx: Ctx) -> tuple[str, list[str]]:
    if not ctx.state.get("meta") or not ctx.state["meta"][1]:
        _create_files(ctx, measured=False)
    return ctx.state["meta"]


def step_create(ctx: Ctx) -> dict:
    done, secs, m, total = _create_files(ctx, measured=True)
    return {"create": _rate(done, secs, m, total)}


def step_stat(ctx: Ctx) -> dict:
    d, names = need_meta(ctx)
    ctx.cold(2)
    done, secs, m = _loop(ctx, os.stat, names, f"stat {len(names)} files, cold")
    cold = _rate(done, secs, m, len(names), cold=ctx.cold_ok)
    # warm: in chunks, each stat'ed once (not measured) and at once again
    # (measured), so no entry outlives a 1 s attribute/entry timeout between
    ctx.say(f"stat {done} files, warm")
    warm = 0
    secs = cpu = ccpu = 0.0
    cap = ctx.p.loop_cap
    for k in range(0, done, 250):
        chunk = names[k:k + 250]
        for p in chunk:
            os.stat(p)
        with Meter(ctx) as m:
            for p in chunk:
                os.stat(p)
        secs += m.wall
        cpu += m.cpu or 0.0
        ccpu += m.client_cpu or 0.0
        warm += len(chunk)
        if secs > cap:
            break
    m.wall, m.cpu, m.client_cpu = secs, (cpu if m.cpu is not None else None), ccpu
    return {"stat_cold": cold, "stat_warm": _rate(warm, secs, m, len(names))}


def step_lookup_miss(ctx: Ctx) -> dict:
    d, names = need_meta(ctx)
    missing = [os.path.join(d, f"missing{i:07d}") for i in range(len(names))]

    def miss(p):
        try:
            os.stat(p)
        except FileNotFoundError:
            return
        raise BenchError(f"{p} exists")
    done, secs, m = _loop(ctx, miss, missing,
                          f"lookup {len(missing)} missing names in a {len(names)}-entry "
                          f"directory")
    return {"lookup_miss": _rate(done, secs, m, len(missing), dir_entries=len(names))}


def step_readdir(ctx: Ctx) -> dict:
    d, names = need_meta(ctx)
    ctx.say(f"readdir of {len(names)} entries")
    want = min(1.0, ctx.p.loop_cap)
    entries = passes = 0
    with Meter(ctx) as m:
        t0 = time.perf_counter()
        while True:
            got = len(os.listdir(d))
            if got != len(names):
                raise BenchError(f"readdir returned {got} entries, expected {len(names)}")
            entries += got
            passes += 1
            if time.perf_counter() - t0 >= want:
                break
    return {"readdir": res(entries / m.wall, n=entries, passes=passes,
                           dir_entries=len(names), seconds=round(m.wall, 3),
                           **m.extra(entries))}


def step_rename(ctx: Ctx) -> dict:
    d, names = need_meta(ctx)
    done, secs, m = _loop(ctx, lambda p: os.rename(p, p + "r"), names,
                          f"rename {len(names)} files")
    ctx.state["meta"] = (d, [p + "r" for p in names[:done]] + names[done:])
    return {"rename": _rate(done, secs, m, len(names))}


def step_unlink(ctx: Ctx) -> dict:
    d, names = need_meta(ctx)
    done, secs, m = _loop(ctx, os.unlink, names, f"unlink {len(names)} files")
    ctx.state["meta"] = (d, names[done:])
    return {"unlink": _rate(done, secs, m, len(names))}


def step_small_files(ctx: Ctx) -> dict:
    d = _new_dir(ctx, "small")
    names = [os.path.join(d, f"s{i:07d}") for i in range(ctx.p.small_files)]
    data = os.urandom(4096)

    def write(p):
        fd = os.open(p, _CREATE, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def read(p):
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if len(os.read(fd, 8192)) != 4096:
                raise BenchError(f"short read of {p}")
        finally:
            os.close(fd)
    done, secs, m = _loop(ctx, write, names, f"write {len(names)} small files")
    w = _rate(done, secs, m, len(names))
    ctx.cold(3)
    done, secs, m = _loop(ctx, read, names[:done], f"read {done} small files, cold")
    return {"small_write": w, "small_read": _rate(done, secs, m, len(names), cold=ctx.cold_ok)}


_WORKER = r"""
import os, sys, time
d, n, start, cap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
names = [os.path.join(d, "p%07d" % i) for i in range(n)]
flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
while time.time() < start:
    time.sleep(0.0005)
done = 0
for p in names:
    os.close(os.open(p, flags, 0o644))
    done += 1
    if not done & 15 and time.time() - start > cap:
        break
print(done, time.time())
"""


def step_parallel_create(ctx: Ctx) -> dict:
    k = ctx.p.clients
    per = max(1, ctx.p.files // k)
    base = _new_dir(ctx, "par")
    dirs = []
    for i in range(k):
        dirs.append(os.path.join(base, f"c{i}"))
        os.mkdir(dirs[-1])
    ctx.say(f"create {per * k} files from {k} processes")
    start = time.time() + 0.5 + 0.1 * k
    procs = []
    with Meter(ctx) as m:
        try:
            for d in dirs:
                procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, d, str(per),
                                               repr(start), repr(ctx.p.loop_cap)],
                                              stdout=subprocess.PIPE, text=True))
            outs = [p.communicate(timeout=ctx.p.loop_cap + 60)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    if any(p.returncode for p in procs):
        raise BenchError("a client process failed")
    done = 0
    end = start
    for o in outs:
        n, t = o.split()
        done += int(n)
        end = max(end, float(t))
    secs = end - start  # from the common start to the last client's end
    return {"parallel_create": _rate(done, secs, m, per * k, clients=k)}


STEP_FUNCS = {
    "seq_write": step_seq_write,
    "seq_read": step_seq_read,
    "overwrite_fsync": step_overwrite_fsync,
    "rand_read": step_rand_read,
    "mixed_rw": step_mixed_rw,
    "parallel_rw": step_parallel_rw,
    "create": step_create,
    "stat": step_stat,
    "lookup_miss": step_lookup_miss,
    "readdir": step_readdir,
    "rename": step_rename,
    "unlink": step_unlink,
    "small_files": step_small_files,
    "parallel_create": step_parallel_create,
}
assert set(STEP_FUNCS) == set(STEPS)
