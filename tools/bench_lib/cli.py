"""tools/bench: the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time

from . import report, systems, workloads
from .util import (SHM, BenchError, Progress, close_fds_under, fuse_mounted, machine_info,
                   mounts_under, parse_size)

DESCRIPTION = """\
Benchmark pmfs against reference file systems measured in the same run: a
kernel tmpfs directory (no FUSE: the limit), libfuse's C passthrough_ll
example, and pyfuse3's passthroughfs.py and tmpfs.py examples.  Everything
runs on /dev/shm.  I/O rows use fio, metadata rows timed os.* loops.  Prints
a table of absolute figures and pmfs/reference ratios."""

EPILOG = """\
systems: pmfs, tmpfs, passthrough_ll, pyfuse3_passthroughfs, pyfuse3_tmpfs
  (or: all, refs; aliases c, py-pt, py-tmpfs)
--only takes row ids, step ids or groups (io, meta, issue); see --list.
Exit status: 0 all measured, 1 some row or system failed, 2 usage, 130 interrupted."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tools/bench", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and short caps (CI smoke test, ~10 s per system)")
    p.add_argument("--systems", default="all", metavar="LIST",
                   help="comma-separated systems (default: all)")
    p.add_argument("--only", default="", metavar="LIST",
                   help="comma-separated rows, steps or groups (default: everything)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--markdown", metavar="FILE", help="also write the table as markdown")
    p.add_argument("--list", action="store_true", help="list rows, steps and groups")
    p.add_argument("--files", type=int, metavar="N",
                   help="files in the directory of the metadata rows")
    p.add_argument("--small-files", type=int, metavar="N", help="files of the small-file rows")
    p.add_argument("--clients", type=int, metavar="N",
                   help="processes / fio jobs of the parallel rows")
    p.add_argument("--seq-size", metavar="SIZE", help="size of the sequential file (e.g. 512M)")
    p.add_argument("--fio-time", type=float, metavar="S", help="seconds per time-based fio job")
    p.add_argument("--image-size", metavar="SIZE", help="pmfs image size (default 2G, quick 256M)")
    p.add_argument("--pmfs-options", default="", metavar="OPTS",
                   help="extra -o options for mount.pmfs (default: none)")
    p.add_argument("--no-pmem-force", dest="pmem_force", action="store_false",
                   help="do not set PMEM_IS_PMEM_FORCE=1 for pmfs (msync backend on tmpfs)")
    p.add_argument("--no-prefault", dest="prefault", action="store_false",
                   help="format the pmfs image without mkfs.pmfs --prefault (its memory "
                        "is then only reserved, and every block faults in on first use)")
    p.add_argument("--keep-failed", action="store_true",
                   help="keep the pmfs image and logs when the daemon reported a problem")
    p.add_argument("--profile", metavar="DIR",
                   help="instead of the comparison: profile pmfs (cProfile windows in the "
                        "daemon, FUSE requests per operation, in-process core timings) and "
                        "write DIR/<step>.prof and DIR/summary.txt")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="rounds (the median is reported; default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return p.parse_args(argv)


def resolve_systems(text: str) -> list[str]:
    order = [c.id for c in systems.ALL]
    want = []
    for t in (x.strip() for x in text.split(",")):
        if not t:
            continue
        if t == "all":
            want += order
        elif t == "refs":
            want += [s for s in order if s != "pmfs"]
        else:
            sid = systems.ALIASES.get(t, t)
            if sid not in systems.BY_ID:
                raise SystemExit(f"tools/bench: unknown system {t!r} (known: "
                                 f"{', '.join(order)})")
            want.append(sid)
    return [s for s in order if s in want]


def resolve_steps(text: str) -> list[str]:
    if not text.strip():
        return list(workloads.STEPS)
    want = set()
    for t in (x.strip() for x in text.split(",")):
        if not t:
            continue
        if t in workloads.GROUPS:
            want.update(workloads.GROUPS[t])
        elif t in workloads.STEP_FUNCS:
            want.add(t)
        elif t in workloads.ROW_BY_ID:
            want.add(workloads.ROW_BY_ID[t].step)
        else:
            raise SystemExit(f"tools/bench: unknown workload {t!r} (see --list)")
    return [s for s in workloads.STEPS if s in want]


def list_workloads() -> None:
    print("rows (id: title [unit], step):")
    for r in workloads.ROWS:
        print(f"  {r.id:<22} {r.title} [{r.unit}]  step={r.step}"
              + ("  (issue table)" if r.issue else ""))
    print("groups:")
    for g, steps in workloads.GROUPS.items():
        print(f"  {g:<8} {', '.join(steps)}")


def make_params(a) -> workloads.Params:
    p = dataclasses.replace(workloads.QUICK if a.quick else workloads.FULL)
    if a.files:
        p.files = a.files
    if a.small_files:
        p.small_files = a.small_files
    if a.clients:
        p.clients = a.clients
    if a.seq_size:
        p.seq_size = parse_size(a.seq_size)
    if a.fio_time:
        p.fio_time = a.fio_time
    if a.image_size:
        p.image_size = parse_size(a.image_size)
    return p


class Opts:
    """What the systems need to know about the command line."""

    def __init__(self, a, params):
        self.image_size = params.image_size
        self.pmfs_options = a.pmfs_options
        self.pmem_force = a.pmem_force
        self.prefault = a.prefault
        self.keep_failed = a.keep_failed


def _terminate(signum, frame):
    raise KeyboardInterrupt


class Runner:
    """All systems mounted side by side; each step runs on every system before the
    next step (so load from elsewhere on the machine spreads over all of them);
    with --repeat the rounds rotate the order and the median is reported."""

    def __init__(self, workdir, opts, params, steps, progress, doc):
        self.workdir = workdir
        self.opts = opts
        self.params = params
        self.steps = steps
        self.progress = progress
        self.doc = doc
        self.live: dict = {}  # id -> (system, ctx)
        self.started: list = []
        self.samples: dict = {}  # id -> row -> [result dicts]

    def start_all(self, sys_ids) -> None:
        scratch = os.path.join(self.workdir, "scratch")
        os.makedirs(scratch, exist_ok=True)
        for sid in sys_ids:
            cls = systems.BY_ID[sid]
            sysobj = cls(self.workdir, self.opts)
            entry = {"short": cls.short, "available": False, "error": None,
                     "notes": sysobj.notes, "description": ""}
            self.doc["systems"][sid] = entry
            self.started.append((sid, sysobj))
            self.progress(f"{sid}: preparing")
            try:
                sysobj.prepare()
                os.makedirs(sysobj.workdir, exist_ok=True)
                self.progress(f"{sid}: mounting")
                root = sysobj.start()
            except BenchError as e:
                entry["error"] = str(e)
                continue
            entry["available"] = True
            self.live[sid] = (sysobj, workloads.Ctx(sysobj, root, self.params, scratch,
                                                    self.progress))
            self.samples[sid] = {}

    def alive(self, sysobj) -> bool:
        return not sysobj.is_fuse or (sysobj.proc is not None and sysobj.proc.poll() is None
                                      and fuse_mounted(sysobj.mnt))

    def run_step(self, sid, step, rnd) -> None:
        sysobj, ctx = self.live[sid]
        samples = self.samples[sid]
        if rnd:
            ctx.say(f"round {rnd + 1}")
        try:
            out = workloads.STEP_FUNCS[step](ctx)
        except (BenchError, OSError) as e:
            msg = str(e) if isinstance(e, BenchError) else \
                f"{type(e).__name__}: {e.strerror or e}" + (f" ({e.filename})"
                                                           if e.filename else "")
            out = {r.id: {"error": msg} for r in workloads.ROWS if r.step == step}
        for rid, r in out.items():
            samples.setdefault(rid, []).append(r)
        if not self.alive(sysobj):
            self.doc["systems"][sid]["notes"].append(f"the daemon died during {step}")
            del self.live[sid]

    def run(self, repeat: int) -> None:
        order = list(self.live)
        for rnd in range(repeat):
            for step in self.steps:
                k = rnd % max(1, len(order))
                for sid in order[k:] + order[:k]:
                    if sid in self.live:
                        self.run_step(sid, step, rnd)

    def stop_all(self) -> None:
        """Unmount and reap everything; further signals do not cut this short."""
        sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
        try:
            close_fds_under(self.workdir)  # left open by an interrupted loop
            for sid, sysobj in self.started:
                entry = self.doc["systems"][sid]
                try:
                    self.progress(f"{sid}: unmounting")
                    sysobj.stop()
                    if sid == "pmfs":
                        entry["backend"] = getattr(sysobj, "backend", "?")
                    entry["description"] = sysobj.description()
                    sysobj.cleanup()
                except BaseException as e:  # keep going: the others must be unmounted too
                    entry["notes"].append(f"clean-up failed: {type(e).__name__}: {e}")
                if sid in self.live and not self.live[sid][1].cold_ok:
                    self.doc["cold_method"] = "fadvise(DONTNEED) (drop_caches not permitted)"
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    def results(self) -> dict:
        """The median sample of each row (by value); errors only when all failed."""
        out = {}
        for sid, rows in self.samples.items():
            out[sid] = {}
            for rid, lst in rows.items():
                good = sorted((r for r in lst if "value" in r), key=lambda r: r["value"])
                if good:
                    med = dict(good[(len(good) - 1) // 2])
                    if len(lst) > 1:
                        med["samples"] = [r.get("value") for r in lst]
                    out[sid][rid] = med
                else:
                    out[sid][rid] = lst[-1]
        return out


def loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.list:
        list_workloads()
        return 0
    params = make_params(a)
    sys_ids = resolve_systems(a.systems)
    steps = resolve_steps(a.only)
    progress = Progress(False if a.no_progress else None)
    if shutil.which("fio") is None and any(s in workloads.GROUPS["io"] for s in steps):
        print("tools/bench: fio is not installed (apt-get install fio)", file=sys.stderr)
        return 1
    if any(systems.BY_ID[s].is_fuse for s in sys_ids) and (
            not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None):
        print("tools/bench: FUSE is not available (/dev/fuse, fusermount3)", file=sys.stderr)
        return 1
    if not os.path.isdir(SHM):
        print("tools/bench: /dev/shm is missing", file=sys.stderr)
        return 1
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)

    if a.profile:
        from . import profiling
        return profiling.main(a, params, Opts(a, params), steps, progress)

    workdir = tempfile.mkdtemp(prefix="pmfs-bench-", dir=SHM)
    doc = {"tool": "tools/bench", "format": 1, "mode": "quick" if a.quick else "full",
           "machine": machine_info(),
           "params": dict(dataclasses.asdict(params), repeat=a.repeat),
           "params_obj": params, "order": sys_ids, "steps": steps,
           "cold_method": "echo 1|2|3 > /proc/sys/vm/drop_caches",
           "systems": {}, "results": {},
           "rows": [dict(dataclasses.asdict(r), title=workloads.row_title(r, params))
                    for r in workloads.ROWS if r.step in steps]}
    interrupted = False
    runner = Runner(workdir, Opts(a, params), params, steps, progress, doc)
    doc["loadavg_start"] = loadavg()
    t0 = time.monotonic()
    try:
        try:
            runner.start_all(sys_ids)
            runner.run(a.repeat)
        finally:
            runner.stop_all()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.clear()
        doc["loadavg_end"] = loadavg()
        doc["seconds"] = round(time.monotonic() - t0, 1)
        doc["results"] = runner.results()
        mounted = mounts_under(workdir)
        if mounted:
            print(f"tools/bench: still mounted, not removing {workdir}: {mounted}",
                  file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    doc["ratios"] = report.ratios(doc) if "pmfs" in doc["results"] else {}
    doc["goal"] = report.goal(doc) if "pmfs" in doc["results"] else {}
    print(report.render(doc))
    if interrupted:
        print("\ninterrupted: the table holds what was measured before", file=sys.stderr)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(report.markdown(doc) + "\n")
    if a.json:
        out = {k: v for k, v in doc.items() if k != "params_obj"}
        out["interrupted"] = interrupted
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(tmp, a.json)
    if interrupted:
        return 130
    failed = any(not doc["systems"][s]["available"] for s in doc["systems"] if s == "pmfs")
    failed |= any("error" in r for rr in doc["results"].values() for r in rr.values())
    return 1 if failed else 0
