"""Per-inode extent maps: a B+tree from file blocks to image blocks.

The root lives in the inode (up to 7 entries); other nodes are 4 KiB blocks
of up to 254 entries.  Leaf entries are extents (file block, length, image
block); index entries are (first file block of the child, 0, child block).
Depth 0 means the root itself holds the extents.  Lookup is a bisect per
level; holes are simply ranges no extent covers.  Adjacent extents that
are contiguous on both sides are merged when inserted.

All changes happen under a WAL transaction: modified nodes are encoded at
commit (`tx_flush`), new nodes are allocated from the block allocator and
charged to the inode's block count, emptied nodes are freed.  If the
transaction aborts the owner drops this object (the inode snapshot restores
the root) and reloads it from the image.
"""

from __future__ import annotations

from bisect import bisect_right

from .layout import (BLOCK_SIZE, EXT_NODE_MAX, EXT_ROOT_MAX, FormatError, Inode,
                     decode_extent_node, decode_root_entries, encode_extent_node,
                     encode_root_entries)

MAX_EXTENT_LEN = (1 << 32) - 1


class _Node:
    __slots__ = ("block", "depth", "entries", "keys")

    def __init__(self, block: int, depth: int, entries: list):
        self.block = block  # 0 = the root in the inode
        self.depth = depth
        self.entries = entries
        self.keys = [e[0] for e in entries]

    def rekey(self) -> None:
        self.keys = [e[0] for e in self.entries]


class ExtentTree:
    """The extent map of one inode (held by the file-system core)."""

    def __init__(self, vol, inode: Inode):
        self.vol = vol
        self.inode = inode
        self.nodes: dict[int, _Node] = {}
        self._dirty: set[int] = set()
        self.root = _Node(0, inode.depth, decode_root_entries(inode.root, inode.count))
        if inode.depth > 8:
            raise FormatError(f"inode {inode.ino}: extent tree depth {inode.depth}")

    # -- reading ---------------------------------------------------------
    def _node(self, block: int, depth: int) -> _Node:
        n = self.nodes.get(block)
        if n is None:
            vol = self.vol
            if not vol.data_start <= block < vol.total_blocks:
                raise FormatError(f"inode {self.inode.ino}: extent node {block} outside "
                                  f"the data area")
            d, ents = decode_extent_node(vol.fsseed, block,
                                         vol.img.read(block * BLOCK_SIZE, BLOCK_SIZE),
                                         self.inode.ino)
            if d != depth:
                raise FormatError(f"inode {self.inode.ino}: extent node {block} has depth "
                                  f"{d}, expected {depth}")
            n = _Node(block, d, ents)
            self.nodes[block] = n
        return n

    def _path(self, lblk: int) -> list[tuple[_Node, int]]:
        """[(node, index of the entry followed)] from the root to a leaf.

        At the leaf the index is the position of the last extent starting at
        or before lblk (-1 if none)."""
        path = []
        node = self.root
        while node.depth > 0:
            i = bisect_right(node.keys, lblk) - 1
            if i < 0:
                i = 0
            path.append((node, i))
            if not node.entries:
                raise FormatError(f"inode {self.inode.ino}: empty extent index node")
            node = self._node(node.entries[i][2], node.depth - 1)
        path.append((node, bisect_right(node.keys, lblk) - 1))
        return path

    def lookup(self, lblk: int):
        """(extent start, length, image block) of the extent holding lblk, or
        (None, hole length up to the next extent or None if none follows)."""
        path = self._path(lblk)
        leaf, i = path[-1]
        ents = leaf.entries
        if i >= 0:
            s, n, p = ents[i]
            if lblk < s + n:
                return (s, n, p)
        if i + 1 < len(ents):
            return (None, ents[i + 1][0] - lblk)
        nxt = self._next_key(path)
        return (None, None if nxt is None else nxt - lblk)

    def _next_key(self, path) -> int | None:
        """First key of the subtree right of the leaf of `path`."""
        for node, i in reversed(path[:-1]):
            if i + 1 < len(node.entries):
                return node.entries[i + 1][0]
        return None

    def map_range(self, lblk: int, count: int) -> list[tuple[int, int, int]]:
        """Cover [lblk, lblk+count) with (file block, length, image block or 0
        for a hole) segments, in order."""
        out = []
        end = lblk + count
        pos = lblk
        while pos < end:
            r = self.lookup(pos)
            if r[0] is None:
                hole = r[1]
                n = end - pos if hole is None else min(hole, end - pos)
                out.append((pos, n, 0))
            else:
                s, n, p = r
                k = min(s + n, end) - pos
                out.append((pos, k, p + (pos - s)))
                n = k
            pos += n
        return out

    def extents(self):
        """Yield every extent (file block, length, image block) in order."""
        yield from self._walk(self.root)

    def _walk(self, node: _Node):
        if node.depth == 0:
            yield from node.entries
            return
        for _k, _z, child in list(node.entries):
            yield from self._walk(self._node(child, node.depth - 1))

    def node_blocks(self):
        """Yield the image blocks of every non-root node."""
        yield from self._walk_nodes(self.root)

    def _walk_nodes(self, node: _Node):
        if node.depth == 0:
            return
        for _k, _z, child in list(node.entries):
            yield child
            yield from self._walk_nodes(self._node(child, node.depth - 1))

    def last_extent(self):
        node = self.root
        while node.depth > 0:
            if not node.entries:
                return None
            node = self._node(node.entries[-1][2], node.depth - 1)
        return node.entries[-1] if node.entries else None

    def end_block(self) -> int:
        """One past the last mapped file block (0 if nothing is mapped)."""
        e = self.last_extent()
        return e[0] + e[1] if e else 0

    def goal_for(self, lblk: int) -> int | None:
        """An image block to allocate file block lblk near (contiguity)."""
        path = self._path(lblk)
        leaf, i = path[-1]
        if i >= 0:
            s, n, p = leaf.entries[i]
            return p + (lblk - s)
        if leaf.entries:
            s, n, p = leaf.entries[0]
            return max(self.vol.data_start, p - (s - lblk))
        return None

    # -- modification ----------------------------------------------------
    def _mark(self, tx, node: _Node) -> None:
        self._dirty.add(node.block)
        tx.add(("extents", self.inode.ino), self)

    def insert(self, tx, lblk: int, count: int, pblk: int) -> None:
        """Map [lblk, lblk+count) -> [pblk, ...); the range must be a hole."""
        while count > 0:
            n = min(count, MAX_EXTENT_LEN)
            self._insert_one(tx, lblk, n, pblk)
            lblk += n
            pblk += n
            count -= n

    def _insert_one(self, tx, lblk: int, count: int, pblk: int) -> None:
        path = self._path(lblk)
        leaf, i = path[-1]
        ents = leaf.entries
        if i >= 0:
            s, n, p = ents[i]
            if lblk < s + n:
                raise AssertionError(f"extent insert over mapped block {lblk}")
        if i + 1 < len(ents) and ents[i + 1][0] < lblk + count:
            raise AssertionError(f"extent insert over mapped block {ents[i + 1][0]}")
        merged = False
        if i >= 0:
            s, n, p = ents[i]
            if s + n == lblk and p + n == pblk and n + count <= MAX_EXTENT_LEN:
                ents[i] = (s, n + count, p)
                merged = True
                # now maybe also touches the successor
                if i + 1 < len(ents):
                    s2, n2, p2 = ents[i + 1]
                    s, n, p = ents[i]
                    if s + n == s2 and p + n == p2 and n + n2 <= MAX_EXTENT_LEN:
                        ents[i] = (s, n + n2, p)
                        del ents[i + 1]
        if not merged and i + 1 < len(ents):
            s2, n2, p2 = ents[i + 1]
            if lblk + count == s2 and pblk + count == p2 and n2 + count <= MAX_EXTENT_LEN:
                ents[i + 1] = (lblk, n2 + count, pblk)
                merged = True
        if not merged:
            ents.insert(i + 1, (lblk, count, pblk))
        leaf.rekey()
        self._mark(tx, leaf)
        self._fix_keys(tx, path)
        self._split_if_needed(tx, path)

    def _cap(self, node: _Node) -> int:
        return EXT_ROOT_MAX if node.block == 0 else EXT_NODE_MAX

    def _fix_keys(self, tx, path) -> None:
        """Make each index entry's key the first key of its child."""
        for level in range(len(path) - 2, -1, -1):
            node, i = path[level]
            child = path[level + 1][0]
            if not child.entries:
                continue
            k = child.entries[0][0]
            e = node.entries[i]
            if e[0] != k:
                node.entries[i] = (k, 0, e[2])
                node.rekey()
                self._mark(tx, node)

    def _split_if_needed(self, tx, path) -> None:
        for level in range(len(path) - 1, -1, -1):
            node, _i = path[level]
            if len(node.entries) <= self._cap(node):
                return
            if node.block == 0:
                self._grow_root(tx)
                # the old root's entries now live in a new child, which may
                # itself need a split (it cannot: 8 <= 254)
                return
            parent, pi = path[level - 1]
            half = len(node.entries) // 2
            new_block = self._alloc_node(tx)
            right = _Node(new_block, node.depth, node.entries[half:])
            node.entries = node.entries[:half]
            node.rekey()
            self.nodes[new_block] = right
            self._mark(tx, node)
            self._mark(tx, right)
            parent.entries.insert(pi + 1, (right.entries[0][0], 0, new_block))
            parent.rekey()
            self._mark(tx, parent)

    def _grow_root(self, tx) -> None:
        root = self.root
        blk = self._alloc_node(tx)
        child = _Node(blk, root.depth, root.entries)
        self.nodes[blk] = child
        self._mark(tx, child)
        root.depth += 1
        root.entries = [(child.entries[0][0], 0, blk)]
        root.rekey()
        self._mark(tx, root)
        if len(child.entries) > EXT_NODE_MAX:  # pragma: no cover - cannot happen
            raise AssertionError("root overflow")

    def _alloc_node(self, tx) -> int:
        vol = self.vol
        goal = None
        last = self.root.entries[-1] if self.root.depth == 0 and self.root.entries else None
        if last:
            goal = last[2] + last[1]
        (blk, _n), = vol.balloc.alloc(tx, 1, goal)
        self.inode.blocks += 1
        return blk

    def _free_node(self, tx, block: int) -> None:
        self.vol.balloc.free_blocks(tx, block, 1)
        self.inode.blocks -= 1
        self.nodes.pop(block, None)
        self._dirty.discard(block)

    def remove(self, tx, lblk: int, count: int) -> list[tuple[int, int]]:
        """Unmap [lblk, lblk+count); returns the freed image ranges
        [(image block, length)] (the caller frees them)."""
        end = lblk + count
        freed: list[tuple[int, int]] = []
        pos = lblk
        while pos < end:
            path = self._path(pos)
            leaf, i = path[-1]
            nxt = self._next_key(path)
            ents = leaf.entries
            new = []
            changed = False
            for e in ents:
                s, n, p = e
                es = s + n
                if es <= pos or s >= end:
                    new.append(e)
                    continue
                changed = True
                a = max(s, pos)
                b = min(es, end)
                if s < a:
                    new.append((s, a - s, p))
                freed.append((p + (a - s), b - a))
                if b < es:
                    new.append((b, es - b, p + (b - s)))
            if changed:
                leaf.entries = new
                leaf.rekey()
                self._mark(tx, leaf)
                if not new:
                    self._drop_empty(tx, path)
                else:
                    self._fix_keys(tx, path)
                    self._split_if_needed(tx, path)
            if nxt is None or nxt >= end:
                break
            pos = nxt
        self._shrink_root(tx)
        return freed

    def _drop_empty(self, tx, path) -> None:
        """Remove emptied nodes bottom-up (the root may become empty)."""
        for level in range(len(path) - 1, 0, -1):
            node, _i = path[level]
            if node.entries:
                self._fix_keys(tx, path[:level + 1])
                return
            parent, pi = path[level - 1]
            self._free_node(tx, node.block)
            del parent.entries[pi]
            parent.rekey()
            self._mark(tx, parent)
        root = self.root
        if not root.entries and root.depth:
            root.depth = 0
            self._mark(tx, root)

    def _shrink_root(self, tx) -> None:
        root = self.root
        while root.depth > 0 and len(root.entries) == 1:
            child = self._node(root.entries[0][2], root.depth - 1)
            if len(child.entries) > EXT_ROOT_MAX:
                return
            root.entries = list(child.entries)
            root.depth = child.depth
            root.rekey()
            self._free_node(tx, child.block)
            self._mark(tx, root)
        if root.depth > 0 and not root.entries:
            root.depth = 0
            self._mark(tx, root)

    def remove_all(self, tx) -> list[tuple[int, int]]:
        """Unmap everything and free every node; returns the freed data ranges."""
        freed = list(self.extents())
        for blk in list(self.node_blocks()):
            self._free_node(tx, blk)
        self.root = _Node(0, 0, [])
        self.nodes.clear()
        self._dirty = {0}
        tx.add(("extents", self.inode.ino), self)
        return [(p, n) for _s, n, p in freed]

    def tx_flush(self, tx) -> None:
        vol = self.vol
        ino = self.inode.ino
        for block in sorted(self._dirty):
            if block == 0:
                root = self.root
                self.inode.root = encode_root_entries(root.entries)
                self.inode.depth = root.depth
                self.inode.count = len(root.entries)
                vol.inode_dirty(tx, self.inode)
            else:
                node = self.nodes[block]
                tx.write(block * BLOCK_SIZE,
                         encode_extent_node(vol.fsseed, block, ino, node.depth, node.entries))
        self._dirty.clear()

    def count_extents(self) -> int:
        return sum(1 for _ in self.extents())
