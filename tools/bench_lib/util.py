"""Processes, mounts, caches, progress output and facts about the machine."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                     "pmfs-bench")
SHM = "/dev/shm"


class BenchError(Exception):
    """A workload or a system could not run (a one-line reason)."""


# -- progress (on a terminal only) -------------------------------------------

class Progress:
    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._shown = False

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        width = shutil.get_terminal_size((100, 20)).columns - 1
        sys.stderr.write("\r\033[K" + msg[:width])
        sys.stderr.flush()
        self._shown = True

    def clear(self) -> None:
        if self.enabled and self._shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self._shown = False

    def note(self, msg: str) -> None:
        """A line that stays (terminal only)."""
        if self.enabled:
            self.clear()
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()


# -- mounts ---------------------------------------------------------------------

def _unescape(s: str) -> str:
    return (s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def mount_entry(path: str):
    """(source, fstype, options) of the mount at `path`, or None."""
    # resolve the parent only: stat'ing the mount point itself would ask the daemon
    a = os.path.abspath(path)
    real = os.path.join(os.path.realpath(os.path.dirname(a)), os.path.basename(a))
    found = None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 3 and _unescape(parts[1]) == real:
                    # the last entry for a path is the visible one
                    found = (_unescape(parts[0]), parts[2], parts[3])
    except OSError:
        return None
    return found


def fuse_mounted(path: str) -> bool:
    e = mount_entry(path)
    return e is not None and e[1].startswith("fuse")


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below `prefix` (read from /proc/self/mounts only)."""
    prefix = os.path.realpath(prefix)
    out = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 1:
                    mp = _unescape(parts[1])
                    if mp == prefix or mp.startswith(prefix + "/"):
                        out.append(mp)
    except OSError:
        pass
    return out


def close_fds_under(prefix: str) -> int:
    """Close this process's file descriptors on mounts at or below `prefix`
    (e.g. one an interrupted loop left open, which would keep a FUSE mount
    busy).  Uses /proc/self/fdinfo's mnt_id: nothing asks the daemons."""
    prefix = os.path.realpath(prefix)
    ids = set()
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                mp = _unescape(parts[4])
                if mp == prefix or mp.startswith(prefix + "/"):
                    ids.add(parts[0])
    except OSError:
        return 0
    closed = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                info = f.read()
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("mnt_id:") and line.split()[1] in ids:
                try:
                    os.close(fd)
                    closed += 1
                except OSError:
                    pass
                break
    return closed


def fusermount_unmount(path: str) -> None:
    """`fusermount3 -u`, then `-u -z` (lazy) if the mount is busy or broken."""
    if not fuse_mounted(path):
        return
    r = subprocess.run(["fusermount3", "-u", path], capture_output=True)
    if r.returncode != 0 or fuse_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)


def reap(proc: subprocess.Popen | None, timeout: float = 20.0) -> int | None:
    """Wait for a daemon to exit after its unmount; SIGTERM, then SIGKILL."""
    if proc is None:
        return None
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    for sig, t in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(timeout=t)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def wait_mounted(path: str, proc: subprocess.Popen, timeout: float, logfile: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fuse_mounted(path):
            return
        if proc.poll() is not None:
            raise BenchError(f"daemon exited with status {proc.returncode} before mounting: "
                             f"{tail(logfile)}")
        time.sleep(0.02)
    raise BenchError(f"not mounted after {timeout:.0f} s: {tail(logfile)}")


def tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read().strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def proc_cpu_seconds(pid: int) -> float | None:
    """CPU time of a process (all its threads), in seconds.

    From /proc/PID/task/*/schedstat (nanoseconds) where the kernel has
    schedstats, else utime+stime of /proc/PID/stat (clock ticks).
    """
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- caches ----------------------------------------------------------------------

def drop_caches(level: int = 3) -> bool:
    """echo LEVEL > /proc/sys/vm/drop_caches (1 page cache, 2 dentries+inodes, 3 both).

    Only clean pages go, so the file systems under test are not affected
    beyond losing their kernel caches.  False when not permitted.
    """
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write(str(level))
        return True
    except OSError:
        return False


def fadvise_dontneed(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- machine ------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return 0.0


def cmd_version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    out = (r.stdout or r.stderr).strip().splitlines()
    return out[0] if out else "unknown"


def pkg_version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return "unavailable"


def pmfs_commit_path() -> str:
    """Which commit path the pmfs daemon will use (it inherits this
    environment, PMFS_NO_ACCEL included)."""
    try:
        from pmfs.accel import describe
        return describe()
    except Exception as e:  # pmfs not importable: the run reports it elsewhere
        return f"unknown ({e})"


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "memory_gib": round(mem_total_gib(), 1),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "fio": cmd_version(["fio", "--version"]),
        "libfuse": cmd_version(["pkg-config", "--modversion", "fuse3"]),
        "pyfuse3": pkg_version("pyfuse3"),
        "trio": pkg_version("trio"),
        "pmfs_commit_path": pmfs_commit_path(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def fmt_bytes(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}"
    return f"{n} B"


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)
