"""fsck.pmfs: check a pmfs image and repair it, in the e2fsck tradition.

    fsck.pmfs [-n | -y | -p/-a] [-f] [-v] [-q] IMAGE

The checker works on the image as mount would see it: it first selects the
superblock replica (and rewrites a damaged one from it), then runs WAL
recovery exactly as mount does, then five passes, one invariant per check:

1. inodes: checksums, legal modes and flags, extent trees (node checksums,
   owners, depths, keys), extents inside the data area and not overlapping,
   sizes, xattr blocks, block counts, and no block owned twice (pass 1b
   resolves shared blocks by cloning them for every owner but one);
2. directories: block maps without holes, record checksums and tiling,
   names legal and unique, entries pointing at live inodes with the right
   file type, exactly one name per directory and `parent` (its "..") naming
   the directory that holds that name;
3. connectivity: the root exists, every directory reaches it, no loops;
   what is disconnected is reconnected to /lost+found as "#<ino>";
4. reference counts: link counts equal the names (files) or 2 + the
   subdirectories (directories); unlinked inodes are freed, interrupted
   truncations completed, the orphan list made consistent (and empty);
5. allocation maps: the bitmaps equal what the inodes use (leaked blocks and
   inodes freed, used-but-free ones marked), counters in the superblock.

What a crash leaves behind and mount itself recovers from -- committed log
records to replay, a torn uncommitted log record, an interrupted superblock
or log-header update, inodes on the orphan list -- is *recovery*, reported
as notes and not as errors: `check()` of any state a crash can produce is
clean.  Everything else is a *problem*: counted, and with repair fixed.

Repairs go through the WAL (`wal.transaction()`), one transaction per
repair, so each is atomic; new structures (extent nodes, cloned blocks,
directory blocks) are written to free blocks first and only then linked in
by a transaction.  SB_FSCK_RUNNING is set while repairing.  Without repair
the same code runs against a copy-on-write overlay of the image (nothing is
written to it), so `-n` reports exactly what `-y` would do.

Exit codes (the e2fsck bit set): 0 no errors, 1 errors corrected (or the
image was modified by recovery), 4 errors left uncorrected, 8 operational
error, 16 usage error, 32 cancelled by the user.

In-process API (used by the crash explorer and the tests)::

    from pmfs.fsck import check
    r = check(img, repair=False, preen=False, force=True, progress=None)
    r.problems, r.notes, r.errors_found, r.errors_fixed, r.exit_code, r.summary
"""

from __future__ import annotations

import os
import stat
import struct
import sys
import time
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

import xxhash

from . import __version__
from .cli import ArgumentParser, Progress, QuietError, UsageError
from .cli import run as cli_run
from .layout import (BITMAP_BYTES, BITS_PER_BITMAP_BLOCK, BLOCK_SIZE, CACHELINE, DIRENT,
                     DT_BLK, DT_CHR, DT_DIR, DT_FIFO, DT_LNK, DT_REG, DT_SOCK, DT_UNKNOWN,
                     EXT_NODE_MAX, EXT_ROOT_MAX, EXTENT, FORMAT_VERSION, I_INLINE, I_ORPHAN,
                     INLINE_MAX, INODE_CSUM_OFF, INODE_SIZE, MASK64, MAX_FILE_BLOCKS,
                     MAX_FILE_SIZE, MAX_SYMLINK, ORPHAN_HEAD_INO, ROOT_INO, SB_CLEAN,
                     SB_COMMIT_OFF, SB_CSUM_OFF, SB_FSCK_RUNNING, SB_MAGIC, SB_NEEDS_FSCK,
                     SB_SIZE, TAG_INODE, WAL_REC, WAL_REC_SKIP, FormatError, Inode,
                     Superblock, WalHeader, csum64, decode_dirent, decode_extent_node,
                     decode_xattr_block, dirent_size, encode_bitmap_trailer, encode_dirent,
                     encode_extent_node, encode_root_entries, fs_seed, inode_checksum_ok,
                     parse_dirent_block, verify_bitmap_block, wal_record_header)
from .layout import _SUPER_SEED  # to re-verify a salvaged superblock replica
from .pmem import Image, ImageBusy, open_image
from .superblock import REPLICA_OFFSETS, SuperblockManager, looks_like_pmfs, read_replicas
from .wal import WAL, TxTooLarge, WalError

EXIT_OK = 0
EXIT_FIXED = 1
EXIT_UNCORRECTED = 4
EXIT_ERROR = 8
EXIT_USAGE = 16
EXIT_CANCELLED = 32

PROG = "fsck.pmfs"

S_IFMT = 0o170000
_LEGAL_TYPES = frozenset((stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR,
                          stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK))
_SPECIAL = frozenset((stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK))
_DTYPE = {stat.S_IFREG: DT_REG, stat.S_IFDIR: DT_DIR, stat.S_IFLNK: DT_LNK,
          stat.S_IFCHR: DT_CHR, stat.S_IFBLK: DT_BLK, stat.S_IFIFO: DT_FIFO,
          stat.S_IFSOCK: DT_SOCK}
_KNOWN_FLAGS = I_INLINE | I_ORPHAN
_GOLDEN = 0x9E3779B97F4A7C15
_REPLICA = "AB"

#: one inode slot as pass 1 reads it: mode, flags, nlink, generation, size,
#: blocks, parent, xattr, orphan next, orphan prev, extent-root depth and
#: count, the seven root entries, checksum (uid/gid/times/rdev skipped)
_SCAN = struct.Struct("<I8xIIIQQ40xQQQQ8xHH4x112s8xQ")
assert _SCAN.size == INODE_SIZE
_ZERO_INODE = bytes(INODE_SIZE)
_CHUNK = 4096  # inodes per bulk read (1 MiB)
_BITS01 = bytes.maketrans(b"\x00\x01", b"01")
_xxh3 = xxhash.xxh3_64_intdigest


def dtype_of(mode: int) -> int:
    return _DTYPE.get(mode & S_IFMT, DT_UNKNOWN)


class FsckAbort(Exception):
    """The check cannot go on (no usable superblock, ...): exit 8."""


class _Failed(Exception):
    """A repair could not be made (its reason is the message)."""


# --------------------------------------------------------------------------
# a copy-on-write overlay: checking without writing
# --------------------------------------------------------------------------


class OverlayImage(Image):
    """An image whose writes go to private pages in DRAM, never to `base`.

    `check(repair=False)` runs recovery and every repair against one of
    these, so that it checks the state the image would reach, without
    changing a byte of it.
    """

    backend = "overlay"

    def __init__(self, base: Image):
        super().__init__(None, base.size, base.path, readonly=False)
        self.base = base
        self.pages: dict[int, bytearray] = {}

    def is_hole(self, off: int, n: int) -> bool:
        first, last = off >> 12, (off + n - 1) >> 12
        if any(first <= p <= last for p in self.pages):
            return False
        return self.base.is_hole(off, n)

    def read(self, off: int, n: int):
        if off < 0 or n < 0 or off + n > self.size:
            raise ValueError(f"read [{off}, {off + n}) outside the image ({self.size})")
        pages = self.pages
        if not pages or n == 0:
            return self.base.read(off, n)
        first, last = off >> 12, (off + n - 1) >> 12
        if last - first < 64:
            hit = [p for p in range(first, last + 1) if p in pages]
        else:
            hit = sorted(p for p in pages if first <= p <= last)
        if not hit:
            return self.base.read(off, n)
        out = bytearray(self.base.read(off, n))
        end = off + n
        for p in hit:
            pg = pages[p]
            base = p << 12
            a = max(off, base)
            b = min(end, base + len(pg))
            out[a - off:b - off] = pg[a - base:b - base]
        return memoryview(out)

    def write(self, off: int, data) -> None:
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        if off < 0 or off + n > self.size:
            raise ValueError(f"write [{off}, {off + n}) outside the image ({self.size})")
        pages = self.pages
        p = off
        end = off + n
        while p < end:
            idx = p >> 12
            base = idx << 12
            pg = pages.get(idx)
            if pg is None:
                pg = pages[idx] = bytearray(self.base.read(base, min(4096, self.size - base)))
            k = min(end, base + 4096) - p
            pg[p - base:p - base + k] = mv[p - off:p - off + k]
            p += k

    def flush(self, off: int, n: int) -> None:
        pass

    def fence(self) -> None:
        pass

    def sync_all(self) -> None:
        pass

    def describe(self) -> str:
        return f"overlay over {self.base.describe()}"

    def close(self) -> None:
        self.pages = {}


# --------------------------------------------------------------------------
# the result
# --------------------------------------------------------------------------


@dataclass
class FsckResult:
    #: one line per inconsistency found ("what: action"); empty means clean
    problems: list = field(default_factory=list)
    #: recovery a crash calls for (what mount would do too); not errors
    notes: list = field(default_factory=list)
    errors_found: int = 0
    errors_fixed: int = 0
    exit_code: int = 0
    summary: str = ""
    #: the image was changed (repairs or recovery), with repair only
    modified: bool = False
    #: problems that preen (-p) may not fix on its own
    unsafe: list = field(default_factory=list)
    #: an operational error that stopped the check (exit 8), or None
    fatal: str | None = None
    stats: dict = field(default_factory=dict)
    #: -p found something it may not fix: nothing was changed
    preen_halted: bool = False

    @property
    def clean(self) -> bool:
        return not self.problems and self.fatal is None


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _set_bits(bits: bytearray, start: int, n: int, value: bool) -> None:
    end = start + n
    i = start
    while i < end and i & 7:
        if value:
            bits[i >> 3] |= 1 << (i & 7)
        else:
            bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
        i += 1
    a, b = i >> 3, end >> 3
    if b > a:
        bits[a:b] = (b"\xff" if value else b"\x00") * (b - a)
        i = b << 3
    while i < end:
        if value:
            bits[i >> 3] |= 1 << (i & 7)
        else:
            bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
        i += 1


def _pack_bits(flags, nbits_area: int) -> bytes:
    """Bytes of 0/1 (one per item) -> a bitmap of `nbits_area` bits (bit i =
    byte i >> 3, bit i & 7), items past len(flags) set."""
    n = len(flags)
    pad = nbits_area - n
    s = bytes(flags).translate(_BITS01)[::-1]
    if pad > 0:
        s = b"1" * pad + s
    return int(s or b"0", 2).to_bytes(nbits_area // 8, "little")


def _merge_extents(ext) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for s, n, p in sorted(ext):
        if out:
            s0, n0, p0 = out[-1]
            if s0 + n0 == s and p0 + n0 == p and n0 + n <= 0xFFFFFFFF:
                out[-1] = (s0, n0 + n, p0)
                continue
        out.append((s, n, p))
    return out


def _plural(n: int, word: str) -> str:
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"


def _fmt_list(items, limit: int = 6) -> str:
    items = list(items)
    s = ", ".join(str(x) for x in items[:limit])
    return s + (f", ... ({len(items)} in all)" if len(items) > limit else "")


class _DirState:
    """Names and free records of one directory (pass 3 adds entries)."""

    __slots__ = ("names", "free", "nblocks")

    def __init__(self):
        self.names: dict[bytes, tuple[int, int, int]] = {}
        self.free: list[tuple[int, int]] = []
        self.nblocks = 0


# --------------------------------------------------------------------------
# the checker
# --------------------------------------------------------------------------


class Fsck:
    """One check (and repair) of one image.

    `img` is where fixes are written: the image itself (`real=True`) or an
    OverlayImage over it (`real=False`: nothing reaches the image, fixes
    are only counted as found).  Each check is a method; `problem()` and
    `note()` record findings and apply their fixes.
    """

    PASSES = {
        1: "checking inodes, blocks and sizes",
        2: "checking directory structure",
        3: "checking directory connectivity",
        4: "checking reference counts and the orphan list",
        5: "checking allocation maps and counters",
    }

    def __init__(self, img: Image, real: bool = False, force: bool = True,
                 progress=None, out=None, verbose: bool = False, name: str | None = None,
                 headers: bool = True):
        self.img = img
        self.headers = headers
        self.real = real
        self.force = force
        self.progress = progress
        self.out = out
        self.verbose = verbose
        self.name = name or img.path or "image"
        self.res = FsckResult()
        self.found = 0
        self.fixed = 0
        self.cur_pass = "superblock"
        self.stats: dict = {}
        self.replayed = 0
        self.wal = None
        self.sbm = None

    # -- reporting ---------------------------------------------------------
    def say(self, line: str) -> None:
        if self.out is not None:
            self.out(line)

    def vsay(self, line: str) -> None:
        if self.verbose:
            self.say(line)

    def problem(self, what: str, action: str, fix=None, safe: bool = False,
                failed: str | None = None) -> bool:
        """Record an inconsistency and apply its fix; True if fixed."""
        line = f"{what}: {action}"
        self.found += 1
        if not safe:
            self.res.unsafe.append(line)
        if fix is not None and failed is None:
            try:
                fix()
            except (Exception, _Failed) as e:  # a repair that fails is reported
                failed = str(e) or type(e).__name__
        self.res.problems.append(line)
        if failed is not None:
            self.say(f"{line} [NOT FIXED: {failed}]")
            return False
        if self.real:
            self.fixed += 1
            self.say(f"{line} [fixed]")
        else:
            self.say(f"{line} [not fixed]")
        return True

    def note(self, what: str, fix=None) -> None:
        """Record recovery that a crash calls for (not an error)."""
        if fix is not None:
            try:
                fix()
            except Exception as e:
                self.problem(what, "recover", failed=str(e) or type(e).__name__)
                return
        self.res.notes.append(what)
        if self.real:
            self.res.modified = True
        self.say(what)

    def tick(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress.update(done, total, f"Pass {self.cur_pass}")

    def header(self, n: int) -> None:
        self.cur_pass = str(n)
        self._t0 = time.monotonic()
        self._found0 = self.found
        if self.headers or self.verbose:
            self.say(f"Pass {n}: {self.PASSES[n]}")
        self.tick(0, 1)

    def footer(self, n: int, detail: str = "") -> None:
        dt = time.monotonic() - self._t0
        self.stats[f"pass{n}_seconds"] = round(dt, 3)
        self.stats[f"pass{n}_problems"] = nprob = self.found - self._found0
        self.vsay(f"  pass {n} done in {dt:.2f}s, {_plural(nprob, 'problem')}"
                  + (f": {detail}" if detail else ""))

    # -- the run -----------------------------------------------------------
    def run(self) -> FsckResult:
        res = self.res
        t0 = time.monotonic()
        try:
            self.check_superblock()
            if not self.force and self.quick_clean():
                return self._finish_result(quick=True, t0=t0)
            self.begin_repair()
            self.check_wal()
            self.load_bitmaps()
            self.pass1()
            self.pass1b()
            self.pass2()
            self.pass3()
            self.pass4()
            self.pass5()
            self.end_repair()
        except FsckAbort as e:
            res.fatal = str(e)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # a bug or damage we did not foresee: one line
            res.fatal = (f"{self.name}: internal error in pass {self.cur_pass}: "
                         f"{type(e).__name__}: {e}")
            if "--debug" in sys.argv or _debug():
                import traceback
                traceback.print_exc()
        finally:
            if self.progress is not None:
                try:
                    self.progress.done()
                except Exception:
                    pass
        return self._finish_result(quick=False, t0=t0)

    def _finish_result(self, quick: bool, t0: float) -> FsckResult:
        res = self.res
        res.errors_found = self.found
        res.errors_fixed = self.fixed if self.real else 0
        code = 0
        if self.real:
            if res.errors_fixed or res.modified:
                code |= EXIT_FIXED
            if res.errors_found > res.errors_fixed:
                code |= EXIT_UNCORRECTED
        elif res.errors_found:
            code |= EXIT_UNCORRECTED
        if res.fatal is not None:
            code |= EXIT_ERROR
            if not res.problems:
                res.problems.append(res.fatal)
                res.errors_found = max(res.errors_found, 1)
        res.exit_code = code
        self.stats["seconds"] = round(time.monotonic() - t0, 3)
        res.stats = self.stats
        if res.fatal is not None and not hasattr(self, "T"):
            res.summary = f"{self.name}: check failed: {res.fatal}"
        elif quick:
            sb = self.sb
            res.summary = (f"{self.name}: clean, {sb.inode_count - 1 - sb.free_inodes}/"
                           f"{sb.inode_count - 1} inodes, "
                           f"{sb.total_blocks - sb.free_blocks}/{sb.total_blocks} blocks")
        else:
            s = self.stats
            res.summary = (f"{self.name}: {s.get('files', 0)} files, "
                           f"{s.get('directories', 0)} directories, "
                           f"{s.get('blocks_used', 0)}/{getattr(self, 'T', 0)} blocks; "
                           f"{res.errors_found} errors found, {res.errors_fixed} fixed")
            if self.replayed:
                res.summary += (f"; log: {self.replayed} transaction(s) "
                                f"{'replayed' if self.real else 'to replay'}")
        return res

    # ======================================================================
    # superblock
    # ======================================================================
    def check_superblock(self) -> None:
        img = self.img
        reps = read_replicas(img)
        reasons: dict[int, str] = {}
        cands = []
        newer = None
        for i, (sb, err) in enumerate(reps):
            if sb is None:
                reasons[i] = err or "invalid"
                continue
            if sb.format_version > FORMAT_VERSION or sb.incompat:
                newer = (f"{self.name}: format version {sb.format_version} (features "
                         f"{sb.incompat:#x}) is newer than this fsck.pmfs supports "
                         f"(version {FORMAT_VERSION}); upgrade pmfs")
                reasons[i] = "newer format"
                continue
            errs = sb.geometry_errors(img.size)
            if errs:
                reasons[i] = errs[0]
                continue
            cands.append((sb.version, i, sb))
        salvaged = False
        if not cands:
            if newer:
                raise FsckAbort(newer)
            if not looks_like_pmfs(img):
                raise FsckAbort(f"{self.name}: not a pmfs file system (no pmfs superblock)")
            geo = [r for i, r in reasons.items() if reps[i][0] is not None]
            if geo:
                raise FsckAbort(f"{self.name}: {geo[0]}")
            got = self._salvage_superblock()
            if got is None:
                raise FsckAbort(
                    f"{self.name}: both superblock replicas are damaged ({reasons.get(0)}; "
                    f"{reasons.get(1)}) and neither can be salvaged")
            i, sb = got
            cands = [(sb.version, i, sb)]
            salvaged = True
        cands.sort(key=lambda c: (c[0], -c[1]))
        _v, act, sb = cands[-1]
        self.sb = sb
        self.sb_was_clean = bool(sb.state & SB_CLEAN)
        self.seed = fs_seed(sb.uuid)
        self.N = sb.inode_count
        self.T = sb.total_blocks
        self.D = sb.data_start
        self.itoff = sb.itable_start * BLOCK_SIZE
        sbm = SuperblockManager(img)
        sbm.sb = sb
        sbm.active = act
        sbm.replica_errors = [reasons.get(0), reasons.get(1)]
        self.sbm = sbm
        self.replica_ok = not salvaged
        other = 1 - act
        osb = reps[other][0]
        A, B = _REPLICA[act], _REPLICA[other]
        if salvaged:
            self.replica_ok = False
            self.problem(f"superblock replica {A}: {reasons[act]}",
                         "salvage it (its contents verify against the inode table)",
                         fix=self._sb_sync, safe=False)
            self.problem(f"superblock replica {B}: {reasons.get(other)}",
                         f"rewrite it from replica {A}", fix=self._sb_sync, safe=False)
        elif osb is None or other in reasons:
            self.replica_ok = False
            raw = bytes(img.read(REPLICA_OFFSETS[other], SB_SIZE))
            why = reasons.get(other, "invalid")
            if raw[:8] == SB_MAGIC and why in ("superblock checksum mismatch",
                                               "superblock replica not committed"):
                self.note(f"superblock replica {B}: interrupted update ({why}); "
                          f"{'rewritten' if self.real else 'to rewrite'} from replica {A}",
                          fix=self._sb_sync)
            else:
                self.problem(f"superblock replica {B} is damaged ({why})",
                             f"rewrite it from replica {A}", fix=self._sb_sync, safe=True)
        elif osb.uuid != sb.uuid or any(
                getattr(osb, k) != getattr(sb, k) for k in
                ("total_blocks", "inode_count", "wal_start", "wal_blocks", "data_start")):
            self.replica_ok = False
            self.problem(f"superblock replica {B} describes another file system",
                         f"rewrite it from replica {A}", fix=self._sb_sync, safe=True)
        if sb.state & SB_FSCK_RUNNING:
            self.vsay("a previous fsck.pmfs repair was interrupted")
        if sb.state & SB_NEEDS_FSCK:
            self.vsay(f"the file system met {sb.error_count} error(s) while mounted")

    def _salvage_superblock(self):
        """A replica with a bad checksum whose fields make sense and whose uuid
        verifies the inode table: (index, Superblock) or None."""
        img = self.img
        for i, off in enumerate(REPLICA_OFFSETS):
            if off + SB_SIZE > img.size:
                continue
            raw = bytearray(img.read(off, SB_SIZE))
            if raw[:8] != SB_MAGIC:
                continue
            try:
                (version,) = struct.unpack_from("<Q", raw, 96)
                struct.pack_into("<Q", raw, SB_COMMIT_OFF, version)
                struct.pack_into("<Q", raw, SB_CSUM_OFF, csum64(raw[:SB_COMMIT_OFF], _SUPER_SEED))
                sb = Superblock.decode(raw)
                if sb.format_version > FORMAT_VERSION or sb.incompat:
                    continue
                if sb.geometry_errors(img.size):
                    continue
                seed = fs_seed(sb.uuid)
                itoff = sb.itable_start * BLOCK_SIZE
                ok = 0
                for ino in (ORPHAN_HEAD_INO, ROOT_INO):
                    r = bytes(img.read(itoff + ino * INODE_SIZE, INODE_SIZE))
                    if r != _ZERO_INODE and inode_checksum_ok(ino, r, seed):
                        ok += 1
                if ok:
                    return i, sb
            except Exception:
                continue
        return None

    def _sb_sync(self) -> None:
        self.sbm.update()

    def quick_clean(self) -> bool:
        """Without -f: is the image marked clean, with nothing to recover?"""
        sb = self.sb
        if not self.replica_ok or not sb.state & SB_CLEAN:
            return False
        if sb.state & (SB_NEEDS_FSCK | SB_FSCK_RUNNING):
            return False
        try:
            wal = WAL(self.img, sb.wal_start, sb.wal_blocks, self.seed)
            if wal.pending():
                return False
            for slot in (0, 1):
                raw = bytes(self.img.read(wal.hdr_off + slot * CACHELINE, CACHELINE))
                if raw != bytes(CACHELINE):
                    WalHeader.decode(raw, self.seed, slot)
        except Exception:
            return False
        return True

    def begin_repair(self) -> None:
        sb = self.sbm.sb
        self.sbm.update(state=(sb.state | SB_FSCK_RUNNING) & ~SB_CLEAN)

    def end_repair(self) -> None:
        # like unmount: every transaction is applied, so the log is emptied
        # before the superblock says clean
        self.wal.checkpoint()
        sb = self.sbm.sb
        state = sb.state & ~SB_FSCK_RUNNING
        all_fixed = self.found == self.fixed or not self.real
        if all_fixed:
            state = (state | SB_CLEAN) & ~SB_NEEDS_FSCK
        else:
            state = (state | SB_NEEDS_FSCK) & ~SB_CLEAN
        self.sbm.update(state=state, free_blocks=self.free_blocks,
                        free_inodes=self.free_inodes, fsck_time=time.time_ns(),
                        error_count=0 if all_fixed else sb.error_count,
                        owner_pid=0, owner_host="")

    # ======================================================================
    # the log
    # ======================================================================
    def check_wal(self) -> None:
        self.cur_pass = "log"
        sb = self.sb
        img = self.img
        wal = WAL(img, sb.wal_start, sb.wal_blocks, self.seed)
        self.wal = wal
        bad_slots = []
        for slot in (0, 1):
            raw = bytes(img.read(wal.hdr_off + slot * CACHELINE, CACHELINE))
            try:
                WalHeader.decode(raw, self.seed, slot)
            except FormatError:
                if raw != bytes(CACHELINE):
                    bad_slots.append(slot)
        try:
            h, _slot = wal._read_header()
            recs = list(wal.scan())
        except WalError as e:
            self.problem(f"log: {e}", "discard the log", fix=self._wal_discard, safe=False)
            return
        n = sum(1 for r in recs if r[2] != WAL_REC_SKIP)
        if recs:
            end_pos, end_txid = recs[-1][0] + recs[-1][4], recs[-1][1] + 1
        else:
            end_pos, end_txid = h.tail_pos, h.tail_txid
        torn = self._torn_record(end_pos, end_txid)

        def replay():
            try:
                self.replayed = wal.recover()
            except Exception as e:
                raise _Failed(f"replay failed ({e})") from None

        if n and self.sb_was_clean:
            ok = self.problem(f"superblock marked clean but the log holds {n} committed "
                              f"transaction(s)", "replay them", fix=replay, safe=True)
        elif n:
            verb = "replayed" if self.real else "to replay (checked as replayed; not written)"
            self.note(f"log: {n} committed transaction(s) {verb}", fix=replay)
            ok = True
        else:
            try:
                wal.recover()
                ok = True
            except Exception as e:
                ok = self.problem(f"log: unusable ({e})", "discard the log",
                                  fix=self._wal_discard, safe=False)
                return
        if not ok:
            self.problem("log: could not be replayed", "discard the log",
                         fix=self._wal_discard, safe=False)
            return
        if torn is not None:
            phys, txid = torn

            def zap(phys=phys):
                off = wal.area_off + phys
                img.write(off, bytes(CACHELINE))
                img.persist(off, CACHELINE)
            self.note(f"log: torn record of uncommitted transaction {txid} "
                      f"{'discarded' if self.real else 'to discard'}", fix=zap)
        if bad_slots:
            still = []
            for slot in bad_slots:
                raw = bytes(img.read(wal.hdr_off + slot * CACHELINE, CACHELINE))
                try:
                    WalHeader.decode(raw, self.seed, slot)
                except FormatError:
                    still.append(slot)
            if still:
                def rewrite():
                    wal._write_header(wal.head_pos, wal.next_txid)
                self.note(f"log header: slot {still[0]} damaged (interrupted update); "
                          f"{'rewritten' if self.real else 'to rewrite'}", fix=rewrite)

    def _torn_record(self, pos: int, txid: int):
        wal = self.wal
        area = wal.area_size
        if area <= 0:
            return None
        phys = pos % area
        if phys + WAL_REC.size > area:
            return None
        hdr = wal_record_header(self.img.read(wal.area_off + phys, WAL_REC.size))
        if hdr is None or hdr[1] != txid:
            return None
        return phys, txid

    def _wal_discard(self) -> None:
        wal = self.wal
        self.img.zero(wal.area_off, wal.area_size)
        wal.reset()

    # ======================================================================
    # bitmaps (the DRAM copy of what the media says)
    # ======================================================================
    def load_bitmaps(self) -> None:
        sb = self.sb
        self.ibits, self.bad_ibm = self._load_bitmap(sb.ibitmap_start, sb.ibitmap_blocks)
        self.bbits, self.bad_bbm = self._load_bitmap(sb.bbitmap_start, sb.bbitmap_blocks)
        # the counts the media bitmaps give (what a clean unmount recorded)
        self.media_free_inodes = self._media_free(self.ibits, self.N)
        self.media_free_blocks = self._media_free(self.bbits, self.T)

    @staticmethod
    def _media_free(bits: bytearray, nbits: int) -> int:
        full, rest = divmod(nbits, 8)
        used = int.from_bytes(bits[:full], "little").bit_count()
        if rest:
            used += (bits[full] & ((1 << rest) - 1)).bit_count()
        return nbits - used

    def _load_bitmap(self, start: int, nblocks: int):
        raw = bytes(self.img.read(start * BLOCK_SIZE, nblocks * BLOCK_SIZE))
        bits = bytearray(nblocks * BITMAP_BYTES)
        bad = set()
        for i in range(nblocks):
            blk = raw[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
            if not verify_bitmap_block(self.seed, start + i, blk):
                bad.add(i)
            bits[i * BITMAP_BYTES:(i + 1) * BITMAP_BYTES] = blk[:BITMAP_BYTES]
        return bits, bad

    def _bm_set(self, tx, which: str, ranges, value: bool) -> None:
        """Set/clear bits of the media bitmap in `tx` (whole blocks rewritten)."""
        if which == "b":
            bits, start, bad = self.bbits, self.sb.bbitmap_start, self.bad_bbm
        else:
            bits, start, bad = self.ibits, self.sb.ibitmap_start, self.bad_ibm
        touched = set()
        for s, n in ranges:
            if n <= 0:
                continue
            _set_bits(bits, s, n, value)
            touched.update(range(s // BITS_PER_BITMAP_BLOCK,
                                 (s + n - 1) // BITS_PER_BITMAP_BLOCK + 1))
        for i in sorted(touched):
            seg = bytes(bits[i * BITMAP_BYTES:(i + 1) * BITMAP_BYTES])
            tx.write((start + i) * BLOCK_SIZE,
                     seg + encode_bitmap_trailer(self.seed, start + i, seg))
            bad.discard(i)

    # ======================================================================
    # small writers
    # ======================================================================
    def tx(self, label: str):
        return self.wal.transaction("fsck-" + label)

    def _ioff(self, ino: int) -> int:
        return self.itoff + ino * INODE_SIZE

    def _inode_rw(self, tx, ino: int, **changes) -> Inode:
        """Read-modify-write inode `ino` (its checksum recomputed) in `tx`."""
        off = self._ioff(ino)
        inode = Inode.decode(ino, tx.read(off, INODE_SIZE), self.seed, verify=False)
        for k, v in changes.items():
            setattr(inode, k, v)
        tx.write(off, inode.encode(self.seed))
        if "nlink" in changes:
            self.nlink[ino] = inode.nlink
        if "size" in changes:
            self.size[ino] = inode.size
        if "parent" in changes:
            self.parent[ino] = inode.parent
        if "blocks" in changes:
            self.blocks[ino] = inode.blocks
        if "flags" in changes:
            self.flags[ino] = inode.flags
        return inode

    def _free_slot_bytes(self, ino: int, raw) -> bytes:
        (gen,) = struct.unpack_from("<I", bytes(raw), 20)
        return Inode(ino, generation=gen).encode(self.seed)

    def _write_free_slot(self, ino: int, raw=None) -> None:
        off = self._ioff(ino)
        with self.tx("clear-inode") as tx:
            tx.write(off, self._free_slot_bytes(ino, raw if raw is not None
                                                else tx.read(off, INODE_SIZE)))

    def _claim(self, p: int, n: int) -> None:
        bused = self.bused
        if n == 1:
            if bused[p]:
                self._dup(p, 1)
            bused[p] = 1
            return
        if bused.count(1, p, p + n):
            self._dup(p, n)
        bused[p:p + n] = b"\x01" * n

    def _dup(self, p: int, n: int) -> None:
        if self.bdup is None:
            self.bdup = bytearray(self.T)
        bused, bdup = self.bused, self.bdup
        for b in range(p, p + n):
            if bused[b]:
                bdup[b] = 1

    def _unclaim(self, ranges) -> None:
        for p, n in ranges:
            self.bused[p:p + n] = bytes(n)

    def _alloc(self, n: int) -> list[tuple[int, int]]:
        """n free blocks (by the computed map) as runs; marks them used.

        The caller writes them directly (not through the log), so the log
        is emptied first: recovery must never replay an older record over
        them (see the report on wal.py: replay re-applies applied records)."""
        self.wal.checkpoint()
        bused = self.bused
        T, D = self.T, self.D
        runs = []
        left = n
        pos = max(self.rotor, D)
        wrapped = False
        while left:
            i = bused.find(0, pos)
            if i < 0:
                if wrapped:
                    for s, k in runs:
                        bused[s:s + k] = bytes(k)
                    raise _Failed("no free blocks left")
                wrapped = True
                pos = D
                continue
            j = bused.find(1, i, i + left)
            if j < 0:
                j = min(i + left, T)
            k = j - i
            bused[i:j] = b"\x01" * k
            runs.append((i, k))
            left -= k
            pos = j
        self.rotor = pos
        return runs

    def _alloc_inode(self) -> int:
        i = self.iused.find(0, ROOT_INO + 1)
        if i < 0:
            raise _Failed("no free inodes left")
        return i

    # -- extent trees ------------------------------------------------------
    def _write_tree(self, ino: int, extents, new_data=(), free_data=(), extra=None,
                    **changes) -> None:
        """Give `ino` a fresh extent tree mapping `extents`.

        New nodes go to free blocks, written and fenced before one
        transaction switches the root, marks the new blocks (nodes and
        `new_data`) used and the old nodes and `free_data` free."""
        extents = _merge_extents(extents)
        img = self.img
        entries = extents
        depth = 0
        new_nodes: list[int] = []
        node_runs: list[tuple[int, int]] = []
        try:
            while len(entries) > EXT_ROOT_MAX:
                chunks = [entries[i:i + EXT_NODE_MAX]
                          for i in range(0, len(entries), EXT_NODE_MAX)]
                runs = self._alloc(len(chunks))
                node_runs += runs
                blocks = [s + k for s, n in runs for k in range(n)]
                up = []
                for blk, ch in zip(blocks, chunks):
                    img.write(blk * BLOCK_SIZE, encode_extent_node(self.seed, blk, ino, depth, ch))
                    img.flush(blk * BLOCK_SIZE, BLOCK_SIZE)
                    up.append((ch[0][0], 0, blk))
                    new_nodes.append(blk)
                entries = up
                depth += 1
        except BaseException:
            self._unclaim(node_runs)
            raise
        img.fence()
        old_nodes = self.nodes.get(ino, [])
        nd = sum(n for _s, n, _p in extents)
        blocks = nd + len(new_nodes) + (1 if self.xattr.get(ino) else 0)
        try:
            with self.tx("extent-tree") as tx:
                self._inode_rw(tx, ino, depth=depth, count=len(entries),
                               root=encode_root_entries(entries), blocks=blocks, **changes)
                self._bm_set(tx, "b", list(node_runs) + list(new_data), True)
                self._bm_set(tx, "b", [(b, 1) for b in old_nodes] + list(free_data), False)
                if extra is not None:
                    extra(tx)
        except BaseException:
            self._unclaim(node_runs)
            raise
        self._unclaim([(b, 1) for b in old_nodes])
        self._unclaim(free_data)
        if new_nodes:
            self.nodes[ino] = new_nodes
        else:
            self.nodes.pop(ino, None)
        if extents:
            self.extents[ino] = extents
        else:
            self.extents.pop(ino, None)
        self.dblocks[ino] = nd

    def _walk_tree(self, ino: int, depth: int, count: int, ents: bytes):
        """(good extents, node blocks, issues) of an inode's extent tree.
        Nodes that do not verify (checksum, owner, depth) are skipped with
        what is below them; bad extents are dropped."""
        issues: list[str] = []
        D, T = self.D, self.T
        if count > EXT_ROOT_MAX:
            return [], [], [f"extent root holds {count} entries (at most {EXT_ROOT_MAX})"]
        if depth > 8:
            return [], [], [f"extent tree depth {depth}"]
        root = list(EXTENT.iter_unpack(ents[:count * EXTENT.size]))
        nodes: list[int] = []
        leaves: list[tuple[int, int, int]] = []
        if depth == 0:
            leaves = root
        else:
            if not root:
                issues.append("empty extent index in the inode")
            visited: set[int] = set()
            img = self.img
            seed = self.seed

            def visit(entries, d):
                prev = -1
                for key, _z, child in entries:
                    if key <= prev:
                        issues.append("extent index keys out of order")
                    prev = key
                    if not D <= child < T:
                        issues.append(f"extent node {child} outside the data area")
                        continue
                    if child in visited:
                        issues.append(f"extent node {child} referenced twice")
                        continue
                    try:
                        cd, cents = decode_extent_node(
                            seed, child, img.read(child * BLOCK_SIZE, BLOCK_SIZE), ino)
                    except Exception as e:
                        issues.append(str(e))
                        continue
                    if cd != d - 1:
                        issues.append(f"extent node {child} has depth {cd}, expected {d - 1}")
                        continue
                    visited.add(child)
                    nodes.append(child)
                    if not cents:
                        issues.append(f"extent node {child} is empty")
                        continue
                    if cents[0][0] != key:
                        issues.append(f"extent index key {key} does not match node {child}")
                    if cd == 0:
                        leaves.extend(cents)
                    else:
                        visit(cents, cd)
            visit(root, depth)
        good = []
        prev_end = 0
        srt = sorted(leaves)
        if srt != leaves:
            issues.append("extents out of order")
        for s, n, p in srt:
            if n == 0:
                issues.append(f"empty extent at file block {s}")
                continue
            if p < D or p + n > T:
                issues.append(f"extent {s}+{n} -> block {p} outside the data area")
                continue
            if s + n > MAX_FILE_BLOCKS:
                issues.append(f"extent {s}+{n} beyond the largest file")
                continue
            if s < prev_end:
                issues.append(f"extent {s}+{n} -> {p} overlaps another")
                continue
            good.append((s, n, p))
            prev_end = s + n
        return good, nodes, issues

    # ======================================================================
    # pass 1: inodes
    # ======================================================================
    def pass1(self) -> None:
        self.header(1)
        N, T, D = self.N, self.T, self.D
        self.mode = array("I", bytes(4 * N))
        self.nlink = array("I", bytes(4 * N))
        self.flags = array("I", bytes(4 * N))
        self.size = array("Q", bytes(8 * N))
        self.parent = array("Q", bytes(8 * N))
        self.blocks = array("Q", bytes(8 * N))
        self.dblocks = array("Q", bytes(8 * N))
        self.iused = bytearray(N)
        self.iused[ORPHAN_HEAD_INO] = 1
        self.bused = bytearray(T)
        self.bused[:D] = b"\x01" * D
        self.bdup = None
        self.rotor = D
        self.extents: dict[int, list] = {}
        self.nodes: dict[int, list] = {}
        self.xattr: dict[int, int] = {}
        self.orph: dict[int, tuple[int, int]] = {}
        self.rebuild: set[int] = set()
        img = self.img
        seed = self.seed
        tagseed = (seed ^ (TAG_INODE << 56)) & MASK64
        scan = _SCAN.iter_unpack
        xxh = _xxh3
        ext_unpack = EXTENT.iter_unpack
        maxb = MAX_FILE_BLOCKS
        zero_chunk = memoryview(bytes(_CHUNK * INODE_SIZE))
        S_REG, S_DIR = stat.S_IFREG, stat.S_IFDIR
        record = self._record
        for base in range(0, N, _CHUNK):
            cnt = min(_CHUNK, N - base)
            self.tick(base, N)
            if img.is_hole(self.itoff + base * INODE_SIZE, cnt * INODE_SIZE):
                continue  # never written: free slots (reading would allocate)
            buf = bytes(img.read(self.itoff + base * INODE_SIZE, cnt * INODE_SIZE))
            if buf == zero_chunk[:cnt * INODE_SIZE]:
                continue
            mv = memoryview(buf)
            for k, rec in enumerate(scan(buf)):
                ino = base + k
                if ino == ORPHAN_HEAD_INO:
                    continue
                mode = rec[0]
                o = k << 8
                if mode == 0:
                    if rec[13] == 0 and buf[o:o + INODE_SIZE] == _ZERO_INODE:
                        continue
                    if xxh(mv[o:o + INODE_CSUM_OFF], (tagseed ^ (ino * _GOLDEN)) & MASK64) \
                            != rec[13]:
                        self._bad_free_slot(ino, buf[o:o + INODE_SIZE])
                    continue
                ok = xxh(mv[o:o + INODE_CSUM_OFF], (tagseed ^ (ino * _GOLDEN)) & MASK64) \
                    == rec[13]
                fmt = mode & S_IFMT
                if (ok and (fmt == S_REG or fmt == S_DIR) and mode <= 0o177777
                        and not rec[1] & ~I_ORPHAN and rec[10] == 0 and rec[7] == 0
                        and rec[11] <= EXT_ROOT_MAX):
                    count = rec[11]
                    ext = list(ext_unpack(rec[12][:count * 16])) if count else []
                    prev = 0
                    good = True
                    for s, n, p in ext:
                        if n == 0 or p < D or p + n > T or s < prev or s + n > maxb:
                            good = False
                            break
                        prev = s + n
                    if good and (fmt == S_DIR or rec[4] <= MAX_FILE_SIZE):
                        record(ino, mode, rec[2], rec[1], rec[4], rec[5], rec[6], rec[8],
                               rec[9], ext, (), 0)
                        continue
                self._inode_slow(ino, buf[o:o + INODE_SIZE], ok)
        self.tick(N, N)

    def _live_stats(self) -> None:
        mode = self.mode
        nd = sum(1 for i in range(1, self.N) if self.iused[i] and mode[i] & S_IFMT == stat.S_IFDIR)
        used = self.iused.count(1) - 1
        self.stats.update(inodes_used=used, directories=nd, files=used - nd)

    def _record(self, ino, mode, nlink, flags, size, blocks, parent, onext, oprev, ext, nodes,
                xattr) -> None:
        self.iused[ino] = 1
        self.mode[ino] = mode
        self.nlink[ino] = nlink
        self.flags[ino] = flags
        self.size[ino] = size
        self.blocks[ino] = blocks
        self.parent[ino] = parent
        if flags & I_ORPHAN or onext or oprev:
            self.orph[ino] = (onext, oprev)
        claim = self._claim
        for b in nodes:
            claim(b, 1)
        if nodes:
            self.nodes[ino] = list(nodes)
        if xattr:
            claim(xattr, 1)
            self.xattr[ino] = xattr
        nd = 0
        for _s, n, p in ext:
            claim(p, n)
            nd += n
        if ext:
            self.extents[ino] = ext
        self.dblocks[ino] = nd

    def _bad_free_slot(self, ino: int, raw: bytes) -> None:
        self.problem(f"inode {ino}: free inode slot with a bad checksum",
                     "rewrite it as a free slot", safe=True,
                     fix=lambda: self._write_free_slot(ino, raw))

    def _clear_inode(self, ino: int, raw: bytes, why: str) -> None:
        self.problem(f"inode {ino}: {why}", "clear the inode", safe=False,
                     fix=lambda: self._write_free_slot(ino, raw))

    def _inode_slow(self, ino: int, raw: bytes, csum_ok: bool) -> None:
        """Every check of one inode, with the problems reported and fixed."""
        inode = Inode.decode(ino, raw, self.seed, verify=False)
        mode = inode.mode
        fmt = mode & S_IFMT
        bad_sum = "" if csum_ok else "checksum mismatch; "
        if fmt not in _LEGAL_TYPES or mode > 0o177777:
            return self._clear_inode(ino, raw, f"{bad_sum}illegal mode {mode:#o}")
        flags = inode.flags
        inline = flags & I_INLINE
        if inline and fmt != stat.S_IFLNK:
            return self._clear_inode(ino, raw, f"{bad_sum}inline-data flag on a non-symlink")
        severe: list[tuple[str, str, object]] = []  # (what, action, fix(inode))
        if flags & ~_KNOWN_FLAGS:
            def f_flags(i):
                i.flags &= _KNOWN_FLAGS
            severe.append((f"unknown flags {flags & ~_KNOWN_FLAGS:#x}", "clear them", f_flags))
        size = inode.size
        ext: list = []
        nodes: list = []
        issues: list[str] = []
        if inline:
            if not 1 <= size <= INLINE_MAX:
                return self._clear_inode(ino, raw, f"{bad_sum}inline symlink of {size} bytes")
        else:
            ext, nodes, issues = self._walk_tree(ino, inode.depth, inode.count, raw[128:240])
        if fmt == stat.S_IFLNK and not inline:
            if (issues or nodes or not 1 <= size <= MAX_SYMLINK or len(ext) != 1
                    or ext[0][0] != 0 or ext[0][1] != 1):
                why = issues[0] if issues else f"size {size}, {_plural(len(ext), 'extent')}"
                return self._clear_inode(ino, raw, f"{bad_sum}damaged symlink ({why})")
        elif fmt in _SPECIAL:
            if ext or nodes or issues or inode.count or inode.depth or size:
                def f_special(i):
                    i.depth = i.count = 0
                    i.root = bytes(INLINE_MAX)
                    i.size = 0
                severe.append(("device, fifo or socket with data blocks or a size",
                               "drop them", f_special))
                ext, nodes, issues = [], [], []
        elif fmt == stat.S_IFREG and size > MAX_FILE_SIZE:
            end = (ext[-1][0] + ext[-1][1]) * BLOCK_SIZE if ext else 0

            def f_size(i, end=end):
                i.size = end
            severe.append((f"size {size} beyond the largest file",
                           f"set it to {end}", f_size))
        xattr = inode.xattr
        if xattr:
            why = None
            if not self.D <= xattr < self.T:
                why = f"xattr block {xattr} outside the data area"
            else:
                try:
                    decode_xattr_block(self.seed, xattr,
                                       self.img.read(xattr * BLOCK_SIZE, BLOCK_SIZE), ino)
                except Exception as e:
                    why = str(e)
            if why:
                def f_xattr(i):
                    i.xattr = 0
                severe.append((why, "drop the extended attributes", f_xattr))
                xattr = 0
        if not csum_ok and not (severe or issues):
            why = self._implausible(ino, fmt, ext, nodes, xattr)
            if why:
                issues.append(why)
        if not csum_ok:
            if severe or issues:
                why = (severe[0][0] if severe else issues[0])
                return self._clear_inode(ino, raw, f"checksum mismatch and damaged contents "
                                                   f"({why})")
            self.problem(f"inode {ino}: checksum mismatch (its contents pass every check)",
                         "rewrite the checksum", safe=True,
                         fix=lambda: self._rewrite_inode(ino, inode))
        else:
            for what, action, fn in severe:
                def fix(fn=fn):
                    fn(inode)
                    self._rewrite_inode(ino, inode)
                self.problem(f"inode {ino}: {what}", action, fix=fix, safe=False)
        if issues:
            self.problem(f"inode {ino}: {'; '.join(issues[:3])}"
                         + (f" (+{len(issues) - 3} more)" if len(issues) > 3 else ""),
                         "rebuild its extent tree from the intact extents", safe=False)
            self.rebuild.add(ino)
        self._record(ino, inode.mode, inode.nlink, inode.flags, inode.size, inode.blocks,
                     inode.parent, inode.orphan_next, inode.orphan_prev, ext, nodes, xattr)

    def _implausible(self, ino: int, fmt: int, ext, nodes, xattr) -> str | None:
        """Why the contents of an inode whose checksum fails cannot be trusted
        (None if they look right): every block it claims must be marked in
        use by a verified bitmap block, and a directory's first block must
        start with a record of this directory."""
        bits, bad = self.bbits, self.bad_bbm
        bpb = BITS_PER_BITMAP_BLOCK
        ranges = [(p, n) for _s, n, p in ext] + [(b, 1) for b in nodes]
        if xattr:
            ranges.append((xattr, 1))
        for p, n in ranges:
            for b in range(p, p + min(n, 1 << 16)):
                if b // bpb in bad:
                    continue
                if not bits[b >> 3] >> (b & 7) & 1:
                    return f"block {b} it maps is marked free"
        if fmt == stat.S_IFDIR and ext:
            s, _n, p = ext[0]
            if s != 0:
                return "directory without a first block"
            try:
                decode_dirent(self.seed, ino, 0, self.img.read(p * BLOCK_SIZE, BLOCK_SIZE), 0)
            except Exception:
                return f"directory block {p} does not belong to it"
        return None

    def _rewrite_inode(self, ino: int, inode: Inode) -> None:
        with self.tx("inode") as tx:
            tx.write(self._ioff(ino), inode.encode(self.seed))

    # ======================================================================
    # pass 1b: blocks owned twice, extent-tree rebuilds, block counts
    # ======================================================================
    def pass1b(self) -> None:
        self.cur_pass = "1b"
        rewritten: set[int] = set()
        if self.bdup is not None:
            self._resolve_dups(rewritten)
            self.bdup = None
        for ino in sorted(self.rebuild - rewritten):
            if not self.iused[ino]:
                continue
            try:
                self._write_tree(ino, self.extents.get(ino, []))
            except Exception as e:
                self.problem(f"inode {ino}: extent tree could not be rebuilt",
                             "leave it", failed=str(e))
        self.rebuild.clear()
        # block counts (data + tree nodes + xattr block)
        blocks, dblocks, nodes, xattr = self.blocks, self.dblocks, self.nodes, self.xattr
        for ino in range(1, self.N):
            if not self.iused[ino]:
                continue
            want = dblocks[ino] + len(nodes.get(ino, ())) + (1 if xattr.get(ino) else 0)
            if blocks[ino] != want:
                def fix(ino=ino, want=want):
                    with self.tx("blocks") as tx:
                        self._inode_rw(tx, ino, blocks=want)
                self.problem(f"inode {ino}: block count {blocks[ino]}, should be {want}",
                             "fix it", fix=fix, safe=True)
        self._live_stats()
        self.footer(1, f"{self.stats['inodes_used']} inodes in use")

    def _resolve_dups(self, rewritten: set) -> None:
        bdup = self.bdup
        claims: dict[int, list[tuple[int, str]]] = {}
        owners = sorted(set(self.extents) | set(self.nodes) | set(self.xattr))
        for ino in owners:
            for b in self.nodes.get(ino, ()):
                if bdup[b]:
                    claims.setdefault(b, []).append((ino, "node"))
            x = self.xattr.get(ino)
            if x and bdup[x]:
                claims.setdefault(x, []).append((ino, "xattr"))
            for _s, n, p in self.extents.get(ino, ()):
                if bdup.count(1, p, p + n):
                    for b in range(p, p + n):
                        if bdup[b]:
                            claims.setdefault(b, []).append((ino, "data"))
        keeper: dict[int, tuple[int, str]] = {}
        losers: dict[int, set[int]] = {}
        xattr_losers: set[int] = set()
        for b, cl in claims.items():
            meta = [c for c in cl if c[1] != "data"]
            keep = meta[0] if meta else cl[0]
            keeper[b] = keep
            kept = False
            for c in cl:
                if c == keep and not kept:
                    kept = True
                    continue
                if c[1] == "data":
                    losers.setdefault(c[0], set()).add(b)
                elif c[1] == "xattr":
                    xattr_losers.add(c[0])
        for ino in sorted(xattr_losers):
            def fix(ino=ino):
                with self.tx("xattr") as tx:
                    self._inode_rw(tx, ino, xattr=0)
                self.xattr.pop(ino, None)
            self.problem(f"inode {ino}: xattr block {self.xattr.get(ino)} is also used "
                         f"elsewhere", "drop the extended attributes", fix=fix, safe=False)
        for ino in sorted(losers):
            blocks = losers[ino]
            first = {b for b in blocks if keeper[b] == (ino, "data")}
            others = sorted({keeper[b][0] for b in blocks} - {ino})
            what = (f"inode {ino}: {_plural(len(blocks), 'block')} "
                    f"({_fmt_list(sorted(blocks), 4)}) also used by "
                    + (f"inode(s) {_fmt_list(others, 4)}" if others else "itself"))
            self.problem(what, "give it its own copy", safe=False,
                         fix=lambda ino=ino, blocks=blocks, first=first:
                         self._clone(ino, blocks, first))
            rewritten.add(ino)

    def _clone(self, ino: int, dup: set, keep_first: set) -> None:
        """Copy the shared blocks `dup` of `ino` into new blocks (but keep the
        first mapping of those in `keep_first`: it owns them)."""
        img = self.img
        keep_first = set(keep_first)
        dl = sorted(dup)
        new_ext = []
        new_data = []
        try:
            for s, n, p in self.extents.get(ino, []):
                i = bisect_left(dl, p)
                if i == len(dl) or dl[i] >= p + n:
                    new_ext.append((s, n, p))
                    continue
                for k in range(n):
                    b = p + k
                    if b in dup and b not in keep_first:
                        (q, _one), = self._alloc(1)
                        new_data.append((q, 1))
                        img.write(q * BLOCK_SIZE, bytes(img.read(b * BLOCK_SIZE, BLOCK_SIZE)))
                        img.flush(q * BLOCK_SIZE, BLOCK_SIZE)
                        new_ext.append((s + k, 1, q))
                    else:
                        keep_first.discard(b)
                        new_ext.append((s + k, 1, b))
            img.fence()
            self._write_tree(ino, new_ext, new_data=new_data)
        except BaseException:
            self._unclaim(new_data)
            raise

    # ======================================================================
    # pass 2: directories
    # ======================================================================
    def pass2(self) -> None:
        self.header(2)
        N = self.N
        self.refs = array("I", bytes(4 * N))
        self.nsub = array("I", bytes(4 * N))
        self.nent = array("I", bytes(4 * N))
        self.dirlinks: dict[int, list[tuple[int, int]]] = {}
        dirs = [i for i in range(1, N)
                if self.iused[i] and self.mode[i] & S_IFMT == stat.S_IFDIR]
        self.stats["entries"] = 0
        for k, d in enumerate(dirs):
            if k % 64 == 0:
                self.tick(k, len(dirs))
            self._check_dir(d)
        self._resolve_dirlinks()
        self.footer(2, f"{_plural(len(dirs), 'directory')}, "
                       f"{_plural(self.stats['entries'], 'entry')}")

    def _dir_shape(self, d: int) -> list:
        """Make the directory's blocks [0, n) without holes, size n*4096."""
        ext = self.extents.get(d, [])
        end = ext[-1][0] + ext[-1][1] if ext else 0
        holes = []
        pos = 0
        for s, n, _p in ext:
            if s > pos:
                holes.append((pos, s - pos))
            pos = s + n
        if holes:
            nhole = sum(n for _s, n in holes)
            mapped = end - nhole
            if nhole <= max(mapped, 16):
                def fill(d=d, holes=holes, end=end):
                    img = self.img
                    new = list(self.extents.get(d, []))
                    runs_all = []
                    for hs, hn in holes:
                        lb = hs
                        for q, r in self._alloc(hn):
                            for k in range(r):
                                blk = bytearray(BLOCK_SIZE)
                                blk[:DIRENT.size] = encode_dirent(
                                    self.seed, d, (lb + k) * BLOCK_SIZE, 0, BLOCK_SIZE, 0, b"")
                                img.write((q + k) * BLOCK_SIZE, blk)
                            img.flush(q * BLOCK_SIZE, r * BLOCK_SIZE)
                            new.append((lb, r, q))
                            runs_all.append((q, r))
                            lb += r
                    img.fence()
                    self._write_tree(d, new, new_data=runs_all, size=end * BLOCK_SIZE)
                self.problem(f"directory {d}: {_plural(nhole, 'hole')} in its block map",
                             "fill them with empty directory blocks", fix=fill, safe=False)
            else:
                cut = holes[0][0]

                def trunc(d=d, cut=cut):
                    keep = [e for e in self.extents.get(d, []) if e[0] < cut]
                    drop = [(p, n) for s, n, p in self.extents.get(d, []) if s >= cut]
                    self._write_tree(d, keep, free_data=drop, size=cut * BLOCK_SIZE)
                self.problem(f"directory {d}: its blocks are scattered far beyond its "
                             f"size", f"truncate it to {cut} block(s)", fix=trunc, safe=False)
            ext = self.extents.get(d, [])
            end = ext[-1][0] + ext[-1][1] if ext else 0
        want = end * BLOCK_SIZE
        if self.size[d] != want:
            def fix(d=d, want=want):
                with self.tx("dir-size") as tx:
                    self._inode_rw(tx, d, size=want)
            self.problem(f"directory {d}: size {self.size[d]}, its blocks make {want}",
                         "fix the size", fix=fix, safe=True)
        return self.extents.get(d, [])

    def _check_dir(self, d: int) -> None:
        ext = self._dir_shape(d)
        seen: set[bytes] = set()
        img = self.img
        damaged: list[int] = []
        kept = 0
        failed = None
        for s, n, p in ext:
            for k in range(n):
                pblk = p + k
                raw = bytes(img.read(pblk * BLOCK_SIZE, BLOCK_SIZE))
                salv = self._check_dir_block(d, s + k, pblk, raw, seen)
                if salv is not None:
                    damaged.append(s + k)
                    kept += salv[0]
                    failed = failed or salv[1]
        if damaged:
            self.problem(f"directory {d}: {_plural(len(damaged), 'block')} with damaged "
                         f"records ({_fmt_list(damaged, 4)})",
                         f"rebuild them keeping the {_plural(kept, 'entry')} that still "
                         f"verify", safe=False, failed=failed)

    def _parse_block(self, d: int, base: int, raw: bytes):
        """[(off, ino, rec_len, ftype, name)] of a well-formed block, or None."""
        try:
            return parse_dirent_block(self.seed, d, base, raw)
        except FormatError:
            return None

    def _salvage_block(self, d: int, base: int, raw: bytes):
        """Keep every record that still verifies; re-tile the block around
        them.  Returns (records, new block bytes, live records lost)."""
        found = []
        off = 0
        while off <= BLOCK_SIZE - DIRENT.size:
            try:
                ino, rl, ft, name = decode_dirent(self.seed, d, base + off, raw, off)
            except Exception:
                off += 8
                continue
            if ino:
                found.append((off, ino, ft, name))
            off += rl
        out = []  # [off, ino, rec_len, ft, name]
        cursor = 0
        for off, ino, ft, name in found:
            need = dirent_size(len(name))
            gap = off - cursor
            if gap >= DIRENT.size:
                out.append([cursor, 0, gap, 0, b""])
            elif gap == 8:
                if out:
                    out[-1][2] += 8
                else:
                    continue  # cannot place a record 8 bytes into a block
            out.append([off, ino, need, ft, name])
            cursor = off + need
        gap = BLOCK_SIZE - cursor
        if gap >= DIRENT.size:
            out.append([cursor, 0, gap, 0, b""])
        elif gap == 8:
            out[-1][2] += 8
        blk = bytearray(BLOCK_SIZE)
        for off, ino, rl, ft, name in out:
            rec = encode_dirent(self.seed, d, base + off, ino, rl, ft, name)
            blk[off:off + len(rec)] = rec
        recs = [tuple(r) for r in out]
        return recs, blk, len(found) - sum(1 for r in recs if r[1])

    def _check_dir_block(self, d: int, lblk: int, pblk: int, raw: bytes, seen: set):
        """Check one directory block (fixes written); (entries kept, failure)
        if it had to be rebuilt from the records that still verify."""
        base = lblk * BLOCK_SIZE
        recs = self._parse_block(d, base, raw)
        new = None
        pending: list[tuple[str, str, bool]] = []
        salvaged = recs is None
        if salvaged:
            recs, new, _lost = self._salvage_block(d, base, raw)
        N = self.N
        iused, mode, refs = self.iused, self.mode, self.refs
        seed = self.seed
        for off, t, rl, ft, name in recs:
            if not t:
                continue
            pos = base + off
            why = None
            newname = name
            if not name or name in (b".", b".."):
                why = f"has the illegal name {name!r}"
            elif b"/" in name or b"\0" in name:
                newname = name.replace(b"/", b".").replace(b"\0", b".")
            if why is None:
                if t >= N or not iused[t] or t == ORPHAN_HEAD_INO:
                    why = f"points at unused inode {t}"
                elif t == ROOT_INO:
                    why = "is a link to the root directory"
                elif t == d:
                    why = "is a link to the directory itself"
                elif newname in seen:
                    why = "is a duplicate name"
            if why is not None:
                if new is None:
                    new = bytearray(raw)
                new[off:off + DIRENT.size] = encode_dirent(seed, d, pos, 0, rl, 0, b"")
                pending.append((f"directory {d}: entry {name!r} {why}", "remove it",
                                False))
                continue
            seen.add(newname)
            want_ft = dtype_of(mode[t])
            if ft != want_ft or newname != name:
                if new is None:
                    new = bytearray(raw)
                rec = encode_dirent(seed, d, pos, t, rl, want_ft, newname)
                new[off:off + len(rec)] = rec
                if newname != name:
                    pending.append((f"directory {d}: entry {name!r} has an illegal name",
                                    f"rename it to {newname!r}", False))
                if ft != want_ft:
                    pending.append((f"directory {d}: entry {name!r} has file type {ft}, "
                                    f"inode {t} is of type {want_ft}", "fix the type", True))
            refs[t] += 1
            self.nent[d] += 1
            self.stats["entries"] += 1
            if mode[t] & S_IFMT == stat.S_IFDIR:
                self.dirlinks.setdefault(t, []).append((d, pos))
                self.nsub[d] += 1
        failed = None
        if new is not None and bytes(new) != raw:
            try:
                with self.tx("dir-block") as tx:
                    tx.write(pblk * BLOCK_SIZE, new)
            except Exception as e:
                failed = str(e) or type(e).__name__
        for what, action, safe in pending:
            self.problem(what, action, safe=safe, failed=failed)
        if salvaged:
            return sum(1 for r in recs if r[1]), failed
        return None

    def _dir_pblk(self, d: int, pos: int) -> int:
        ext = self.extents.get(d, [])
        lblk = pos // BLOCK_SIZE
        i = bisect_right([e[0] for e in ext], lblk) - 1
        if i < 0 or lblk >= ext[i][0] + ext[i][1]:
            raise _Failed(f"directory {d}: no block at offset {pos}")
        s, _n, p = ext[i]
        return p + (lblk - s)

    def _dir_remove_tx(self, tx, d: int, pos: int) -> None:
        off = self._dir_pblk(d, pos) * BLOCK_SIZE + pos % BLOCK_SIZE
        _i, rl, _nl, _ft, _c = DIRENT.unpack(tx.read(off, DIRENT.size))
        tx.write(off, encode_dirent(self.seed, d, pos, 0, rl, 0, b""))
        st = self._dstate.get(d) if hasattr(self, "_dstate") else None
        if st is not None:
            for name, (_t, _f, p) in list(st.names.items()):
                if p == pos:
                    del st.names[name]
            st.free.append((pos, rl))

    def _resolve_dirlinks(self) -> None:
        """Exactly one name per directory; its parent field names the holder."""
        self.container: dict[int, tuple[int, int]] = {}
        for c in sorted(self.dirlinks):
            links = self.dirlinks[c]
            keep = next((lk for lk in links if lk[0] == self.parent[c]), links[0])
            for lk in links:
                if lk is keep:
                    continue
                cont, pos = lk

                def fix(cont=cont, pos=pos):
                    with self.tx("dir-link") as tx:
                        self._dir_remove_tx(tx, cont, pos)
                self.problem(f"directory {c} has a second name (in directory {cont})",
                             "remove that entry", fix=fix, safe=False)
                self.refs[c] -= 1
                self.nsub[cont] -= 1
                self.nent[cont] -= 1
            self.container[c] = keep
            if self.parent[c] != keep[0]:
                def fix(c=c, p=keep[0]):
                    with self.tx("dotdot") as tx:
                        self._inode_rw(tx, c, parent=p)
                self.problem(f"directory {c}: '..' is {self.parent[c]}, should be {keep[0]}",
                             "fix it", fix=fix, safe=True)
        if (self.iused[ROOT_INO] and self.mode[ROOT_INO] & S_IFMT == stat.S_IFDIR
                and self.parent[ROOT_INO] != ROOT_INO):
            def fix():
                with self.tx("dotdot") as tx:
                    self._inode_rw(tx, ROOT_INO, parent=ROOT_INO)
            self.problem(f"root directory: '..' is {self.parent[ROOT_INO]}, should be itself",
                         "fix it", fix=fix, safe=True)

    # ======================================================================
    # pass 3: connectivity
    # ======================================================================
    def pass3(self) -> None:
        self.header(3)
        self._dstate: dict[int, _DirState] = {}
        N = self.N
        iused, mode, refs, nlink = self.iused, self.mode, self.refs, self.nlink
        S_DIR = stat.S_IFDIR
        self.tick(0, 4)
        # the root
        if not iused[ROOT_INO] or mode[ROOT_INO] & S_IFMT != S_DIR:
            why = "missing" if not iused[ROOT_INO] else "not a directory"
            self.problem(f"root directory is {why}", "create a new, empty one",
                         fix=self._make_root, safe=False)
        # inodes nobody names and nobody may use: freed in pass 4
        self.doomed: set[int] = set()
        for i in range(ROOT_INO + 1, N):
            if iused[i] and not refs[i] and not nlink[i]:
                if mode[i] & S_IFMT != S_DIR or not self.nent[i]:
                    self.doomed.add(i)
        self.tick(1, 4)
        # what can be reached from the root
        kids: dict[int, list[int]] = {}
        for c, (cont, _pos) in self.container.items():
            kids.setdefault(cont, []).append(c)
        reach = bytearray(N)

        def mark(top):
            stack = [top]
            reach[top] = 1
            while stack:
                x = stack.pop()
                for c in kids.get(x, ()):
                    if not reach[c]:
                        reach[c] = 1
                        stack.append(c)
        if iused[ROOT_INO]:
            mark(ROOT_INO)
        self.tick(2, 4)
        # /lost+found
        self.lf = None
        rs = self._dirstate(ROOT_INO)
        e = rs.names.get(b"lost+found")
        if e is not None:
            t = e[0]
            if mode[t] & S_IFMT == S_DIR and t not in self.doomed:
                self.lf = t
            else:
                def fix(pos=e[2], t=t):
                    with self.tx("lost+found") as tx:
                        self._dir_remove_tx(tx, ROOT_INO, pos)
                self.problem(f"'/lost+found' (inode {t}) is not a directory",
                             "remove the entry (the inode is reconnected below)",
                             fix=fix, safe=False)
                refs[t] -= 1
                self.nent[ROOT_INO] -= 1
        # disconnected directories: reconnect the top of each piece
        for d in range(ROOT_INO + 1, N):
            if not iused[d] or reach[d] or mode[d] & S_IFMT != S_DIR or d in self.doomed:
                continue
            top = d
            path = {d}
            while top in self.container:
                cont, pos = self.container[top]
                if reach[cont]:
                    break
                if cont in path:  # a loop: cut it here
                    def cut(top=top, cont=cont, pos=pos):
                        with self.tx("loop") as tx:
                            self._dir_remove_tx(tx, cont, pos)
                            self._inode_rw(tx, cont, nlink=max(0, self.nlink[cont] - 1))
                    self.problem(f"directories {_fmt_list(sorted(path), 4)} form a loop "
                                 f"unreachable from the root",
                                 f"cut it at directory {top}", fix=cut, safe=False)
                    del self.container[top]
                    refs[top] -= 1
                    self.nsub[cont] -= 1
                    self.nent[cont] -= 1
                    break
                path.add(cont)
                top = cont
            if top in self.container and reach[self.container[top][0]]:
                mark(top)
                continue
            if self._reconnect(top, f"directory {top} is not connected to the root"):
                mark(top)
            else:
                reach[top] = 1  # left alone; do not retry
        self.tick(3, 4)
        # files nobody names
        for i in range(ROOT_INO + 1, N):
            if (iused[i] and not refs[i] and i not in self.doomed
                    and mode[i] & S_IFMT != S_DIR):
                self._reconnect(i, f"inode {i} ({_plural(nlink[i], 'link')}) has no name")
        self.tick(4, 4)
        self.footer(3)

    def _make_root(self) -> None:
        now = time.time_ns()
        off = self._ioff(ROOT_INO)
        old = bytes(self.img.read(off, INODE_SIZE))
        (gen,) = struct.unpack_from("<I", old, 20)
        # whatever the old slot held is dropped
        for d in (self.extents, self.nodes, self.xattr):
            d.pop(ROOT_INO, None)
        root = Inode(ROOT_INO, mode=stat.S_IFDIR | 0o755, nlink=2, generation=gen + 1,
                     atime=now, mtime=now, ctime=now, btime=now, parent=ROOT_INO)
        with self.tx("root") as tx:
            tx.write(off, root.encode(self.seed))
            self._bm_set(tx, "i", [(ROOT_INO, 1)], True)
        self.iused[ROOT_INO] = 1
        self.mode[ROOT_INO] = root.mode
        self.nlink[ROOT_INO] = 2
        self.size[ROOT_INO] = 0
        self.parent[ROOT_INO] = ROOT_INO
        self.blocks[ROOT_INO] = 0
        self.dblocks[ROOT_INO] = 0
        self.flags[ROOT_INO] = 0
        self._dstate.pop(ROOT_INO, None)

    def _dirstate(self, d: int) -> _DirState:
        st = self._dstate.get(d)
        if st is not None:
            return st
        st = _DirState()
        if self.iused[d] and self.mode[d] & S_IFMT == stat.S_IFDIR:
            for s, n, p in self.extents.get(d, []):
                for k in range(n):
                    base = (s + k) * BLOCK_SIZE
                    raw = bytes(self.img.read((p + k) * BLOCK_SIZE, BLOCK_SIZE))
                    recs = self._parse_block(d, base, raw) or []
                    for off, t, rl, ft, name in recs:
                        if t:
                            st.names[name] = (t, ft, base + off)
                        else:
                            st.free.append((base + off, rl))
                st.nblocks = max(st.nblocks, s + n)
        self._dstate[d] = st
        return st

    def _ensure_lf(self) -> int:
        if self.lf is not None:
            return self.lf
        ino = self._alloc_inode()
        now = time.time_ns()
        off = self._ioff(ino)
        (gen,) = struct.unpack_from("<I", bytes(self.img.read(off, INODE_SIZE)), 20)
        lf = Inode(ino, mode=stat.S_IFDIR | 0o700, nlink=2, generation=(gen + 1) & 0xFFFFFFFF
                   or 1, atime=now, mtime=now, ctime=now, btime=now, parent=ROOT_INO)

        def extra(tx):
            tx.write(off, lf.encode(self.seed))
            self._bm_set(tx, "i", [(ino, 1)], True)
            self._inode_rw(tx, ROOT_INO, nlink=self.nlink[ROOT_INO] + 1)
        self.iused[ino] = 1  # reserve it while adding the entry
        try:
            self._dir_add(ROOT_INO, b"lost+found", ino, DT_DIR, extra)
        except BaseException:
            self.iused[ino] = 0
            raise
        self.mode[ino] = lf.mode
        self.nlink[ino] = 2
        self.parent[ino] = ROOT_INO
        self.size[ino] = 0
        self.blocks[ino] = 0
        self.dblocks[ino] = 0
        self.flags[ino] = 0
        self.refs[ino] = 1
        self.nsub[ROOT_INO] += 1
        self.nent[ROOT_INO] += 1
        self.container[ino] = (ROOT_INO, self._dirstate(ROOT_INO).names[b"lost+found"][2])
        self.lf = ino
        return ino

    def _reconnect(self, ino: int, what: str) -> bool:
        is_dir = self.mode[ino] & S_IFMT == stat.S_IFDIR

        def fix():
            if self.lf is None:
                self.problem("'/lost+found' is missing", "create it", fix=self._ensure_lf,
                             safe=True)
                if self.lf is None:
                    raise _Failed("no /lost+found")
            lf = self.lf
            st = self._dirstate(lf)
            name = f"#{ino}".encode()
            k = 1
            while name in st.names:
                name = f"#{ino}.{k}".encode()
                k += 1

            def extra(tx):
                if is_dir:
                    self._inode_rw(tx, ino, parent=lf)
                    self._inode_rw(tx, lf, nlink=self.nlink[lf] + 1)
            self._dir_add(lf, name, ino, dtype_of(self.mode[ino]), extra)
            self.refs[ino] += 1
            self.nent[lf] += 1
            if is_dir:
                self.nsub[lf] += 1
                self.container[ino] = (lf, st.names[name][2])
        return self.problem(what, f"reconnect it to /lost+found as #{ino}", fix=fix,
                            safe=False)

    def _dir_add(self, d: int, name: bytes, ino: int, ftype: int, extra=None) -> None:
        st = self._dirstate(d)
        need = dirent_size(len(name))
        cand = next((k for k, (_p, rl) in enumerate(st.free) if rl >= need), None)
        if cand is None:
            nb = max(st.nblocks, (self.extents[d][-1][0] + self.extents[d][-1][1])
                     if self.extents.get(d) else 0)
            (blk, _n), = self._alloc(1)
            pos = nb * BLOCK_SIZE
            block = bytearray(BLOCK_SIZE)
            block[:DIRENT.size] = encode_dirent(self.seed, d, pos, 0, BLOCK_SIZE, 0, b"")
            self.img.write(blk * BLOCK_SIZE, block)
            self.img.persist(blk * BLOCK_SIZE, BLOCK_SIZE)
            try:
                self._write_tree(d, self.extents.get(d, []) + [(nb, 1, blk)],
                                 new_data=[(blk, 1)], size=(nb + 1) * BLOCK_SIZE)
            except BaseException:
                self._unclaim([(blk, 1)])
                raise
            st.nblocks = nb + 1
            st.free.append((pos, BLOCK_SIZE))
            cand = len(st.free) - 1
        pos, rl = st.free[cand]
        rest = rl - need
        img_off = self._dir_pblk(d, pos) * BLOCK_SIZE + pos % BLOCK_SIZE
        with self.tx("dir-add") as tx:
            if rest >= DIRENT.size:
                tx.write(img_off, encode_dirent(self.seed, d, pos, ino, need, ftype, name))
                tx.write(img_off + need,
                         encode_dirent(self.seed, d, pos + need, 0, rest, 0, b""))
            else:
                tx.write(img_off, encode_dirent(self.seed, d, pos, ino, rl, ftype, name))
            if extra is not None:
                extra(tx)
        if rest >= DIRENT.size:
            st.free[cand] = (pos + need, rest)
        else:
            del st.free[cand]
        st.names[name] = (ino, ftype, pos)

    # ======================================================================
    # pass 4: reference counts, orphans
    # ======================================================================
    def pass4(self) -> None:
        self.header(4)
        N = self.N
        iused, flags, nlink = self.iused, self.flags, self.nlink
        self.tick(0, 3)
        head_raw = bytes(self.img.read(self._ioff(ORPHAN_HEAD_INO), INODE_SIZE))
        head_ok = inode_checksum_ok(ORPHAN_HEAD_INO, head_raw, self.seed)
        head = Inode.decode(ORPHAN_HEAD_INO, head_raw, self.seed, verify=False)
        why = None
        if not head_ok:
            why = "its head (inode slot 0) has a bad checksum"
        elif head.mode:
            why = "its head (inode slot 0) is not empty"
        listed: list[int] = []
        if why is None:
            ino, prev = head.orphan_next, ORPHAN_HEAD_INO
            seen = set()
            while ino:
                if not 0 < ino < N or not iused[ino]:
                    why = f"it links to unused inode {ino}"
                    break
                if ino in seen:
                    why = "it loops"
                    break
                if not flags[ino] & I_ORPHAN:
                    why = f"it holds inode {ino}, which is not flagged as an orphan"
                    break
                nxt, prv = self.orph.get(ino, (0, 0))
                if prv != prev:
                    why = f"inode {ino} has a wrong back link"
                    break
                seen.add(ino)
                listed.append(ino)
                prev = ino
                ino = nxt
        flagged = {i for i, (_n, _p) in self.orph.items() if iused[i] and flags[i] & I_ORPHAN}
        if why is None and set(listed) != flagged:
            extra = sorted(flagged - set(listed))
            why = f"inode(s) {_fmt_list(extra, 4)} flagged as orphans are not on it"
        if why is None and any(self.orph.get(i, (0, 0)) != (0, 0)
                               for i in self.orph if i not in flagged):
            why = "inodes not flagged as orphans have orphan links"
        doomed = self.doomed
        if why is None:
            # a consistent list: recovery, as mount does it
            for ino in listed:
                nxt = self.orph[ino][0]
                if ino in doomed:
                    self.note(f"inode {ino}: unlinked while open (orphan): "
                              f"{'freed' if self.real else 'to free'}",
                              fix=lambda ino=ino, nxt=nxt: self._free_inode(ino, unlist=nxt))
                    doomed.discard(ino)
                else:
                    self._finish_orphan(ino, nxt)
        else:
            self.problem(f"orphan list: {why}", "rebuild it (every orphan is processed)",
                         fix=self._reset_orphan_head, safe=True)
            for ino in sorted(set(listed) | flagged | {i for i in self.orph if iused[i]}):
                if ino in doomed:
                    self.problem(f"inode {ino}: orphan with no links", "free it",
                                 fix=lambda ino=ino: self._free_inode(ino), safe=True)
                    doomed.discard(ino)
                elif iused[ino]:
                    self._finish_orphan(ino, None)
        for ino in sorted(doomed):
            if not iused[ino]:
                continue
            self.problem(f"inode {ino}: no links and no name, not on the orphan list",
                         "free it", fix=lambda ino=ino: self._free_inode(ino), safe=True)
        self.tick(1, 3)
        # link counts
        mode, refs, nsub = self.mode, self.refs, self.nsub
        S_DIR = stat.S_IFDIR
        for i in range(ROOT_INO, N):
            if not iused[i]:
                continue
            want = 2 + nsub[i] if mode[i] & S_IFMT == S_DIR else refs[i]
            if nlink[i] != want:
                def fix(i=i, want=want):
                    with self.tx("nlink") as tx:
                        self._inode_rw(tx, i, nlink=want)
                self.problem(f"inode {i}: link count {nlink[i]}, should be {want}",
                             "fix it", fix=fix, safe=True)
        self.tick(3, 3)
        self.footer(4)

    def _reset_orphan_head(self) -> None:
        with self.tx("orphan-head") as tx:
            tx.write(self._ioff(ORPHAN_HEAD_INO), Inode(ORPHAN_HEAD_INO).encode(self.seed))

    def _unlist_tx(self, tx, nxt: int) -> None:
        """Take the first inode off a consistent orphan list."""
        self._inode_rw(tx, ORPHAN_HEAD_INO, orphan_next=nxt)
        if nxt:
            self._inode_rw(tx, nxt, orphan_prev=ORPHAN_HEAD_INO)
            n2, _p = self.orph.get(nxt, (0, 0))
            self.orph[nxt] = (n2, ORPHAN_HEAD_INO)

    def _finish_orphan(self, ino: int, nxt) -> None:
        """An orphan that stays: complete its truncation, take it off the list."""
        mode = self.mode[ino]
        ext = self.extents.get(ino, [])
        cut = -(-self.size[ino] // BLOCK_SIZE)
        trimmed = [e for e in ext if e[0] < cut]
        trimmed = [(s, min(n, cut - s), p) for s, n, p in trimmed]
        freed = []
        for s, n, p in ext:
            if s + n > cut:
                a = max(s, cut)
                freed.append((p + (a - s), s + n - a))
        fmt = mode & S_IFMT
        trim = (bool(freed) and fmt in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK)
                and not self.flags[ino] & I_INLINE and bool(self.flags[ino] & I_ORPHAN))

        def fix():
            if trim:
                self._write_tree(ino, trimmed, free_data=freed)
            with self.tx("orphan-done") as tx:
                if nxt is not None:
                    self._unlist_tx(tx, nxt)
                self._inode_rw(tx, ino, flags=self.flags[ino] & ~I_ORPHAN, orphan_next=0,
                               orphan_prev=0)
            self.orph.pop(ino, None)
        what = (f"inode {ino}: interrupted truncation "
                f"{'completed' if self.real else 'to complete'}" if trim else
                f"inode {ino}: taken off the orphan list")
        if nxt is not None:
            self.note(what, fix=fix)
        else:
            self.vsay(what)
            try:
                fix()
            except Exception as e:
                self.problem(f"inode {ino}: orphan", "process it", failed=str(e))

    def _free_inode(self, ino: int, unlist=None) -> None:
        """Free an unlinked inode and its blocks (bitmaps in the same tx)."""
        ranges = [(p, n) for _s, n, p in self.extents.get(ino, [])]
        ranges += [(b, 1) for b in self.nodes.get(ino, [])]
        if self.xattr.get(ino):
            ranges.append((self.xattr[ino], 1))
        off = self._ioff(ino)

        def body(tx, with_bits):
            if unlist is not None:
                self._unlist_tx(tx, unlist)
            tx.write(off, self._free_slot_bytes(ino, tx.read(off, INODE_SIZE)))
            self._bm_set(tx, "i", [(ino, 1)], False)
            if with_bits:
                self._bm_set(tx, "b", ranges, False)
        try:
            with self.tx("free-inode") as tx:
                body(tx, True)
        except TxTooLarge:
            with self.tx("free-inode") as tx:
                body(tx, False)
            for k in range(0, len(ranges), 16):
                with self.tx("free-blocks") as tx:
                    self._bm_set(tx, "b", ranges[k:k + 16], False)
        self._unclaim(ranges)
        self.iused[ino] = 0
        self.mode[ino] = 0
        for d in (self.extents, self.nodes, self.xattr, self.orph):
            d.pop(ino, None)

    # ======================================================================
    # pass 5: allocation maps, counters
    # ======================================================================
    def pass5(self) -> None:
        self.header(5)
        sb = self.sb
        self.tick(0, 2)
        self.free_inodes = self._check_bitmap("inode", self.iused, self.ibits, self.bad_ibm,
                                              sb.ibitmap_blocks, "i")
        self.tick(1, 2)
        self.free_blocks = self._check_bitmap("block", self.bused, self.bbits, self.bad_bbm,
                                              sb.bbitmap_blocks, "b")
        self.tick(2, 2)
        self.stats["blocks_used"] = self.T - self.free_blocks
        self._live_stats()
        if self.sb_was_clean and (sb.free_blocks != self.media_free_blocks
                                  or sb.free_inodes != self.media_free_inodes):
            self.problem(f"superblock: free counts {sb.free_blocks} blocks, {sb.free_inodes} "
                         f"inodes, the bitmaps say {self.media_free_blocks}, "
                         f"{self.media_free_inodes}", "fix them", safe=True)
            # (written by end_repair)
        self.footer(5, f"{self.T - self.free_blocks}/{self.T} blocks, "
                       f"{self.N - 1 - self.free_inodes}/{self.N - 1} inodes in use")

    def _check_bitmap(self, what: str, used, media: bytearray, bad: set, nblocks: int,
                      which: str) -> int:
        """Compare the media bitmap with what is in use; rewrite what differs.
        Returns the free count."""
        nitems = len(used)
        expect = _pack_bits(used, nblocks * BITS_PER_BITMAP_BLOCK)
        free = nitems - used.count(1)
        leaked: list[int] = []
        missing: list[int] = []
        nleak = nmiss = 0
        fix_blocks = set(bad)
        for i in range(nblocks):
            a, b = i * BITMAP_BYTES, (i + 1) * BITMAP_BYTES
            e, m = expect[a:b], bytes(media[a:b])
            if e == m:
                continue
            fix_blocks.add(i)
            x = int.from_bytes(e, "little")
            y = int.from_bytes(m, "little")
            lk = y & ~x
            ms = x & ~y
            nleak += lk.bit_count()
            nmiss += ms.bit_count()
            for z, out in ((lk, leaked), (ms, missing)):
                while z and len(out) < 6:
                    low = (z & -z).bit_length() - 1
                    out.append(i * BITS_PER_BITMAP_BLOCK + low)
                    z &= z - 1
        unit = "inode" if which == "i" else "block"
        if bad:
            self.problem(f"{what} bitmap: {_plural(len(bad), 'bitmap block')} "
                         f"({_fmt_list(sorted(bad), 4)}) fail their checksum",
                         "rewrite them", safe=True)
        if nleak:
            self.problem(f"{what} bitmap: {_plural(nleak, unit)} marked in use but unused "
                         f"({_fmt_list(leaked) if nleak <= 6 else _fmt_list(leaked) + ', ...'})",
                         "mark them free", safe=True)
        if nmiss:
            self.problem(f"{what} bitmap: {_plural(nmiss, unit)} in use but marked free "
                         f"({_fmt_list(missing) if nmiss <= 6 else _fmt_list(missing) + ', ...'})",
                         "mark them in use", safe=True)
        if fix_blocks:
            start = self.sb.ibitmap_start if which == "i" else self.sb.bbitmap_start
            blocks = sorted(fix_blocks)
            try:
                for k in range(0, len(blocks), 8):
                    with self.tx(f"{what}-bitmap") as tx:
                        for i in blocks[k:k + 8]:
                            seg = expect[i * BITMAP_BYTES:(i + 1) * BITMAP_BYTES]
                            tx.write((start + i) * BLOCK_SIZE,
                                     seg + encode_bitmap_trailer(self.seed, start + i, seg))
                            media[i * BITMAP_BYTES:(i + 1) * BITMAP_BYTES] = seg
                            bad.discard(i)
            except Exception as e:
                self.problem(f"{what} bitmap", "rewrite it", failed=str(e))
        return free


def _debug() -> bool:
    import os
    return os.environ.get("PMFS_DEBUG") == "1"


# --------------------------------------------------------------------------
# the in-process API
# --------------------------------------------------------------------------


def check(img: Image, repair: bool = False, preen: bool = False, force: bool = True,
          progress=None, verbose: bool = False, out=None, headers: bool = True) -> FsckResult:
    """Check (and with `repair`, repair) the file system in `img`.

    repair=False never writes to `img`: recovery and repairs run against a
    copy-on-write overlay, so the result describes the image as it will be
    after recovery.  preen=True (with repair) repairs only if every problem
    is safe to fix without a human; otherwise nothing is changed and the
    exit code is 4.
    """
    if not repair:
        return Fsck(OverlayImage(img), real=False, force=force, progress=progress, out=out,
                    verbose=verbose, name=img.path, headers=headers).run()
    if img.readonly:
        r = FsckResult(fatal=f"{img.path or 'image'}: opened read-only; cannot repair")
        r.problems.append(r.fatal)
        r.errors_found = 1
        r.exit_code = EXIT_ERROR
        return r
    if preen:
        dry = Fsck(OverlayImage(img), real=False, force=force, progress=progress, out=None,
                   name=img.path).run()
        if dry.fatal is not None:
            return dry
        if dry.unsafe:
            dry.preen_halted = True
            dry.exit_code = EXIT_UNCORRECTED
            if out is not None:
                for line in dry.problems:
                    out(line)
            return dry
    return Fsck(img, real=True, force=force, progress=progress, out=out, verbose=verbose,
                name=img.path, headers=headers).run()


# --------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Check a pmfs file system image and optionally repair it.",
        epilog="Exit codes (bits): 0 no errors, 1 errors corrected, 4 errors left "
               "uncorrected, 8 operational error, 16 usage error, 32 cancelled.")
    p.add_argument("image", metavar="IMAGE", help="image file or device")
    p.add_argument("-n", dest="no", action="store_true",
                   help="check only: open read-only, answer 'no' to every question")
    p.add_argument("-y", dest="yes", action="store_true", help="repair everything")
    p.add_argument("-p", dest="preen", action="store_true",
                   help="preen: repair what is safe without a human, else exit 4")
    p.add_argument("-a", dest="preen_a", action="store_true", help="same as -p")
    p.add_argument("-f", dest="force", action="store_true",
                   help="check even if the file system is marked clean")
    p.add_argument("-v", dest="verbose", action="store_true", help="verbose")
    p.add_argument("-q", dest="quiet", action="store_true", help="no progress display")
    p.add_argument("--debug", action="store_true", help="tracebacks on errors")
    p.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    return p


def main_args(argv) -> int:
    a = build_parser().parse_args(argv)
    preen = a.preen or a.preen_a
    modes = [m for m, on in (("-n", a.no), ("-y", a.yes), ("-p", preen)) if on]
    if len(modes) > 1:
        raise UsageError(f"{' and '.join(modes)} are mutually exclusive")
    mode = modes[0] if modes else None
    if mode is None and not sys.stdin.isatty():
        raise QuietError("need a terminal for interactive repairs; use -n, -p or -y",
                         EXIT_ERROR)
    # a symlink (e.g. /dev/disk/by-id/...) names the file it points to
    path = os.path.realpath(a.image) if os.path.islink(a.image) else a.image
    try:
        img = open_image(path, readonly=(mode == "-n"),
                         lock="shared" if mode == "-n" else "exclusive")
    except ImageBusy:
        raise QuietError(f"{path} is in use (mounted?): refusing to check it; unmount it "
                         f"first (pmfs-inspect shows a mounted image)",
                         EXIT_ERROR) from None
    progress = Progress(PROG, quiet=a.quiet or preen)
    lines: list[str] = []

    def out(line: str) -> None:
        progress.done()
        print(f"{path}: {line}" if preen else line, flush=True)
        lines.append(line)
    try:
        if mode == "-n":
            r = check(img, repair=False, force=a.force, progress=progress,
                      verbose=a.verbose, out=out)
        elif mode in ("-y", "-p"):
            r = check(img, repair=True, preen=(mode == "-p"), force=a.force,
                      progress=progress, verbose=a.verbose, out=out, headers=not preen)
        else:
            r = check(img, repair=False, force=a.force, progress=progress,
                      verbose=a.verbose, out=out)
            if r.fatal is None and r.problems:
                print(f"{len(r.problems)} problem(s) found.")
                try:
                    ans = input("Repair them? [y/N] ").strip().lower()
                except EOFError:
                    ans = ""
                if ans in ("y", "yes"):
                    r = check(img, repair=True, force=True, progress=progress,
                              verbose=a.verbose, out=out)
    finally:
        progress.done()
        img.close()
    if r.fatal is not None:
        raise QuietError(r.fatal, r.exit_code or EXIT_ERROR)
    if r.preen_halted:
        print(f"{path}: UNEXPECTED INCONSISTENCY; RUN {PROG} MANUALLY (without -p or -a)")
    if r.modified or r.errors_fixed:
        print(f"\n{path}: ***** FILE SYSTEM WAS MODIFIED *****")
    if r.exit_code & EXIT_UNCORRECTED:
        print(f"\n{path}: ********** WARNING: file system still has errors **********")
    print(r.summary)
    return r.exit_code


def main(argv=None) -> int:
    sys.exit(cli_run(PROG, main_args, argv, usage_code=EXIT_USAGE, error_code=EXIT_ERROR,
                     interrupt_code=EXIT_CANCELLED))


if __name__ == "__main__":
    main()
