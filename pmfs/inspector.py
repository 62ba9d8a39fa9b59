"""pmfs-inspect: show a pmfs image without mounting it (like dumpe2fs/debugfs).

    pmfs-inspect [--json] [--no-replay] IMAGE            superblock, usage, WAL
    pmfs-inspect IMAGE inode N                           one inode by number
    pmfs-inspect IMAGE stat PATH                         one inode by path
    pmfs-inspect IMAGE ls [PATH]                         a directory, like ls -l
    pmfs-inspect IMAGE orphans                           the orphan list
    pmfs-inspect IMAGE wal                               the log records in detail
    pmfs-inspect IMAGE cat PATH|N > FILE                 a file's bytes (like debugfs's cat)

The tool never writes: it maps the image read-only.  An image nobody has
mounted is read in place under a shared lock (held until the tool exits:
a mount or a repair started meanwhile finds the image busy).  A mounted
image is read without the lock, from a snapshot (the metadata regions
always, the whole image when it is at most 256 MiB; holes cost no
memory), retried while the WAL header changes under it, so a busy mounted
image is shown as of one moment between two commits.  Nothing reads the
image through the mount's DRAM state: what is shown is what is on the
media.

Opening the image for inspection runs no recovery on it.  When the log
holds committed transactions, the state is shown as it would be after
replay: the replay goes into a private copy-on-write overlay of the
snapshot.  --no-replay shows the raw state instead.

Paths are resolved from the root through the directory index (the same
`Directory` code the file system uses), "." and ".." included; symbolic
links are not followed.  Names, xattr names and values are shown with
backslash escapes for bytes that are not printable UTF-8.

`cat` copies a regular file's content out of the image (holes as zeros,
exactly i_size bytes) without mounting it: the way to rescue a file from
an image that does not mount.  It checks nothing but the inode and its
extent tree, so it also works on images fsck.pmfs would have to repair.

Damaged structures are reported (in the output and as a one-line error)
and make the exit code 8; they never produce a traceback (unless --debug).

Exit codes: 0 shown, nothing damaged; 8 damaged structures found, or an
operational error; 16 usage error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
import stat
import sys
import uuid as uuidlib

from . import __version__
from .alloc import Bitmap
from .cli import ArgumentParser, QuietError, UsageError, human, run
from .directory import Directory
from .extent import ExtentTree
from .layout import (BLOCK_SIZE, CACHELINE, I_INLINE, I_ORPHAN, INLINE_MAX,
                     INODE_SIZE, MAX_SYMLINK, ORPHAN_HEAD_INO, ROOT_INO, SB_CLEAN,
                     SB_COMMIT_OFF, SB_FSCK_RUNNING, SB_MAGIC, SB_NEEDS_FSCK, SB_SIZE,
                     WAL_REC, WAL_REC_SKIP, FormatError, Inode, WalHeader, decode_wal_entries,
                     decode_xattr_block, fs_seed, inode_checksum_ok, wal_record_header)
from .pmem import Image, ImageBusy, libpmem, libpmem_says_pmem, open_image
from .superblock import REPLICA_OFFSETS, SuperblockError, looks_like_pmfs, read_replicas
from .wal import WAL, WalError

PROG = "pmfs-inspect"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 8, 16

#: images up to this size are snapshotted whole; larger ones have their
#: metadata regions snapshotted and their data area read in place
FULL_SNAPSHOT_MAX = 256 << 20
#: attempts at a snapshot during which the WAL header does not change
SNAPSHOT_TRIES = 20

_PAGE = 4096

_TYPE_NAMES = {
    stat.S_IFREG: ("file", "regular file"), stat.S_IFDIR: ("dir", "directory"),
    stat.S_IFLNK: ("symlink", "symbolic link"), stat.S_IFCHR: ("chrdev", "character device"),
    stat.S_IFBLK: ("blkdev", "block device"), stat.S_IFIFO: ("fifo", "fifo"),
    stat.S_IFSOCK: ("socket", "socket"),
}
_DT_NAMES = {1: "fifo", 2: "chrdev", 4: "dir", 6: "blkdev", 8: "file", 10: "symlink",
             12: "socket"}


# --------------------------------------------------------------------------
# formatting helpers
# --------------------------------------------------------------------------


def escape(raw: bytes) -> str:
    """Printable text for a name or value: UTF-8 where it is printable,
    backslash escapes for everything else (a backslash itself is doubled)."""
    out = []
    for ch in bytes(raw).decode("utf-8", "surrogateescape"):
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif not ch.isprintable():
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def human_time(ns: int) -> str:
    """'2026-11-21 13:36:02.127658123 +0000' (local time) for a time in ns."""
    try:
        dt = datetime.datetime.fromtimestamp(ns // 10**9).astimezone()
    except (OverflowError, OSError, ValueError):
        return "(out of range)"
    return f"{dt:%Y-%m-%d %H:%M:%S}.{ns % 10**9:09d} {dt:%z}"


def time_info(ns: int) -> dict:
    return {"ns": ns, "human": human_time(ns)}


def type_names(mode: int) -> tuple[str, str]:
    return _TYPE_NAMES.get(stat.S_IFMT(mode), ("unknown", f"unknown type {stat.S_IFMT(mode):#o}"))


def block_range(first: int, n: int) -> str:
    return f"{first}" if n == 1 else f"{first}-{first + n - 1}"


# --------------------------------------------------------------------------
# the snapshot: a private, writable copy-on-write view of the image
# --------------------------------------------------------------------------


class SnapshotImage(Image):
    """A private view of an image: bytes [0, len(snap)) come from a copy
    taken at one moment, the rest from the live (read-only) mapping, and
    every write (WAL replay) goes to private pages, never to the image."""

    backend = "snapshot"

    def __init__(self, snap: bytes, live: Image, size: int, path: str | None = None):
        super().__init__(None, size, path, readonly=False)
        self.snap = memoryview(snap)
        self.snap_end = len(snap)
        self.live = live
        self.pages: dict[int, bytearray] = {}

    def _base(self, off: int, n: int):
        end = off + n
        if end <= self.snap_end:
            return self.snap[off:end]
        if off >= self.snap_end:
            return self.live.read(off, n)
        return bytes(self.snap[off:]) + bytes(self.live.read(self.snap_end, end - self.snap_end))

    def read(self, off: int, n: int):
        if off < 0 or n < 0 or off + n > self.size:
            raise ValueError(f"read [{off}, {off + n}) outside the image ({self.size})")
        pages = self.pages
        if not pages or n == 0:
            return self._base(off, n)
        first, last = off // _PAGE, (off + n - 1) // _PAGE
        hit = [p for p in range(first, last + 1) if p in pages] if last - first < 64 \
            else sorted(p for p in pages if first <= p <= last)
        if not hit:
            return self._base(off, n)
        out = bytearray(self._base(off, n))
        end = off + n
        for p in hit:
            pg = pages[p]
            base = p * _PAGE
            a, b = max(off, base), min(end, base + len(pg))
            out[a - off:b - off] = pg[a - base:b - base]
        return memoryview(out)

    def write(self, off: int, data) -> None:
        mv = memoryview(data).cast("B")
        n = len(mv)
        if off < 0 or off + n > self.size:
            raise ValueError(f"write [{off}, {off + n}) outside the image ({self.size})")
        p, end = off, off + n
        while p < end:
            idx = p // _PAGE
            base = idx * _PAGE
            pg = self.pages.get(idx)
            if pg is None:
                pg = self.pages[idx] = bytearray(self._base(base, min(_PAGE, self.size - base)))
            k = min(end, base + _PAGE) - p
            pg[p - base:p - base + k] = mv[p - off:p - off + k]
            p += k

    def flush(self, off: int, n: int) -> None:
        pass

    def fence(self) -> None:
        pass

    def discard(self) -> None:
        """Forget every private write (back to the snapshot)."""
        self.pages.clear()

    def changed_bytes(self, skip: range = range(0)) -> int:
        """How many bytes the private pages change (pages in `skip` ignored)."""
        n = 0
        for idx, pg in self.pages.items():
            if idx in skip:
                continue
            base = bytes(self._base(idx * _PAGE, len(pg)))
            if base != pg:
                n += sum(1 for a, b in zip(base, pg) if a != b)
        return n

    def close(self) -> None:
        self.snap = None
        self.pages.clear()


def _wal_header_bytes(img: Image, sb) -> bytes:
    off = sb.wal_start * BLOCK_SIZE
    if off + 2 * CACHELINE > img.size:
        return b""
    return bytes(img.read(off, 2 * CACHELINE))


def take_snapshot(live: Image, sb, quiet: bool = False) -> tuple[SnapshotImage, bool, bool]:
    """(snapshot, whole image copied?, stable?).  Stable: the WAL header
    (which every commit changes) was the same before and after the copy.

    quiet: the caller holds a shared lock on the image, so nothing can
    change it (no mount, no repair): nothing is copied, everything is read
    in place and only the replay's writes go to private pages."""
    if quiet:
        return SnapshotImage(b"", live, live.size, live.path), True, True
    whole = live.size <= FULL_SNAPSHOT_MAX
    end = live.size if whole else min(live.size, sb.data_start * BLOCK_SIZE)
    snap = b""
    stable = False
    # copying a whole image again and again under load is costly: fewer tries
    for _ in range(SNAPSHOT_TRIES if not whole or end <= (16 << 20) else 5):
        before = _wal_header_bytes(live, sb)
        snap = live.read_copy(0, end)  # no second copy: holes cost no memory
        after = _wal_header_bytes(live, sb)
        if before == after:
            stable = True
            break
    return SnapshotImage(snap, live, live.size, live.path), whole, stable


# --------------------------------------------------------------------------
# a read-only volume over the snapshot
# --------------------------------------------------------------------------


class Volume:
    """Just enough of a file system for ExtentTree and Directory to read
    the image; no allocator, no caches that outlive the inspection, no
    side effects (unlike FileSystem, it does not refuse an image whose
    bitmaps are damaged, and never logs or flags corruption)."""

    def __init__(self, img: Image, sb):
        self.img = img
        self.sb = sb
        self.fsseed = fs_seed(sb.uuid)
        self.total_blocks = sb.total_blocks
        self.inode_count = sb.inode_count
        self.data_start = sb.data_start
        self._itable_off = sb.itable_start * BLOCK_SIZE
        self._trees: dict[int, ExtentTree] = {}

    def inode_off(self, ino: int) -> int:
        return self._itable_off + ino * INODE_SIZE

    def raw_inode(self, ino: int) -> tuple[Inode, bool]:
        """(inode decoded without verification, checksum ok?)."""
        if not 0 <= ino < self.inode_count:
            raise QuietError(f"inode {ino} is out of range (0..{self.inode_count - 1})")
        raw = bytes(self.img.read(self.inode_off(ino), INODE_SIZE))
        return Inode.decode(ino, raw, self.fsseed, verify=False), \
            inode_checksum_ok(ino, raw, self.fsseed)

    def iget(self, ino: int) -> Inode:
        """A live, verified inode (FormatError if damaged, QuietError if free)."""
        inode, ok = self.raw_inode(ino)
        if not ok:
            raise FormatError(f"inode {ino}: checksum mismatch")
        if inode.mode == 0:
            raise QuietError(f"inode {ino} is free")
        return inode

    def tree(self, inode: Inode) -> ExtentTree:
        t = self._trees.get(inode.ino)
        if t is None or t.inode is not inode:
            t = self._trees[inode.ino] = ExtentTree(self, inode)
        return t

    def dir(self, inode: Inode) -> Directory:
        if not stat.S_ISDIR(inode.mode):
            raise QuietError(f"inode {inode.ino} is not a directory")
        d = Directory(self, inode, inode.size // BLOCK_SIZE)
        d.load()
        return d

    def readlink(self, inode: Inode) -> tuple[bytes, bool]:
        """(target, stored inline?)."""
        if inode.flags & I_INLINE:
            if inode.size > INLINE_MAX:
                raise FormatError(f"inode {inode.ino}: inline symlink of {inode.size} bytes")
            return bytes(inode.root[:inode.size]), True
        if inode.size > MAX_SYMLINK:
            raise FormatError(f"inode {inode.ino}: symlink of {inode.size} bytes")
        r = self.tree(inode).lookup(0)
        if r[0] is None:
            raise FormatError(f"inode {inode.ino}: symlink without a block")
        if not self.data_start <= r[2] < self.total_blocks:
            raise FormatError(f"inode {inode.ino}: symlink block {r[2]} outside the data area")
        return bytes(self.img.read(r[2] * BLOCK_SIZE, inode.size)), False

    def xattrs(self, inode: Inode) -> list[tuple[bytes, bytes]]:
        b = inode.xattr
        if not b:
            return []
        if not self.data_start <= b < self.total_blocks:
            raise FormatError(f"inode {inode.ino}: xattr block {b} outside the data area")
        return decode_xattr_block(self.fsseed, b, self.img.read(b * BLOCK_SIZE, BLOCK_SIZE),
                                  inode.ino)

    def resolve(self, path: str) -> int:
        """Inode number of `path` (from the root; symlinks are not followed)."""
        cur = ROOT_INO
        done: list[bytes] = []
        for comp in os.fsencode(path).split(b"/"):
            if comp in (b"", b"."):
                continue
            inode = self.iget(cur)
            shown = "/" + "/".join(escape(c) for c in done)
            if not stat.S_ISDIR(inode.mode):
                raise QuietError(f"{shown}: not a directory")
            if comp == b"..":
                cur = inode.parent or ROOT_INO
                if done:
                    done.pop()
                continue
            e = self.dir(inode).lookup(comp)
            if e is None:
                raise QuietError(f"{escape(os.fsencode(path))}: no such file or directory")
            cur = e[0]
            done.append(comp)
        return cur


# --------------------------------------------------------------------------
# the inspection
# --------------------------------------------------------------------------


def _replica_info(img: Image) -> list[dict]:
    out = []
    for i, (sb, err) in enumerate(read_replicas(img)):
        off = REPLICA_OFFSETS[i]
        info = {"name": "AB"[i], "block": off // BLOCK_SIZE, "valid": sb is not None,
                "reason": err, "version": None, "commit": None, "active": False}
        if sb is not None:
            info["version"], info["commit"] = sb.version, sb.commit
        elif off + SB_SIZE <= img.size and bytes(img.read(off, 8)) == SB_MAGIC:
            raw = bytes(img.read(off, SB_SIZE))
            info["version"] = int.from_bytes(raw[96:104], "little")
            info["commit"] = int.from_bytes(raw[SB_COMMIT_OFF:SB_COMMIT_OFF + 8], "little")
        out.append(info)
    return out


def _select(img: Image):
    """(active superblock or None, replica table)."""
    reps = read_replicas(img)
    table = _replica_info(img)
    best = -1
    for i, (sb, _err) in enumerate(reps):
        if sb is not None and (best < 0 or sb.version > reps[best][0].version):
            best = i
    if best < 0:
        return None, table
    table[best]["active"] = True
    return reps[best][0], table


def backend_info(path: str) -> dict:
    """The persistence backend a read-write mount (-o backend=auto) would use."""
    if os.environ.get("PMFS_NO_LIBPMEM"):
        return {"name": "msync", "reason": "PMFS_NO_LIBPMEM is set"}
    if libpmem() is None:
        return {"name": "msync", "reason": "libpmem is not installed"}
    if not os.access(path, os.W_OK):
        return {"name": "msync", "reason": "cannot ask libpmem without write access "
                                           "to the image (a mount would be read-only)"}
    if libpmem_says_pmem(path):
        forced = os.environ.get("PMEM_IS_PMEM_FORCE") == "1"
        return {"name": "libpmem", "reason": "PMEM_IS_PMEM_FORCE=1" if forced
                else "libpmem says the image is persistent memory"}
    return {"name": "msync", "reason": "libpmem says the image is not persistent memory; "
                                       "PMEM_IS_PMEM_FORCE=1 forces it"}


def _owner_running(sb) -> bool | None:
    """Is the daemon that has the image mounted alive?  None: cannot tell."""
    if not sb.owner_pid:
        return None
    if sb.owner_host and sb.owner_host != socket.gethostname():
        return None
    try:
        with open(f"/proc/{sb.owner_pid}/cmdline", "rb") as f:
            return b"pmfs" in f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return None


class Inspection:
    """One image, opened read-only, snapshotted, optionally replayed."""

    def __init__(self, path: str, replay: bool = True):
        self.path = path
        self.errors: list[str] = []
        self.notes: list[str] = []
        # a symlink (e.g. /dev/disk/by-id/...) names the file it points to
        real = os.path.realpath(path) if os.path.islink(path) else path
        # Unmounted (the usual case after a crash): a shared lock, held
        # until the end, keeps a mount or a repair from starting meanwhile
        # and lets the image be read in place.  Mounted (or being
        # repaired): no lock, and a snapshot of the metadata instead.
        try:
            self.live = open_image(real, readonly=True, lock="shared")
            self.quiet = True
        except ImageBusy:
            self.live = open_image(real, readonly=True, lock=None)
            self.quiet = False
        self.sb = None
        self.img: SnapshotImage | None = None
        self.vol: Volume | None = None
        self.replay_wanted = replay
        self.wal_info: dict | None = None
        self.replicas: list[dict] = []

    def close(self) -> None:
        if self.img is not None:
            self.img.close()
        self.live.close()

    # -- opening ---------------------------------------------------------------
    def open(self, need_fs: bool = True) -> None:
        """Select the superblock, snapshot, look at the WAL and (by default)
        replay it into the snapshot.  Without a usable superblock: raise if
        `need_fs`, else record the reason in `errors`."""
        live = self.live
        sb, self.replicas = _select(live)
        if sb is None:
            if not looks_like_pmfs(live):
                raise SuperblockError(f"{self.path}: not a pmfs file system (no pmfs "
                                      f"superblock)", foreign=True)
            msg = (f"{self.path}: both superblock replicas are damaged "
                   f"({self.replicas[0]['reason']}; {self.replicas[1]['reason']})")
            if need_fs:
                raise SuperblockError(msg)
            self.errors.append(msg)
            return
        snap, whole, stable = take_snapshot(live, sb, self.quiet)
        self.img = snap
        # select again in the snapshot: the superblock may have changed
        sb2, table = _select(snap)
        if sb2 is not None:
            sb, self.replicas = sb2, table
        self.sb = sb
        if not whole:
            self.notes.append("the data area is read in place (the image is larger than "
                              f"{human(FULL_SNAPSHOT_MAX)}; only the metadata regions were "
                              "snapshotted)")
        if not stable:
            self.notes.append("the image changed during every snapshot attempt (mounted and "
                              "busy?): what is shown may mix two states")
        if sb.format_version > 1 or sb.incompat:
            raise SuperblockError(f"{self.path}: format version {sb.format_version} "
                                  f"(features {sb.incompat:#x}) is newer than this pmfs "
                                  f"supports")
        geo_errs = sb.geometry_errors(live.size)
        if geo_errs:
            msg = f"{self.path}: {geo_errs[0]}"
            if need_fs:
                raise SuperblockError(msg)
            self.errors.extend(f"{self.path}: {e}" for e in geo_errs)
            return
        self.vol = Volume(snap, sb)
        self.wal_info = self._wal()

    # -- the WAL -------------------------------------------------------------
    def _wal(self) -> dict:
        sb, img = self.sb, self.img
        fsseed = fs_seed(sb.uuid)
        w = WAL(img, sb.wal_start, sb.wal_blocks, fsseed)
        info: dict = {"start_block": sb.wal_start, "blocks": sb.wal_blocks,
                      "area_bytes": w.area_size, "slots": [], "tail_pos": None,
                      "tail_txid": None, "state": None, "pending": 0, "records": [],
                      "torn": None, "uncommitted": 0, "replayed": False,
                      "replay_changes_bytes": 0}
        best = None
        for slot in (0, 1):
            raw = img.read(w.hdr_off + slot * CACHELINE, CACHELINE)
            try:
                h = WalHeader.decode(raw, fsseed, slot)
            except FormatError as e:
                info["slots"].append({"slot": slot, "valid": False, "reason": str(e),
                                      "seq": None, "current": False})
                continue
            info["slots"].append({"slot": slot, "valid": True, "reason": None, "seq": h.seq,
                                  "tail_pos": h.tail_pos, "tail_txid": h.tail_txid,
                                  "current": False})
            if best is None or h.seq > best[0].seq:
                best = (h, slot)
        if best is None:
            info["state"] = "damaged"
            self.errors.append("WAL header: both slots are damaged ("
                               + "; ".join(s["reason"] for s in info["slots"]) + ")")
            return info
        h, slot = best
        info["slots"][slot]["current"] = True
        info["tail_pos"], info["tail_txid"] = h.tail_pos, h.tail_txid
        pos, txid = h.tail_pos, h.tail_txid
        try:
            for rpos, rtxid, kind, raw, length in w.scan():
                rec = {"pos": rpos, "txid": rtxid, "kind": "skip" if kind == WAL_REC_SKIP
                       else "tx", "length": length, "entries": []}
                if kind != WAL_REC_SKIP:
                    _k, _t, _l, nent, _c = wal_record_header(raw)
                    for off, data in decode_wal_entries(raw, nent, length):
                        rec["entries"].append({"offset": off, "length": len(data),
                                               "where": self.where(off, len(data))})
                    info["pending"] += 1
                info["records"].append(rec)
                pos, txid = rpos + length, rtxid + 1
        except (FormatError, WalError) as e:
            self.errors.append(f"WAL: {e}")
        info["head_pos"], info["next_txid"] = pos, txid
        info["torn"] = self._torn(w, pos, txid)
        info["uncommitted"] = 1 if info["torn"] else 0
        info["state"] = "empty" if not info["pending"] else "pending"
        if info["pending"] and self.replay_wanted:
            try:
                w.recover()
            except (FormatError, WalError, ValueError) as e:
                img.discard()
                self.errors.append(f"WAL replay failed: {e} (the raw state is shown)")
            else:
                info["replayed"] = True
                hdr_page = w.hdr_off // _PAGE
                info["replay_changes_bytes"] = img.changed_bytes(range(hdr_page, hdr_page + 1))
        return info

    @staticmethod
    def _torn(w: WAL, pos: int, txid: int) -> dict | None:
        """The record after the replayable ones, if it carries the next txid
        but does not verify (a commit that was interrupted)."""
        area = w.area_size
        phys = pos % area
        if phys + WAL_REC.size > area:
            return None
        hdr = wal_record_header(w.img.read(w.area_off + phys, WAL_REC.size))
        if hdr is None:
            return None
        kind, rtxid, length, _nent, _csum = hdr
        if rtxid != txid:
            return None  # a stale record of an earlier lap
        if length < CACHELINE or length % CACHELINE or phys + length > area:
            reason = f"bad length {length}"
        else:
            reason = "checksum mismatch (not completely written)"
        return {"pos": pos, "txid": rtxid, "kind": "skip" if kind == WAL_REC_SKIP else "tx",
                "length": length, "reason": reason}

    def where(self, off: int, n: int) -> str:
        """Which structure image bytes [off, off+n) belong to."""
        sb = self.sb
        blk = off // BLOCK_SIZE
        last = (off + max(n, 1) - 1) // BLOCK_SIZE
        if blk < 2:
            return f"superblock replica {'AB'[blk]}"
        if blk < sb.wal_start + sb.wal_blocks:
            return "WAL"
        if blk < sb.ibitmap_start + sb.ibitmap_blocks:
            return f"inode bitmap block {blk - sb.ibitmap_start}"
        if blk < sb.bbitmap_start + sb.bbitmap_blocks:
            return f"block bitmap block {blk - sb.bbitmap_start}"
        if blk < sb.itable_start + sb.itable_blocks:
            base = sb.itable_start * BLOCK_SIZE
            a = (off - base) // INODE_SIZE
            b = (off + max(n, 1) - 1 - base) // INODE_SIZE
            return f"inode {a}" if a == b else f"inodes {a}-{b}"
        return f"data block {block_range(blk, last - blk + 1)}"

    # -- the whole image -------------------------------------------------------
    def superblock_info(self) -> dict:
        info: dict = {"replicas": self.replicas, "active": None}
        sb = self.sb
        if sb is None:
            return info
        active = next(r["name"] for r in self.replicas if r["active"])
        running = _owner_running(sb)
        flags = [name for bit, name in ((SB_CLEAN, "clean"), (SB_NEEDS_FSCK, "needs_fsck"),
                                        (SB_FSCK_RUNNING, "fsck_running")) if sb.state & bit]
        if sb.state & ~(SB_CLEAN | SB_NEEDS_FSCK | SB_FSCK_RUNNING):
            flags.append(f"unknown {sb.state & ~7:#x}")
        geo = {k: getattr(sb, k) for k in (
            "total_blocks", "inode_count", "wal_start", "wal_blocks", "ibitmap_start",
            "ibitmap_blocks", "bbitmap_start", "bbitmap_blocks", "itable_start",
            "itable_blocks", "data_start")}
        info.update({
            "active": active, "version": sb.version,
            "uuid": str(uuidlib.UUID(bytes=sb.uuid)), "label": sb.label,
            "format_version": sb.format_version, "incompat": sb.incompat,
            "compat": sb.compat, "state": sb.state, "flags": flags, "clean": sb.clean,
            "needs_fsck": bool(sb.state & SB_NEEDS_FSCK),
            "fsck_running": bool(sb.state & SB_FSCK_RUNNING),
            "mount_count": sb.mount_count, "error_count": sb.error_count,
            "mkfs_time": time_info(sb.mkfs_time), "mount_time": time_info(sb.mount_time),
            "write_time": time_info(sb.write_time), "fsck_time": time_info(sb.fsck_time),
            "owner": {"pid": sb.owner_pid, "host": sb.owner_host, "running": running},
            "free_blocks_at_unmount": sb.free_blocks,
            "free_inodes_at_unmount": sb.free_inodes,
            "block_size": sb.block_size, "inode_size": sb.inode_size,
            "image_bytes": self.live.size, "geometry": geo,
            "geometry_errors": sb.geometry_errors(self.live.size),
            "backend": backend_info(self.path),
        })
        return info

    def usage_info(self) -> dict:
        sb, vol = self.sb, self.vol
        fsseed = vol.fsseed
        ibm = Bitmap(self.img, fsseed, sb.ibitmap_start, sb.ibitmap_blocks, sb.inode_count,
                     "inode")
        bbm = Bitmap(self.img, fsseed, sb.bbitmap_start, sb.bbitmap_blocks, sb.total_blocks,
                     "block")
        damaged = []
        for name, bm in (("inode", ibm), ("block", bbm)):
            for i in bm.load():
                damaged.append(f"{name} bitmap block {i} (image block {bm.start + i}): "
                               f"checksum mismatch")
        self.errors.extend(damaged)
        data = sb.total_blocks - sb.data_start
        hist: dict[int, list[int]] = {}
        count = largest = 0
        free_in_runs = 0
        for _start, n in bbm.free_runs(sb.data_start):
            count += 1
            free_in_runs += n
            largest = max(largest, n)
            k = n.bit_length() - 1
            h = hist.setdefault(k, [0, 0])
            h[0] += 1
            h[1] += n
        histogram = [{"min": 1 << k, "max": (2 << k) - 1, "extents": c, "blocks": b,
                      "percent": round(100.0 * b / free_in_runs, 2) if free_in_runs else 0.0}
                     for k, (c, b) in sorted(hist.items())]
        return {
            "blocks": {"total": sb.total_blocks, "metadata": sb.data_start, "data": data,
                       "used": data - bbm.free, "free": bbm.free},
            "inodes": {"total": sb.inode_count - 1, "used": sb.inode_count - 1 - ibm.free,
                       "free": ibm.free},
            "free_extents": {"count": count, "largest": largest,
                             "largest_bytes": largest * BLOCK_SIZE, "histogram": histogram},
            "damaged_bitmap_blocks": damaged,
        }

    def summary(self) -> dict:
        out = {"image": self.path, "superblock": self.superblock_info()}
        if self.vol is not None:
            out["usage"] = self.usage_info()
            out["wal"] = self.wal_info
            orph = self.orphans()
            out["orphans"] = len(orph["orphans"])
        return out

    # -- inodes ----------------------------------------------------------------
    def inode(self, ino: int, path: str | None = None) -> dict:
        vol = self.vol
        inode, ok = vol.raw_inode(ino)
        errs: list[str] = []
        info: dict = {"ino": ino}
        if path is not None:
            info["path"] = escape(os.fsencode(path))
        info["checksum_ok"] = ok
        if not ok:
            errs.append(f"inode {ino}: checksum mismatch (fields shown as stored)")
        if ino == ORPHAN_HEAD_INO:
            info.update({"orphan_head": True, "first_orphan": inode.orphan_next})
            info["errors"] = errs
            self.errors.extend(errs)
            return info
        info["free"] = inode.mode == 0
        short, long_ = type_names(inode.mode)
        info.update({
            "mode": inode.mode, "mode_octal": f"{stat.S_IMODE(inode.mode):04o}",
            "mode_string": stat.filemode(inode.mode), "type": short, "type_name": long_,
            "uid": inode.uid, "gid": inode.gid, "size": inode.size, "nlink": inode.nlink,
            "blocks": inode.blocks, "st_blocks": inode.blocks * (BLOCK_SIZE // 512),
            "generation": inode.generation, "flags": inode.flags,
            "flag_names": [n for bit, n in ((I_INLINE, "inline"), (I_ORPHAN, "orphan"))
                           if inode.flags & bit]
            + ([f"unknown {inode.flags & ~3:#x}"] if inode.flags & ~3 else []),
            "atime": time_info(inode.atime), "mtime": time_info(inode.mtime),
            "ctime": time_info(inode.ctime), "btime": time_info(inode.btime),
            "parent": inode.parent, "xattr_block": inode.xattr,
            "orphan_next": inode.orphan_next, "orphan_prev": inode.orphan_prev,
        })
        if stat.S_ISCHR(inode.mode) or stat.S_ISBLK(inode.mode):
            info["rdev"] = {"value": inode.rdev, "major": os.major(inode.rdev),
                            "minor": os.minor(inode.rdev)}
        if inode.mode == 0:
            info["errors"] = errs
            self.errors.extend(errs)
            return info
        # extents
        info["extents"] = []
        if not inode.flags & I_INLINE:
            info["extent_tree"] = {"depth": inode.depth, "node_blocks": []}
            try:
                t = vol.tree(inode)
                for s, n, p in t.extents():
                    info["extents"].append({"file_block": s, "blocks": n, "image_block": p})
                info["extent_tree"]["node_blocks"] = list(t.node_blocks())
            except FormatError as e:
                errs.append(f"extent tree: {e}")
        # xattrs
        info["xattrs"] = []
        try:
            for k, v in vol.xattrs(inode):
                info["xattrs"].append({"name": escape(k), "value": escape(v),
                                       "name_hex": k.hex(), "value_hex": v.hex(),
                                       "length": len(v)})
        except FormatError as e:
            errs.append(f"xattrs: {e}")
        if stat.S_ISLNK(inode.mode):
            try:
                target, inline = vol.readlink(inode)
                info["symlink"] = {"target": escape(target), "target_hex": target.hex(),
                                   "inline": inline}
            except FormatError as e:
                errs.append(f"symlink: {e}")
        if stat.S_ISDIR(inode.mode):
            try:
                info["entries"] = len(vol.dir(inode).entries)
            except FormatError as e:
                errs.append(f"directory: {e}")
        info["errors"] = errs
        self.errors.extend(errs)
        return info

    def ls(self, path: str) -> dict:
        vol = self.vol
        ino = vol.resolve(path)
        inode = vol.iget(ino)
        out: dict = {"path": escape(os.fsencode(path)), "ino": ino, "entries": []}
        if stat.S_ISDIR(inode.mode):
            out["directory"] = True
            d = vol.dir(inode)
            items = sorted((name, e[0], e[1]) for name, e in d.entries.items())
        else:
            out["directory"] = False
            items = [(os.fsencode(path).rstrip(b"/").rsplit(b"/", 1)[-1], ino, None)]
        for name, eino, ftype in items:
            ent: dict = {"name": escape(name), "name_hex": name.hex(), "ino": eino,
                         "dirent_type": _DT_NAMES.get(ftype, "unknown")
                         if ftype is not None else None}
            try:
                ei = vol.iget(eino)
            except (FormatError, QuietError) as e:
                msg = f"{escape(name)} (inode {eino}): {e}"
                ent["error"] = msg
                self.errors.append(msg)
                out["entries"].append(ent)
                continue
            short, _l = type_names(ei.mode)
            ent.update({"type": short, "mode": ei.mode, "mode_string": stat.filemode(ei.mode),
                        "nlink": ei.nlink, "uid": ei.uid, "gid": ei.gid, "size": ei.size,
                        "mtime": time_info(ei.mtime)})
            if ftype is not None and ent["dirent_type"] != short:
                msg = (f"{escape(name)}: directory entry says {ent['dirent_type']}, "
                       f"inode {eino} is a {short}")
                ent["error"] = msg
                self.errors.append(msg)
            if stat.S_ISCHR(ei.mode) or stat.S_ISBLK(ei.mode):
                ent["rdev"] = {"major": os.major(ei.rdev), "minor": os.minor(ei.rdev)}
            if stat.S_ISLNK(ei.mode):
                try:
                    target, _inline = vol.readlink(ei)
                    ent["target"] = escape(target)
                except FormatError as e:
                    ent["error"] = f"{escape(name)}: {e}"
                    self.errors.append(ent["error"])
            out["entries"].append(ent)
        return out

    def cat(self, ino: int, out) -> int:
        """Write regular file `ino`'s bytes to the binary stream `out`; returns
        the number of bytes written."""
        vol = self.vol
        inode = vol.iget(ino)
        if not stat.S_ISREG(inode.mode):
            _short, long_ = type_names(inode.mode)
            raise QuietError(f"inode {ino} is a {long_}, not a regular file")
        size = inode.size
        pos = 0
        chunk = 1 << 20
        for s, n, p in vol.tree(inode).extents():
            a = s * BLOCK_SIZE
            if a >= size:
                break
            if not (vol.data_start <= p and p + n <= vol.total_blocks):
                raise FormatError(f"inode {ino}: extent at file block {s} points outside "
                                  f"the data area (image block {p})")
            while pos < a:  # a hole
                k = min(chunk, a - pos)
                out.write(bytes(k))
                pos += k
            end = min(size, (s + n) * BLOCK_SIZE)
            while pos < end:
                k = min(chunk, end - pos)
                out.write(bytes(self.img.read(p * BLOCK_SIZE + (pos - a), k)))
                pos += k
        while pos < size:  # a hole up to EOF
            k = min(chunk, size - pos)
            out.write(bytes(k))
            pos += k
        return pos

    def orphans(self) -> dict:
        vol = self.vol
        out: dict = {"orphans": [], "errors": []}
        errs = out["errors"]
        head, ok = vol.raw_inode(ORPHAN_HEAD_INO)
        if not ok:
            errs.append("orphan-list head (inode 0): checksum mismatch")
        prev, ino = ORPHAN_HEAD_INO, head.orphan_next
        seen: set[int] = set()
        while ino:
            if ino in seen:
                errs.append(f"orphan list loops back to inode {ino}")
                break
            if not 0 < ino < vol.inode_count:
                errs.append(f"orphan list points outside the inode table (inode {ino})")
                break
            seen.add(ino)
            inode, ok = vol.raw_inode(ino)
            short, _l = type_names(inode.mode)
            ent = {"ino": ino, "type": short, "nlink": inode.nlink, "size": inode.size,
                   "blocks": inode.blocks, "flags": inode.flags,
                   "state": "unlinked (freed at its last close, or at the next mount)"
                   if inode.nlink == 0 else
                   "truncation in progress (blocks past its size are freed at the next "
                   "mount)"}
            out["orphans"].append(ent)
            if not ok:
                errs.append(f"inode {ino} (on the orphan list): checksum mismatch")
                break
            if inode.mode == 0:
                errs.append(f"inode {ino} on the orphan list is free")
            if not inode.flags & I_ORPHAN:
                errs.append(f"inode {ino} is on the orphan list without the orphan flag")
            if inode.orphan_prev != prev:
                errs.append(f"inode {ino}: orphan_prev is {inode.orphan_prev}, expected "
                            f"{prev}")
            prev, ino = ino, inode.orphan_next
        self.errors.extend(errs)
        return out


# --------------------------------------------------------------------------
# text output
# --------------------------------------------------------------------------


def _kv(lines: list[str], key: str, value, indent: int = 2) -> None:
    lines.append(f"{' ' * indent}{key + ':':<16} {value}")


def render_summary(d: dict) -> str:
    lines: list[str] = []
    sbi = d["superblock"]
    lines.append(f"pmfs image {d['image']}")
    lines.append("")
    lines.append("Superblock")
    for r in sbi["replicas"]:
        what = "valid" if r["valid"] else f"INVALID ({r['reason']})"
        ver = f", version {r['version']}" if r["version"] is not None else ""
        if not r["valid"] and r["commit"] is not None:
            ver += f", commit word {r['commit']}"
        act = "   <- active" if r["active"] else ""
        lines.append(f"  replica {r['name']} (block {r['block']}): {what}{ver}{act}")
    if sbi.get("active") is None:
        return "\n".join(lines)
    _kv(lines, "uuid", sbi["uuid"])
    _kv(lines, "label", sbi["label"] or "(none)")
    _kv(lines, "format", f"version {sbi['format_version']}, incompat {sbi['incompat']:#x}, "
                         f"compat {sbi['compat']:#x}")
    own = sbi["owner"]
    if sbi["clean"]:
        state = "clean (unmounted cleanly)"
    else:
        state = "not clean: "
        if own["pid"]:
            where = f"pid {own['pid']} on host {own['host'] or '?'}"
            if own["running"] is True:
                state += f"mounted by {where} (running)"
            elif own["running"] is False:
                state += f"was mounted by {where}, which is gone (crashed: the next mount " \
                         f"recovers)"
            else:
                state += f"mounted by {where}"
        else:
            state += "mounted, or not cleanly unmounted"
    _kv(lines, "state", state + f" [flags {sbi['state']:#x}: "
        f"{', '.join(sbi['flags']) or 'none'}]")
    _kv(lines, "needs fsck", "YES (corruption was met while mounted)" if sbi["needs_fsck"]
        else "no")
    _kv(lines, "fsck running", "YES (a repair was interrupted)" if sbi["fsck_running"]
        else "no")
    _kv(lines, "mount count", sbi["mount_count"])
    _kv(lines, "errors", f"{sbi['error_count']} since the last fsck")
    for key, label in (("mkfs_time", "created"), ("mount_time", "last mount"),
                       ("write_time", "last write"), ("fsck_time", "last fsck")):
        t = sbi[key]
        _kv(lines, label, "never" if t["ns"] == 0 else f"{t['human']} ({t['ns']})")
    _kv(lines, "free at unmount", f"{sbi['free_blocks_at_unmount']} blocks, "
        f"{sbi['free_inodes_at_unmount']} inodes (informational)")
    b = sbi["backend"]
    _kv(lines, "backend", f"{b['name']} ({b['reason']})")
    g = sbi["geometry"]
    _kv(lines, "geometry", f"{g['total_blocks']} blocks of {sbi['block_size']} bytes "
        f"({human(g['total_blocks'] * sbi['block_size'])}), {g['inode_count']} inode slots "
        f"of {sbi['inode_size']} bytes")
    lines.append(f"    {'region':<14}{'first block':>12}{'blocks':>12}{'size':>12}")
    for name, start, n in (("superblocks", 0, 2), ("WAL", g["wal_start"], g["wal_blocks"]),
                           ("inode bitmap", g["ibitmap_start"], g["ibitmap_blocks"]),
                           ("block bitmap", g["bbitmap_start"], g["bbitmap_blocks"]),
                           ("inode table", g["itable_start"], g["itable_blocks"]),
                           ("data", g["data_start"], g["total_blocks"] - g["data_start"])):
        lines.append(f"    {name:<14}{start:>12}{n:>12}{human(n * BLOCK_SIZE):>12}")
    for e in sbi["geometry_errors"]:
        lines.append(f"  GEOMETRY ERROR: {e}")
    if "usage" in d:
        u = d["usage"]
        bl, ino, fe = u["blocks"], u["inodes"], u["free_extents"]
        lines.append("")
        lines.append("Usage")
        pct = 100.0 * bl["used"] / bl["data"] if bl["data"] else 0.0
        _kv(lines, "data blocks", f"{bl['data']} total, {bl['used']} used ({pct:.1f}%), "
            f"{bl['free']} free ({human(bl['free'] * BLOCK_SIZE)})")
        _kv(lines, "inodes", f"{ino['total']} total, {ino['used']} used, {ino['free']} free")
        _kv(lines, "free extents", f"{fe['count']}, largest {fe['largest']} blocks "
            f"({human(fe['largest_bytes'])})")
        if fe["histogram"]:
            lines.append(f"    {'extent size (blocks)':<24}{'extents':>10}{'blocks':>12}"
                         f"{'% of free':>11}")
            for h in fe["histogram"]:
                rng = f"{h['min']}" if h["min"] == h["max"] else f"{h['min']}-{h['max']}"
                lines.append(f"    {rng:<24}{h['extents']:>10}{h['blocks']:>12}"
                             f"{h['percent']:>10.1f}%")
        for e in u["damaged_bitmap_blocks"]:
            lines.append(f"  DAMAGED: {e}")
    if d.get("wal") is not None:
        lines.append("")
        lines.extend(render_wal(d["wal"], detail=False))
    if "orphans" in d:
        lines.append("")
        n = d["orphans"]
        lines.append(f"Orphans: {n}" + (f" (pmfs-inspect {d['image']} orphans)" if n else ""))
    return "\n".join(lines)


def render_wal(w: dict, detail: bool) -> list[str]:
    lines = ["Write-ahead log"]
    _kv(lines, "area", f"blocks {w['start_block'] + 1}-{w['start_block'] + w['blocks'] - 1} "
        f"({human(w['area_bytes'])}), header in block {w['start_block']}")
    slots = []
    for s in w["slots"]:
        if s["valid"]:
            slots.append(f"slot {s['slot']}: seq {s['seq']}" + (" (current)" if s["current"]
                                                                  else ""))
        else:
            slots.append(f"slot {s['slot']}: invalid ({s['reason']})")
    _kv(lines, "header", "; ".join(slots))
    if w["state"] == "damaged":
        _kv(lines, "state", "DAMAGED header: nothing can be replayed (fsck.pmfs resets it)")
        return lines
    _kv(lines, "tail", f"position {w['tail_pos']}, txid {w['tail_txid']}")
    txs = [r for r in w["records"] if r["kind"] == "tx"]
    if not txs:
        state = "empty (nothing to replay)"
    else:
        state = (f"{len(txs)} committed transaction(s) pending replay (txid "
                 f"{', '.join(str(r['txid']) for r in txs)})")
    _kv(lines, "state", state)
    if txs:
        if w["replayed"]:
            ch = w["replay_changes_bytes"]
            _kv(lines, "shown", "as after replay into a private copy (--no-replay: the raw "
                "state); " + (f"replay changes {ch} byte(s)" if ch else
                              "already applied in place (replay changes nothing)"))
        else:
            _kv(lines, "shown", "raw state (not replayed)")
    if w["torn"]:
        t = w["torn"]
        _kv(lines, "uncommitted", f"txid {t['txid']} at position {t['pos']} after them: a "
            f"torn record ({t['reason']}), never committed; recovery ignores it")
    if detail:
        for r in w["records"]:
            if r["kind"] == "skip":
                lines.append(f"  txid {r['txid']} at {r['pos']}: SKIP {r['length']} bytes "
                             f"(padding to the end of the area)")
                continue
            lines.append(f"  txid {r['txid']} at {r['pos']}: {r['length']} bytes, "
                         f"{len(r['entries'])} entries")
            for e in r["entries"]:
                lines.append(f"    offset {e['offset']:>12} length {e['length']:>6}  "
                             f"{e['where']}")
    return lines


def render_inode(d: dict) -> str:
    title = f"inode {d['ino']}" + (f" ({d['path']})" if "path" in d else "")
    lines = [title]
    if d.get("orphan_head"):
        lines.append("  the orphan-list head (slot 0, never a file)")
        _kv(lines, "first orphan", d["first_orphan"] or "none")
        _kv(lines, "checksum", "ok" if d["checksum_ok"] else "MISMATCH")
        return "\n".join(lines)
    if d["free"]:
        lines.append(f"  free slot (generation {d['generation']})")
        _kv(lines, "checksum", "ok" if d["checksum_ok"] else "MISMATCH")
        return "\n".join(lines)
    _kv(lines, "type", d["type_name"])
    _kv(lines, "mode", f"{d['mode_octal']} ({d['mode_string']}, st_mode {d['mode']:#o})")
    _kv(lines, "uid/gid", f"{d['uid']}/{d['gid']}")
    _kv(lines, "size", f"{d['size']} bytes" + (f" ({human(d['size'])})"
                                               if d["size"] >= 1024 else ""))
    _kv(lines, "links", d["nlink"])
    _kv(lines, "blocks", f"{d['blocks']} of 4 KiB (st_blocks {d['st_blocks']})")
    _kv(lines, "generation", d["generation"])
    _kv(lines, "flags", f"{d['flags']:#x} ({', '.join(d['flag_names']) or 'none'})")
    if "rdev" in d:
        _kv(lines, "device", f"{d['rdev']['major']}:{d['rdev']['minor']}")
    for k in ("atime", "mtime", "ctime", "btime"):
        _kv(lines, k, f"{d[k]['human']} ({d[k]['ns']})")
    if d["type"] == "dir":
        _kv(lines, "parent", d["parent"])
        if "entries" in d:
            _kv(lines, "entries", f"{d['entries']} (plus . and ..)")
    if "orphan" in d["flag_names"]:
        _kv(lines, "orphan links", f"next {d['orphan_next']}, prev {d['orphan_prev']}")
    if d["xattr_block"]:
        _kv(lines, "xattr block", d["xattr_block"])
    _kv(lines, "checksum", "ok" if d["checksum_ok"] else "MISMATCH")
    if "symlink" in d:
        s = d["symlink"]
        _kv(lines, "target", f'"{s["target"]}" ({"inline" if s["inline"] else "in a block"})')
    if "extent_tree" in d:
        t = d["extent_tree"]
        nodes = f", index/leaf nodes in blocks {', '.join(map(str, t['node_blocks']))}" \
            if t["node_blocks"] else ""
        lines.append(f"  extents: {len(d['extents'])} (tree depth {t['depth']}{nodes})")
        for e in d["extents"]:
            n = e["blocks"]
            lines.append(f"    file blocks {block_range(e['file_block'], n):<17} -> image "
                         f"blocks {block_range(e['image_block'], n):<17} ({n} "
                         f"block{'s' if n != 1 else ''})")
    if d["xattrs"]:
        lines.append(f"  xattrs: {len(d['xattrs'])}")
        for x in d["xattrs"]:
            v = x["value"]
            shown = f'"{v[:200]}"... ({x["length"]} bytes)' if len(v) > 200 else f'"{v}"'
            lines.append(f'    {x["name"]} = {shown}')
    for e in d.get("errors", []):
        lines.append(f"  DAMAGED: {e}")
    return "\n".join(lines)


def render_ls(d: dict) -> str:
    rows = []
    for e in d["entries"]:
        if "mode" not in e:
            rows.append((str(e["ino"]), "?", "?" * 10, "?", "?", "?", "?", "?",
                         e["name"] + f"   [{e['error']}]"))
            continue
        size = f"{e['rdev']['major']}, {e['rdev']['minor']}" if "rdev" in e else str(e["size"])
        name = e["name"] + (f" -> {e['target']}" if "target" in e else "")
        if "error" in e:
            name += f"   [{e['error']}]"
        rows.append((str(e["ino"]), e["type"], e["mode_string"], str(e["nlink"]), str(e["uid"]),
                     str(e["gid"]), size, e["mtime"]["human"][:16], name))
    head = ("inode", "type", "mode", "links", "uid", "gid", "size", "mtime", "name")
    if not rows:
        return f"{d['path']}: empty directory (inode {d['ino']})"
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    right = {0, 3, 4, 5, 6}
    out = []
    for r in [head] + rows:
        cells = [(c.rjust(widths[i]) if i in right else c.ljust(widths[i])) if i < 8 else c
                 for i, c in enumerate(r)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def render_orphans(d: dict) -> str:
    if not d["orphans"] and not d["errors"]:
        return "orphan list: empty"
    lines = [f"orphan list: {len(d['orphans'])} inode(s)"]
    for o in d["orphans"]:
        lines.append(f"  inode {o['ino']:>8}  {o['type']:<8} links {o['nlink']}  size "
                     f"{o['size']}  blocks {o['blocks']}  -- {o['state']}")
    for e in d["errors"]:
        lines.append(f"  DAMAGED: {e}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------


def _common_options(p, sub: bool) -> None:
    # on the subcommands the defaults are suppressed, so that an option
    # given before the subcommand is not reset by it
    d = {"default": argparse.SUPPRESS} if sub else {}
    p.add_argument("--json", action="store_true",
                   help="machine-readable output (one JSON document on stdout)", **d)
    p.add_argument("--no-replay", action="store_true",
                   help="show the raw state: do not replay committed log transactions "
                        "into the private copy", **d)
    p.add_argument("--debug", action="store_true", help="tracebacks on errors", **d)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        usage="%(prog)s [-h] [--json] [--no-replay] [--debug] [-V] IMAGE "
              "[{summary,inode N,stat PATH,ls [PATH],orphans,wal,cat PATH|N}]",
        description="Show a pmfs image without mounting it: the superblock replicas, "
                    "usage and fragmentation, the write-ahead log, single inodes, "
                    "directories and the orphan list.  Read-only: the image is never "
                    "written (it may be mounted); committed log transactions are "
                    "replayed into a private copy unless --no-replay is given.",
        epilog="Commands: (none) or summary: superblock, usage, WAL; inode N: one "
               "inode by number; stat PATH: one inode by path (symlinks not followed); "
               "ls [PATH]: list a directory (default /); orphans: the orphan list; wal: "
               "the log records and what they change; cat PATH|N: a regular file's bytes "
               "on stdout (to rescue a file from an image that does not mount).  "
               "Exit codes: 0 shown, nothing "
               "damaged; 8 damaged structures found or operational error; 16 usage error.")
    p.add_argument("image", metavar="IMAGE", help="image file or device")
    _common_options(p, sub=False)
    p.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("summary", prog=f"{PROG} IMAGE summary",
                       help="superblock, usage and WAL state (the default)",
                       description="Superblock replicas, usage, fragmentation, WAL state.")
    _common_options(c, sub=True)
    c = sub.add_parser("inode", prog=f"{PROG} IMAGE inode",
                       help="show one inode by number",
                       description="Show one inode: attributes, times, extents, xattrs, "
                                   "symlink target.")
    c.add_argument("number", metavar="N", help="inode number (decimal, or 0x... hex)")
    _common_options(c, sub=True)
    c = sub.add_parser("stat", prog=f"{PROG} IMAGE stat",
                       help="show the inode of PATH",
                       description="Show the inode a path (from the root of the image) "
                                   "names; a final symbolic link is not followed.")
    c.add_argument("path", metavar="PATH", help="path inside the image, e.g. /dir/file")
    _common_options(c, sub=True)
    c = sub.add_parser("ls", prog=f"{PROG} IMAGE ls",
                       help="list a directory like ls -l",
                       description="List a directory of the image: inode, type, mode, "
                                   "links, owner, size, mtime, name.")
    c.add_argument("path", metavar="PATH", nargs="?", default="/",
                   help="directory inside the image (default /)")
    _common_options(c, sub=True)
    c = sub.add_parser("orphans", prog=f"{PROG} IMAGE orphans",
                       help="show the orphan list",
                       description="Inodes on the orphan list (unlinked while open, or "
                                   "truncations in progress).")
    _common_options(c, sub=True)
    c = sub.add_parser("wal", prog=f"{PROG} IMAGE wal",
                       help="show the log records in detail",
                       description="The WAL header slots and every record recovery would "
                                   "replay, with the structures each entry changes.")
    _common_options(c, sub=True)
    c = sub.add_parser("cat", prog=f"{PROG} IMAGE cat",
                       help="write a file's bytes to stdout",
                       description="Copy a regular file's content (holes as zeros) to "
                                   "stdout, like debugfs's cat: a file can be rescued from "
                                   "an image that does not mount.  --json does not apply.")
    c.add_argument("file", metavar="PATH|N",
                   help="path inside the image, or an inode number")
    _common_options(c, sub=True)
    return p


def _parse_ino(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        raise UsageError(f"invalid inode number {text!r}") from None
    if n < 0:
        raise UsageError(f"invalid inode number {text!r}")
    return n


def main_args(argv) -> int:
    a = build_parser().parse_args(argv)
    cmd = a.command or "summary"
    ino = _parse_ino(a.number) if cmd == "inode" else None
    if cmd == "cat":
        if a.json:
            raise UsageError("cat writes the file's bytes: --json does not apply")
        return _cat(a)
    insp = Inspection(a.image, replay=not a.no_replay)
    try:
        insp.open(need_fs=(cmd != "summary"))
        if cmd == "summary":
            result = insp.summary()
            text = render_summary(result)
        elif cmd == "wal":
            result = {"image": a.image, "wal": insp.wal_info}
            text = "\n".join(render_wal(insp.wal_info, detail=True))
        elif cmd == "inode":
            result = insp.inode(ino)
            text = render_inode(result)
        elif cmd == "stat":
            result = insp.inode(insp.vol.resolve(a.path), path=a.path)
            text = render_inode(result)
        elif cmd == "ls":
            result = insp.ls(a.path)
            text = render_ls(result)
        else:  # orphans
            result = insp.orphans()
            text = render_orphans(result)
    finally:
        insp.close()
    wal = insp.wal_info
    if cmd not in ("summary", "wal") and wal and wal["pending"]:
        held = f"the log holds {wal['pending']} committed transaction(s)"
        if not wal["replayed"]:
            insp.notes.append(f"{held}, not replayed: the raw state is shown")
        elif wal["replay_changes_bytes"]:
            insp.notes.append(f"{held}: shown as after replay (--no-replay for the raw "
                              f"state)")
        # else: already applied in place, which is how the log always looks
        # after a commit (the tail names the last record): nothing to say
    try:
        if a.json:
            result = dict(result)
            result.setdefault("image", a.image)
            result["notes"] = insp.notes
            result["errors"] = insp.errors
            result["replayed"] = bool(wal and wal["replayed"])
            result["wal_pending"] = wal["pending"] if wal else None
            print(json.dumps(result, indent=2))
        else:
            for n in insp.notes:
                print(f"{PROG}: note: {n}", file=sys.stderr)
            print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (pmfs-inspect ... | head): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    if insp.errors:
        more = f" (and {len(insp.errors) - 1} more)" if len(insp.errors) > 1 else ""
        raise QuietError(f"damaged: {insp.errors[0]}{more}", EXIT_ERROR)
    return EXIT_OK


def _cat(a) -> int:
    insp = Inspection(a.image, replay=not a.no_replay)
    try:
        insp.open()
        text = a.file
        ino = int(text, 0) if re.fullmatch(r"\d+|0[xX][0-9a-fA-F]+", text) else \
            insp.vol.resolve(text)
        wal = insp.wal_info
        if wal and wal["pending"] and not wal["replayed"]:
            print(f"{PROG}: note: the log holds {wal['pending']} committed transaction(s), "
                  f"not replayed: the raw state is shown", file=sys.stderr)
        try:
            insp.cat(ino, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141
    finally:
        insp.close()
    return EXIT_OK


def main(argv=None) -> None:
    try:
        sys.stdout.reconfigure(errors="backslashreplace")
    except (AttributeError, ValueError):
        pass
    sys.exit(run(PROG, main_args, argv, usage_code=EXIT_USAGE, error_code=EXIT_ERROR))


if __name__ == "__main__":
    main()
