"""The file systems under test.

Every system lives in its own directory under the run's work directory on
/dev/shm.  FUSE daemons run in the foreground in their own session (a
Ctrl-C on the terminal reaches the benchmark, not them), log to a file,
and are always unmounted (`fusermount3 -u`, then `-u -z`) and reaped
(SIGTERM, then SIGKILL) by `stop()`.

The references are obtained at run time, never vendored:

* libfuse's C `passthrough_ll` is compiled from the examples Debian's
  libfuse3-dev ships (/usr/share/doc/libfuse3-dev/examples) with gcc and
  `pkg-config fuse3` into ~/.cache/pmfs-bench;
* pyfuse3's `examples/passthroughfs.py` and `examples/tmpfs.py` come from
  the pyfuse3 source distribution of the installed pyfuse3 version
  (`pip download --no-binary :all: --no-deps`), unpacked into the cache.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request

from .util import (CACHE, REPO, BenchError, fuse_mounted, fusermount_unmount, pkg_version,
                   reap, tail, wait_mounted)

LIBFUSE_EXAMPLES = "/usr/share/doc/libfuse3-dev/examples"


class System:
    id = "?"
    short = "?"  # column label
    is_fuse = True
    is_reference = True
    max_seq_size: int | None = None  # cap on the sequential file (None: no cap)

    def __init__(self, workdir: str, opts):
        self.workdir = os.path.join(workdir, self.id)
        self.opts = opts
        self.proc: subprocess.Popen | None = None
        self.mnt = os.path.join(self.workdir, "mnt")
        self.log = os.path.join(self.workdir, "daemon.log")
        self.notes: list[str] = []
        self.extra_args: list[str] = []  # more daemon arguments (e.g. ["-o", "timeout=0"])

    # -- to override ----------------------------------------------------------
    def prepare(self) -> None:
        """Build or fetch what the system needs (BenchError: unavailable)."""

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict:
        return dict(os.environ)

    def before_mount(self) -> None:
        pass

    def description(self) -> str:
        return self.id

    def info(self) -> dict:
        return {"description": self.description(), "notes": self.notes}

    # -- life cycle -------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> str:
        """Mount; returns the directory the workloads use."""
        os.makedirs(self.mnt, exist_ok=True)
        self.before_mount()
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=subprocess.STDOUT,
                                         env=self.env(), cwd=self.workdir,
                                         start_new_session=True)
        try:
            wait_mounted(self.mnt, self.proc, 30.0, self.log)
        except BaseException:
            self.stop()
            raise
        return self.mnt

    def stop(self) -> None:
        """Unmount and reap (idempotent; safe after a failed start)."""
        try:
            fusermount_unmount(self.mnt)
        finally:
            rc = reap(self.proc)
            self.proc = None
            if rc not in (None, 0):
                self.notes.append(f"daemon exited with status {rc}: {tail(self.log)}")
            if fuse_mounted(self.mnt):  # last resort: never leave a mount behind
                subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True)

    def cleanup(self) -> None:
        """Remove the system's files (never while something is mounted there)."""
        if not fuse_mounted(self.mnt):
            shutil.rmtree(self.workdir, ignore_errors=True)


class KernelTmpfs(System):
    id = "tmpfs"
    short = "tmpfs"
    is_fuse = False

    def description(self) -> str:
        return "kernel tmpfs: a directory on /dev/shm, no FUSE (the limit)"

    def start(self) -> str:
        self.mnt = os.path.join(self.workdir, "dir")
        os.makedirs(self.mnt, exist_ok=True)
        return self.mnt

    def stop(self) -> None:
        pass


def _copy_example(name: str, dest: str) -> None:
    src = os.path.join(LIBFUSE_EXAMPLES, name)
    if os.path.exists(src):
        shutil.copyfile(src, dest)
    elif os.path.exists(src + ".gz"):
        with gzip.open(src + ".gz", "rb") as f, open(dest, "wb") as g:
            shutil.copyfileobj(f, g)
    else:
        raise BenchError(f"{src} not found (install libfuse3-dev)")


class CPassthrough(System):
    """libfuse's passthrough_ll example (C, low-level API, multi-threaded)."""

    id = "passthrough_ll"
    short = "C-pt_ll"

    def __init__(self, workdir, opts):
        super().__init__(workdir, opts)
        self.src = os.path.join(self.workdir, "src")
        self.binary = None
        self.libfuse = "?"

    def prepare(self) -> None:
        for tool in ("gcc", "pkg-config", "fusermount3"):
            if shutil.which(tool) is None:
                raise BenchError(f"{tool} is not installed")
        r = subprocess.run(["pkg-config", "--modversion", "fuse3"], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise BenchError("pkg-config does not know fuse3 (install libfuse3-dev)")
        self.libfuse = r.stdout.strip()
        build = os.path.join(CACHE, f"libfuse-{self.libfuse}")
        binary = os.path.join(build, "passthrough_ll")
        if not os.path.exists(binary):
            os.makedirs(build, exist_ok=True)
            for f in ("passthrough_ll.c", "passthrough_helpers.h"):
                _copy_example(f, os.path.join(build, f))
            flags = subprocess.run(["pkg-config", "fuse3", "--cflags", "--libs"],
                                   capture_output=True, text=True).stdout.split()
            r = subprocess.run(["gcc", "-O2", "-Wall", "-o", binary + ".tmp",
                                os.path.join(build, "passthrough_ll.c"), *flags],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise BenchError(f"gcc failed to build passthrough_ll: "
                                 f"{r.stderr.strip().splitlines()[-1:]}")
            os.replace(binary + ".tmp", binary)
        self.binary = binary

    def before_mount(self) -> None:
        os.makedirs(self.src, exist_ok=True)

    def command(self) -> list[str]:
        # defaults: multi-threaded, cache=auto (timeout 1 s), no writeback cache
        return [self.binary, "-f", "-o", f"source={self.src}", *self.extra_args, self.mnt]

    def description(self) -> str:
        return (f"libfuse {self.libfuse} example passthrough_ll (C, low-level API, "
                f"multi-threaded, defaults) serving a directory on /dev/shm; built from "
                f"{LIBFUSE_EXAMPLES}. passthrough_hp (C++) is not shipped there, so this "
                f"stands in for the issue's 'passthrough (hp)'")


def _index_url() -> str:
    """The package index pip would use (PIP_INDEX_URL or pip's configuration)."""
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        try:
            r = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                               capture_output=True, text=True, timeout=60)
            url = r.stdout.strip() if r.returncode == 0 else ""
        except (OSError, subprocess.TimeoutExpired):
            url = ""
    return (url or "https://pypi.org/simple").rstrip("/")


def _download_sdist(project: str, ver: str, dest: str) -> None:
    """Fetch `project`'s sdist of version `ver` to `dest`, checked against its sha256.

    Straight from the index's simple API (PEP 691 JSON): `pip download
    --no-binary :all:` would also build the sdist's metadata, which pulls
    and compiles its build dependencies from source (minutes, or a hang).
    """
    name = f"{project}-{ver}.tar.gz"
    url = f"{_index_url()}/{project}/"
    try:
        req = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            body = r.read()
            ctype = r.headers.get("Content-Type", "")
        if "json" in ctype:
            files = json.loads(body).get("files", [])
        else:  # PEP 503 HTML: <a href="URL#sha256=HEX">NAME</a>
            files = []
            for href, text in re.findall(rb'<a[^>]*href="([^"]+)"[^>]*>([^<]+)</a>', body):
                u, _, frag = html.unescape(href.decode()).partition("#")
                h = dict([frag.split("=", 1)]) if "=" in frag else {}
                files.append({"filename": html.unescape(text.decode()).strip(), "url": u,
                              "hashes": h})
        entry = next((f for f in files if f.get("filename") == name), None)
        if entry is None:
            raise BenchError(f"{url} lists no {name}")
        with urllib.request.urlopen(urllib.parse.urljoin(url, entry["url"]), timeout=120) as r:
            data = r.read()
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, bad JSON
        raise BenchError(f"could not download {name} from {url}: {e}") from None
    want = entry.get("hashes", {}).get("sha256")
    if want and hashlib.sha256(data).hexdigest() != want:
        raise BenchError(f"{name} from {url} does not match its sha256 {want}")
    tmp = dest + ".part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)


def pyfuse3_examples() -> str:
    """The examples directory of the installed pyfuse3's sdist (fetched once)."""
    ver = pkg_version("pyfuse3")
    if ver == "unavailable":
        raise BenchError(f"pyfuse3 is not installed for {sys.executable}")
    exdir = os.path.join(CACHE, f"pyfuse3-{ver}", "examples")
    want = ("passthroughfs.py", "tmpfs.py")
    if all(os.path.exists(os.path.join(exdir, w)) for w in want):
        return exdir
    sdist_dir = os.path.join(CACHE, "sdist")
    os.makedirs(sdist_dir, exist_ok=True)
    tarball = os.path.join(sdist_dir, f"pyfuse3-{ver}.tar.gz")
    if not os.path.exists(tarball):
        _download_sdist("pyfuse3", ver, tarball)
    os.makedirs(exdir, exist_ok=True)
    with tarfile.open(tarball) as tf:
        for m in tf.getmembers():
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 3 and parts[1] == "examples" and parts[2] in want:
                data = tf.extractfile(m).read()
                with open(os.path.join(exdir, parts[2]), "wb") as f:
                    f.write(data)
    missing = [w for w in want if not os.path.exists(os.path.join(exdir, w))]
    if missing:
        raise BenchError(f"the pyfuse3 {ver} sdist has no examples/{missing[0]}")
    return exdir


class PyfuseExample(System):
    script = "?"
    what = ""

    def prepare(self) -> None:
        self.path = os.path.join(pyfuse3_examples(), self.script)
        with open(self.path, errors="replace") as f:
            text = f.read()
        # handlers it lacks: the kernel stops sending those requests after ENOSYS
        self.missing = [h for h in ("fsync", "getxattr")
                        if not re.search(rf"\bdef {h}\s*\(", text)]

    def description(self) -> str:
        d = (f"pyfuse3 {pkg_version('pyfuse3')} examples/{self.script} from the PyPI sdist, "
             f"run with {sys.executable}{self.what}")
        if getattr(self, "missing", None):
            d += (f"; implements no {'/'.join(self.missing)} (after the first ENOSYS the "
                  f"kernel answers these itself: fsync does no work)")
        return d


class PyfusePassthrough(PyfuseExample):
    id = "pyfuse3_passthroughfs"
    short = "py-pt"
    script = "passthroughfs.py"

    def __init__(self, workdir, opts):
        super().__init__(workdir, opts)
        self.src = os.path.join(self.workdir, "src")

    def before_mount(self) -> None:
        os.makedirs(self.src, exist_ok=True)

    what = ", serving a directory on /dev/shm"

    def command(self) -> list[str]:
        return [sys.executable, self.path, self.src, self.mnt]


class PyfuseTmpfs(PyfuseExample):
    id = "pyfuse3_tmpfs"
    short = "py-tmpfs"
    script = "tmpfs.py"
    #: it rewrites the whole file (an SQLite blob) on every write and reads
    #: the whole blob for every read, so the cost of an operation grows with
    #: the file: capped so a run stays short
    max_seq_size = 32 << 20

    what = (", in-memory SQLite, writeback cache, 300 s timeouts; its files are capped "
            "at 32 MiB here: every read/write handles the whole file")

    def command(self) -> list[str]:
        return [sys.executable, self.path, self.mnt]


class Pmfs(System):
    id = "pmfs"
    short = "pmfs"
    is_reference = False

    def __init__(self, workdir, opts):
        super().__init__(workdir, opts)
        self.image = os.path.join(self.workdir, "pmfs.img")
        self.pmfs_log = os.path.join(self.workdir, "pmfs.log")
        self.backend = "?"
        self.profile_wrapper = None  # set by the profiler: [python, wrapper.py, OUT]
        self.version = "?"

    def _env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"]
                                    if env.get("PYTHONPATH") else "")
        if self.opts.pmem_force:
            env["PMEM_IS_PMEM_FORCE"] = "1"
        return env

    def env(self) -> dict:
        return self._env()

    def prepare(self) -> None:
        r = subprocess.run([sys.executable, "-c", "import pmfs, pmfs.mount, mkfs; "
                            "print(pmfs.__version__)"], capture_output=True, text=True,
                           env=self._env())
        if r.returncode != 0:
            raise BenchError(f"pmfs is not importable with {sys.executable}: "
                             f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
        self.version = r.stdout.strip()

    def before_mount(self) -> None:
        if os.path.exists(self.image):
            os.unlink(self.image)
        for f in (self.log, self.pmfs_log):
            if os.path.exists(f):
                os.unlink(f)
        prefault = ["--prefault"] if self.opts.prefault else []
        r = subprocess.run([sys.executable, "-c", "import mkfs; mkfs.main()", "-q", *prefault,
                            self.image, str(self.opts.image_size)], capture_output=True,
                           text=True, env=self._env(), cwd=self.workdir)
        if r.returncode != 0:
            raise BenchError(f"mkfs.pmfs failed: {r.stderr.strip()}")

    def mount_options(self) -> str:
        opts = [f"log={self.pmfs_log}"]
        if self.opts.pmfs_options:
            opts.append(self.opts.pmfs_options)
        return ",".join(opts)

    def command(self) -> list[str]:
        pre = self.profile_wrapper or [sys.executable]
        return [*pre, "-m", "pmfs.mount", self.image, self.mnt, "-f",
                "-o", self.mount_options()]

    def start(self) -> str:
        root = super().start()
        m = None
        try:
            with open(self.pmfs_log, errors="replace") as f:
                m = re.search(r"opened .*\(([\w-]+) backend", f.read())
        except OSError:
            pass
        self.backend = m.group(1) if m else "unknown"
        return root

    def stop(self) -> None:
        super().stop()
        text = ""
        for log in (self.log, self.pmfs_log):
            try:
                with open(log, errors="replace") as f:
                    text += f.read()
            except OSError:
                pass
        if "Traceback" in text:
            self.notes.append(f"the daemon logged a traceback (see {self.pmfs_log})")
        if re.search(r"\b[1-9]\d* corruption event", text):
            self.notes.append(f"the daemon reported corruption (see {self.pmfs_log})")

    def cleanup(self) -> None:
        if self.notes and self.opts.keep_failed:
            return  # keep the image and log for a post-mortem
        super().cleanup()

    def description(self) -> str:
        env = "PMEM_IS_PMEM_FORCE=1, " if self.opts.pmem_force else ""
        extra = f"-o {self.opts.pmfs_options}" if self.opts.pmfs_options else \
            "default mount options"
        made = "mkfs.pmfs --prefault" if self.opts.prefault else "mkfs.pmfs"
        return (f"pmfs {self.version}, {self.opts.image_size >> 20} MiB image on /dev/shm "
                f"({made}), {env}{self.backend} backend, {extra}")

    def info(self) -> dict:
        d = super().info()
        d["backend"] = self.backend
        return d


ALL = [Pmfs, KernelTmpfs, CPassthrough, PyfusePassthrough, PyfuseTmpfs]
BY_ID = {c.id: c for c in ALL}
ALIASES = {"c": "passthrough_ll", "passthrough": "passthrough_ll", "ll": "passthrough_ll",
           "passthroughfs": "pyfuse3_passthroughfs", "pyfuse3-pt": "pyfuse3_passthroughfs",
           "py-pt": "pyfuse3_passthroughfs", "pyfuse3-tmpfs": "pyfuse3_tmpfs",
           "py-tmpfs": "pyfuse3_tmpfs", "kernel": "tmpfs"}
