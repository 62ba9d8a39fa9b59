"""The file-system core: POSIX semantics over the pmfs image, no FUSE types.

`FileSystem` opens an image (superblock selection, WAL recovery, bitmaps,
orphan processing) and offers the operations of a POSIX file system on
inode numbers.  Errors are raised as OSError with the errno a kernel file
system would give.  The FUSE adapter (fuse.py), the command-line tools and
the crash explorer all drive this class; it runs in-process without a
mount.

Promises kept here (see docs/DESIGN.md for the flush/fence ordering):

* every metadata operation is one WAL transaction, durable on return;
* data reaches newly allocated blocks, zero-filled where the write does not
  cover them, and is fenced before the transaction that maps it commits;
* blocks freed in a transaction are reusable only after it commits;
* an inode whose last name goes while it is open or looked up is put on the
  orphan list in the same transaction and freed at its last release/forget
  (or at the next mount after a crash).

The core is single-threaded: the FUSE adapter calls it for one request
at a time and no operation awaits.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .alloc import Bitmap, BlockAllocator, InodeAllocator, NoSpace
from .directory import Directory
from .extent import ExtentTree
from .layout import (BLOCK_SIZE, DT_BLK, DT_CHR, DT_DIR, DT_FIFO, DT_LNK, DT_REG, DT_SOCK,
                     DT_UNKNOWN, I_INLINE, I_ORPHAN, INLINE_MAX, INODE_SIZE, MAX_FILE_SIZE,
                     MAX_NAME, MAX_SYMLINK, ORPHAN_HEAD_INO, ROOT_INO, SB_CLEAN,
                     SB_NEEDS_FSCK, XATTR_SPACE, FormatError, Inode, decode_xattr_block,
                     encode_xattr_block, fs_seed, xattr_entries_size)
from .pmem import Image
from .superblock import SuperblockManager
from .wal import WAL, TxTooLarge

log = logging.getLogger(__name__)

S_IFMT = stat.S_IFMT
#: mode (offset 0) and generation (offset 20) of an inode slot
_SLOT_MODE_GEN = struct.Struct("<I16xI")
MAX_NLINK = 0x7FFFFFFF
XATTR_CREATE = 1
XATTR_REPLACE = 2
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
_DAY_NS = 86400 * 10**9
_XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")

_DTYPE = {stat.S_IFREG: DT_REG, stat.S_IFDIR: DT_DIR, stat.S_IFLNK: DT_LNK,
          stat.S_IFCHR: DT_CHR, stat.S_IFBLK: DT_BLK, stat.S_IFIFO: DT_FIFO,
          stat.S_IFSOCK: DT_SOCK}


def dtype_of(mode: int) -> int:
    return _DTYPE.get(S_IFMT(mode), DT_UNKNOWN)


def _err(code: int, msg: str | None = None) -> OSError:
    return OSError(code, msg or os.strerror(code))


@dataclass(frozen=True)
class Ctx:
    """The caller of an operation (uid/gid of new files come from here)."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    groups: tuple = field(default=())
    #: the kernel has already applied mode_strip_sgid (true for FUSE
    #: requests since Linux 6.0; the adapter cannot know the caller's
    #: supplementary groups, the kernel can)
    sgid_stripped: bool = False


ROOT_CTX = Ctx()


@dataclass
class MountOptions:
    readonly: bool = False
    sync: bool = False  # every write durable on return
    atime: str = "relatime"  # relatime | noatime | strictatime
    inode_cache: int = 65536
    tree_cache: int = 16384
    dir_cache_entries: int = 1_000_000
    #: speculative preallocation past EOF for small appending writes (like
    #: XFS's EOF blocks): at most this many blocks (0: never); they are
    #: freed again at the file's last release
    eof_prealloc: int = 256
    #: unlinked inodes freed per transaction once the kernel forgets them
    #: (1: each at its own FORGET/release; more: deferred and freed in
    #: batches, like XFS's inode inactivation -- they stay on the orphan
    #: list until then, so a crash frees them at the next mount)
    reclaim_batch: int = 1


class _InodeFlush:
    """Writes an inode into a transaction at commit."""

    __slots__ = ("fs", "inode", "snap")

    def __init__(self, fs, inode):
        self.fs = fs
        self.inode = inode
        self.snap = None  # (_mod) the inode's fields before the transaction

    def tx_flush(self, tx) -> None:
        ino = self.inode.ino
        tx.write(self.fs.inode_off(ino), self.inode.encode(self.fs.fsseed))


def _op(fn):
    """Turn damaged metadata met by an operation into EIO (logged once).

    An operation that runs out of space or inodes while unlinked inodes
    wait in the reclaim queue is run once more after they are freed --
    only if it committed nothing, so the retry starts from the same state."""
    def wrapper(self, *a, **kw):
        retried = False
        while True:
            commits = self.wal.commits
            try:
                return fn(self, *a, **kw)
            except FormatError as e:
                self.corruption(str(e))
                raise _err(errno.EIO, f"corrupted metadata: {e}") from None
            except OSError as e:
                if retried or e.errno != errno.ENOSPC or not self.reclaim_queue \
                        or self.wal.commits != commits or self.wal.active is not None:
                    raise
            retried = True
            self.drain_reclaim()
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    wrapper.__qualname__ = fn.__qualname__
    return wrapper


class FileSystem:
    """A mounted (or in-process opened) pmfs image."""

    def __init__(self, img: Image, options: MountOptions | None = None):
        self.img = img
        self.opts = options or MountOptions(readonly=img.readonly)
        if img.readonly:
            self.opts.readonly = True
        self.readonly = self.opts.readonly
        self.sbm = SuperblockManager(img)
        sb = self.sbm.load()
        self.was_clean = sb.clean
        self.fsseed = fs_seed(sb.uuid)
        self.total_blocks = sb.total_blocks
        self.inode_count = sb.inode_count
        self.data_start = sb.data_start
        self._itable_off = sb.itable_start * BLOCK_SIZE
        self.wal = WAL(img, sb.wal_start, sb.wal_blocks, self.fsseed)
        # statistics reported at unmount
        self.stats = {"recovered_tx": 0, "orphans": 0, "errors": 0}
        self._corrupt_seen: set[str] = set()
        if self.readonly:
            pending = self.wal.pending()
            if pending:
                raise _err(errno.EROFS,
                           f"{img.path or 'image'}: the log holds {pending} committed "
                           f"transaction(s) to replay; mount read-write once (or run "
                           f"fsck.pmfs) to recover it")
            self.wal.recover()  # nothing to replay: only reads the header
        else:
            self.sbm.mark_mounted()
            self.stats["recovered_tx"] = self.wal.recover()
        self.ibm = Bitmap(img, self.fsseed, sb.ibitmap_start, sb.ibitmap_blocks,
                          sb.inode_count, "inode")
        self.bbm = Bitmap(img, self.fsseed, sb.bbitmap_start, sb.bbitmap_blocks,
                          sb.total_blocks, "block")
        bad = [f"inode bitmap block {i}" for i in self.ibm.load()]
        bad += [f"block bitmap block {i}" for i in self.bbm.load()]
        if bad:
            if not self.readonly:
                self._mark_needs_fsck()
            raise _err(errno.EUCLEAN, f"{img.path or 'image'}: {bad[0]} is damaged "
                                      f"({len(bad)} damaged bitmap blocks); run fsck.pmfs")
        self.balloc = BlockAllocator(self.bbm, sb.data_start)
        self.ialloc = InodeAllocator(self.ibm)
        # caches
        self.icache: OrderedDict[int, Inode] = OrderedDict()
        self.trees: OrderedDict[int, ExtentTree] = OrderedDict()
        self.dirs: OrderedDict[int, Directory] = OrderedDict()
        self._dir_entries = 0
        self.lazy: dict[int, Inode] = {}  # inodes with unlogged time changes
        #: speculative blocks past EOF: ino -> (generation, first, end block)
        self.eof_blocks: dict[int, tuple[int, int, int]] = {}
        self.lookups: dict[int, int] = {}
        self.opens: dict[int, int] = {}
        #: inodes whose last name went while the kernel held them: freed at
        #: their last release/FORGET (FORGET need not read other inodes)
        self.zombies: set[int] = set()
        #: forgotten zombies waiting to be freed in one batch (reclaim_batch)
        self.reclaim_queue: list[int] = []
        self._ohead: Inode | None = None  # the orphan list head, once read
        self.closed = False
        if not self.readonly:
            self.stats["orphans"] = self.process_orphans()

    # ------------------------------------------------------------------
    # housekeeping
    # ------------------------------------------------------------------
    @property
    def sb(self):
        return self.sbm.sb

    def inode_off(self, ino: int) -> int:
        return self._itable_off + ino * INODE_SIZE

    def corruption(self, what: str) -> None:
        """Damaged metadata met at run time: log once, flag the image for fsck."""
        self.stats["errors"] += 1
        if what in self._corrupt_seen:
            return
        self._corrupt_seen.add(what)
        log.error("corrupted metadata: %s (the image is marked for fsck)", what)
        self._mark_needs_fsck()

    def _mark_needs_fsck(self) -> None:
        if self.readonly or self.img.readonly:
            return
        sb = self.sbm.sb
        if not sb.state & SB_NEEDS_FSCK:
            try:
                self.sbm.update(state=sb.state | SB_NEEDS_FSCK,
                                error_count=sb.error_count + 1)
            except Exception:
                log.exception("could not mark the superblock")

    def close(self, clean: bool = True) -> None:
        """Unmount: persist everything and mark the image clean."""
        if self.closed:
            return
        try:
            if not self.readonly:
                for ino in list(self.eof_blocks):
                    try:
                        self._trim_eof_blocks(ino)
                    except (FormatError, OSError) as e:  # kept: zeroed, past EOF
                        log.error("could not free the preallocation of inode %d: %s", ino, e)
                self.flush_lazy()
                self.drain_reclaim()
                # nothing is open or looked up any more: free the orphans
                self.lookups.clear()
                self.opens.clear()
                self.process_orphans()
                self.wal.checkpoint()
                if clean:
                    sb = self.sbm.sb
                    self.sbm.update(state=(sb.state | SB_CLEAN), free_blocks=self.bbm.free,
                                    free_inodes=self.ibm.free, owner_pid=0, owner_host="")
                self.img.sync_all()
        finally:
            self.closed = True

    def tx(self, label: str = ""):
        if self.readonly:
            raise _err(errno.EROFS)
        return self.wal.transaction(label)

    # ------------------------------------------------------------------
    # inodes
    # ------------------------------------------------------------------
    def _load_inode(self, ino: int) -> Inode:
        raw = self.img.read(self.inode_off(ino), INODE_SIZE)
        return Inode.decode(ino, raw, self.fsseed)

    def iget(self, ino: int) -> Inode:
        """The live inode `ino` (ENOENT if free or out of range)."""
        ic = self.icache
        inode = ic.get(ino)
        if inode is not None:
            ic.move_to_end(ino)
            return inode
        if not 0 < ino < self.inode_count:
            raise _err(errno.ENOENT, f"inode {ino} out of range")
        inode = self.lazy.get(ino)
        if inode is None:
            t = self.trees.get(ino)
            if t is not None:
                inode = t.inode
            else:
                d = self.dirs.get(ino)
                inode = d.inode if d is not None else None
        if inode is None:
            inode = self._load_inode(ino)
            if inode.mode == 0:
                raise _err(errno.ENOENT, f"inode {ino} is free")
        ic[ino] = inode
        # never evict during a transaction: it may hold inodes it changed
        if len(ic) > self.opts.inode_cache and self.wal.active is None:
            for _ in range(len(ic) // 16):
                ic.popitem(last=False)
        return inode

    def iget_entry(self, ino: int, name: bytes) -> Inode:
        """The inode directory entry `name` names.  An entry naming a free
        or out-of-range inode is damage (FormatError: EIO for that name,
        logged once, the image marked for fsck), not a missing name."""
        try:
            return self.iget(ino)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            raise FormatError(f"directory entry {name!r} names inode {ino}, which is "
                              f"{'free' if 0 < ino < self.inode_count else 'out of range'}"
                              ) from None

    def _mod(self, tx, inode: Inode) -> Inode:
        """Declare that `tx` changes `inode` (snapshot for abort, write at commit)."""
        ino = inode.ino
        snaps = tx.meta.get("inodes")
        if snaps is None:
            # one abort hook restores every inode the transaction declared
            snaps = tx.meta["inodes"] = {}
            tx.abort_hook(lambda: self._restore_inodes(snaps))
        flush = snaps.get(ino)
        if flush is None:
            flush = snaps[ino] = _InodeFlush(self, inode)
            flush.snap = inode.snapshot()
        elif flush.inode is not inode:  # another object for the slot: write that one
            flush = _InodeFlush(self, inode)
        tx.add(("inode", ino), flush)
        self.lazy.pop(ino, None)
        return inode

    def _restore_inodes(self, snaps: dict) -> None:
        for flush in snaps.values():
            flush.inode.restore(flush.snap)
            self.trees.pop(flush.inode.ino, None)

    def inode_dirty(self, tx, inode: Inode) -> None:
        """(layer interface) write `inode` at commit."""
        tx.add(("inode", inode.ino), _InodeFlush(self, inode))

    def _new_inode(self, tx, mode: int, ctx: Ctx, parent: Inode, rdev: int = 0) -> Inode:
        ino = self.ialloc.alloc(tx)
        # the slot's last generation + 1 (a free slot keeps its generation)
        mode0, gen0 = _SLOT_MODE_GEN.unpack(self.img.read(self.inode_off(ino), 24))
        gen = (gen0 + 1) & 0xFFFFFFFF or 1
        if mode0:
            log.warning("inode %d was free in the bitmap but in use in the table", ino)
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:
            # BSD group semantics in a setgid directory (inode_init_owner);
            # a group-executable setgid file made by an outsider of that
            # group loses S_ISGID (mode_strip_sgid)
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
            elif (mode & (stat.S_ISGID | stat.S_IXGRP) == (stat.S_ISGID | stat.S_IXGRP)
                  and not ctx.sgid_stripped
                  and ctx.uid != 0 and ctx.gid != gid and gid not in ctx.groups):
                mode &= ~stat.S_ISGID
        now = time.time_ns()
        inode = Inode(ino, mode=mode, uid=ctx.uid, gid=gid, generation=gen, atime=now,
                      mtime=now, ctime=now, btime=now, rdev=rdev)
        self.icache[ino] = inode
        self.trees.pop(ino, None)
        self.dirs.pop(ino, None)

        def forget_new():
            self.icache.pop(ino, None)
            self.trees.pop(ino, None)
            self.dirs.pop(ino, None)
        tx.abort_hook(forget_new)
        tx.add(("inode", ino), _InodeFlush(self, inode))
        return inode

    def tree(self, inode: Inode) -> ExtentTree:
        t = self.trees.get(inode.ino)
        if t is None or t.inode is not inode:
            if inode.flags & I_INLINE:
                raise AssertionError("inline inode has no extent tree")
            tx = self.wal.active
            t = tx.objects.get(("extents", inode.ino)) if tx is not None else None
            if t is None or t.inode is not inode:
                t = ExtentTree(self, inode)
            self.trees[inode.ino] = t
            if len(self.trees) > self.opts.tree_cache and tx is None:
                for _ in range(len(self.trees) // 16):
                    self.trees.popitem(last=False)
        else:
            self.trees.move_to_end(inode.ino)
        return t

    def dir(self, inode: Inode) -> Directory:
        d = self.dirs.get(inode.ino)
        if d is not None and d.inode is inode:
            self.dirs.move_to_end(inode.ino)
            return d
        if not stat.S_ISDIR(inode.mode):
            raise _err(errno.ENOTDIR)
        d = Directory(self, inode, inode.size // BLOCK_SIZE)
        d.load()
        old = self.dirs.pop(inode.ino, None)
        if old is not None:
            self._dir_entries -= len(old.entries)
        self.dirs[inode.ino] = d
        self._dir_entries += len(d.entries)
        while (self._dir_entries > self.opts.dir_cache_entries and len(self.dirs) > 1
               and self.wal.active is None):
            _k, ev = self.dirs.popitem(last=False)
            self._dir_entries -= len(ev.entries)
        return d

    def dir_invalidate_fn(self, ino: int):
        """(layer interface) a callback dropping the index of directory `ino`."""
        def drop():
            d = self.dirs.pop(ino, None)
            if d is not None:
                self._dir_entries -= len(d.entries)
        return drop

    def dir_grow(self, tx, d: Directory) -> int:
        """(layer interface) add a zeroed block to directory `d`; returns its offset."""
        inode = self.iget(d.ino)
        self._mod(tx, inode)
        t = self.tree(inode)
        lblk = d.nblocks
        if (lblk + 1) * BLOCK_SIZE > MAX_FILE_SIZE:
            raise _err(errno.ENOSPC, "directory too large")
        goal = t.goal_for(lblk)
        (pblk, _n), = self.balloc.alloc(tx, 1, goal)
        self.img.zero(pblk * BLOCK_SIZE, BLOCK_SIZE, drain=False)
        tx.data_fence = True
        t.insert(tx, lblk, 1, pblk)
        inode.blocks += 1
        inode.size = (lblk + 1) * BLOCK_SIZE
        d.nblocks = lblk + 1

        def undo(d=d, n=lblk):
            d.nblocks = n
            d.forget_blocks(n)
        tx.abort_hook(undo)
        return lblk * BLOCK_SIZE

    def _purge(self, ino: int) -> None:
        self.icache.pop(ino, None)
        self.trees.pop(ino, None)
        d = self.dirs.pop(ino, None)
        if d is not None:
            self._dir_entries -= len(d.entries)
        self.lazy.pop(ino, None)
        self.eof_blocks.pop(ino, None)

    # ------------------------------------------------------------------
    # orphans and freeing
    # ------------------------------------------------------------------
    def _orphan_head(self) -> Inode:
        """The orphan list head (inode slot 0), decoded once and then kept:
        every change to it goes through `_mod`, like any cached inode."""
        h = self._ohead
        if h is None:
            raw = self.img.read(self.inode_off(ORPHAN_HEAD_INO), INODE_SIZE)
            h = self._ohead = Inode.decode(ORPHAN_HEAD_INO, raw, self.fsseed)
        return h

    def _orphan_inode(self, ino: int) -> Inode:
        return self._orphan_head() if ino == ORPHAN_HEAD_INO else self.iget(ino)

    def _orphan_add(self, tx, inode: Inode) -> None:
        if inode.flags & I_ORPHAN:
            return
        head = self._orphan_head()
        self._mod(tx, head)
        self._mod(tx, inode)
        first = head.orphan_next
        inode.orphan_next = first
        inode.orphan_prev = ORPHAN_HEAD_INO
        inode.flags |= I_ORPHAN
        if first:
            f = self.iget(first)
            self._mod(tx, f)
            f.orphan_prev = inode.ino
        head.orphan_next = inode.ino

    def _orphan_del(self, tx, inode: Inode) -> None:
        if not inode.flags & I_ORPHAN:
            return
        self._mod(tx, inode)
        prev = self._orphan_inode(inode.orphan_prev)
        self._mod(tx, prev)
        prev.orphan_next = inode.orphan_next
        if inode.orphan_next:
            nxt = self.iget(inode.orphan_next)
            self._mod(tx, nxt)
            nxt.orphan_prev = inode.orphan_prev
        inode.orphan_next = inode.orphan_prev = 0
        inode.flags &= ~I_ORPHAN

    def orphans(self) -> list[int]:
        """Inode numbers on the orphan list."""
        out = []
        seen = set()
        ino = self._orphan_head().orphan_next
        while ino and ino not in seen and len(out) < self.inode_count:
            seen.add(ino)
            out.append(ino)
            ino = self.iget(ino).orphan_next
        return out

    def process_orphans(self) -> int:
        """Finish what a crash (or the last user) left: free unlinked inodes,
        complete truncations.  Returns how many were processed."""
        n = 0
        try:
            lst = self.orphans()
        except FormatError as e:
            self.corruption(str(e))  # as an unlink meeting it later says it: logged once
            return 0
        except OSError as e:
            self.corruption(f"orphan list: {e}")
            return 0
        for ino in lst:
            if self.lookups.get(ino) or self.opens.get(ino):
                continue
            try:
                inode = self.iget(ino)
                if inode.nlink == 0:
                    self._reclaim(inode)
                else:
                    self._truncate_blocks(inode, -(-inode.size // BLOCK_SIZE), chunked=True)
                    with self.tx("orphan-done") as tx:
                        self._orphan_del(tx, inode)
                n += 1
            except FormatError as e:
                self.corruption(str(e))
            except OSError as e:
                self.corruption(f"orphan inode {ino}: {e}")
        return n

    def _free_inode_tx(self, tx, inode: Inode) -> None:
        """Free an unlinked inode and everything it owns, in `tx`."""
        self._mod(tx, inode)
        if not inode.flags & I_INLINE and inode.count:  # count: root extent entries
            t = self.tree(inode)
            for p, n in t.remove_all(tx):
                self.balloc.free_blocks(tx, p, n)
        if inode.xattr:
            self.balloc.free_blocks(tx, inode.xattr, 1)
        self._orphan_del(tx, inode)
        ino = inode.ino
        gen = inode.generation
        inode.restore(Inode(ino, generation=gen).snapshot())
        self.ialloc.free_inode(tx, ino)
        tx.commit_hook(lambda: self._purge(ino))

    def _reclaim(self, inode: Inode) -> None:
        """Free an unlinked inode nobody uses, in as many transactions as needed."""
        try:
            with self.tx("free-inode") as tx:
                self._free_inode_tx(tx, inode)
            return
        except TxTooLarge:
            pass
        # too big for one transaction: it is on the orphan list (a crash
        # resumes the work at mount); free the blocks in chunks, then the inode
        with self.tx("orphan") as tx:
            self._orphan_add(tx, inode)
        self._truncate_blocks(inode, 0, chunked=True)
        with self.tx("free-inode") as tx:
            self._free_inode_tx(tx, inode)

    def _truncate_blocks(self, inode: Inode, from_lblk: int, chunked: bool = False,
                         tx=None) -> None:
        """Unmap and free every block at or after file block `from_lblk`."""
        if inode.flags & I_INLINE or not stat.S_ISREG(inode.mode) and not \
                stat.S_ISDIR(inode.mode) and not stat.S_ISLNK(inode.mode):
            return
        if tx is not None:
            t = self.tree(inode)
            end = t.end_block()
            if end > from_lblk:
                self._mod(tx, inode)
                for p, n in t.remove(tx, from_lblk, end - from_lblk):
                    self.balloc.free_blocks(tx, p, n)
                    inode.blocks -= n
            return
        step = None
        while True:
            t = self.tree(inode)
            end = t.end_block()
            if end <= from_lblk:
                return
            start = from_lblk if step is None else max(from_lblk, end - step)
            try:
                with self.tx("truncate-chunk") as tx:
                    self._mod(tx, inode)
                    t = self.tree(inode)
                    for p, n in t.remove(tx, start, end - start):
                        self.balloc.free_blocks(tx, p, n)
                        inode.blocks -= n
            except TxTooLarge:
                if not chunked:
                    raise
                step = max(1, (end - start) // 4)

    def _drop_link(self, tx, inode: Inode) -> bool:
        """After nlink reached 0 in `tx`: free now (True) or park on the orphan
        list until its last user goes (False)."""
        ino = inode.ino
        if self.lookups.get(ino) or self.opens.get(ino):
            # the kernel still holds it (open, someone's cwd, a cached
            # inode): it lives until the last release/FORGET
            self._orphan_add(tx, inode)
            zombies = self.zombies
            tx.commit_hook(lambda: zombies.add(ino))
            return False
        self._free_inode_tx(tx, inode)
        return True

    def _in_use(self, ino: int) -> bool:
        return bool(self.lookups.get(ino) or self.opens.get(ino))

    def _maybe_reclaim(self, ino: int) -> None:
        if ino not in self.zombies or self._in_use(ino) or self.readonly:
            return
        self.zombies.discard(ino)
        q = self.reclaim_queue
        q.append(ino)
        if len(q) >= self.opts.reclaim_batch:
            self.drain_reclaim()

    def drain_reclaim(self) -> int:
        """Free the unlinked inodes waiting in the reclaim queue: one
        transaction for the batch (one by one, in chunks, if it is too large
        for the log).  Returns how many were freed."""
        q = self.reclaim_queue
        if not q or self.readonly:
            return 0
        self.reclaim_queue = []
        inodes = []
        for ino in q:
            try:
                inode = self.iget(ino)
            except FormatError as e:
                self.corruption(str(e))  # stays an orphan: fsck frees it
                continue
            except OSError:
                continue
            if inode.nlink == 0 and inode.mode:
                inodes.append(inode)
        if not inodes:
            return 0
        if len(inodes) > 1:
            try:
                with self.tx("free-inodes") as tx:
                    for inode in inodes:
                        self._free_inode_tx(tx, inode)
                return len(inodes)
            except (TxTooLarge, FormatError):
                pass  # aborted: every inode as it was; free them one by one
        n = 0
        for inode in inodes:
            try:
                self._reclaim(inode)
                n += 1
            except FormatError as e:
                self.corruption(str(e))
        return n

    def _run_unlinking(self, fn):
        """Run a transaction that may free an inode; if it is too large, retry
        it with the inode parked on the orphan list, then free in chunks."""
        try:
            return fn(True)
        except TxTooLarge:
            pass
        res, victims = fn(False)
        for inode in victims:
            if self._in_use(inode.ino):
                self.zombies.add(inode.ino)
            else:
                self._reclaim(inode)
        return res, victims

    # ------------------------------------------------------------------
    # lookups and references (the kernel's lookup count)
    # ------------------------------------------------------------------
    def ref(self, ino: int, n: int = 1) -> None:
        self.lookups[ino] = self.lookups.get(ino, 0) + n

    def forget(self, ino: int, n: int = 1) -> None:
        c = self.lookups.get(ino, 0) - n
        if c > 0:
            self.lookups[ino] = c
            return
        self.lookups.pop(ino, None)
        if not self.opens.get(ino):
            try:
                self._maybe_reclaim(ino)
            except FormatError as e:
                # freeing met damage: fsck frees it (it stays an orphan)
                self.corruption(str(e))

    # ------------------------------------------------------------------
    # attributes
    # ------------------------------------------------------------------
    @_op
    def getattr(self, ino: int) -> Inode:
        return self.iget(ino)

    @staticmethod
    def _check_name(name: bytes) -> None:
        if not name:
            raise _err(errno.ENOENT)
        if len(name) > MAX_NAME:
            raise _err(errno.ENAMETOOLONG)
        if b"/" in name or b"\0" in name:
            raise _err(errno.EINVAL)

    def _dir_inode(self, ino: int) -> Inode:
        inode = self.iget(ino)
        if not stat.S_ISDIR(inode.mode):
            raise _err(errno.ENOTDIR)
        if inode.nlink == 0:
            raise _err(errno.ENOENT, "directory was removed")
        return inode

    @_op
    def lookup(self, parent: int, name: bytes) -> Inode:
        p = self.iget(parent)
        if not stat.S_ISDIR(p.mode):
            raise _err(errno.ENOTDIR)
        if name == b"." or name == b"":
            return p
        if name == b"..":
            return self.iget(p.parent or ROOT_INO)
        if len(name) > MAX_NAME:
            raise _err(errno.ENAMETOOLONG)
        e = self.dir(p).lookup(name)
        if e is None:
            raise _err(errno.ENOENT)
        return self.iget_entry(e[0], name)

    @_op
    def setattr(self, ino: int, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime: int | None = None,
                mtime: int | None = None, ctime: int | None = None,
                ctx: Ctx = ROOT_CTX) -> Inode:
        """Change attributes; times are ns (UTIME_NOW/UTIME_OMIT accepted)."""
        inode = self.iget(ino)
        now = time.time_ns()
        if atime == UTIME_NOW:
            atime = now
        if mtime == UTIME_NOW:
            mtime = now
        if atime == UTIME_OMIT:
            atime = None
        if mtime == UTIME_OMIT:
            mtime = None
        if size is not None:
            if stat.S_ISDIR(inode.mode):
                raise _err(errno.EISDIR)
            if not stat.S_ISREG(inode.mode):
                raise _err(errno.EINVAL)
            if size < 0:
                raise _err(errno.EINVAL)
            if size > MAX_FILE_SIZE:
                raise _err(errno.EFBIG)
        if uid is not None and uid == 0xFFFFFFFF:
            uid = None
        if gid is not None and gid == 0xFFFFFFFF:
            gid = None
        if size is not None and size <= inode.size:
            # also for the same size: blocks preallocated past EOF go (ext4)
            self._shrink(inode, size, mode=mode, uid=uid, gid=gid, atime=atime,
                         mtime=mtime, ctime=ctime, now=now)
            return inode
        with self.tx("setattr") as tx:
            self._mod(tx, inode)
            if size is not None and size != inode.size:
                self._grow_size(tx, inode, size)
                inode.mtime = now
            self._apply_attrs(inode, mode, uid, gid, atime, mtime, ctime, now)
        return inode

    def _apply_attrs(self, inode, mode, uid, gid, atime, mtime, ctime, now) -> None:
        if mode is not None:
            inode.mode = S_IFMT(inode.mode) | (mode & 0o7777)
        if uid is not None:
            inode.uid = uid
        if gid is not None:
            inode.gid = gid
        if atime is not None:
            inode.atime = atime
        if mtime is not None:
            inode.mtime = mtime
        inode.ctime = ctime if ctime is not None else now

    def _grow_size(self, tx, inode: Inode, size: int) -> None:
        """Extend a file to `size` (holes read as zeros)."""
        self._zero_tail(inode, inode.size, size)
        tx.data_fence = True
        inode.size = size

    def _zero_tail(self, inode: Inode, old_size: int, new_start: int) -> None:
        """Zero the mapped bytes of [old_size, new_start), which a growing
        size is about to expose (flushed; the caller's transaction fences).
        Past EOF they may be stale: the rest of the last block a truncate
        kept, or -- after a crash -- what an extending write stored into
        blocks allocated past EOF (fallocate KEEP_SIZE, speculative
        preallocation) before its size change could commit."""
        if new_start <= old_size:
            return
        lb0 = old_size >> 12
        t = self.tree(inode)
        if t.end_block() <= lb0:
            return  # nothing mapped past the old EOF's block
        for s, k, p in t.map_range(lb0, ((new_start - 1) >> 12) - lb0 + 1):
            if p == 0:
                continue
            a = max(old_size, s * BLOCK_SIZE)
            b = min(new_start, (s + k) * BLOCK_SIZE)
            if b > a:
                self.img.zero(p * BLOCK_SIZE + (a - s * BLOCK_SIZE), b - a, drain=False)

    def _shrink(self, inode: Inode, size: int, **attrs) -> None:
        """Truncate down: one transaction if it fits, else size first (with
        the inode on the orphan list) then the blocks in chunks."""
        self.eof_blocks.pop(inode.ino, None)  # everything past EOF goes
        now = attrs.pop("now")
        first_free = -(-size // BLOCK_SIZE)

        def apply(tx):
            self._mod(tx, inode)
            inode.size = size
            inode.mtime = now
            self._apply_attrs(inode, attrs["mode"], attrs["uid"], attrs["gid"],
                              attrs["atime"], attrs["mtime"], attrs["ctime"], now)
        try:
            with self.tx("truncate") as tx:
                apply(tx)
                self._truncate_blocks(inode, first_free, tx=tx)
            return
        except TxTooLarge:
            pass
        with self.tx("truncate-begin") as tx:
            apply(tx)
            self._orphan_add(tx, inode)
        self._truncate_blocks(inode, first_free, chunked=True)
        with self.tx("truncate-end") as tx:
            self._orphan_del(tx, inode)

    # ------------------------------------------------------------------
    # creating names
    # ------------------------------------------------------------------
    def _prepare_create(self, parent: int, name: bytes):
        self._check_name(name)
        p = self._dir_inode(parent)
        if name in (b".", b".."):
            raise _err(errno.EEXIST)
        d = self.dir(p)
        if d.lookup(name) is not None:
            raise _err(errno.EEXIST)
        return p, d

    @_op
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int = 0,
              ctx: Ctx = ROOT_CTX) -> Inode:
        fmt = S_IFMT(mode)
        if fmt == 0:
            mode |= stat.S_IFREG
            fmt = stat.S_IFREG
        if fmt not in (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            raise _err(errno.EINVAL if fmt != stat.S_IFDIR else errno.EPERM)
        if fmt not in (stat.S_IFCHR, stat.S_IFBLK):
            rdev = 0
        p, d = self._prepare_create(parent, name)
        now = time.time_ns()
        with self.tx("mknod") as tx:
            self._mod(tx, p)
            inode = self._new_inode(tx, mode, ctx, p, rdev)
            inode.nlink = 1
            d.add(tx, name, inode.ino, dtype_of(mode))
            p.mtime = p.ctime = now
        return inode

    def create(self, parent: int, name: bytes, mode: int, ctx: Ctx = ROOT_CTX) -> Inode:
        return self.mknod(parent, name, stat.S_IFREG | (mode & 0o7777), 0, ctx)

    @_op
    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Ctx = ROOT_CTX) -> Inode:
        p, d = self._prepare_create(parent, name)
        if p.nlink >= MAX_NLINK:
            raise _err(errno.EMLINK)
        now = time.time_ns()
        with self.tx("mkdir") as tx:
            self._mod(tx, p)
            inode = self._new_inode(tx, stat.S_IFDIR | (mode & 0o7777), ctx, p)
            inode.nlink = 2
            inode.parent = p.ino
            d.add(tx, name, inode.ino, DT_DIR)
            p.nlink += 1
            p.mtime = p.ctime = now
        return inode

    @_op
    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Ctx = ROOT_CTX) -> Inode:
        if not target:
            raise _err(errno.ENOENT)
        if len(target) > MAX_SYMLINK:
            raise _err(errno.ENAMETOOLONG)
        p, d = self._prepare_create(parent, name)
        now = time.time_ns()
        with self.tx("symlink") as tx:
            self._mod(tx, p)
            inode = self._new_inode(tx, stat.S_IFLNK | 0o777, ctx, p)
            inode.nlink = 1
            inode.size = len(target)
            if len(target) <= INLINE_MAX:
                inode.flags |= I_INLINE
                inode.root = target.ljust(INLINE_MAX, b"\0")
            else:
                t = self.tree(inode)
                (pblk, _n), = self.balloc.alloc(tx, 1, None)
                self.img.zero(pblk * BLOCK_SIZE, BLOCK_SIZE, drain=False)
                self.img.write(pblk * BLOCK_SIZE, target)
                self.img.flush(pblk * BLOCK_SIZE, len(target))
                tx.data_fence = True
                t.insert(tx, 0, 1, pblk)
                inode.blocks = 1
            d.add(tx, name, inode.ino, DT_LNK)
            p.mtime = p.ctime = now
        return inode

    @_op
    def readlink(self, ino: int) -> bytes:
        inode = self.iget(ino)
        if not stat.S_ISLNK(inode.mode):
            raise _err(errno.EINVAL)
        self._touch_atime(inode)
        if inode.flags & I_INLINE:
            if inode.size > INLINE_MAX:
                raise FormatError(f"inode {ino}: inline symlink of {inode.size} bytes")
            return bytes(inode.root[:inode.size])
        if inode.size > MAX_SYMLINK:
            raise FormatError(f"inode {ino}: symlink of {inode.size} bytes")
        r = self.tree(inode).lookup(0)
        if r[0] is None:
            raise FormatError(f"inode {ino}: symlink without a block")
        return bytes(self.img.read(r[2] * BLOCK_SIZE, inode.size))

    @_op
    def link(self, ino: int, newparent: int, newname: bytes) -> Inode:
        inode = self.iget(ino)
        if stat.S_ISDIR(inode.mode):
            raise _err(errno.EPERM)
        if inode.nlink == 0:
            raise _err(errno.ENOENT)
        if inode.nlink >= MAX_NLINK:
            raise _err(errno.EMLINK)
        p, d = self._prepare_create(newparent, newname)
        now = time.time_ns()
        with self.tx("link") as tx:
            self._mod(tx, p)
            self._mod(tx, inode)
            d.add(tx, newname, ino, dtype_of(inode.mode))
            inode.nlink += 1
            inode.ctime = now
            p.mtime = p.ctime = now
        return inode

    # ------------------------------------------------------------------
    # removing names
    # ------------------------------------------------------------------
    @_op
    def unlink(self, parent: int, name: bytes) -> None:
        self._check_name(name)
        p = self._dir_inode(parent)
        d = self.dir(p)
        e = d.lookup(name)
        if e is None:
            raise _err(errno.EISDIR if name in (b".", b"..") else errno.ENOENT)
        inode = self.iget_entry(e[0], name)
        if stat.S_ISDIR(inode.mode):
            raise _err(errno.EISDIR)
        now = time.time_ns()

        def run(free_now):
            victims = []
            with self.tx("unlink") as tx:
                self._mod(tx, p)
                self._mod(tx, inode)
                d.remove(tx, name)
                inode.nlink -= 1
                inode.ctime = now
                p.mtime = p.ctime = now
                if inode.nlink == 0:
                    if free_now:
                        self._drop_link(tx, inode)
                    else:
                        self._orphan_add(tx, inode)
                        victims.append(inode)
            return None, victims
        self._run_unlinking(run)

    @_op
    def rmdir(self, parent: int, name: bytes) -> None:
        if name == b".":
            raise _err(errno.EINVAL)
        if name == b"..":
            raise _err(errno.ENOTEMPTY)
        self._check_name(name)
        p = self._dir_inode(parent)
        d = self.dir(p)
        e = d.lookup(name)
        if e is None:
            raise _err(errno.ENOENT)
        inode = self.iget_entry(e[0], name)
        if not stat.S_ISDIR(inode.mode):
            raise _err(errno.ENOTDIR)
        if len(self.dir(inode)):
            raise _err(errno.ENOTEMPTY)
        now = time.time_ns()

        def run(free_now):
            victims = []
            with self.tx("rmdir") as tx:
                self._mod(tx, p)
                self._mod(tx, inode)
                d.remove(tx, name)
                p.nlink -= 1
                p.mtime = p.ctime = now
                inode.nlink = 0
                inode.ctime = now
                if free_now:
                    self._drop_link(tx, inode)
                else:
                    self._orphan_add(tx, inode)
                    victims.append(inode)
            return None, victims
        self._run_unlinking(run)

    @_op
    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int = 0) -> None:
        """rename(2)/renameat2(2): flags RENAME_NOREPLACE (1), RENAME_EXCHANGE (2)."""
        noreplace = flags & 1
        exchange = flags & 2
        if flags & ~3 or (noreplace and exchange):
            raise _err(errno.EINVAL)
        for n in (name, newname):
            if n in (b".", b".."):
                raise _err(errno.EBUSY)
            self._check_name(n)
        p1 = self._dir_inode(parent)
        p2 = self._dir_inode(newparent)
        d1 = self.dir(p1)
        d2 = self.dir(p2)
        e1 = d1.lookup(name)
        if e1 is None:
            raise _err(errno.ENOENT)
        src = self.iget_entry(e1[0], name)
        e2 = d2.lookup(newname)
        dst = self.iget_entry(e2[0], newname) if e2 is not None else None
        if exchange and dst is None:
            raise _err(errno.ENOENT)
        if noreplace and dst is not None:
            raise _err(errno.EEXIST)
        src_dir = stat.S_ISDIR(src.mode)
        dst_dir = dst is not None and stat.S_ISDIR(dst.mode)
        # the checks in the order the kernel makes them (do_renameat2)
        if src_dir and p2 is not p1 and self._is_ancestor(src.ino, p2):
            raise _err(errno.EINVAL)  # source is an ancestor of the target
        if dst_dir and p1 is not p2 and self._is_ancestor(dst.ino, p1):
            # target is an ancestor of the source
            raise _err(errno.EINVAL if exchange else errno.ENOTEMPTY)
        if p1 is p2 and name == newname or dst is src:
            return  # one name, or two names of one inode: nothing to do
        if not exchange and dst is not None:
            if src_dir and not dst_dir:
                raise _err(errno.ENOTDIR)
            if not src_dir and dst_dir:
                raise _err(errno.EISDIR)
            if dst_dir and len(self.dir(dst)):
                raise _err(errno.ENOTEMPTY)
        if src_dir and p1 is not p2 and not (exchange and dst_dir) and p2.nlink >= MAX_NLINK:
            raise _err(errno.EMLINK)
        now = time.time_ns()

        def run(free_now):
            victims = []
            with self.tx("rename") as tx:
                self._mod(tx, p1)
                self._mod(tx, p2)
                self._mod(tx, src)
                if dst is not None:
                    self._mod(tx, dst)
                p1.mtime = p1.ctime = p2.mtime = p2.ctime = now
                src.ctime = now
                if exchange:
                    d1.replace(tx, name, dst.ino, dtype_of(dst.mode))
                    d2.replace(tx, newname, src.ino, dtype_of(src.mode))
                    dst.ctime = now
                    if p1 is not p2:
                        if src_dir:
                            src.parent = p2.ino
                            p1.nlink -= 1
                            p2.nlink += 1
                        if dst_dir:
                            dst.parent = p1.ino
                            p2.nlink -= 1
                            p1.nlink += 1
                    return None, victims
                d1.remove(tx, name)
                if dst is None:
                    d2.add(tx, newname, src.ino, dtype_of(src.mode))
                else:
                    d2.replace(tx, newname, src.ino, dtype_of(src.mode))
                    dst.ctime = now
                    if dst_dir:
                        dst.nlink = 0
                        p2.nlink -= 1
                    else:
                        dst.nlink -= 1
                    if dst.nlink == 0:
                        if free_now:
                            self._drop_link(tx, dst)
                        else:
                            self._orphan_add(tx, dst)
                            victims.append(dst)
                if src_dir and p1 is not p2:
                    src.parent = p2.ino
                    p1.nlink -= 1
                    p2.nlink += 1
            return None, victims
        self._run_unlinking(run)

    def _is_ancestor(self, anc: int, inode: Inode) -> bool:
        """True if directory `anc` is `inode` or one of its ancestors."""
        seen = 0
        cur = inode
        while True:
            if cur.ino == anc:
                return True
            if cur.ino == ROOT_INO or seen > self.inode_count:
                return False
            cur = self.iget(cur.parent or ROOT_INO)
            seen += 1

    # ------------------------------------------------------------------
    # directories
    # ------------------------------------------------------------------
    @_op
    def opendir(self, ino: int) -> Inode:
        inode = self.iget(ino)
        if not stat.S_ISDIR(inode.mode):
            raise _err(errno.ENOTDIR)
        return inode

    @_op
    def readdir(self, ino: int, off: int = 0):
        """List (name, ino, ftype, next offset) from offset `off` (0 = start).

        Offsets: 0 start, 1 after ".", 2 after "..", p+3 after the record at
        directory offset p.  Records never move, so offsets stay valid while
        entries come and go."""
        inode = self.iget(ino)
        if not stat.S_ISDIR(inode.mode):
            raise _err(errno.ENOTDIR)
        out = []
        if off == 0:
            out.append((b".", ino, DT_DIR, 1))
        if off <= 1:
            out.append((b"..", inode.parent or ROOT_INO, DT_DIR, 2))
        start = 0 if off <= 2 else off - 2
        if inode.nlink:
            d = self.dir(inode)
            for pos, eino, ftype, name in d.iter_from(start):
                out.append((name, eino, ftype, pos + 3))
        self._touch_atime(inode)
        return out

    def iter_dir(self, ino: int, off: int = 0):
        """Like readdir, as an iterator that reads blocks as it goes."""
        inode = self.iget(ino)
        if not stat.S_ISDIR(inode.mode):
            raise _err(errno.ENOTDIR)
        if off == 0:
            yield (b".", ino, DT_DIR, 1)
        if off <= 1:
            yield (b"..", inode.parent or ROOT_INO, DT_DIR, 2)
        start = 0 if off <= 2 else off - 2
        if inode.nlink:
            try:
                for pos, eino, ftype, name in self.dir(inode).iter_from(start):
                    yield (name, eino, ftype, pos + 3)
            except FormatError as e:
                self.corruption(str(e))
                raise _err(errno.EIO) from None
        self._touch_atime(inode)

    def listdir(self, ino: int) -> dict[bytes, int]:
        """{name: ino} of a directory (no . and ..)."""
        inode = self._dir_inode(ino)
        return {name: e[0] for name, e in self.dir(inode).entries.items()}

    # ------------------------------------------------------------------
    # files
    # ------------------------------------------------------------------
    @_op
    def open(self, ino: int, flags: int = os.O_RDONLY, ctx: Ctx = ROOT_CTX) -> Inode:
        inode = self.iget(ino)
        if stat.S_ISDIR(inode.mode) and flags & os.O_ACCMODE != os.O_RDONLY:
            raise _err(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY and self.readonly:
            raise _err(errno.EROFS)
        self.opens[ino] = self.opens.get(ino, 0) + 1
        # O_TRUNC truncates whatever the access mode (Linux does it for
        # O_RDONLY too; the kernel has checked write permission)
        if flags & os.O_TRUNC and stat.S_ISREG(inode.mode):
            # with atomic O_TRUNC the kernel sends no setattr, so the
            # set-id bits a truncation by a non-owner drops go here
            mode = None
            if ctx.uid != 0 and inode.mode & (stat.S_ISUID | stat.S_ISGID):
                mode = inode.mode & ~stat.S_ISUID
                if mode & stat.S_IXGRP:
                    mode &= ~stat.S_ISGID
                mode &= 0o7777
            try:
                if inode.size:
                    self.setattr(ino, size=0, mode=mode)
                else:
                    now = time.time_ns()
                    self.setattr(ino, mtime=now, ctime=now, mode=mode)
            except BaseException:
                self.release(ino)
                raise
        return inode

    def release(self, ino: int) -> bool:
        """The end of one open.  True if the last one freed preallocated
        blocks: the file's st_blocks changed (a cache of its attributes,
        the kernel's, is stale)."""
        c = self.opens.get(ino, 0) - 1
        if c > 0:
            self.opens[ino] = c
            return False
        self.opens.pop(ino, None)
        trimmed = False
        try:
            if ino in self.eof_blocks:
                # (its transaction writes the lazily kept times too)
                trimmed = self._trim_eof_blocks(ino)
            if not self.lookups.get(ino):
                self._maybe_reclaim(ino)
        except FormatError as e:
            self.corruption(str(e))
        return trimmed

    @_op
    def read(self, ino: int, off: int, size: int):
        """Up to `size` bytes at `off`: a view of the image when the range is
        one extent (zero-copy), else bytes."""
        inode = self.iget(ino)
        if not stat.S_ISREG(inode.mode):
            raise _err(errno.EISDIR if stat.S_ISDIR(inode.mode) else errno.EINVAL)
        fsize = inode.size
        if off >= fsize or size <= 0:
            self._touch_atime(inode)
            return b""
        n = min(size, fsize - off)
        end = off + n
        lb0 = off >> 12
        segs = self.tree(inode).map_range(lb0, ((end - 1) >> 12) - lb0 + 1)
        self._touch_atime(inode)
        img = self.img
        if len(segs) == 1:
            p = segs[0][2]
            if p == 0:
                return bytes(n)
            return img.read(p * BLOCK_SIZE + (off & 4095), n)
        parts = []
        pos = off
        for s, k, p in segs:
            a = max(pos, s * BLOCK_SIZE)
            b = min(end, (s + k) * BLOCK_SIZE)
            if p == 0:
                parts.append(bytes(b - a))
            else:
                parts.append(img.read(p * BLOCK_SIZE + (a - s * BLOCK_SIZE), b - a))
            pos = b
        return b"".join(parts)

    def _touch_atime(self, inode: Inode) -> None:
        mode = self.opts.atime
        if mode == "noatime" or self.readonly:
            return
        now = time.time_ns()
        if mode == "relatime" and not (inode.atime <= inode.mtime or inode.atime <= inode.ctime
                                       or now - inode.atime > _DAY_NS):
            return
        inode.atime = now
        self._lazy(inode)

    @_op
    def write(self, ino: int, off: int, data) -> int:
        inode = self.iget(ino)
        if not stat.S_ISREG(inode.mode):
            raise _err(errno.EISDIR if stat.S_ISDIR(inode.mode) else errno.EINVAL)
        if self.readonly:
            raise _err(errno.EROFS)
        n = len(data)
        if off < 0:
            raise _err(errno.EINVAL)
        if n == 0:
            return 0
        if off >= MAX_FILE_SIZE:
            raise _err(errno.EFBIG)
        if off + n > MAX_FILE_SIZE:
            n = MAX_FILE_SIZE - off
            data = memoryview(data)[:n]
        end = off + n
        lb0 = off >> 12
        nblk = ((end - 1) >> 12) - lb0 + 1
        t = self.tree(inode)
        segs = t.map_range(lb0, nblk)
        holes = sum(k for _s, k, p in segs if p == 0)
        if holes:
            if self.reclaim_queue and holes + 64 > self.balloc.free:
                self.drain_reclaim()  # no short write while space waits in the queue
            avail = self.balloc.free
            try:
                return self._write_fit(inode, off, data, segs, avail,
                                       off <= inode.size < end)
            except OSError as e:
                # nothing was written: the extent tree needed blocks too;
                # leave it room and write what still fits
                if e.errno != errno.ENOSPC:
                    raise
                avail -= self._tree_reserve(self.tree(inode))
                segs = self.tree(inode).map_range(lb0, nblk)
                return self._write_fit(inode, off, data, segs, avail)
        self._zero_tail(inode, inode.size, off)
        self._copy_in(off, data, segs)
        now = time.time_ns()
        if end > inode.size:
            with self.tx("write-extend") as tx:
                self._mod(tx, inode)
                tx.data_fence = True
                inode.size = end
                inode.mtime = inode.ctime = now
        else:
            inode.mtime = inode.ctime = now
            self._lazy(inode)
            if self.opts.sync:
                self.fsync(ino)
        return n

    def _copy_in(self, off: int, data, segs) -> None:
        """Store `data` (for file offset `off`) into the mapped segments, flushed
        but not fenced."""
        img = self.img
        if type(data) is not bytes:
            data = memoryview(data)
            if data.format != "B":
                data = data.cast("B")
        end = off + len(data)
        for s, k, p in segs:
            a = max(off, s * BLOCK_SIZE)
            b = min(end, (s + k) * BLOCK_SIZE)
            if b <= a:
                continue
            img.copy(p * BLOCK_SIZE + (a - s * BLOCK_SIZE), data, drain=False,
                     start=a - off, n=b - a)

    def _write_fit(self, inode: Inode, off: int, data, segs, avail: int,
                   appends: bool = False) -> int:
        """Write as much of `data` as `avail` new blocks allow (short write);
        ENOSPC if not even one byte fits.  `appends`: the write extends the
        file from within (speculative preallocation past it may follow)."""
        if avail <= 0:
            raise NoSpace()
        left = avail
        end = off + len(data)
        cut = None
        for s, k, p in segs:
            if p == 0:
                if k > left:
                    cut = s + left
                    break
                left -= k
        if cut is not None:
            end = min(end, cut * BLOCK_SIZE)
            if end <= off:
                raise NoSpace()
            data = memoryview(data)[:end - off]
            lb0 = off >> 12
            segs = [sg for sg in segs if sg[0] < cut]
            s, k, p = segs[-1]
            if s + k > cut:
                segs[-1] = (s, cut - s, p)
            assert sum(k for _s, k, p in segs if p == 0) <= avail
            del lb0
            appends = False  # out of space: no speculation
        return self._write_alloc(inode, off, data, segs, appends)

    #: hole runs filled per transaction: bounds the log record of one step
    HOLES_PER_TX = 16

    @staticmethod
    def _tree_reserve(t: ExtentTree) -> int:
        """Blocks an insertion may need for extent-tree node splits."""
        return t.root.depth + 2

    def _chunks(self, segs):
        """Split segments into runs holding at most HOLES_PER_TX holes."""
        i = 0
        while i < len(segs):
            j = i
            holes = 0
            while j < len(segs) and (segs[j][2] or holes < self.HOLES_PER_TX):
                if segs[j][2] == 0:
                    holes += 1
                j += 1
            yield segs[i:j]
            i = j

    def _write_alloc(self, inode: Inode, off: int, data, segs, appends: bool = False) -> int:
        """A write that fills holes: one transaction per HOLES_PER_TX holes.
        Returns the bytes written (short if space runs out part-way)."""
        mv = memoryview(data)
        if mv.format != "B":
            mv = mv.cast("B")
        end = off + len(mv)
        done = 0
        chunks = list(self._chunks(segs))
        for i, chunk in enumerate(chunks):
            a = max(off, chunk[0][0] * BLOCK_SIZE)
            b = min(end, (chunk[-1][0] + chunk[-1][1]) * BLOCK_SIZE)
            try:
                self._write_alloc_tx(inode, a, mv[a - off:b - off], chunk,
                                     appends and i == len(chunks) - 1)
            except OSError as e:
                if e.errno == errno.ENOSPC and done:
                    return done
                raise
            done += b - a
        return done

    def _write_alloc_tx(self, inode: Inode, off: int, data, segs,
                        appends: bool = False) -> None:
        n = len(data)
        end = off + n
        t = self.tree(inode)
        now = time.time_ns()
        img = self.img
        with self.tx("write") as tx:
            self._mod(tx, inode)
            t = self.tree(inode)
            new_segs = []
            goal = None
            for s, k, p in segs:
                if p:
                    new_segs.append((s, k, p))
                    goal = p + k
                    continue
                if goal is None:
                    goal = t.goal_for(s)
                cur = s
                for q, m in self.balloc.alloc(tx, k, goal):
                    img.prefault(q * BLOCK_SIZE, m * BLOCK_SIZE)
                    # zero what the write leaves uncovered in the new blocks
                    a = cur * BLOCK_SIZE
                    b = (cur + m) * BLOCK_SIZE
                    if a < off:
                        img.zero(q * BLOCK_SIZE, off - a, drain=False)
                    if b > end:
                        z = max(end, a)
                        img.zero(q * BLOCK_SIZE + (z - a), b - z, drain=False)
                    t.insert(tx, cur, m, q)
                    inode.blocks += m
                    new_segs.append((cur, m, q))
                    cur += m
                    goal = q + m
            self._zero_tail(inode, inode.size, off)
            self._copy_in(off, data, new_segs)
            tx.data_fence = True
            if end > inode.size:
                inode.size = end
            inode.mtime = inode.ctime = now
            if appends and self.opts.eof_prealloc > 0:
                self._eof_prealloc(tx, inode, t, -(-end // BLOCK_SIZE), goal,
                                   sum(k for _s, k, p in segs if p == 0))

    #: files smaller than this get no speculative preallocation (a file
    #: written in one go and closed would only pay for freeing it again)
    EOF_PREALLOC_FROM = 64 << 10

    def _eof_prealloc(self, tx, inode: Inode, t: ExtentTree, next_lblk: int, goal,
                      allocated: int) -> None:
        """Speculative preallocation (XFS's "EOF blocks"): in the
        transaction of a small write that appended to a file of 64 KiB or
        more and left nothing mapped past it, allocate zeroed blocks past
        the write -- as many as the file has without a hole before the
        write's end, at least 16, up to `eof_prealloc` -- so
        that the appends that follow store data and change the size only,
        instead of allocating a block and inserting an extent each time.
        Like fallocate KEEP_SIZE blocks they count in st_blocks and never
        show in the data; the file's last release frees what is still past
        EOF (_trim_eof_blocks).  A crash keeps them (zeroed, past EOF) until
        the file is truncated or deleted."""
        if inode.size < self.EOF_PREALLOC_FROM or t.end_block() > next_lblk:
            return
        # as many blocks as the file has mapped without a hole up to here
        # (XFS sizes it by the last extent): a file that grows by appends
        # doubles, a sparse one -- written here and there -- gets none
        cap = min(self.opts.eof_prealloc, MAX_FILE_SIZE // BLOCK_SIZE - next_lblk)
        run = 0
        lb = next_lblk - 1
        while run < cap and lb >= 0:
            r = t.lookup(lb)
            if r[0] is None:
                break
            run += lb - r[0] + 1
            lb = r[0] - 1
        want = min(cap, run)
        if want * BLOCK_SIZE < self.EOF_PREALLOC_FROM or allocated >= want:
            return  # large writes allocate enough by themselves
        if self.balloc.free < 4 * want + 1024 or goal is None:
            return  # space is short: speculate with none of it
        # only the free run right after the write's last block: one
        # extent (it extends the write's), never a scatter of fragments
        want = self.bbm.run_length(goal, want) if goal < self.bbm.nbits else 0
        if want < 16:
            return
        ino = inode.ino
        self._map_zeroed(tx, inode, t, next_lblk, want, goal)
        old = self.eof_blocks.get(ino)
        first = next_lblk
        if old is not None and old[0] == inode.generation:
            first = min(first, old[1])
        rec = (inode.generation, first, next_lblk + want)
        tx.commit_hook(lambda: self.eof_blocks.__setitem__(ino, rec))

    def _map_zeroed(self, tx, inode: Inode, t: ExtentTree, lblk: int, n: int, goal) -> int:
        """Allocate `n` blocks near `goal` for file blocks [lblk, lblk+n),
        zeroed whole (flushed; the transaction's data fence makes them
        durable before the extents that map them), mapped and charged to
        the inode.  Returns the image block after the last one."""
        tx.data_fence = True
        for q, m in self.balloc.alloc(tx, n, goal):
            self.img.prefault(q * BLOCK_SIZE, m * BLOCK_SIZE)
            self.img.zero(q * BLOCK_SIZE, m * BLOCK_SIZE, drain=False)
            t.insert(tx, lblk, m, q)
            inode.blocks += m
            lblk += m
            goal = q + m
        return goal

    def _trim_eof_blocks(self, ino: int) -> bool:
        """Free what is left past EOF of a file's speculative preallocation
        (True if there was some)."""
        rec = self.eof_blocks.pop(ino, None)
        if rec is None or self.readonly:
            return False
        gen, first, end = rec
        inode = self.iget(ino)
        if inode.generation != gen or not stat.S_ISREG(inode.mode) or not inode.nlink:
            return False  # freed and reused, or unlinked (its reclaim frees everything)
        first = max(first, -(-inode.size // BLOCK_SIZE))
        t = self.tree(inode)
        end = min(end, t.end_block())
        if first >= end:
            return False
        with self.tx("trim-eof") as tx:
            self._mod(tx, inode)
            t = self.tree(inode)
            for p, n in t.remove(tx, first, end - first):
                self.balloc.free_blocks(tx, p, n)
                inode.blocks -= n
        return True

    @_op
    def fsync(self, ino: int, datasync: bool = False) -> None:
        """Make every earlier write of `ino` durable (and its metadata).

        Size and block changes are transactions already, so what may be
        pending is only time stamps: fdatasync leaves them (POSIX allows
        it) and costs one fence.  A transaction ends with a fence, which
        makes every earlier flush durable too: no second one after it."""
        commits = self.wal.commits
        if not datasync and ino in self.lazy:
            self._flush_lazy_one(ino)
        if self.wal.commits == commits:
            self.img.fence()

    def _flush_lazy_one(self, ino: int) -> None:
        inode = self.lazy.pop(ino, None)
        if inode is None or self.readonly or inode.mode == 0:
            return
        with self.tx("inode-times") as tx:
            self._mod(tx, inode)

    #: inodes with time changes kept in DRAM before they are written (a
    #: bound on the memory they hold; `flush_lazy` then writes them all)
    LAZY_MAX = 1024
    #: inodes written per transaction by flush_lazy
    LAZY_BATCH = 64

    def _lazy(self, inode: Inode) -> None:
        """Keep `inode`'s new time stamps in DRAM: written by fsync, by the
        daemon's housekeeping every 5 s, at unmount, with the inode's next
        transaction, or when LAZY_MAX inodes wait."""
        lazy = self.lazy
        lazy[inode.ino] = inode
        if len(lazy) > self.LAZY_MAX and self.wal.active is None:
            self.flush_lazy()

    def flush_lazy(self) -> None:
        """Write every pending time change, LAZY_BATCH inodes per
        transaction (one by one if a batch fails)."""
        lazy = self.lazy
        if self.readonly:
            lazy.clear()
            return
        while lazy:
            batch = [lazy.pop(ino) for ino in list(itertools.islice(lazy, self.LAZY_BATCH))]
            try:
                with self.tx("inode-times") as tx:
                    for inode in batch:
                        if inode.mode:
                            self._mod(tx, inode)
                continue
            except (FormatError, OSError):
                pass  # aborted: write them one by one
            for inode in batch:
                lazy[inode.ino] = inode
                try:
                    self._flush_lazy_one(inode.ino)
                except (FormatError, OSError) as e:
                    log.error("could not write inode %d: %s", inode.ino, e)

    def sync(self) -> None:
        """Everything durable (syncfs); unlinked inodes waiting for a batch
        are freed too."""
        self.flush_lazy()
        self.drain_reclaim()
        self.img.fence()

    #: copy_range copies through DRAM in pieces of this size
    COPY_CHUNK = 8 << 20

    @_op
    def copy_range(self, ino_in: int, off_in: int, ino_out: int, off_out: int,
                   length: int) -> int:
        """copy_file_range(2): copy up to `length` bytes of `ino_in` at
        `off_in` to `ino_out` at `off_out`, as reads and writes (holes are
        copied as zeros); returns the count copied, 0 at the source's EOF.
        A failure after some bytes were copied ends the copy short, like a
        short write."""
        if off_in < 0 or off_out < 0 or length < 0:
            raise _err(errno.EINVAL)
        for ino in (ino_in, ino_out):
            mode = self.iget(ino).mode
            if not stat.S_ISREG(mode):
                raise _err(errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL)
        done = 0
        while done < length:
            data = self.read(ino_in, off_in + done, min(self.COPY_CHUNK, length - done))
            if not data:
                break
            if ino_in == ino_out and type(data) is not bytes:
                data = bytes(data)  # a view of the blocks the write may change
            try:
                n = self.write(ino_out, off_out + done, data)
            except OSError:
                if done:
                    break
                raise
            done += n
            if n < len(data):
                break
        return done

    @_op
    def seek(self, ino: int, off: int, whence: int) -> int:
        """lseek(2) SEEK_DATA / SEEK_HOLE: the first offset >= `off` in data
        (a mapped block) or in a hole (an unmapped block, or the implicit
        hole at EOF).  ENXIO when `off` is not inside the file; a block
        fallocate zeroed counts as data, as on ext4 after a write."""
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise _err(errno.EINVAL)
        inode = self.iget(ino)
        if not stat.S_ISREG(inode.mode):
            raise _err(errno.EINVAL)
        size = inode.size
        if off < 0 or off >= size:
            raise _err(errno.ENXIO)
        if inode.flags & I_INLINE:
            return off if whence == os.SEEK_DATA else size
        t = self.tree(inode)
        lb = off >> 12
        last = (size - 1) >> 12
        while lb <= last:
            r = t.lookup(lb)
            if r[0] is not None:           # lb is mapped: (start, length, image block)
                if whence == os.SEEK_DATA:
                    return max(off, lb << 12)
                lb = r[0] + r[1]
            else:                          # a hole of r[1] blocks (None: no extent follows)
                if whence == os.SEEK_HOLE:
                    return max(off, lb << 12)
                if r[1] is None:
                    break
                lb += r[1]
        if whence == os.SEEK_HOLE:
            return size
        raise _err(errno.ENXIO)

    @_op
    def fallocate(self, ino: int, mode: int, off: int, length: int) -> None:
        inode = self.iget(ino)
        if off < 0 or length <= 0:
            raise _err(errno.EINVAL)
        if stat.S_ISDIR(inode.mode):
            raise _err(errno.EISDIR)
        if not stat.S_ISREG(inode.mode):
            raise _err(errno.ENODEV)
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) or (
                mode & FALLOC_FL_PUNCH_HOLE and mode & FALLOC_FL_ZERO_RANGE):
            raise _err(errno.EOPNOTSUPP)
        end = off + length
        if end > MAX_FILE_SIZE:
            raise _err(errno.EFBIG)
        # the blocks past EOF are the caller's from now on: never trimmed
        self.eof_blocks.pop(ino, None)
        if mode & FALLOC_FL_PUNCH_HOLE:
            if not mode & FALLOC_FL_KEEP_SIZE:
                raise _err(errno.EOPNOTSUPP)
            self._punch(inode, off, end)
            return
        lb0 = off >> 12
        lb1 = (end - 1) >> 12
        t = self.tree(inode)
        segs = t.map_range(lb0, lb1 - lb0 + 1)
        need = sum(k for _s, k, p in segs if p == 0)
        if need > self.balloc.free and self.reclaim_queue:
            self.drain_reclaim()
        if need > self.balloc.free:
            raise NoSpace()
        now = time.time_ns()
        if mode & FALLOC_FL_ZERO_RANGE:
            # the mapped blocks of the range are zeroed in place: a data
            # change like a write of zeros (flushed here, fenced by the
            # transaction below); the holes get zeroed blocks like mode 0
            for s, k, p in segs:
                if p:
                    a = max(off, s * BLOCK_SIZE)
                    b = min(end, (s + k) * BLOCK_SIZE)
                    self.img.zero(p * BLOCK_SIZE + (a - s * BLOCK_SIZE), b - a, drain=False)
        chunks = list(self._chunks(segs)) or [[]]
        # one transaction per HOLES_PER_TX holes; the size changes with the
        # last one (a crash part-way leaves zeroed blocks past EOF, which
        # the next truncate frees)
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            with self.tx("fallocate") as tx:
                self._mod(tx, inode)
                t = self.tree(inode)
                goal = None
                for s, k, p in chunk:
                    if p:
                        goal = p + k
                        continue
                    if goal is None:
                        goal = t.goal_for(s)
                    goal = self._map_zeroed(tx, inode, t, s, k, goal)
                tx.data_fence = True
                if last and not mode & FALLOC_FL_KEEP_SIZE and end > inode.size:
                    self._zero_tail(inode, inode.size, end)
                    inode.size = end
                    inode.mtime = now
                if mode & FALLOC_FL_ZERO_RANGE:
                    inode.mtime = now  # the data changed
                inode.ctime = now

    def _punch(self, inode: Inode, off: int, end: int) -> None:
        size = inode.size
        end = min(end, max(size, end))
        t = self.tree(inode)
        # zero the partial blocks at the edges in place (data)
        first_full = -(-off // BLOCK_SIZE)
        last_full = end // BLOCK_SIZE
        for a, b in ((off, min(end, first_full * BLOCK_SIZE)),
                     (max(off, last_full * BLOCK_SIZE), end)):
            if b <= a:
                continue
            for s, k, p in t.map_range(a >> 12, ((b - 1) >> 12) - (a >> 12) + 1):
                if p == 0:
                    continue
                sa = max(a, s * BLOCK_SIZE)
                sb = min(b, (s + k) * BLOCK_SIZE)
                self.img.zero(p * BLOCK_SIZE + (sa - s * BLOCK_SIZE), sb - sa, drain=False)
            if first_full * BLOCK_SIZE >= end:
                break
        now = time.time_ns()
        with self.tx("punch") as tx:
            self._mod(tx, inode)
            tx.data_fence = True
            if last_full > first_full:
                for p, n in t.remove(tx, first_full, last_full - first_full):
                    self.balloc.free_blocks(tx, p, n)
                    inode.blocks -= n
            inode.mtime = inode.ctime = now

    # ------------------------------------------------------------------
    # extended attributes
    # ------------------------------------------------------------------
    def _xattrs(self, inode: Inode) -> list[tuple[bytes, bytes]]:
        if not inode.xattr:
            return []
        b = inode.xattr
        if not self.data_start <= b < self.total_blocks:
            raise FormatError(f"inode {inode.ino}: xattr block {b} outside the data area")
        return decode_xattr_block(self.fsseed, b, self.img.read(b * BLOCK_SIZE, BLOCK_SIZE),
                                  inode.ino)

    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        if not name:
            raise _err(errno.EINVAL)
        if len(name) > XATTR_NAME_MAX:
            raise _err(errno.ERANGE)
        if not name.startswith(_XATTR_NAMESPACES):
            raise _err(errno.EOPNOTSUPP)
        if name in _XATTR_NAMESPACES:
            raise _err(errno.EINVAL)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        v = self.find_xattr(ino, name)
        if v is None:
            raise _err(errno.ENODATA)
        return v

    @_op
    def find_xattr(self, ino: int, name: bytes) -> bytes | None:
        """getxattr, with None for an absent attribute: the kernel asks for
        security.capability before every write to a file, and the answer is
        almost always "none" -- no exception for it."""
        self._check_xattr_name(name)
        inode = self.iget(ino)
        if not inode.xattr:
            return None
        if name.startswith(b"user.") and not (stat.S_ISREG(inode.mode)
                                              or stat.S_ISDIR(inode.mode)):
            return None
        for k, v in self._xattrs(inode):
            if k == name:
                return v
        return None

    @_op
    def listxattr(self, ino: int) -> list[bytes]:
        return [k for k, _v in self._xattrs(self.iget(ino))]

    @_op
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self._check_xattr_name(name)
        if len(value) > XATTR_SIZE_MAX:
            raise _err(errno.E2BIG)
        inode = self.iget(ino)
        if name.startswith(b"user.") and not (stat.S_ISREG(inode.mode)
                                              or stat.S_ISDIR(inode.mode)):
            raise _err(errno.EPERM)
        items = self._xattrs(inode)
        idx = next((i for i, (k, _v) in enumerate(items) if k == name), -1)
        if flags & XATTR_CREATE and idx >= 0:
            raise _err(errno.EEXIST)
        if flags & XATTR_REPLACE and idx < 0:
            raise _err(errno.ENODATA)
        if idx >= 0:
            items[idx] = (name, bytes(value))
        else:
            items.append((name, bytes(value)))
        if xattr_entries_size(items) > XATTR_SPACE:
            raise _err(errno.ENOSPC, "no room for the extended attribute")
        self._store_xattrs(inode, items)

    @_op
    def removexattr(self, ino: int, name: bytes) -> None:
        self._check_xattr_name(name)
        inode = self.iget(ino)
        if name.startswith(b"user.") and not (stat.S_ISREG(inode.mode)
                                              or stat.S_ISDIR(inode.mode)):
            raise _err(errno.EPERM)
        items = self._xattrs(inode)
        new = [(k, v) for k, v in items if k != name]
        if len(new) == len(items):
            raise _err(errno.ENODATA)
        self._store_xattrs(inode, new)

    def _store_xattrs(self, inode: Inode, items) -> None:
        now = time.time_ns()
        with self.tx("xattr") as tx:
            self._mod(tx, inode)
            if not items:
                if inode.xattr:
                    self.balloc.free_blocks(tx, inode.xattr, 1)
                    inode.blocks -= 1
                    inode.xattr = 0
            else:
                if not inode.xattr:
                    (b, _n), = self.balloc.alloc(tx, 1, None)
                    inode.xattr = b
                    inode.blocks += 1
                b = inode.xattr
                tx.write(b * BLOCK_SIZE, encode_xattr_block(self.fsseed, b, inode.ino, items))
            inode.ctime = now

    # ------------------------------------------------------------------
    # whole file system
    # ------------------------------------------------------------------
    def statfs(self) -> dict:
        if self.reclaim_queue:
            self.drain_reclaim()  # df after rm shows the space freed
        data_blocks = self.total_blocks - self.data_start
        return {
            "f_bsize": BLOCK_SIZE, "f_frsize": BLOCK_SIZE, "f_blocks": data_blocks,
            "f_bfree": self.bbm.free, "f_bavail": self.bbm.free,
            "f_files": self.inode_count - 1, "f_ffree": self.ibm.free,
            "f_favail": self.ibm.free, "f_namemax": MAX_NAME,
        }

    @_op
    def access(self, ino: int, mask: int, ctx: Ctx = ROOT_CTX) -> None:
        """access(2) semantics for `ctx` (EACCES if denied)."""
        inode = self.iget(ino)
        if mask == os.F_OK:
            return
        if mask & os.W_OK and self.readonly:
            raise _err(errno.EROFS)
        mode = inode.mode
        if ctx.uid == 0:
            if mask & os.X_OK and not stat.S_ISDIR(mode) and not mode & 0o111:
                raise _err(errno.EACCES)
            return
        if ctx.uid == inode.uid:
            bits = (mode >> 6) & 7
        elif ctx.gid == inode.gid or inode.gid in ctx.groups:
            bits = (mode >> 3) & 7
        else:
            bits = mode & 7
        if mask & ~bits & 7:
            raise _err(errno.EACCES)

    def st_blocks(self, inode: Inode) -> int:
        return inode.blocks * (BLOCK_SIZE // 512)


def struct_size_check() -> None:  # pragma: no cover - import-time sanity
    assert struct.calcsize("<Q") == 8
