"""Persistence primitives: the only code that touches the image mapping.

Every other layer reads and writes the image through an `Image`:

``read(off, n)``
    a zero-copy memoryview of the mapping (valid until `close`);
``write(off, data)``
    a store: visible at once, not yet durable;
``flush(off, n)``
    start writing back the cache lines (or pages) of a range;
``fence()``
    wait until every earlier flush is durable, and order later stores
    after them;
``persist(off, n)``
    flush + fence;
``copy(off, data, drain=True)`` / ``zero(off, n, drain=True)``
    bulk store + flush (+ fence when `drain`), done with libpmem's
    memcpy/memset family where it is available.

Backends, chosen by `open_image`:

``libpmem``
    the image is persistent memory (a DAX mapping, or any file when
    ``PMEM_IS_PMEM_FORCE=1``), as libpmem's pmem_map_file/pmem_is_pmem
    decide.  Flushes are CLWB/CLFLUSHOPT (pmem_flush), fences SFENCE
    (pmem_drain).  The mapping itself is a Python mmap (MAP_SYNC where the
    file system offers it) so that memoryviews handed out by `read` keep it
    alive: closing an image that still has views raises instead of leaving
    dangling pointers.
``msync``
    ordinary storage, or no libpmem: flushes record page ranges, a fence
    msyncs them (coalesced).
``memory``
    a bytearray; flush and fence do nothing.  For tests.
``TracingImage``
    wraps another image and records every store, flush and fence in order,
    plus labelled marks, for the crash explorer.  Layers above cannot tell
    it from the image it wraps.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import time

from .accel import ACCEL

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
CACHELINE = 64
_MAP_SHARED_VALIDATE = 0x03
_MAP_SYNC = 0x80000


class ImageError(Exception):
    """The image file cannot be opened or mapped (a one-line reason)."""

    def __init__(self, msg: str, errno_: int = errno.EIO):
        super().__init__(msg)
        self.errno = errno_


class ImageBusy(ImageError):
    """Another process holds the image (it is mounted or being checked)."""


# --------------------------------------------------------------------------
# libpmem through ctypes
# --------------------------------------------------------------------------

_libpmem = None
_libpmem_tried = False


def libpmem():
    """The libpmem library, or None when it is not installed."""
    global _libpmem, _libpmem_tried
    if _libpmem_tried:
        return _libpmem
    _libpmem_tried = True
    if os.environ.get("PMFS_NO_LIBPMEM"):
        return None
    try:
        lib = ctypes.CDLL("libpmem.so.1")
    except OSError:
        return None
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    lib.pmem_map_file.restype = vp
    lib.pmem_map_file.argtypes = [ctypes.c_char_p, sz, ctypes.c_int, ctypes.c_uint,
                                  ctypes.POINTER(sz), ctypes.POINTER(ctypes.c_int)]
    lib.pmem_unmap.argtypes = [vp, sz]
    lib.pmem_unmap.restype = ctypes.c_int
    lib.pmem_is_pmem.argtypes = [vp, sz]
    lib.pmem_is_pmem.restype = ctypes.c_int
    lib.pmem_flush.argtypes = [vp, sz]
    lib.pmem_flush.restype = None
    lib.pmem_drain.argtypes = []
    lib.pmem_drain.restype = None
    lib.pmem_persist.argtypes = [vp, sz]
    lib.pmem_persist.restype = None
    lib.pmem_memset_nodrain.argtypes = [vp, ctypes.c_int, sz]
    lib.pmem_memset_nodrain.restype = vp
    lib.pmem_memcpy_nodrain.argtypes = [vp, vp, sz]
    lib.pmem_memcpy_nodrain.restype = vp
    lib.pmem_errormsg.argtypes = []
    lib.pmem_errormsg.restype = ctypes.c_char_p
    _libpmem = lib
    return lib


def libpmem_says_pmem(path: str) -> bool:
    """Ask libpmem (pmem_map_file + pmem_is_pmem) whether `path` is pmem."""
    lib = libpmem()
    if lib is None:
        return False
    mapped = ctypes.c_size_t()
    is_pmem = ctypes.c_int()
    addr = lib.pmem_map_file(os.fsencode(path), 0, 0, 0, ctypes.byref(mapped),
                             ctypes.byref(is_pmem))
    if not addr:
        return False
    try:
        return bool(is_pmem.value) or bool(lib.pmem_is_pmem(addr, mapped.value))
    finally:
        lib.pmem_unmap(addr, mapped.value)


# --------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------


class Image:
    """Base: an image mapped as `buf` (a writable memoryview of bytes)."""

    backend = "?"
    is_pmem = False
    #: True when mark() records something (TracingImage): callers on hot
    #: paths skip building marks otherwise
    traced = False
    #: False where every access to `buf` must be seen (crashtest's
    #: TrackImage): no C loop (pmfs._accel) may then read the mapping on
    #: its own
    direct_buf = True

    def __init__(self, buf, size: int, path: str | None = None, readonly: bool = False):
        self.buf = buf
        self.size = size
        self.path = path
        self.readonly = readonly

    # -- the primitives -------------------------------------------------
    def read(self, off: int, n: int):
        if off < 0 or off + n > self.size:
            raise ValueError(f"read [{off}, {off + n}) outside the image ({self.size})")
        return self.buf[off:off + n]

    def write(self, off: int, data) -> None:
        n = len(data)
        if off < 0 or off + n > self.size:
            raise ValueError(f"write [{off}, {off + n}) outside the image ({self.size})")
        self.buf[off:off + n] = data

    def flush(self, off: int, n: int) -> None:
        raise NotImplementedError

    def fence(self) -> None:
        raise NotImplementedError

    def persist(self, off: int, n: int) -> None:
        self.flush(off, n)
        self.fence()

    def store_all(self, ranges) -> None:
        """Store and flush every (offset, bytes) of `ranges`, in order and
        not overlapping (a WAL record's entries; a record and the log
        header); no fence."""
        for off, data in ranges:
            self.write(off, data)
            self.flush(off, len(data))

    def copy(self, off: int, data, drain: bool = True, start: int = 0,
             n: int | None = None) -> None:
        """Store data[start:start+n] at `off` and flush it (a bulk store:
        libpmem's memcpy_persist family); fenced too unless drain=False."""
        if start or (n is not None and n != len(data)):
            if n is None:
                n = len(data) - start
            if start < 0 or n < 0 or start + n > len(data):
                raise ValueError(f"copy of [{start}, {start + n}) from {len(data)} bytes")
            data = memoryview(data)[start:start + n]
        self.write(off, data)
        self.flush(off, len(data))
        if drain:
            self.fence()

    def zero(self, off: int, n: int, drain: bool = True) -> None:
        z = _zeros(min(n, 1 << 20))
        p = off
        end = off + n
        while p < end:
            k = min(len(z), end - p)
            self.write(p, z[:k])
            p += k
        self.flush(off, n)
        if drain:
            self.fence()

    def prefault(self, off: int, n: int) -> None:
        """A hint: [off, off+n) is about to be written (newly allocated
        blocks).  File-backed images map its pages in one call instead of
        taking a page fault on each first store."""

    def is_hole(self, off: int, n: int) -> bool:
        """True if [off, off+n) is known to hold no data (a hole of a sparse
        image file: it reads as zeros).  Lets scanners skip holes instead of
        reading them, which on tmpfs would allocate the pages."""
        return False

    def read_copy(self, off: int, n: int):
        """A private copy of [off, off+n), as a writable buffer.  Holes are
        not touched (see is_hole), and the copy is anonymous memory whose
        pages stay unallocated until written: copying a sparse region costs
        memory only for the parts of it that hold data."""
        out = mmap.mmap(-1, n) if n >= (1 << 20) else bytearray(n)
        step = 1 << 20
        p = off
        while p < off + n:
            k = min(step, off + n - p)
            if not self.is_hole(p, k):
                out[p - off:p - off + k] = self.read(p, k)
            p += k
        return out

    # -- housekeeping ---------------------------------------------------
    def mark(self, label: str, **info) -> None:
        """A labelled point in the store stream (recorded by TracingImage)."""

    def sync_all(self) -> None:
        """Make the whole image durable (used at unmount and by tools)."""
        self.fence()

    def describe(self) -> str:
        return f"{self.backend} backend" + (" (read-only)" if self.readonly else "")

    def close(self) -> None:
        self.buf = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_ZEROS = bytes(1 << 20)


def _zeros(n: int):
    return memoryview(_ZEROS)[:n]


class MemoryImage(Image):
    """An image held in a bytearray: no durability, nothing to flush."""

    backend = "memory"

    def __init__(self, size_or_bytes):
        if isinstance(size_or_bytes, int):
            data = bytearray(size_or_bytes)
        else:
            data = bytearray(size_or_bytes)
        self.data = data
        super().__init__(memoryview(data), len(data))

    def flush(self, off: int, n: int) -> None:
        pass

    def fence(self) -> None:
        pass

    def snapshot(self) -> bytes:
        return bytes(self.data)


class _FileImage(Image):
    """Common code of the file-backed images: open, lock, map, close."""

    def __init__(self, path: str, fd: int, mm: mmap.mmap, size: int, readonly: bool):
        self.fd = fd
        self.mm = mm
        super().__init__(memoryview(mm), size, path, readonly)
        self._anchor = None if readonly else ctypes.c_char.from_buffer(mm)
        self.addr = ctypes.addressof(self._anchor) if self._anchor is not None else 0
        # tmpfs maps its pages writable on a read fault (no dirty tracking),
        # and a read populate maps them in batches (fault-around): 3-10x
        # cheaper per page than a write populate for pages the file already
        # has.  Elsewhere a read fault maps pages read-only (the first store
        # faults again), so there the write populate is the one that helps.
        self._populate = (_MADV_POPULATE_READ if _fs_type(fd) == _TMPFS_MAGIC
                          else _MADV_POPULATE_WRITE)

    def prefault(self, off: int, n: int) -> None:
        global _populate_ok
        if not _populate_ok or self._anchor is None or n <= 0:
            return
        a = off & ~(PAGE - 1)
        b = min(self.size, (off + n + PAGE - 1) & ~(PAGE - 1))
        if _libc().madvise(self.addr + a, b - a, self._populate) != 0:
            _populate_ok = False  # kernel before 5.14, or a mapping that refuses it

    def is_hole(self, off: int, n: int) -> bool:
        try:
            nxt = os.lseek(self.fd, off, os.SEEK_DATA)
        except OSError as e:
            return e.errno == errno.ENXIO  # no data at or after off
        return nxt >= off + n

    def close(self) -> None:
        if self.mm is None:
            return
        if not self.readonly:
            try:
                self.sync_all()
            except Exception:  # the mapping is going away anyway
                log.exception("final sync of %s failed", self.path)
        self._anchor = None
        buf, self.buf = self.buf, None
        try:
            buf.release()
        except (BufferError, ValueError):
            pass
        try:
            self.mm.close()
        except BufferError:
            # a view handed out by read() is still alive; the mapping will
            # be released when the last view goes
            log.debug("image %s still has views; mapping left to the GC", self.path)
        self.mm = None
        os.close(self.fd)
        self.fd = -1


class MsyncImage(_FileImage):
    """Ordinary storage: page-granular msync of the flushed ranges."""

    backend = "msync"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._pending: list[tuple[int, int]] = []

    def flush(self, off: int, n: int) -> None:
        if n > 0:
            self._pending.append((off, off + n))

    def fence(self) -> None:
        pend = self._pending
        if not pend:
            return
        self._pending = []
        pend.sort()
        mm = self.mm
        start = end = -1
        for a, b in pend:
            a -= a % PAGE
            if a <= end:
                end = max(end, b)
                continue
            if end > start:
                mm.flush(start, end - start)
            start, end = a, b
        if end > start:
            mm.flush(start, min(end, self.size) - start)

    def sync_all(self) -> None:
        self._pending.clear()
        if self.mm is not None:
            self.mm.flush()


class LibpmemImage(_FileImage):
    """Persistent memory: CLWB/CLFLUSHOPT + SFENCE through libpmem."""

    backend = "libpmem"
    is_pmem = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._lib = libpmem()
        # bound once: they run several times per commit
        self._flush = self._lib.pmem_flush
        self._drain = self._lib.pmem_drain
        # (pmfs._accel calls these through their addresses)
        accel = ACCEL is not None and self.addr
        self._flush_ptr = ctypes.cast(self._flush, ctypes.c_void_p).value if accel else None
        self._memcpy_ptr = (ctypes.cast(self._lib.pmem_memcpy_nodrain, ctypes.c_void_p).value
                            if accel else None)

    def flush(self, off: int, n: int) -> None:
        if n > 0:
            self._flush(self.addr + off, n)

    def fence(self) -> None:
        self._drain()

    def persist(self, off: int, n: int) -> None:
        self._lib.pmem_persist(self.addr + off, n)

    def store_all(self, ranges) -> None:
        # Ranges a few cache lines apart share one flush: flushing a clean
        # line costs less than a call into libpmem (an inode and its
        # neighbour in the table, a dirent and its block's free map).
        if self._flush_ptr:  # the same loop in C, calling pmem_flush directly
            ACCEL.store_flush(self.buf, self.addr, self._flush_ptr, ranges, _FLUSH_GAP)
            return
        buf, size, flush, addr = self.buf, self.size, self._flush, self.addr
        start = end = None
        for off, data in ranges:
            n = len(data)
            if off < 0 or off + n > size:
                raise ValueError(f"write [{off}, {off + n}) outside the image ({size})")
            buf[off:off + n] = data
            if end is None or off < end or off - end > _FLUSH_GAP:
                if end is not None:
                    flush(addr + start, end - start)
                start = off
            end = off + n
        if end is not None:
            flush(addr + start, end - start)

    def copy(self, off: int, data, drain: bool = True, start: int = 0,
             n: int | None = None) -> None:
        if n is None:
            n = len(data) - start
        if n >= _NT_COPY_MIN and self._memcpy_ptr:
            # any buffer (a memoryview of a write's bytes too): the C
            # module hands its address to pmem_memcpy_nodrain
            ACCEL.copy_nodrain(self.buf, self.addr, self._memcpy_ptr, off, data, start, n)
            if drain:
                self._lib.pmem_drain()
            return
        if type(data) is not bytes or n < _NT_COPY_MIN:
            # no stable address to hand to libpmem (without pmfs._accel),
            # or too small for the call to pay off (measured: 4 KiB 1.4 us
            # stored and flushed, 1.9 us through libpmem; 64 KiB 8.8 us
            # against 4.0 us)
            return Image.copy(self, off, data, drain, start, n)
        if off < 0 or off + n > self.size or start < 0 or start + n > len(data):
            raise ValueError(f"copy [{off}, {off + n}) outside the image")
        # non-temporal stores for large copies: about twice as fast as a
        # store through the cache followed by a flush of every line
        self._lib.pmem_memcpy_nodrain(self.addr + off, _address(data) + start, n)
        if drain:
            self._lib.pmem_drain()

    def zero(self, off: int, n: int, drain: bool = True) -> None:
        if off < 0 or off + n > self.size:
            raise ValueError(f"zero [{off}, {off + n}) outside the image")
        self._lib.pmem_memset_nodrain(self.addr + off, 0, n)
        if drain:
            self._lib.pmem_drain()

    def sync_all(self) -> None:
        self._lib.pmem_drain()

    def close(self) -> None:
        if self.mm is not None:
            self.sync_all()
        super().close()


#: LibpmemImage.store_all: ranges at most this far apart share one flush
_FLUSH_GAP = 4 * 64
_NT_COPY_MIN = 16384  # LibpmemImage.copy: from this size on, pmem_memcpy_nodrain
_MADV_POPULATE_READ = 22  # linux >= 5.14
_MADV_POPULATE_WRITE = 23
_TMPFS_MAGIC = 0x01021994
_populate_ok = True
_libc_handle = None


def _libc():
    global _libc_handle
    if _libc_handle is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.madvise.restype = ctypes.c_int
        lib.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
        lib.fstatfs.restype = ctypes.c_int
        _libc_handle = lib
    return _libc_handle


def _fs_type(fd: int) -> int:
    """f_type of fstatfs(2) for `fd` (0 if it cannot be told)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes
    lib = _libc()
    if lib.fstatfs(fd, buf) != 0:
        return 0
    return ctypes.c_long.from_buffer(buf).value  # f_type: the first field


def _address(data: bytes) -> int:
    """The address of a bytes object's contents (valid while it lives)."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value


def _map(fd: int, size: int, readonly: bool, want_sync: bool) -> mmap.mmap:
    if readonly:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    if want_sync:
        try:
            return mmap.mmap(fd, size, _MAP_SHARED_VALIDATE | _MAP_SYNC,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            pass  # not a DAX file system (e.g. PMEM_IS_PMEM_FORCE on tmpfs)
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def open_image(path: str, readonly: bool = False, backend: str = "auto",
               lock: str | None = None, min_size: int = 0, wait: float = 0) -> Image:
    """Open and map an image file (or block/DAX device).

    backend: "auto" (libpmem when libpmem says the file is pmem, else
    msync), "libpmem" or "msync".  lock: None, "shared" or "exclusive": an
    flock held as long as the image is open (ImageBusy if another process
    holds a conflicting one; `wait` seconds are given to a holder that is
    shutting down).  Raises ImageError with a one-line reason.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file", errno.ENOENT) from None
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror}", e.errno) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{path}: is a directory, not an image file", errno.EISDIR)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)
            or stat.S_ISCHR(st.st_mode)):
        raise ImageError(f"{path}: not a regular file or device", errno.EINVAL)
    flags = os.O_RDONLY if readonly else os.O_RDWR
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM) and not readonly:
            raise ImageError(f"{path}: cannot open for writing ({e.strerror})",
                             e.errno) from None
        if e.errno == errno.ELOOP:
            raise ImageError(f"{path}: is a symbolic link; give the image path itself",
                             e.errno) from None
        raise ImageError(f"{path}: {e.strerror}", e.errno) from None
    try:
        if lock:
            op = fcntl.LOCK_EX if lock == "exclusive" else fcntl.LOCK_SH
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, op | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise ImageBusy(f"{path}: in use by another process (mounted, or "
                                        f"being checked)", errno.EBUSY) from None
                    time.sleep(0.05)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        except OSError as e:
            raise ImageError(f"{path}: not an image (cannot tell its size: {e.strerror})",
                             e.errno) from None
        if size == 0 and stat.S_ISCHR(st.st_mode):
            raise ImageError(f"{path}: not an image (a character device without a size)",
                             errno.EINVAL)
        if size < max(min_size, 1):
            raise ImageError(f"{path}: image is too small ({size} bytes)", errno.EINVAL)
        use_pmem = False
        if backend in ("auto", "libpmem") and not readonly:
            use_pmem = libpmem() is not None and libpmem_says_pmem(path)
            if backend == "libpmem" and not use_pmem:
                raise ImageError(f"{path}: libpmem is not available or the file is not "
                                 f"persistent memory (set PMEM_IS_PMEM_FORCE=1 to force)")
        elif backend not in ("auto", "msync", "libpmem"):
            raise ImageError(f"unknown backend {backend!r}", errno.EINVAL)
        try:
            mm = _map(fd, size, readonly, want_sync=use_pmem)
        except (OSError, ValueError) as e:
            raise ImageError(f"{path}: cannot map image: {e}") from None
        cls = LibpmemImage if use_pmem else MsyncImage
        return cls(path, fd, mm, size, readonly)
    except BaseException:
        os.close(fd)
        raise


# --------------------------------------------------------------------------
# tracing
# --------------------------------------------------------------------------

# event kinds recorded by TracingImage
EV_STORE = "S"  # (EV_STORE, off, bytes)
EV_FLUSH = "F"  # (EV_FLUSH, off, n)
EV_FENCE = "B"  # (EV_FENCE,)
EV_MARK = "M"  # (EV_MARK, label, info-dict)


class TracingImage(Image):
    """Records every store, flush and fence made on the image it wraps.

    `events` is the ordered list of events; `initial` the image content when
    tracing began.  It also keeps pmemcheck-style state: the cache lines
    stored but not flushed, and those flushed but not fenced.
    """

    backend = "tracing"
    traced = True

    def __init__(self, inner: Image, record: bool = True):
        super().__init__(inner.buf, inner.size, inner.path, inner.readonly)
        self.inner = inner
        self.is_pmem = inner.is_pmem
        self.initial = bytes(inner.buf) if record else b""
        self.events: list = []
        self.record = record
        self.unflushed: set[int] = set()
        self.unfenced: set[int] = set()

    @property
    def backend_name(self):
        return f"tracing({self.inner.backend})"

    def describe(self) -> str:
        return f"tracing over {self.inner.describe()}"

    def write(self, off: int, data) -> None:
        self.inner.write(off, data)
        n = len(data)
        if n == 0:
            return
        if self.record:
            self.events.append((EV_STORE, off, bytes(data)))
        self.unflushed.update(range(off // CACHELINE, (off + n - 1) // CACHELINE + 1))

    def flush(self, off: int, n: int) -> None:
        self.inner.flush(off, n)
        if n <= 0:
            return
        if self.record:
            self.events.append((EV_FLUSH, off, n))
        lines = range(off // CACHELINE, (off + n - 1) // CACHELINE + 1)
        uf = self.unflushed
        if len(uf) < len(lines):
            hit = {ln for ln in uf if lines.start <= ln < lines.stop}
        else:
            hit = {ln for ln in lines if ln in uf}
        uf -= hit
        self.unfenced |= hit

    def fence(self) -> None:
        self.inner.fence()
        if self.record:
            self.events.append((EV_FENCE,))
        self.unfenced.clear()

    def persist(self, off: int, n: int) -> None:
        self.flush(off, n)
        self.fence()

    def zero(self, off: int, n: int, drain: bool = True) -> None:
        Image.zero(self, off, n, drain)

    def mark(self, label: str, **info) -> None:
        if self.record:
            self.events.append((EV_MARK, label, info))

    def is_hole(self, off: int, n: int) -> bool:
        return self.inner.is_hole(off, n)

    def prefault(self, off: int, n: int) -> None:
        self.inner.prefault(off, n)

    def pending(self) -> tuple[set[int], set[int]]:
        """(lines stored but not flushed, lines flushed but not fenced)."""
        return set(self.unflushed), set(self.unfenced)

    def sync_all(self) -> None:
        # make the bookkeeping agree with a full write-back
        if self.unflushed:
            lo = min(self.unflushed) * CACHELINE
            hi = (max(self.unflushed) + 1) * CACHELINE
            self.flush(lo, hi - lo)
        self.fence()
        self.inner.sync_all()

    def close(self) -> None:
        self.inner.close()
        self.buf = None
