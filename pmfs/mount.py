"""mount.pmfs / pmfs: mount a pmfs image through FUSE.

    mount.pmfs IMAGE MOUNTPOINT [-o OPTIONS] [-f] [--debug]
    pmfs IMAGE MOUNTPOINT -o OPTIONS          (what mount.fuse3 runs)

An fstab line mounts it at boot or with `mount /mnt/pmfs`:

    /var/lib/pmfs/default.img  /mnt/pmfs  fuse.pmfs  defaults  0 0

Without -f the program forks: the parent returns once the file system is
live (exit 0) or prints why it could not mount (exit 32).  The daemon
holds an exclusive lock on the image for as long as it runs, replays the
WAL and processes orphans before serving, and on SIGTERM, SIGINT or
`fusermount3 -u` persists everything and marks the image clean.

The daemon logs what it does (mount, recovery, corruption met, unmount)
to stderr in the foreground; in the background to the file -o log=PATH
names, or to syslog (facility daemon) with -o log=syslog or by default
when a syslog daemon listens on /dev/log, else to $TMPDIR/pmfs-UID.log.
-o debug adds one line per FUSE request: its name, its arguments (data
abbreviated to its size) and its answer.  At unmount the log gets a
summary: requests served and how many failed with an I/O error, what
recovery did at mount (transactions replayed, orphans freed) and the
corruption events met.

Exit codes (as mount(8)): 0 mounted, 1 usage error, 32 mount failure.
"""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import signal
import socket
import stat
import sys

from . import __version__
from .cli import ArgumentParser, QuietError, UsageError, run
from .fs import FileSystem, MountOptions
from .layout import FormatError
from .pmem import ImageBusy, ImageError, open_image
from .superblock import SuperblockError

log = logging.getLogger("pmfs")

EXIT_OK, EXIT_USAGE, EXIT_FAIL = 0, 1, 32

#: options handed to the kernel / libfuse as they are
_FUSE_FLAGS = {"nosuid", "suid", "nodev", "dev", "noexec", "exec", "dirsync"}
#: generic mount(8)/fstab options that concern nobody here
_IGNORED = {"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "_netdev",
            "nofail", "rw", "async", "lazytime", "nolazytime", "nodiratime", "diratime",
            "norelatime", "nostrictatime", "loud", "silent", "default_permissions"}


class Config:
    def __init__(self):
        self.readonly = False
        self.sync = False
        self.allow_other = False
        self.atime = "relatime"
        self.debug = False
        self.log = None
        self.fsname = None
        self.subtype = "pmfs"
        self.backend = "auto"
        self.attr_timeout = 60.0
        self.entry_timeout = 60.0
        self.fuse_flags: list[str] = []
        self.recover_foreign = False
        self.readahead_kb = 4096
        self.spin_us = 50
        self.reclaim_batch = 64
        self.eof_prealloc = 256


def _number(key: str, val: str, conv, lo, hi=None):
    """The value of -o key=val: conv(val) in [lo, hi), else a usage error."""
    try:
        x = conv(val)
        if not (lo <= x and (hi is None or x < hi)):
            raise ValueError
    except ValueError:
        raise UsageError(f"invalid value for {key}: {val!r}") from None
    return x


def parse_options(text_list) -> Config:
    cfg = Config()
    for text in text_list:
        for opt in text.split(","):
            opt = opt.strip()
            if not opt:
                continue
            key, eq, val = opt.partition("=")
            if key == "ro":
                cfg.readonly = True
            elif key == "sync":
                cfg.sync = True
            elif key == "allow_other":
                cfg.allow_other = True
            elif key in ("noatime", "relatime", "strictatime"):
                cfg.atime = key
            elif key == "atime":
                cfg.atime = "relatime"
            elif key == "debug":
                cfg.debug = True
            elif key == "log" and eq:
                cfg.log = val
            elif key == "fsname" and eq:
                cfg.fsname = val
            elif key == "subtype" and eq:
                cfg.subtype = val
            elif key == "backend" and eq:
                if val not in ("auto", "libpmem", "msync"):
                    raise UsageError(f"invalid value for backend: {val!r} (auto, libpmem "
                                     f"or msync)")
                cfg.backend = val
            elif key in ("attr_timeout", "entry_timeout") and eq:
                setattr(cfg, key, _number(key, val, float, 0, 1e9))  # also nan, inf
            elif key == "readahead" and eq:
                cfg.readahead_kb = _number(key, val, int, 0)
            elif key == "spin" and eq:
                cfg.spin_us = _number(key, val, int, 0)
            elif key == "reclaim_batch" and eq:
                cfg.reclaim_batch = _number(key, val, int, 1)
            elif key == "eof_prealloc" and eq:
                cfg.eof_prealloc = _number(key, val, int, 0, 1 << 20)
            elif key == "force_recovery":
                cfg.recover_foreign = True
            elif key in _FUSE_FLAGS:
                cfg.fuse_flags.append(key)
            elif key in _IGNORED or key.startswith(("x-", "comment")):
                pass
            else:
                raise UsageError(f"unknown mount option {opt!r}")
    return cfg


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(
        prog=prog,
        description="Mount a pmfs image (made by mkfs.pmfs) at MOUNTPOINT through FUSE.",
        epilog="Options (-o, comma separated): ro, sync (every write durable on return), "
               "allow_other (other users may access; implies default_permissions, which "
               "is always on), noatime|relatime|strictatime (atime = relatime; "
               "noatime also lets the kernel cache symlink targets), debug "
               "(trace every request on one line), log=PATH|syslog (where the daemon logs: a "
               "file, or syslog with facility daemon; default: stderr with -f, else "
               "syslog if a syslog daemon listens on /dev/log, else $TMPDIR/pmfs-UID.log; "
               "a file named syslog is log=./syslog; at unmount the log gets a summary: "
               "requests served, errors, what recovery did at mount), "
               "fsname=NAME, subtype=NAME, "
               "backend=auto|libpmem|msync, attr_timeout=SECONDS, entry_timeout=SECONDS "
               "(how long the kernel caches attributes and names, default 60), "
               "readahead=KB (kernel read-ahead of the mount, default 4096; root only), "
               "spin=MICROSECONDS (how long the daemon polls for the next request "
               "before it sleeps, default 50; 0 never spins), "
               "reclaim_batch=N (unlinked inodes the kernel has forgotten are freed N "
               "per transaction, default 64, and at statfs, sync, a full file system, "
               "every 5 s and unmount; 1 frees each at once), "
               "eof_prealloc=BLOCKS (a file of 64 KiB or more that grows by small "
               "appends gets up to this many zeroed 4 KiB blocks allocated past its "
               "end in advance, as many as it holds without a hole, freed again at "
               "its last close; default 256; 0 never), "
               "nosuid|suid, nodev|dev, noexec|exec, dirsync (passed to the kernel), "
               "force_recovery (recover an image marked as mounted on another host). "
               "Generic fstab options (defaults, rw, auto, nofail, _netdev, ...) are "
               "accepted and ignored. Exit codes: 0 mounted, 1 usage error, 32 mount failure.")
    p.add_argument("image", metavar="IMAGE", help="the image file (or DAX device) "
                   "made by mkfs.pmfs")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="mount options, comma separated (see below); may be repeated")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground (log to stderr)")
    p.add_argument("-s", dest="single", action="store_true",
                   help="accepted for compatibility (pmfs always serves one request "
                        "at a time)")
    p.add_argument("-n", dest="no_mtab", action="store_true",
                   help="accepted for compatibility with mount helpers")
    p.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    p.add_argument("-V", "--version", action="version", version=f"{prog} {__version__}")
    return p


#: where log=syslog (and the background default) sends the log; the
#: environment variable is for tests (a socket of their own)
def _syslog_address() -> str:
    return os.environ.get("PMFS_SYSLOG_SOCKET", "/dev/log")


def _syslog_handler() -> logging.Handler:
    """A handler for the local syslog daemon (facility daemon); OSError if
    there is none listening."""
    addr = _syslog_address()
    # SysLogHandler ignores a socket nobody listens on: try it first
    err: OSError | None = None
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as s:
            try:
                s.connect(addr)
            except OSError as e:
                err = err or e
                continue
        return logging.handlers.SysLogHandler(
            address=addr, facility=logging.handlers.SysLogHandler.LOG_DAEMON, socktype=kind)
    assert err is not None
    raise err


def log_destination(cfg: Config, foreground: bool) -> str:
    """Where the daemon's log goes: 'stderr', 'syslog' or a file path."""
    if cfg.log == "syslog":
        return "syslog"
    if cfg.log:
        return os.path.abspath(cfg.log)
    if foreground:
        return "stderr"
    return "syslog-or-file"


def _setup_logging(cfg: Config, foreground: bool) -> str:
    """Send the log where -o log= / -f say; returns where it went (shown at
    start-up in the log itself and used in messages)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    # until a real handler is in place nothing may reach logging's
    # last-resort handler (a second line on the user's terminal)
    root.addHandler(logging.NullHandler())
    level = logging.DEBUG if cfg.debug else logging.INFO
    fmt = "%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s"
    dest = log_destination(cfg, foreground)
    handler: logging.Handler
    if dest == "stderr":
        handler = logging.StreamHandler(sys.stderr)
    elif dest in ("syslog", "syslog-or-file"):
        try:
            handler = _syslog_handler()
            fmt = "pmfs[%(process)d]: %(levelname)s: %(message)s"
            dest = "syslog"
        except OSError as e:
            if dest == "syslog":
                raise QuietError(f"cannot log to syslog: {_syslog_address()}: "
                                 f"{e.strerror or e} (is a syslog daemon running? "
                                 f"-o log=PATH logs to a file)", EXIT_FAIL) from None
            # no syslog: never drop the log (corruption reports, the summary);
            # the fallback file is opened without following a planted symlink
            handler = logging.StreamHandler(_private_log())
            import tempfile
            dest = os.path.join(tempfile.gettempdir(), f"pmfs-{os.getuid()}.log")
    elif dest != "stderr":
        try:
            handler = logging.FileHandler(dest)
        except OSError as e:
            raise QuietError(f"cannot open the log file {dest}: "
                             f"{e.strerror or e} (-o log=PATH)", EXIT_FAIL) from None
    handler.setFormatter(logging.Formatter(fmt))
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    # a fatal signal (above all SIGBUS: the image file shrank under the
    # mapping) is written to the log with where it struck, not lost
    stream = getattr(handler, "stream", None)
    if stream is not None:
        import faulthandler
        try:
            faulthandler.enable(stream)
        except (ValueError, OSError, AttributeError):
            pass
    root.setLevel(level)
    logging.getLogger("pyfuse3").setLevel(logging.DEBUG if cfg.debug else logging.WARNING)
    return dest


def _private_log():
    """The fallback log, $TMPDIR/pmfs-UID.log, opened for appending without
    following a symlink and only if it is a regular file of ours: in a
    world-writable directory, anyone could have made that name first (a
    symlink to /etc/shadow, for a daemon run by root)."""
    import tempfile
    path = os.path.join(tempfile.gettempdir(), f"pmfs-{os.getuid()}.log")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError:
        return open(os.devnull, "a")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        return open(os.devnull, "a")
    return os.fdopen(fd, "a", buffering=1)


def _writable(path: str) -> bool:
    """Can this process open `path` for writing (also immutable files)?"""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def stat_is_dir(mode: int) -> bool:
    return stat.S_ISDIR(mode)


def image_is_mounted(image: str) -> bool:
    """True if a mount in /proc/mounts has `image` as its source (fsname)."""
    real = os.path.realpath(image)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2].startswith("fuse") and (
                        parts[0] == real or parts[0] == image):
                    return True
    except OSError:
        pass
    return False


def _check_mountpoint(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise QuietError(f"mount point {path} does not exist", EXIT_FAIL) from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise QuietError(f"mount point {path} is a dead FUSE mount (its daemon died); "
                             f"run fusermount3 -u {path} first", EXIT_FAIL) from None
        raise QuietError(f"mount point {path}: {e.strerror}", EXIT_FAIL) from None
    if not stat_is_dir(st.st_mode):
        raise QuietError(f"mount point {path} is not a directory", EXIT_FAIL)
    if os.path.ismount(path):
        try:
            with open("/proc/self/mounts") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) > 2 and os.path.realpath(path) == parts[1] \
                            and parts[2].startswith("fuse"):
                        # stat() may have been answered from the kernel's
                        # cache; statfs always asks the daemon
                        try:
                            os.statvfs(path)
                        except OSError as e:
                            if e.errno == errno.ENOTCONN:
                                raise QuietError(
                                    f"mount point {path} is a dead FUSE mount (its daemon "
                                    f"died); run fusermount3 -u {path} first",
                                    EXIT_FAIL) from None
                        raise QuietError(f"{path} is already a FUSE mount point", EXIT_FAIL)
        except OSError:
            pass


class Daemon:
    """Opens the image, mounts, serves, and cleans up."""

    def __init__(self, image: str, mountpoint: str, cfg: Config):
        # an image named through a symlink (e.g. /dev/disk/by-id/...) is the
        # file it points to; the image itself is then opened O_NOFOLLOW
        self.image = os.path.realpath(image)
        self.mountpoint = os.path.abspath(mountpoint)
        self.cfg = cfg
        self.img = None
        self.fs = None
        self.ops = None
        self.ext = None
        self.mounted = False
        #: messages for the user at mount time (also logged)
        self.warnings: list[str] = []

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        log.warning("%s", msg)

    def prepare(self) -> None:
        """Everything that can fail before the mount is live."""
        cfg = self.cfg
        readonly = cfg.readonly
        if not readonly and os.path.exists(self.image) and not _writable(self.image):
            self.warn(f"{self.image} is write-protected: mounted read-only")
            readonly = True
            cfg.readonly = True
        lock = "shared" if readonly else "exclusive"
        try:
            self.img = open_image(self.image, readonly=readonly, backend=cfg.backend,
                                  lock=lock, wait=0 if image_is_mounted(self.image) else 10)
        except ImageBusy:
            raise QuietError(f"{self.image} is already mounted (or being checked by "
                             f"fsck.pmfs, or read by pmfs-inspect)", EXIT_FAIL) from None
        try:
            self._refuse_foreign_owner()
            self.fs = FileSystem(self.img, MountOptions(readonly=readonly, sync=cfg.sync,
                                                        atime=cfg.atime,
                                                        reclaim_batch=cfg.reclaim_batch,
                                                        eof_prealloc=cfg.eof_prealloc))
        except BaseException:
            self.img.close()
            raise
        if not self.fs.was_clean:
            log.warning("%s was not cleanly unmounted: replayed %d transaction(s), "
                        "processed %d orphan(s)", self.image,
                        self.fs.stats["recovered_tx"], self.fs.stats["orphans"])
        log.info("opened %s (%s)", self.image, self.img.describe())
        # an image others may read or write bypasses every permission in it:
        # tell its owner (who can chmod it)
        try:
            st = os.stat(self.image)
            mode = st.st_mode if st.st_uid == os.geteuid() else 0
        except OSError:
            mode = 0  # gone meanwhile
        if stat.S_ISREG(mode) and mode & 0o066:
            can = "change" if mode & 0o022 else "read"
            self.warn(f"{self.image} is mode {stat.S_IMODE(mode):04o}: other users can {can} "
                      f"every file in it, whatever its permissions (chmod 600 {self.image})")

    def _refuse_foreign_owner(self) -> None:
        from .layout import SB_FSCK_RUNNING, SB_NEEDS_FSCK
        from .superblock import SuperblockManager
        sb = SuperblockManager(self.img).load()
        if sb.state & SB_FSCK_RUNNING:
            raise QuietError(f"{self.image}: a repair by fsck.pmfs was interrupted; run "
                             f"fsck.pmfs -y {self.image} first", EXIT_FAIL)
        if sb.state & SB_NEEDS_FSCK:
            self.warn(f"{self.image} has damaged metadata ({sb.error_count} error(s) met "
                      f"while mounted); run fsck.pmfs on it soon")
        host = socket.gethostname()
        if (not sb.clean and sb.owner_host and sb.owner_host != host
                and not self.cfg.recover_foreign):
            raise QuietError(
                f"{self.image} is marked as mounted on host {sb.owner_host!r}; if that "
                f"host is down, mount with -o force_recovery", EXIT_FAIL)

    def fuse_options(self) -> set[str]:
        cfg = self.cfg
        opts = {"default_permissions", f"fsname={cfg.fsname or self.image}",
                f"subtype={cfg.subtype}"}
        if cfg.allow_other:
            opts.add("allow_other")
        if cfg.readonly:
            opts.add("ro")
        opts.update(cfg.fuse_flags)
        return opts

    def mount(self) -> None:
        import pyfuse3

        from .fuseops import Operations
        cfg = self.cfg
        self.ops = Operations(self.fs, cfg.attr_timeout, cfg.entry_timeout, cfg.debug)
        # libfuse reports why a mount fails on stderr: capture it for our
        # one-line message
        import tempfile
        saved = os.dup(2)
        with tempfile.TemporaryFile() as cap:
            os.dup2(cap.fileno(), 2)
            try:
                pyfuse3.init(self.ops, self.mountpoint, self.fuse_options())
                err = None
            except RuntimeError as e:
                err = e
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            cap.seek(0)
            said = " ".join(cap.read().decode("utf-8", "replace").split())
        if err is not None:
            reason = said.removeprefix("fuse: ") if said else str(err)
            hint = ""
            if (cfg.allow_other and os.getuid() != 0 and "allow_other" not in reason
                    and "/dev/fuse" not in reason):
                hint = " (allow_other needs user_allow_other in /etc/fuse.conf)"
            raise QuietError(f"cannot mount on {self.mountpoint}: {reason}{hint}",
                             EXIT_FAIL) from None
        if said:
            log.warning("libfuse: %s", said)
        self.mounted = True
        # FUSE_FALLOCATE, which pyfuse3 does not forward (pmfs/fuseext.py)
        from .fuseext import Extension
        # symlink targets cached by the kernel only where readlink need not
        # touch the atime (a cached READLINK never reaches the daemon)
        self.ext = Extension(self.ops, cache_symlinks=self.cfg.atime == "noatime"
                             or self.cfg.readonly)
        self.ext.install()
        log.info("mounted %s on %s", self.image, self.mountpoint)

    def _tune_readahead(self) -> None:
        """Raise the kernel's read-ahead for this mount (its bdi): reads of a
        pmfs file are memory copies, so fewer, larger READ requests win.
        Done once FUSE_INIT is answered (its reply sets the read-ahead), and
        found through mountinfo: a stat() of the mount point would wait for
        this very daemon."""
        kb = self.cfg.readahead_kb
        if kb <= 0:
            return
        try:
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) > 4 and parts[4] == self.mountpoint:
                        dev = parts[2]
            with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
                f.write(str(kb))
        except (OSError, UnboundLocalError) as e:
            log.debug("read-ahead left as it is: %s", e)

    def serve(self) -> None:
        import pyfuse3

        from .fuseloop import Loop

        loop = Loop()
        loop.spin_ns = self.cfg.spin_us * 1000

        def on_signal(sig):
            if sig == signal.SIGHUP:
                self.fs.sync()
                return
            log.info("signal %d: unmounting", sig)
            pyfuse3.terminate()

        def housekeeping():
            if self.fs.lazy:
                self.fs.flush_lazy()
            if self.fs.reclaim_queue:
                self.fs.drain_reclaim()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.on_signal(sig, on_signal)
        loop.call_later(0.3, self._tune_readahead)  # FUSE_INIT is answered by then
        if not self.cfg.readonly:
            loop.call_every(5, housekeeping)
        try:
            loop.run(pyfuse3.main(min_tasks=1, max_tasks=1))
        finally:
            try:
                pyfuse3.close(unmount=True)
            except Exception:
                log.exception("error while closing the FUSE session")
            self.mounted = False
            self.shutdown()

    def shutdown(self) -> None:
        if self.fs is not None and not self.fs.closed:
            try:
                self.fs.close()
                log.info("%s cleanly unmounted", self.image)
            except Exception:
                log.exception("error while writing the image at unmount; run fsck.pmfs")
        if self.ops is not None:
            log.info("%s", self.ops.summary())
        if self.img is not None:
            self.img.close()
            self.img = None


def _daemonize_and_mount(args, cfg: Config) -> int:
    """Fork; the child mounts and serves, the parent waits for the verdict."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            msg = r.read().decode("utf-8", "replace")
        if msg.startswith("OK"):
            for line in msg.splitlines()[1:]:
                print(f"{_prog()}: warning: {line}", file=sys.stderr)
            return EXIT_OK
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        if not msg:
            msg = "ERR 32 the mount daemon died during start-up"
        _tag, code, text = msg.split(" ", 2)
        print(f"{_prog()}: {text}", file=sys.stderr)
        return int(code)
    # child
    os.close(rfd)
    os.setsid()
    code = EXIT_FAIL
    d = None
    try:
        _setup_logging(cfg, foreground=False)
        d = Daemon(args.image, args.mountpoint, cfg)
        d.prepare()
        d.mount()
    except BaseException as e:  # report to the parent, never a traceback
        if isinstance(e, QuietError):
            text, code = str(e), e.code if e.code is not None else EXIT_FAIL
            log.error("%s", text)
        elif isinstance(e, (ImageError, SuperblockError, FormatError)):
            text = str(e)
            log.error("%s", text)
        elif isinstance(e, OSError):
            text = e.strerror or str(e)
            if e.filename:
                text = f"{e.filename}: {text}"
            if e.errno == errno.EUCLEAN:
                code = EXIT_FAIL
            log.error("%s", text)
        else:
            text = str(e) or type(e).__name__
            log.exception("mount failed")
        if d is not None:
            d.shutdown()
        os.write(wfd, f"ERR {code} {text}".encode())
        os.close(wfd)
        os._exit(code)
    os.write(wfd, "\n".join(["OK"] + d.warnings).encode())
    os.close(wfd)
    # like any daemon (libfuse's fuse_daemonize): keep no directory busy --
    # the one mount.pmfs was started from may be on a file system that
    # must unmount later; every path the daemon uses is absolute
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    rc = 0
    try:
        d.serve()
    except BaseException:
        log.exception("daemon failed")
        rc = 1
    os._exit(rc)


def _foreground(args, cfg: Config) -> int:
    _setup_logging(cfg, foreground=True)
    d = Daemon(args.image, args.mountpoint, cfg)
    try:
        d.prepare()
        d.mount()
    except BaseException:
        d.shutdown()
        raise
    for w in d.warnings:
        if not any(isinstance(h, logging.StreamHandler) and not isinstance(
                h, logging.FileHandler) for h in logging.getLogger().handlers):
            print(f"{_prog()}: warning: {w}", file=sys.stderr)
    d.serve()
    return EXIT_OK


_PROG = ["mount.pmfs"]


def _prog() -> str:
    return _PROG[0]


def main_args(argv) -> int:
    a = build_parser(_prog()).parse_args(argv)
    cfg = parse_options(a.options)
    if a.debug:
        cfg.debug = True
    if not os.path.lexists(a.image):
        raise QuietError(f"{a.image}: no such file (create it with mkfs.pmfs)", EXIT_FAIL)
    if os.path.isdir(a.image):
        raise QuietError(f"{a.image}: is a directory, not an image file", EXIT_FAIL)
    _check_mountpoint(a.mountpoint)
    if cfg.log and cfg.log != "syslog":
        # the daemon's log must open: say so here, once (the daemon would
        # have nowhere to report it)
        try:
            os.close(os.open(cfg.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                             0o644))
        except OSError as e:
            raise QuietError(f"cannot open the log file {cfg.log}: {e.strerror or e} "
                             f"(-o log=PATH)", EXIT_FAIL) from None
    if a.foreground:
        return _foreground(a, cfg)
    return _daemonize_and_mount(a, cfg)


def main(argv=None) -> None:
    _PROG[0] = "mount.pmfs"
    sys.exit(run(_prog(), main_args, argv, usage_code=EXIT_USAGE, error_code=EXIT_FAIL))


def main_fuse(argv=None) -> None:
    """Entry point named `pmfs`, the helper mount.fuse3 runs for fuse.pmfs."""
    _PROG[0] = "pmfs"
    sys.exit(run(_prog(), main_args, argv, usage_code=EXIT_USAGE, error_code=EXIT_FAIL))


if __name__ == "__main__":
    main()
