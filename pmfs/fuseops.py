"""The FUSE adapter: pyfuse3 requests onto the file-system core.

Every handler is a thin translation: arguments to core calls, core results
to pyfuse3 types, OSError to FUSEError.  Any other exception is a bug: it is
logged with its traceback and answered with EIO, and the daemon keeps
serving (only FUSEError may leave a pyfuse3 handler).

The core is synchronous and no handler awaits, so requests are served one
at a time, each atomically, in the order they arrive (pmfs/fuseloop.py
runs pyfuse3's request loop without a scheduler).

Kernel caching (see docs/DESIGN.md): files are opened with keep_cache (all
changes to the image come through this mount, which holds an exclusive
lock on it), writes go through to the daemon (no writeback cache: a write
that returned is in the image, so it survives a daemon crash, and the
`sync` option can make it durable before the reply), reads are answered
with a view of the image (no copy in the daemon).  Entries and attributes
are cached by the kernel for `attr_timeout`/`entry_timeout` seconds; the
kernel invalidates what it changes itself, which is everything.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time

import pyfuse3
from pyfuse3 import FUSEError

from .fs import Ctx, FileSystem
from .layout import FormatError, Inode

log = logging.getLogger(__name__)


def _fmt(args) -> str:
    """Request arguments for the debug log (data abbreviated)."""
    out = []
    for a in args:
        if isinstance(a, (bytes, bytearray, memoryview)) and len(a) > 64:
            out.append(f"<{len(a)} bytes>")
        elif isinstance(a, (int, bytes, str, float)) or a is None:
            out.append(repr(a))
        else:
            out.append(type(a).__name__)
    return "(" + ", ".join(out) + ")"


def _serve(self, name: str, fn, args):
    """Run one handler body: OSError becomes FUSEError, any other exception
    is logged and answered EIO (only FUSEError may leave a handler)."""
    self.requests += 1
    try:
        res = fn(self, *args)
    except FUSEError as e:
        if self.debug:
            log.debug("%s%s -> %s", name, _fmt(args), os.strerror(e.errno))
        raise
    except OSError as e:
        code = e.errno or errno.EIO
        if code == errno.EIO:
            self.errors += 1
        if self.debug:
            log.debug("%s%s -> %s", name, _fmt(args), os.strerror(code))
        raise FUSEError(code) from None
    except Exception:
        self.errors += 1
        log.exception("internal error in %s%s (answered EIO)", name, _fmt(args))
        raise FUSEError(errno.EIO) from None
    if self.debug:
        log.debug("%s%s -> ok", name, _fmt(args))
    return res


def _handler(fn):
    """Wrap a synchronous handler body into a pyfuse3 coroutine."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args):
        return _serve(self, name, fn, args)
    return wrapper


def _ctx(ctx) -> Ctx:
    if ctx is None:
        return Ctx()
    return Ctx(uid=ctx.uid, gid=ctx.gid, pid=ctx.pid, sgid_stripped=True)


class Operations(pyfuse3.Operations):
    """pyfuse3 operations over a `FileSystem`."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: FileSystem, attr_timeout: float = 60.0,
                 entry_timeout: float = 60.0, debug: bool = False):
        super().__init__()
        self.fs = fs
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self.debug = debug
        self.requests = 0
        self.errors = 0
        self.started = time.monotonic()

    # -- helpers ------------------------------------------------------------
    def attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode.ino
        a.generation = inode.generation
        a.st_mode = inode.mode
        a.st_nlink = inode.nlink
        a.st_uid = inode.uid
        a.st_gid = inode.gid
        a.st_rdev = inode.rdev
        a.st_size = inode.size
        a.st_blksize = 4096
        a.st_blocks = inode.blocks * 8
        a.st_atime_ns = inode.atime
        a.st_mtime_ns = inode.mtime
        a.st_ctime_ns = inode.ctime
        a.attr_timeout = self.attr_timeout
        a.entry_timeout = self.entry_timeout
        return a

    def _entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        """An entry reply: the kernel now holds one more lookup reference."""
        self.fs.ref(inode.ino)
        return self.attrs(inode)

    # -- lifecycle ------------------------------------------------------------
    def init(self):
        log.debug("FUSE session initialised")

    # -- names ----------------------------------------------------------------
    @_handler
    def lookup(self, parent, name, ctx=None):
        try:
            inode = self.fs.lookup(parent, name)
        except FileNotFoundError:
            # a negative entry the kernel may cache; it drops it when this
            # mount creates the name
            a = pyfuse3.EntryAttributes()
            a.st_ino = 0
            a.entry_timeout = self.entry_timeout
            return a
        return self._entry(inode)

    @_handler
    def forget(self, inode_list):
        for ino, n in inode_list:
            try:
                self.fs.forget(ino, n)
            except Exception:
                log.exception("forget(%d, %d) failed", ino, n)

    @_handler
    def getattr(self, inode, ctx=None):
        return self.attrs(self.fs.getattr(inode))

    @_handler
    def setattr(self, inode, attr, fields, fh, ctx):
        kw = {}
        if fields.update_mode:
            kw["mode"] = attr.st_mode
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_atime:
            kw["atime"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime"] = attr.st_mtime_ns
        if fields.update_ctime:
            kw["ctime"] = attr.st_ctime_ns
        return self.attrs(self.fs.setattr(inode, ctx=_ctx(ctx), **kw))

    @_handler
    def readlink(self, inode, ctx):
        return self.fs.readlink(inode)

    @_handler
    def mknod(self, parent, name, mode, rdev, ctx):
        return self._entry(self.fs.mknod(parent, name, mode, rdev, _ctx(ctx)))

    @_handler
    def mkdir(self, parent, name, mode, ctx):
        return self._entry(self.fs.mkdir(parent, name, mode, _ctx(ctx)))

    @_handler
    def symlink(self, parent, name, target, ctx):
        return self._entry(self.fs.symlink(parent, name, target, _ctx(ctx)))

    @_handler
    def link(self, inode, new_parent, new_name, ctx):
        return self._entry(self.fs.link(inode, new_parent, new_name))

    @_handler
    def unlink(self, parent, name, ctx):
        self.fs.unlink(parent, name)

    @_handler
    def rmdir(self, parent, name, ctx):
        self.fs.rmdir(parent, name)

    @_handler
    def rename(self, parent_old, name_old, parent_new, name_new, flags, ctx):
        self.fs.rename(parent_old, name_old, parent_new, name_new, flags)

    # -- files ------------------------------------------------------------------
    @_handler
    def open(self, inode, flags, ctx):
        self.fs.open(inode, flags, _ctx(ctx))
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

    @_handler
    def create(self, parent, name, mode, flags, ctx):
        inode = self.fs.create(parent, name, mode, _ctx(ctx))
        self.fs.open(inode.ino, flags & ~os.O_TRUNC)
        return (pyfuse3.FileInfo(fh=inode.ino, keep_cache=True, direct_io=False),
                self._entry(inode))

    @_handler
    def read(self, fh, off, size):
        return self.fs.read(fh, off, size)

    @_handler
    def write(self, fh, off, buf):
        return self.fs.write(fh, off, buf)

    @_handler
    def release(self, fh):
        if self.fs.release(fh):
            # the last close freed blocks preallocated past EOF: the
            # kernel's cached st_blocks is stale (attributes only: no page
            # is affected, and without the writeback cache nothing blocks)
            try:
                pyfuse3.invalidate_inode(fh, attr_only=True)
            except OSError as e:  # ENOENT: the kernel no longer knows it
                if e.errno != errno.ENOENT:
                    log.debug("could not invalidate inode %d: %s", fh, e)

    @_handler
    def fsync(self, fh, datasync):
        self.fs.fsync(fh, bool(datasync))

    def fallocate_errno(self, inode, mode, off, length) -> int:
        """FUSE_FALLOCATE, which pyfuse3 does not forward (pmfs/fuseext.py
        calls this from libfuse): 0 or the errno to answer."""
        try:
            _serve(self, "fallocate", Operations._fallocate, (inode, mode, off, length))
        except FUSEError as e:
            return e.errno
        return 0

    def _fallocate(self, inode, mode, off, length):
        self.fs.fallocate(inode, mode, off, length)

    def lseek_result(self, inode, off, whence) -> tuple[int, int]:
        """FUSE_LSEEK (SEEK_DATA/SEEK_HOLE; pmfs/fuseext.py calls this from
        libfuse): (0, offset) or (errno, 0)."""
        try:
            return 0, _serve(self, "lseek", Operations._lseek, (inode, off, whence))
        except FUSEError as e:
            return e.errno, 0

    def _lseek(self, inode, off, whence):
        return self.fs.seek(inode, off, whence)

    def copy_range_result(self, ino_in, off_in, ino_out, off_out, length,
                          flags) -> tuple[int, int]:
        """FUSE_COPY_FILE_RANGE (pmfs/fuseext.py calls this from libfuse):
        (0, bytes copied) or (errno, 0)."""
        try:
            return 0, _serve(self, "copy_file_range", Operations._copy_range,
                             (ino_in, off_in, ino_out, off_out, length, flags))
        except FUSEError as e:
            return e.errno, 0

    def _copy_range(self, ino_in, off_in, ino_out, off_out, length, flags):
        if flags:
            raise FUSEError(errno.EINVAL)
        return self.fs.copy_range(ino_in, off_in, ino_out, off_out, length)

    # -- directories --------------------------------------------------------------
    @_handler
    def opendir(self, inode, ctx):
        self.fs.opendir(inode)
        return inode

    @_handler
    def readdir(self, fh, start_id, token):
        fs = self.fs
        for name, ino, _ftype, next_id in fs.iter_dir(fh, start_id):
            try:
                inode = fs.iget(ino) if name in (b".", b"..") else fs.iget_entry(ino, name)
            except OSError:
                continue
            except FormatError as e:
                # a damaged inode: the rest of the directory stays listable
                fs.corruption(str(e))
                continue
            if not pyfuse3.readdir_reply(token, name, self.attrs(inode), next_id):
                break
            if name != b"." and name != b"..":
                fs.ref(ino)

    @_handler
    def releasedir(self, fh):
        pass

    @_handler
    def fsyncdir(self, fh, datasync):
        self.fs.fsync(fh, bool(datasync))

    # -- extended attributes ----------------------------------------------------------
    @_handler
    def getxattr(self, inode, name, ctx):
        v = self.fs.find_xattr(inode, name)
        if v is None:
            raise FUSEError(errno.ENODATA)
        return v

    @_handler
    def setxattr(self, inode, name, value, ctx):
        self.fs.setxattr(inode, name, value)

    @_handler
    def listxattr(self, inode, ctx):
        return self.fs.listxattr(inode)

    @_handler
    def removexattr(self, inode, name, ctx):
        self.fs.removexattr(inode, name)

    # -- whole file system ----------------------------------------------------------
    @_handler
    def statfs(self, ctx):
        s = self.fs.statfs()
        st = pyfuse3.StatvfsData()
        for k, v in s.items():
            setattr(st, k, v)
        return st

    @_handler
    def access(self, inode, mode, ctx):
        self.fs.access(inode, mode, _ctx(ctx))
        return True

    def summary(self) -> str:
        up = time.monotonic() - self.started
        st = self.fs.stats
        return (f"served {self.requests} requests in {up:.0f} s, {self.errors} errors; "
                f"recovery at mount replayed {st['recovered_tx']} transaction(s) and "
                f"processed {st['orphans']} orphan(s); {st['errors']} corruption event(s)")
