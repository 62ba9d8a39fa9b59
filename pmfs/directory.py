"""Directories: entries in the directory's own blocks, indexed in DRAM.

A directory's data is a sequence of 4 KiB blocks mapped by its extent tree
like a file's.  Each block is tiled by records (layout.DIRENT): live
records (ino != 0) carry a name; free records (ino == 0) are space.  Every
record has its own checksum, seeded with the directory's inode number and
the record's offset, so an entry is written (and logged) alone.

Records never move: a live record's offset within the directory is its
identity, which makes readdir offsets stable under concurrent creates and
deletes.  Inserting splits a free record; deleting turns the record free
and merges it with free neighbours in the same block.

Lookup does not scan: the first access to a directory reads its blocks once
and builds a DRAM index (name -> inode, type, offset) plus a map of the free
records; the core keeps a bounded LRU of these indexes.  "." and ".." are
not stored: "." is the directory itself and ".." is its inode's `parent`.
"""

from __future__ import annotations

from bisect import bisect_left, insort

from .layout import (BLOCK_SIZE, DIRENT, DIRENT_MIN, FormatError, dirent_size,
                     encode_dirent, parse_dirent_block)


class Directory:
    """The DRAM index of one directory."""

    __slots__ = ("vol", "ino", "inode", "entries", "free", "free_end", "by_size", "sizes",
                 "nblocks", "nsubdirs", "_order", "_order_pos", "_pblks")

    def __init__(self, vol, inode, nblocks: int):
        self.vol = vol
        self.ino = inode.ino
        self.inode = inode
        self.nblocks = nblocks
        self.entries: dict[bytes, tuple[int, int, int]] = {}  # name -> (ino, ftype, pos)
        self.free: dict[int, int] = {}  # pos -> rec_len
        self.free_end: dict[int, int] = {}  # end pos -> pos
        self.by_size: dict[int, set[int]] = {}  # rec_len -> {pos}
        self.sizes: list[int] = []  # sorted keys of by_size
        self.nsubdirs = 0
        self._order = None  # [(pos, name)] sorted, built for readdir
        self._order_pos = None
        #: directory block -> image block, as looked up (a directory's
        #: blocks never move while it lives; see forget_blocks)
        self._pblks: dict[int, int] = {}

    # -- loading ---------------------------------------------------------
    def load(self) -> None:
        """Scan every block and build the index (FormatError if damaged)."""
        for lblk, pblk in self.blocks():
            base = lblk * BLOCK_SIZE
            raw = self.vol.img.read(pblk * BLOCK_SIZE, BLOCK_SIZE)
            for off, ino, rec_len, ftype, name in parse_dirent_block(self.vol.fsseed,
                                                                     self.ino, base, raw):
                pos = base + off
                if ino:
                    if name in self.entries:
                        raise FormatError(f"directory {self.ino}: duplicate name {name!r}")
                    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
                        raise FormatError(f"directory {self.ino}: illegal name {name!r}")
                    self.entries[name] = (ino, ftype, pos)
                    if ftype == 4:  # DT_DIR
                        self.nsubdirs += 1
                else:
                    self._add_free(pos, rec_len)

    def blocks(self):
        """Yield (directory block index, image block) of every block."""
        for s, n, p in self.vol.tree(self.inode).map_range(0, self.nblocks):
            if p == 0:
                raise FormatError(f"directory {self.ino}: hole at block {s}")
            for k in range(n):
                yield s + k, p + k

    def _pblk(self, lblk: int) -> int:
        p = self._pblks.get(lblk)
        if p is not None:
            return p
        r = self.vol.tree(self.inode).lookup(lblk)
        if r[0] is None:
            raise FormatError(f"directory {self.ino}: hole at block {lblk}")
        s, _n, p = r
        p += lblk - s
        self._pblks[lblk] = p
        return p

    def forget_blocks(self, from_lblk: int) -> None:
        """Drop the cached mappings of blocks >= from_lblk (a growth undone)."""
        for k in [k for k in self._pblks if k >= from_lblk]:
            del self._pblks[k]

    def _img_off(self, pos: int) -> int:
        return self._pblk(pos // BLOCK_SIZE) * BLOCK_SIZE + pos % BLOCK_SIZE

    # -- free-record bookkeeping --------------------------------------------
    def _add_free(self, pos: int, rec_len: int) -> None:
        self.free[pos] = rec_len
        self.free_end[pos + rec_len] = pos
        s = self.by_size.get(rec_len)
        if s is None:
            s = self.by_size[rec_len] = set()
            insort(self.sizes, rec_len)
        s.add(pos)

    def _del_free(self, pos: int) -> int:
        rec_len = self.free.pop(pos)
        del self.free_end[pos + rec_len]
        s = self.by_size[rec_len]
        s.discard(pos)
        if not s:
            del self.by_size[rec_len]
            del self.sizes[bisect_left(self.sizes, rec_len)]
        return rec_len

    def _find_free(self, need: int) -> int:
        """Offset of a free record of at least `need` bytes, or -1."""
        sizes = self.sizes
        i = bisect_left(sizes, need)
        if i == len(sizes):
            return -1
        return next(iter(self.by_size[sizes[i]]))

    # -- queries ------------------------------------------------------------
    def lookup(self, name: bytes):
        """(ino, ftype, pos) or None."""
        return self.entries.get(name)

    def __len__(self) -> int:
        return len(self.entries)

    def iter_from(self, pos: int):
        """Yield (pos, ino, ftype, name) of live records at offsets >= pos, in
        offset order (from the index: the blocks were verified when it was
        built)."""
        if not self.entries:
            return
        if self._order is None:
            self._order = sorted((e[2], name) for name, e in self.entries.items())
            self._order_pos = [p for p, _n in self._order]
        entries = self.entries
        for p, name in self._order[bisect_left(self._order_pos, pos):]:
            e = entries.get(name)
            if e is not None and e[2] == p:
                yield p, e[0], e[1], name

    # -- changes (under a transaction) ------------------------------------------
    def add(self, tx, name: bytes, ino: int, ftype: int) -> int:
        """Insert an entry; returns its offset.  May grow the directory by a
        block (through `vol.dir_grow`)."""
        need = dirent_size(len(name))
        pos = self._find_free(need)
        if pos < 0:
            pos = self.vol.dir_grow(tx, self)
            self._add_free(pos, BLOCK_SIZE)
            self._write_free(tx, pos, BLOCK_SIZE)
        rec_len = self._del_free(pos)
        rest = rec_len - need
        if rest >= DIRENT_MIN:
            self._add_free(pos + need, rest)
            self._write_free(tx, pos + need, rest)
            rec_len = need
        tx.write(self._img_off(pos),
                 encode_dirent(self.vol.fsseed, self.ino, pos, ino, rec_len, ftype, name))
        self.entries[name] = (ino, ftype, pos)
        self._order = None
        if ftype == 4:
            self.nsubdirs += 1
        tx.abort_hook(self.vol.dir_invalidate_fn(self.ino))
        return pos

    def remove(self, tx, name: bytes) -> tuple[int, int]:
        """Delete an entry; returns its (ino, ftype)."""
        ino, ftype, pos = self.entries.pop(name)
        self._order = None
        if ftype == 4:
            self.nsubdirs -= 1
        tx.abort_hook(self.vol.dir_invalidate_fn(self.ino))
        raw = tx.read(self._img_off(pos), DIRENT.size)
        _i, rec_len, _nl, _ft, _c = DIRENT.unpack(raw)
        start, length = pos, rec_len
        # merge with a free record right after (same block)
        nxt = pos + rec_len
        if nxt % BLOCK_SIZE and nxt in self.free:
            length += self._del_free(nxt)
        # and with one right before
        if pos % BLOCK_SIZE and pos in self.free_end:
            prev = self.free_end[pos]
            length += self._del_free(prev)
            start = prev
        self._add_free(start, length)
        self._write_free(tx, start, length)
        return ino, ftype

    def replace(self, tx, name: bytes, ino: int, ftype: int) -> int:
        """Point an existing entry at another inode (rename over a target);
        returns the inode it pointed at."""
        old_ino, old_ft, pos = self.entries[name]
        raw = tx.read(self._img_off(pos), DIRENT.size)
        _i, rec_len, _nl, _ft, _c = DIRENT.unpack(raw)
        tx.write(self._img_off(pos),
                 encode_dirent(self.vol.fsseed, self.ino, pos, ino, rec_len, ftype, name))
        self.entries[name] = (ino, ftype, pos)
        self.nsubdirs += (ftype == 4) - (old_ft == 4)
        tx.abort_hook(self.vol.dir_invalidate_fn(self.ino))
        return old_ino

    def _write_free(self, tx, pos: int, rec_len: int) -> None:
        tx.write(self._img_off(pos),
                 encode_dirent(self.vol.fsseed, self.ino, pos, 0, rec_len, 0, b""))
