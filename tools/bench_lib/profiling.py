"""`tools/bench --profile DIR`: where pmfs spends its time, measured.

For each step (default: create, stat, rename, unlink, seq_write,
overwrite_fsync):

1. unprofiled: a fresh pmfs mount, the step's prerequisites, then the step
   with the daemon's CPU time metered (/proc/PID/stat): wall and daemon CPU
   per operation;
2. profiled: a fresh pmfs mount whose daemon runs under profwrap.py; after
   the prerequisites a SIGUSR1 opens a cProfile window around the step
   alone.  From it: FUSE requests per operation by type (calls of the
   Operations handlers), bytes per WRITE request, WAL commits per
   operation, the top functions by own time;
3. in-process: the same request sequence driven straight into
   pmfs.fuseops.Operations (no kernel, no pyfuse3 loop, no profiler) on an
   image on /dev/shm with the same backend: what the pmfs adapter + core
   cost per operation, and the time per WAL commit.

The difference between (1)'s daemon CPU per operation and (3) is what
pyfuse3, the request loop and the kernel's /dev/fuse side cost the daemon.  A
round-trip probe (fstat with attribute caching off: one GETATTR each)
measures the floor of one request through pyfuse3 against libfuse's C
passthrough_ll.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pstats
import random
import signal
import subprocess
import sys
import time
import types

from . import systems, workloads
from .util import REPO, BenchError, mounts_under, proc_cpu_seconds

DEFAULT_STEPS = ["create", "stat", "rename", "unlink", "seq_write", "overwrite_fsync"]

HANDLERS = {"lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir", "symlink",
            "link", "unlink", "rmdir", "rename", "open", "create", "read", "write", "flush",
            "release", "fsync", "opendir", "readdir", "releasedir", "fsyncdir", "getxattr",
            "setxattr", "listxattr", "removexattr", "statfs", "access", "init", "fallocate"}

#: the row whose `n` counts the operations of a step's window
PRIMARY = {"create": "create", "stat": "stat_cold", "rename": "rename", "unlink": "unlink",
           "seq_write": "seq_write", "overwrite_fsync": "rand_overwrite_fsync",
           "lookup_miss": "lookup_miss", "readdir": "readdir", "seq_read": "seq_read_cold",
           "rand_read": "rand_read_cold", "mixed_rw": "mixed_rw", "parallel_rw": "parallel_rw",
           "small_files": "small_write", "parallel_create": "parallel_create"}
#: waiting for the next request (pmfs/fuseloop.py: poll(2), and the spin
#: before it; trio's epoll when run on trio): idle, not cost
IDLE = {"<method 'poll' of 'select.poll' objects>", "<built-in method posix.sched_yield>",
        "_spin", "<method 'poll' of 'select.epoll' objects>"}
META_NEEDS = {"stat", "lookup_miss", "readdir", "rename", "unlink"}
IO_NEEDS = {"seq_read", "overwrite_fsync", "rand_read", "mixed_rw", "parallel_rw"}


def _prereqs(ctx, step) -> None:
    if step in META_NEEDS:
        workloads.need_meta(ctx)
    if step in IO_NEEDS:
        workloads.need_datafile(ctx)


def _ops(out: dict, step: str) -> int:
    r = out.get(PRIMARY.get(step, ""), {})
    return int(r.get("n") or 0)


class _Mounted:
    """A pmfs mount for one step (optionally profiled); always unmounted."""

    def __init__(self, workdir, opts, params, progress, wrapper=None, tag=""):
        self.sys = systems.Pmfs(os.path.join(workdir, tag), opts)
        self.sys.profile_wrapper = wrapper
        self.params = params
        self.progress = progress

    def __enter__(self):
        self.sys.prepare()
        os.makedirs(self.sys.workdir, exist_ok=True)
        root = self.sys.start()
        scratch = os.path.join(self.sys.workdir, "scratch")
        os.makedirs(scratch, exist_ok=True)
        return workloads.Ctx(self.sys, root, self.params, scratch, self.progress)

    def __exit__(self, *exc):
        self.sys.stop()
        self.sys.cleanup()
        return False


def _signal_and_wait(pid: int, done: str | None, timeout: float = 60.0) -> None:
    os.kill(pid, signal.SIGUSR1)
    if done is None:
        time.sleep(0.3)  # the handler runs when the daemon's loop next wakes
        return
    deadline = time.monotonic() + timeout
    while not os.path.exists(done):
        if time.monotonic() > deadline:
            raise BenchError("the profiled daemon did not write its profile")
        time.sleep(0.05)


def analyse(prof: str, ops: int, wall: float, top: int = 14) -> dict:
    st = pstats.Stats(prof)
    entries = st.stats  # {(file, line, func): (cc, nc, tt, ct, callers)}
    total_tt = sum(v[2] for v in entries.values())
    handlers = {}
    handler_ct = 0.0
    commit = None
    for (f, _line, fn), (_cc, nc, tt, ct, _callers) in entries.items():
        if f.endswith(os.path.join("pmfs", "fuseops.py")):
            if fn in HANDLERS:
                handlers[fn] = handlers.get(fn, 0) + nc
            elif fn == "wrapper":
                handler_ct += ct
        if f.endswith(os.path.join("pmfs", "wal.py")) and fn == "commit":
            commit = {"calls": nc, "us_per_call_profiled": ct / nc * 1e6 if nc else None}
    idle = sum(v[2] for k, v in entries.items() if k[2] in IDLE)
    busy = total_tt - idle

    def item(key, val):
        f, line, fn = key
        nc, tt, ct = val[1], val[2], val[3]
        short = f.replace(REPO + os.sep, "")
        if "site-packages" + os.sep in short:
            short = short.split("site-packages" + os.sep, 1)[1]
        return {"function": f"{short}:{line}({fn})" if line else fn,
                "calls_per_op": nc / ops if ops else 0,
                "tottime_s": round(tt, 4), "cumtime_s": round(ct, 4),
                "share": tt / busy if busy else 0,
                "us_per_op": tt / ops * 1e6 if ops else 0,
                "cum_us_per_op": ct / ops * 1e6 if ops else 0}
    own = sorted(((k, v) for k, v in entries.items() if k[2] not in IDLE),
                 key=lambda kv: kv[1][2], reverse=True)[:top]
    pm = os.sep + "pmfs" + os.sep
    cum = sorted(((k, v) for k, v in entries.items() if pm in k[0]),
                 key=lambda kv: kv[1][3], reverse=True)[:top]
    return {"ops": ops, "window_wall_s": round(wall, 3),
            "profiled_python_s": round(total_tt, 4),
            "idle_s": round(idle, 4), "busy_s": round(busy, 4),
            "top": [item(k, v) for k, v in own],
            "top_pmfs_cumulative": [item(k, v) for k, v in cum],
            "handler_time_s": round(handler_ct, 4),
            "requests_per_op": {k: round(v / ops, 3) for k, v in
                                sorted(handlers.items(), key=lambda kv: -kv[1])} if ops else {},
            "requests_total": handlers, "wal_commit": commit}


# -- in-process: the adapter and the core without the kernel and pyfuse3 --------------

def _call(coro):
    """Run a handler coroutine to completion, as the daemon's loop does."""
    from pmfs.fuseloop import Loop
    return Loop.drive(coro)


class _Core:
    """pmfs.fuseops.Operations over a FileSystem on an image on /dev/shm."""

    def __init__(self, workdir, opts, params, prof_dir=None):
        self.prof_dir = prof_dir
        os.environ.setdefault("PMEM_IS_PMEM_FORCE", "1" if opts.pmem_force else "0")
        if REPO not in sys.path:
            sys.path.insert(0, REPO)
        from pmfs.fs import FileSystem, MountOptions
        from pmfs.fuseops import Operations
        from pmfs.pmem import open_image
        self.image = os.path.join(workdir, "core.img")
        prefault = ["--prefault"] if opts.prefault else []
        r = subprocess.run([sys.executable, "-c", "import mkfs; mkfs.main()", "-q", "-F",
                            *prefault, self.image, str(params.image_size)], capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=REPO))
        if r.returncode != 0:
            raise BenchError(f"mkfs.pmfs failed: {r.stderr.strip()}")
        self.img = open_image(self.image, backend="auto")
        self.fs = FileSystem(self.img, MountOptions())
        self.ops = Operations(self.fs, 1.0, 1.0, False)
        self.ctx = types.SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)
        self.commit_time = 0.0
        self.commit_calls = 0
        wal = self.fs.wal
        orig = wal.commit

        def timed_commit(tx, _orig=orig):
            t = time.thread_time()
            try:
                return _orig(tx)
            finally:
                self.commit_time += time.thread_time() - t
                self.commit_calls += 1
        wal.commit = timed_commit  # an instance attribute: pmfs code is not touched

    def close(self):
        try:
            self.fs.close()
        finally:
            self.img.close()
            os.unlink(self.image)

    def mkdir(self, name: bytes) -> int:
        return _call(self.ops.mkdir(1, name, 0o755, self.ctx)).st_ino


def _core_measure(core: _Core, key, label, n, fn) -> dict:
    prof = None
    if core.prof_dir:  # a separate pass whose times are not reported
        import cProfile
        prof = cProfile.Profile()  # wall clock: a CPU-time timer costs a system call
        prof.enable()
    c0, t0 = core.commit_calls, core.commit_time
    wall0, start = time.perf_counter(), time.thread_time()
    for i in range(n):
        fn(i)
    secs = time.thread_time() - start  # CPU time: robust against a busy machine
    wall = time.perf_counter() - wall0
    if prof is not None:
        prof.disable()
        prof.dump_stats(os.path.join(core.prof_dir, f"core-{key}.prof"))
    commits = core.commit_calls - c0
    ctime = core.commit_time - t0
    return {"ops": n, "us_per_op": secs / n * 1e6, "wall_us_per_op": wall / n * 1e6,
            "commits_per_op": commits / n,
            "us_per_commit": ctime / commits * 1e6 if commits else None,
            "commit_share": ctime / secs if secs else 0, "sequence": label}


def core_timings(workdir, opts, params, steps, write_size: int, prof_dir=None) -> dict:
    """µs per operation for the FUSE request sequence of each step, in process.

    The sequences are those the profiled windows show (printed next to them);
    lookup references are tracked and forgotten as the kernel would.
    """
    core = _Core(workdir, opts, params, prof_dir)
    out = {"backend": core.img.backend}
    ops, ctx = core.ops, core.ctx
    n = params.files
    try:
        d = core.mkdir(b"core")
        names = [b"f%07d" % i for i in range(n)]
        inos: list[int] = []
        refs: dict[int, int] = {}

        def lookup_miss(name):
            if _call(ops.lookup(d, name, ctx)).st_ino != 0:
                raise BenchError(f"{name!r} exists")

        def create(i):
            lookup_miss(names[i])
            fi, attr = _call(ops.create(d, names[i], 0o100644, os.O_WRONLY | os.O_CREAT, ctx))
            inos.append(attr.st_ino)
            refs[attr.st_ino] = 1
            _call(ops.release(fi.fh))  # no FLUSH: pmfs answers it ENOSYS once
            _call(ops.getattr(d, ctx))  # the parent, before the next permission check
        out["create"] = _core_measure(core, "create", "LOOKUP(miss) CREATE RELEASE GETATTR",
                                      n, create)

        if "stat" in steps:
            # the cache drop before a cold stat makes the kernel forget every inode
            _call(ops.forget([(ino, c) for ino, c in refs.items()]))
            refs = {ino: 0 for ino in inos}

            def stat_(i):
                a = _call(ops.lookup(d, names[i], ctx))
                refs[a.st_ino] += 1
            out["stat"] = _core_measure(core, "stat", "LOOKUP(hit)", n, stat_)

        cur = names
        if "rename" in steps:
            def rename(i):
                lookup_miss(names[i] + b"r")
                _call(ops.rename(d, names[i], d, names[i] + b"r", 0, ctx))
            out["rename"] = _core_measure(core, "rename", "LOOKUP(miss) RENAME", n, rename)
            cur = [nm + b"r" for nm in names]

        if "unlink" in steps:
            def unlink(i):
                _call(ops.unlink(d, cur[i], ctx))
                ino = inos[i]
                if refs.get(ino):  # the kernel evicts the unlinked inode: FORGET
                    _call(ops.forget([(ino, refs.pop(ino))]))
            out["unlink"] = _core_measure(core, "unlink", "UNLINK FORGET", n, unlink)

        out["getattr"] = _core_measure(core, "getattr", "GETATTR", 20000,
                                       lambda i: _call(ops.getattr(d, ctx)))

        if "seq_write" in steps or "overwrite_fsync" in steps:
            fi, attr = _call(ops.create(1, b"data", 0o100644, os.O_RDWR | os.O_CREAT, ctx))
            fh = fi.fh
            size = min(params.seq_size, 256 << 20)
            chunk = os.urandom(64) * (write_size // 64)
            per = size // write_size

            def seqw(i):
                _call(ops.write(fh, i * write_size, chunk))
                if i == per - 1:
                    _call(ops.fsync(fh, 0))
            if "seq_write" in steps:
                r = _core_measure(core, "seq_write", f"WRITE({write_size >> 10} KiB) x {per}, FSYNC", per,
                                  seqw)
                r["MB_per_s"] = write_size / (r["us_per_op"] / 1e6) / 1e6
                out["seq_write"] = r
            else:
                for i in range(per):
                    _call(ops.write(fh, i * write_size, chunk))
            region = min(params.rand_size, size) // 4096
            block = chunk[:4096]
            rnd = random.Random(1)

            def overwrite(i):
                _call(ops.write(fh, rnd.randrange(region) * 4096, block))
                _call(ops.fsync(fh, 0))
            if "overwrite_fsync" in steps:
                out["overwrite_fsync"] = _core_measure(core, "overwrite_fsync", "WRITE(4 KiB) FSYNC", 20000,
                                                       overwrite)
            _call(ops.release(fh))
    except Exception as e:  # pmfs is being edited by others: report, do not die
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        core.close()
    return out


def core_breakdown(prof: str, ops: int, us_per_op: float, top: int = 16) -> list[dict]:
    """The pmfs functions of an in-process pass by cumulative time: their share of
    the profiled pass, scaled to the unprofiled CPU time per operation (the
    profiler inflates every call; the shares stay roughly right)."""
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values()) or 1.0
    pm = os.sep + "pmfs" + os.sep
    rows = sorted(((k, v) for k, v in st.stats.items() if pm in k[0]),
                  key=lambda kv: kv[1][3], reverse=True)[:top]
    return [{"function": f"{f.split(pm, 1)[1]}:{line}({fn})",
             "cum_share": v[3] / total, "own_share": v[2] / total,
             "cum_us_per_op": v[3] / total * us_per_op,
             "own_us_per_op": v[2] / total * us_per_op,
             "calls_per_op": v[1] / ops} for (f, line, fn), v in rows]


# -- the GETATTR round trip -------------------------------------------------------------

def roundtrip(workdir, opts, params, progress) -> dict:
    """fstat() with attribute caching off: one GETATTR request per call."""
    out = {}
    probes = [("pmfs", systems.Pmfs, "attr_timeout=0,entry_timeout=0"),
              ("passthrough_ll", systems.CPassthrough, "timeout=0"),
              ("pyfuse3_passthroughfs", systems.PyfusePassthrough, None)]
    for sid, cls, option in probes:
        o = types.SimpleNamespace(**vars(opts))
        if sid == "pmfs":
            o.pmfs_options = ",".join(x for x in (opts.pmfs_options, option) if x)
        s = cls(os.path.join(workdir, "rt"), o)
        if sid == "passthrough_ll":
            s.extra_args = ["-o", option]
        try:
            progress(f"round trip: {sid}")
            s.prepare()
            os.makedirs(s.workdir, exist_ok=True)
            root = s.start()
            path = os.path.join(root, "probe")
            with open(path, "wb") as f:
                f.write(b"x")
            fd = os.open(path, os.O_RDONLY)
            try:
                n = 0
                c0 = proc_cpu_seconds(s.pid)
                t0 = time.perf_counter()
                while True:
                    for _ in range(200):
                        os.fstat(fd)
                    n += 200
                    if time.perf_counter() - t0 > min(2.0, params.loop_cap):
                        break
                wall = time.perf_counter() - t0
                cpu = proc_cpu_seconds(s.pid) - c0
            finally:
                os.close(fd)
            out[sid] = {"us_per_request": wall / n * 1e6, "requests_per_s": n / wall,
                        "daemon_cpu_us_per_request": cpu / n * 1e6, "n": n}
        except (BenchError, OSError) as e:
            out[sid] = {"error": str(e)}
        finally:
            s.stop()
            s.cleanup()
    return out


# -- the driver -----------------------------------------------------------------------

def main(a, params, opts, steps, progress) -> int:
    import shutil
    import tempfile
    outdir = os.path.abspath(a.profile)
    os.makedirs(outdir, exist_ok=True)
    if not a.only.strip():
        steps = [s for s in workloads.STEPS if s in DEFAULT_STEPS]
    wrapper = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                            "profwrap.py")]
    workdir = tempfile.mkdtemp(prefix="pmfs-bench-prof-", dir="/dev/shm")
    result = {"params": dataclasses.asdict(params), "steps": {}}
    try:
        for step in steps:
            entry = result["steps"].setdefault(step, {})
            # 1. unprofiled
            try:
                with _Mounted(workdir, opts, params, progress, tag=f"{step}-plain") as ctx:
                    _prereqs(ctx, step)
                    out = workloads.STEP_FUNCS[step](ctx)
                    entry["backend"] = ctx.system.backend
                r = out.get(PRIMARY[step], {})
                entry["plain"] = {k: r.get(k) for k in ("value", "n", "seconds",
                                                         "daemon_cpu_us_per_op", "bytes")}
            except (BenchError, OSError) as e:
                entry["plain"] = {"error": str(e)}
            # 2. profiled window
            prefix = os.path.join(outdir, step)
            for f in (prefix + ".1.prof", prefix + ".1.done"):
                if os.path.exists(f):
                    os.unlink(f)
            try:
                with _Mounted(workdir, opts, params, progress, tag=f"{step}-prof",
                              wrapper=wrapper + [prefix]) as ctx:
                    _prereqs(ctx, step)
                    pid = ctx.system.pid
                    _signal_and_wait(pid, None)
                    t0 = time.perf_counter()
                    out = workloads.STEP_FUNCS[step](ctx)
                    wall = time.perf_counter() - t0
                    _signal_and_wait(pid, prefix + ".1.done")
                os.replace(prefix + ".1.prof", prefix + ".prof")
                os.unlink(prefix + ".1.done")
                ops = _ops(out, step)
                entry["profile"] = analyse(prefix + ".prof", ops, wall)
                entry["profile"]["profiled_value"] = out.get(PRIMARY[step], {}).get("value")
                if step == "seq_write":
                    nbytes = out["seq_write"].get("bytes") or 0
                    w = entry["profile"]["requests_total"].get("write", 0)
                    entry["profile"]["bytes_per_write_request"] = nbytes // w if w else None
            except (BenchError, OSError) as e:
                entry["profile"] = {"error": str(e)}
        # 3. in-process
        progress("in-process adapter + core timings")
        ws = result["steps"].get("seq_write", {}).get("profile", {}).get(
            "bytes_per_write_request") or (128 << 10)
        ws = max(4096, min(ws, 1 << 20)) // 4096 * 4096
        try:
            result["core"] = core_timings(workdir, opts, params, steps, ws)
            core_timings(workdir, opts, params, steps, ws, prof_dir=outdir)
            result["core_profile"] = {}
            for key in list(result["core"]):
                f = os.path.join(outdir, f"core-{key}.prof")
                if isinstance(result["core"][key], dict) and os.path.exists(f):
                    c = result["core"][key]
                    result["core_profile"][key] = core_breakdown(f, c["ops"], c["us_per_op"])
        except (BenchError, OSError, ImportError) as e:
            result["core"] = {"error": str(e)}
        result["roundtrip"] = roundtrip(workdir, opts, params, progress)
    finally:
        progress.clear()
        if not mounts_under(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
    text = render(result)
    print(text)
    with open(os.path.join(outdir, "summary.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return 0


def render(result: dict) -> str:
    L = []
    core = result.get("core", {})
    for step, e in result["steps"].items():
        L.append(f"== {step} " + "=" * max(0, 70 - len(step)))
        p = e.get("plain", {})
        if "error" in p:
            L.append(f"  unprofiled: error: {p['error']}")
        elif p.get("n"):
            wall_us = p["seconds"] / p["n"] * 1e6 if p.get("seconds") else None
            L.append(f"  unprofiled: {p['value']:.1f} per s; {p['n']} ops; wall "
                     f"{wall_us:.1f} us/op; daemon CPU {p.get('daemon_cpu_us_per_op')} us/op"
                     f" (backend {e.get('backend')})")
        pr = e.get("profile", {})
        if "error" in pr:
            L.append(f"  profile: error: {pr['error']}")
        elif pr:
            req = ", ".join(f"{k} {v:g}" for k, v in pr["requests_per_op"].items())
            L.append(f"  FUSE requests per op: {req}")
            if pr.get("bytes_per_write_request"):
                L.append(f"  bytes per WRITE request: {pr['bytes_per_write_request']}")
            if pr.get("wal_commit") and pr["wal_commit"]["calls"] >= 0.01 * pr["ops"]:
                c = pr["wal_commit"]
                L.append(f"  WAL commits per op: {c['calls'] / pr['ops']:.2f} "
                         f"({c['us_per_call_profiled']:.1f} us each under the profiler)")
            share = pr["handler_time_s"] / pr["busy_s"] if pr["busy_s"] else 0
            L.append(f"  profiled window: {pr['window_wall_s']} s wall; {pr['idle_s']} s "
                     f"idle in epoll; {pr['busy_s']} s busy, of which "
                     f"{pr['handler_time_s']} s ({share:.0%}) inside the pmfs handlers")
            L.append("  top functions by own time (us/op under the profiler, share of busy; "
                     "pyfuse3/_pyfuse3.py(wrapper) holds pyfuse3's unprofiled Cython loop "
                     "incl. the /dev/fuse syscalls):")
            for t in pr["top"]:
                L.append(f"    {t['us_per_op']:8.2f}  {t['share']:5.1%}  "
                         f"{t['calls_per_op']:6.2f} calls/op  {t['function']}")
            L.append("  pmfs functions by cumulative time (us/op under the profiler):")
            for t in pr["top_pmfs_cumulative"]:
                L.append(f"    {t['cum_us_per_op']:8.2f} cum {t['us_per_op']:8.2f} own  "
                         f"{t['calls_per_op']:6.2f} calls/op  {t['function']}")
        c = core.get(step)
        if c:
            extra = f", {c['MB_per_s']:.0f} MB/s" if "MB_per_s" in c else ""
            com = (f"; {c['commits_per_op']:.2f} WAL commits/op at "
                   f"{c['us_per_commit']:.1f} us each ({c['commit_share']:.0%} of it)"
                   if c.get("us_per_commit") else "")
            L.append(f"  in-process adapter+core ({c['sequence']}): {c['us_per_op']:.1f} "
                     f"us CPU/op{extra}{com}")
            cp = result.get("core_profile", {}).get(step)
            if cp:
                L.append("  in-process pmfs functions by cumulative time (share of a profiled "
                         "pass x the unprofiled CPU us/op):")
                for t in cp:
                    L.append(f"    {t['cum_us_per_op']:8.2f} cum {t['own_us_per_op']:8.2f} own  "
                             f"{t['cum_share']:5.1%}  {t['calls_per_op']:6.2f} calls/op  "
                             f"{t['function']}")
            if p.get("daemon_cpu_us_per_op") and step != "seq_write":
                rest = p["daemon_cpu_us_per_op"] - c["us_per_op"]
                L.append(f"  => daemon CPU/op {p['daemon_cpu_us_per_op']:.1f} us = pmfs "
                         f"{c['us_per_op']:.1f} us + pyfuse3/loop/kernel {rest:.1f} us")
        L.append("")
    if "error" in core:
        L.append(f"in-process timings: error: {core['error']}")
    if "getattr" in core:
        L.append(f"in-process GETATTR through the adapter: {core['getattr']['us_per_op']:.2f} "
                 f"us CPU ({core.get('backend', '?')} backend)")
    rt = result.get("roundtrip", {})
    if rt:
        L.append("GETATTR round trip (fstat, attribute caching off), wall and daemon CPU "
                 "per request:")
        for sid, r in rt.items():
            if "error" in r:
                L.append(f"  {sid:<22} error: {r['error']}")
            else:
                L.append(f"  {sid:<22} {r['us_per_request']:6.1f} us wall, "
                         f"{r['daemon_cpu_us_per_request']:6.1f} us daemon CPU "
                         f"({r['requests_per_s']:.0f}/s)")
    return "\n".join(L)
