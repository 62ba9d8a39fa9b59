"""FUSE requests pyfuse3 does not forward: FALLOCATE, LSEEK and
COPY_FILE_RANGE; and one capability it does not ask for: CACHE_SYMLINKS.

pyfuse3 (3.5) registers no `fallocate` and no `lseek` handler with
libfuse, so libfuse answers those requests with ENOSYS, and the kernel
then fails every fallocate(2) on the mount with EOPNOTSUPP -- although
the core implements it (preallocation, KEEP_SIZE, PUNCH_HOLE), atomically
and durably -- and answers lseek(SEEK_DATA/SEEK_HOLE) as if files had no
holes.

This module adds the handlers after `pyfuse3.init()`: it finds the
libfuse session pyfuse3 created, finds in it the copy of pyfuse3's
operation table (`struct fuse_lowlevel_ops`, copied by
fuse_session_new), and fills its empty `fallocate`, `lseek` and
`copy_file_range` slots with ctypes callbacks (a copy_file_range(2) is
then one request that copies in the daemon, instead of the kernel's
fallback of READ and WRITE requests through the page cache).  libfuse then calls them from fuse_session_process_buf,
in the daemon's one request loop, like every pyfuse3 handler.  The `init`
slot gets a wrapper that runs pyfuse3's handler and then, on a mount that never
updates atimes (noatime or ro), also asks for FUSE_CAP_CACHE_SYMLINKS:
the kernel keeps symlink targets in its page cache instead of sending
READLINK for every resolution.  Not otherwise: FUSE leaves atimes to the
daemon, and a READLINK the kernel answers from its cache would not mark
the symlink's atime as POSIX (and relatime) want.

Nothing is guessed.  The session pointer and pyfuse3's own table come
from the symbol table of pyfuse3's extension module (ELF `.symtab`,
present because pip builds pyfuse3 from source); the table layout is the
public one of libfuse 3's fuse_lowlevel.h, checked against the slots
pyfuse3 is known to fill and to leave empty; the session's copy is found
by comparing all of its bytes.  If any of it does not hold (a stripped
or different pyfuse3, another libfuse ABI), `install` changes nothing
and says why: fallocate(2) then answers EOPNOTSUPP, and lseek sees
every file as data up to its end.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import struct

log = logging.getLogger(__name__)

#: struct fuse_lowlevel_ops of libfuse 3 (fuse_lowlevel.h, FUSE_USE_VERSION
#: 35+), one function pointer each, in order
LL_OPS = ("init destroy lookup forget getattr setattr readlink mknod mkdir unlink rmdir "
          "symlink rename link open read write flush release fsync opendir readdir "
          "releasedir fsyncdir statfs setxattr getxattr listxattr removexattr access create "
          "getlk setlk bmap ioctl poll write_buf retrieve_reply forget_multi flock "
          "fallocate readdirplus copy_file_range lseek").split()
#: the slots pyfuse3 3.5 fills (src/pyfuse3/internal.pxi: init_fuse_ops);
#: 3.3 and 3.4 fill the same but `poll`
PYFUSE3_FILLS = set(("init lookup forget getattr setattr readlink mknod mkdir unlink rmdir "
                     "symlink rename link open read write flush release fsync opendir "
                     "readdirplus releasedir fsyncdir statfs setxattr getxattr listxattr "
                     "removexattr access create forget_multi write_buf poll").split())
KNOWN_FILLS = (PYFUSE3_FILLS, PYFUSE3_FILLS - {"poll"})
_PTR = 8
#: how far into struct fuse_session its `op` member may start (it is the
#: eighth member in libfuse 3.14, at byte 48)
_SCAN = 256

# void (*fallocate)(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset,
#                   off_t length, struct fuse_file_info *fi);
FALLOCATE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                             ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)

# void (*lseek)(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
#               struct fuse_file_info *fi);
LSEEK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int,
                         ctypes.c_void_p)

# void (*copy_file_range)(fuse_req_t req, fuse_ino_t ino_in, off_t off_in,
#     struct fuse_file_info *fi_in, fuse_ino_t ino_out, off_t off_out,
#     struct fuse_file_info *fi_out, size_t len, int flags);
COPY_FILE_RANGE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64,
                                   ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64,
                                   ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

# void (*init)(void *userdata, struct fuse_conn_info *conn): ours, and
# pyfuse3's, called without releasing the GIL (it runs Python code)
INIT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
PYFUSE3_INIT = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
#: struct fuse_conn_info (fuse_common.h): byte offsets of `capable`, `want`
CONN_CAPABLE, CONN_WANT = 20, 24
#: symlink targets may be cached in the kernel's page cache: a pmfs
#: symlink's target never changes (only a new inode can take the name)
FUSE_CAP_CACHE_SYMLINKS = 1 << 23


class Unsupported(Exception):
    """The handler cannot be installed here (the reason is the message)."""


def elf_symbols(path: str, names: set[str]) -> dict[str, int]:
    """st_value of the named symbols in the ELF64 little-endian file's .symtab."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise Unsupported(f"{path}: not a 64-bit little-endian ELF file")
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize)
                for i in range(e_shnum)]
    found: dict[str, int] = {}
    for sh in sections:
        if sh[1] != 2:  # SHT_SYMTAB
            continue
        off, size, link, entsize = sh[4], sh[5], sh[6], sh[9]
        stroff = sections[link][4]
        for p in range(off, off + size, entsize or 24):
            st_name, _info, _other, _shndx, st_value, _size = struct.unpack_from(
                "<IBBHQQ", data, p)
            if not st_name:
                continue
            end = data.index(b"\0", stroff + st_name)
            name = data[stroff + st_name:end].decode("ascii", "replace")
            if name in names:
                found[name] = st_value
    missing = names - set(found)
    if missing:
        raise Unsupported(f"{path}: no symbol {', '.join(sorted(missing))} "
                          f"(a stripped pyfuse3?)")
    return found


def _session_ops() -> int:
    """The address of the `op` table inside pyfuse3's libfuse session."""
    import pyfuse3
    so = pyfuse3.__file__
    want = {"PyInit_pyfuse3", "__pyx_v_7pyfuse3_session", "__pyx_v_7pyfuse3_fuse_ops"}
    syms = elf_symbols(so, want)
    lib = ctypes.CDLL(so)
    base = ctypes.cast(lib.PyInit_pyfuse3, ctypes.c_void_p).value - syms["PyInit_pyfuse3"]
    session = ctypes.c_void_p.from_address(base + syms["__pyx_v_7pyfuse3_session"]).value
    if not session:
        raise Unsupported("pyfuse3 has no session (pyfuse3.init not called?)")
    table = ctypes.string_at(base + syms["__pyx_v_7pyfuse3_fuse_ops"], len(LL_OPS) * _PTR)
    slots = struct.unpack(f"<{len(LL_OPS)}Q", table)
    filled = {name for name, v in zip(LL_OPS, slots) if v}
    if filled not in KNOWN_FILLS:
        raise Unsupported("pyfuse3's operation table is not laid out as expected "
                          f"(filled: {sorted(filled ^ PYFUSE3_FILLS)} differ)")
    for start in range(0, _SCAN + 1, _PTR):
        if ctypes.string_at(session + start, len(table)) == table:
            return session + start
    raise Unsupported("the libfuse session holds no copy of pyfuse3's operation table")


class Extension:
    """The handlers added to the session; keep it alive as long as the mount."""

    def __init__(self, ops, cache_symlinks: bool = False):
        self.ops = ops
        #: ask for FUSE_CAP_CACHE_SYMLINKS (only where atimes are not kept)
        self.cache_symlinks = cache_symlinks
        self.libfuse = None
        self._callbacks: list = []
        self.installed: list[str] = []
        #: capabilities asked for at FUSE_INIT beyond pyfuse3's
        self.capabilities: list[str] = []

    def install(self) -> list[str]:
        """Add the handlers; returns their names (empty, and logged, when
        this pyfuse3/libfuse cannot take them)."""
        try:
            table = _session_ops()
            name = ctypes.util.find_library("fuse3") or "libfuse3.so.3"
            lib = ctypes.CDLL(name)
            lib.fuse_reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
            lib.fuse_reply_err.restype = ctypes.c_int
            lib.fuse_reply_lseek.argtypes = [ctypes.c_void_p, ctypes.c_int64]
            lib.fuse_reply_lseek.restype = ctypes.c_int
            lib.fuse_reply_write.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            lib.fuse_reply_write.restype = ctypes.c_int
            self.libfuse = lib
        except Exception as e:  # noqa: BLE001 - whatever it is, the mount goes on without
            log.warning("fallocate(2) and lseek(SEEK_DATA/SEEK_HOLE) stay unsupported on "
                        "this mount (copy_file_range falls back to the kernel's copy): %s",
                        e)
            return []
        init = ctypes.c_void_p.from_address(table + LL_OPS.index("init") * _PTR)
        self._pyfuse3_init = PYFUSE3_INIT(init.value)
        cb = INIT(self._init)
        self._callbacks.append(cb)
        init.value = ctypes.cast(cb, ctypes.c_void_p).value
        self.installed.append("init")
        for op, proto, fn in (("fallocate", FALLOCATE, self._fallocate),
                              ("lseek", LSEEK, self._lseek),
                              ("copy_file_range", COPY_FILE_RANGE, self._copy_file_range)):
            slot = ctypes.c_void_p.from_address(table + LL_OPS.index(op) * _PTR)
            if slot.value:
                log.warning("%s: the session already has a handler; left alone", op)
                continue
            cb = proto(fn)
            self._callbacks.append(cb)
            slot.value = ctypes.cast(cb, ctypes.c_void_p).value
            self.installed.append(op)
        log.debug("handlers added to the FUSE session: %s", ", ".join(self.installed))
        return self.installed

    # A ctypes callback must not raise: the request would never be answered
    # and its caller would hang.  So every failure is answered EIO.

    def _init(self, userdata, conn) -> None:
        """FUSE_INIT: pyfuse3's own handler, then the capabilities pmfs
        wants beyond pyfuse3's (libfuse turns `want` into the reply)."""
        try:
            self._pyfuse3_init(userdata, conn)
        except BaseException:  # noqa: BLE001
            log.exception("pyfuse3's init handler failed")
        try:
            capable = ctypes.c_uint.from_address(conn + CONN_CAPABLE).value
            want = ctypes.c_uint.from_address(conn + CONN_WANT)
            if self.cache_symlinks and capable & FUSE_CAP_CACHE_SYMLINKS:
                want.value |= FUSE_CAP_CACHE_SYMLINKS
                self.capabilities.append("cache_symlinks")
        except BaseException:  # noqa: BLE001
            log.exception("could not add FUSE capabilities")

    def _fallocate(self, req, ino, mode, off, length, _fi) -> None:
        try:
            code = self.ops.fallocate_errno(ino, mode, off, length)
        except BaseException:  # noqa: BLE001 - answered EIO, logged
            log.exception("internal error in fallocate(%d, %d, %d, %d) (answered EIO)",
                          ino, mode, off, length)
            code = errno.EIO
        self._reply_err(req, code)

    def _lseek(self, req, ino, off, whence, _fi) -> None:
        try:
            code, pos = self.ops.lseek_result(ino, off, whence)
        except BaseException:  # noqa: BLE001 - answered EIO, logged
            log.exception("internal error in lseek(%d, %d, %d) (answered EIO)",
                          ino, off, whence)
            code, pos = errno.EIO, 0
        if code:
            self._reply_err(req, code)
            return
        try:
            self.libfuse.fuse_reply_lseek(req, pos)
        except BaseException:  # noqa: BLE001
            log.exception("could not answer an LSEEK request")

    def _copy_file_range(self, req, ino_in, off_in, _fi_in, ino_out, off_out, _fi_out,
                         length, flags) -> None:
        try:
            code, n = self.ops.copy_range_result(ino_in, off_in, ino_out, off_out, length,
                                                 flags)
        except BaseException:  # noqa: BLE001 - answered EIO, logged
            log.exception("internal error in copy_file_range(%d, %d, %d, %d, %d) "
                          "(answered EIO)", ino_in, off_in, ino_out, off_out, length)
            code, n = errno.EIO, 0
        if code:
            self._reply_err(req, code)
            return
        try:
            self.libfuse.fuse_reply_write(req, n)
        except BaseException:  # noqa: BLE001
            log.exception("could not answer a COPY_FILE_RANGE request")

    def _reply_err(self, req, code: int) -> None:
        try:
            self.libfuse.fuse_reply_err(req, code)
        except BaseException:  # noqa: BLE001
            log.exception("could not answer a request")
