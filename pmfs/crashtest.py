"""The crash explorer: prove every promise of pmfs against every crash state.

A *workload* is a short sequence of POSIX operations on a small,
pre-populated file system.  `run_workload` runs it against the core
(`FileSystem`) on a `TracingImage`, which records every store, flush and
fence; each operation is bracketed by "op-begin"/"op-end" marks.  Then, at
every fence (and at the end of the trace), `pmfs.crashsim` builds the crash
images the persistence model allows -- the durable image, the durable image
plus every in-flight (flushed, unfenced) line, and the durable image plus
every subset of 1..k dirty lines (flushed or only stored: a cache eviction
can write those), at cache-line granularity, lines persisted in program
order -- and every distinct image is checked:

1. **recovery**: mounted as mount.pmfs would (superblock selection, WAL
   replay, orphan processing);
2. **consistency**: fsck in check-only mode (`pmfs.fsck.check`, when that
   module exists) plus a structural *consistency walk* (every directory
   listable, every inode readable, link counts equal references, no block
   used twice, bitmaps agree with what is reachable, WAL and orphan list
   empty after mount);
3. **oracle**: the file-system state (tree, names, types, modes, sizes,
   contents, link counts, xattrs, symlink targets) must be one the model
   allows: the state before or after the operation in flight, with every
   promise of the operations that returned kept (see `Model`);
4. **new work**: the recovered image must accept creates, writes, renames
   and deletes, and be consistent after a clean unmount.

The *model* is the oracle.  Metadata operations are synchronous: durable
and atomic on return.  A plain write() is not durable on return: each file
keeps `layers`, the contents it may show after a crash (every byte of the
file must equal that byte of some layer long enough to hold it) and the
sizes it may have.  An overwrite adds a layer (each byte old or new); an
append or a write into a hole adds a layer and a size (the old size, or the
new size with the new data -- never unwritten bytes: what the owner never
wrote reads as zero); fsync/fdatasync collapse the file to its current
content.

Besides crash states, every run also checks:

* **pending** (pmemcheck-style, `unpersisted`): when a metadata operation
  or fsync returns, none of its stores may still be unflushed or
  unfenced; a plain write may leave its data flushed-but-unfenced, never
  unflushed;
* **semantics**: the live file system and the model agree after every
  operation (same errors, same state), so the oracle itself is checked;
* **recovery crashes**: for every transaction, the crash image with its log
  record durable and nothing applied is recovered on a tracing image, and
  that recovery is crashed at every fence and recovered again.

Cost: a state differs from its crash point's durable image in one or two
lines.  A *full check* mounts a private copy of the image on a tracking
image that logs every read and write.  A state whose patched lines were
never read by the full check of a "base" image (the durable image, or the
durable image plus the patched lines that were read) -- except by the
read-back of file contents -- is *derived* from that check: same result,
with the patched bytes substituted into the file contents they map to.
This is exact (the check is deterministic and never looked at those bytes)
and makes the many data-line states cheap.  Identical images (equal
`crashsim` keys, also across crash points) are checked once.

Entry points: `run_workload`, `run_workloads` (multiprocessing),
`seq_workloads` (ACE-style), `random_workload`, `parse_workload`,
`unpersisted`; the command-line tool is tools/crashtest and docs/CRASH.md
describes both.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import stat
import sys
import time
import traceback
from array import array
from dataclasses import dataclass, field, replace

from .crashsim import CrashSimulator, CrashState
from .layout import BLOCK_SIZE, CACHELINE, I_INLINE, ROOT_INO, SB_NEEDS_FSCK, FormatError, \
    Inode, compute_geometry
from .pmem import EV_FENCE, EV_MARK, EV_STORE, Image, MemoryImage, TracingImage

_L = CACHELINE
_FULL = (1 << _L) - 1

# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """How a workload is explored."""

    image_size: int = 2 << 20
    inodes: int = 48
    #: subsets of up to k dirty lines per crash point
    k: int = 2
    #: cap on the states of a crash point (the single-line states are always
    #: all built; beyond them the k-subsets are a fixed-seed sample); None:
    #: every k-subset (the default: derivation makes it affordable)
    max_states: int | None = None
    #: word-granular tearing of multi-word stores (see crashsim)
    torn: bool = False
    max_torn: int = 32
    #: crash the recovery of logged-not-applied transactions: all | first | none
    recovery: str = "all"
    #: derive states that differ only in lines the check never read
    fast: bool = True
    #: after the checks, create/write/delete on the recovered image
    new_work: bool = True
    #: the pmemcheck-style check at the end of every operation
    pending_check: bool = True
    #: compare the live file system with the model after every operation
    live_check: bool = True
    #: "auto": pmfs.fsck when importable, plus the consistency walk;
    #: "walk": the consistency walk only; "fsck": require pmfs.fsck
    fsck: str = "auto"
    seed: int = 0
    #: only these crash points (reproducers); None: every fence
    points: tuple | None = None
    #: violations kept per workload (all are counted)
    keep: int = 5
    #: full-check every derived state too and fail if they disagree (tests)
    verify_fast: bool = False


CI_CONFIG = Config()

# --------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------

#: argument kinds: p path, i int, s string, f rename flags, m fallocate
#: mode, o octal mode
OPSPEC = {
    "creat": "p", "mkdir": "p", "symlink": "ps", "link": "pp", "unlink": "p",
    "rmdir": "p", "rename": "ppf", "write": "piii", "truncate": "pi",
    "falloc": "pmii", "setxattr": "pss", "removexattr": "ps", "chmod": "po",
    "fsync": "p", "fdatasync": "p", "openunlink": "p", "hold": "p",
    # unlinked while open, freed later in a batch (MountOptions.reclaim_batch)
    "deferunlink": "p", "reclaim": "",
}
RENAME_FLAGS = {"0": 0, "noreplace": 1, "exchange": 2}
FALLOC_MODES = {"0": 0, "keep": 1, "punch": 3, "zero": 0x10, "zerokeep": 0x11}
#: operations that are not synchronous (the data of a plain write)
DATA_OPS = ("write",)


@dataclass(frozen=True)
class Op:
    name: str
    args: tuple

    def __str__(self) -> str:
        out = [self.name]
        for kind, a in zip(OPSPEC[self.name], self.args):
            if kind == "f":
                out.append({v: k for k, v in RENAME_FLAGS.items()}[a])
            elif kind == "m":
                out.append({v: k for k, v in FALLOC_MODES.items()}[a])
            elif kind == "o":
                out.append(f"{a:o}")
            else:
                out.append(str(a))
        if self.name == "rename" and self.args[2] == 0:
            out.pop()
        return " ".join(out)

    @property
    def path(self) -> str:
        return self.args[0] if self.args else ""


def parse_op(text: str) -> Op:
    parts = text.split()
    if not parts or parts[0] not in OPSPEC:
        raise ValueError(f"unknown operation {text!r} (known: {', '.join(OPSPEC)})")
    name, words = parts[0], parts[1:]
    spec = OPSPEC[name]
    if name == "rename" and len(words) == 2:
        words.append("0")
    if len(words) != len(spec):
        raise ValueError(f"{name} takes {len(spec)} arguments ({spec}): {text!r}")
    args = []
    for kind, w in zip(spec, words):
        if kind == "i":
            args.append(int(w, 0))
        elif kind == "f":
            args.append(RENAME_FLAGS[w])
        elif kind == "m":
            args.append(FALLOC_MODES[w])
        elif kind == "o":
            args.append(int(w, 8))
        else:
            args.append(w)
    return Op(name, tuple(args))


@dataclass(frozen=True)
class Workload:
    name: str
    ops: tuple
    #: the log before the workload: "empty" (as after mkfs) or "wrap" (its
    #: head a few hundred bytes before the end of the circular log area: the
    #: workload's first record wraps, behind a SKIP record)
    log: str = "empty"

    def __str__(self) -> str:
        text = "; ".join(str(o) for o in self.ops)
        return text if self.log == "empty" else f"log={self.log}: {text}"


LOG_STATES = ("empty", "wrap")


def parse_workload(text: str, name: str = "cli") -> Workload:
    """'creat A/x; write A/x 0 300 1; fsync A/x' -> Workload; a prefix
    'log=wrap:' sets the log state (see Workload)."""
    log = "empty"
    t = text.strip()
    if t.startswith("log="):
        head, _sep, t = t.partition(":")
        log = head[4:].strip()
        if log not in LOG_STATES:
            raise ValueError(f"unknown log state {log!r} ({', '.join(LOG_STATES)})")
    ops = tuple(parse_op(x.strip()) for x in t.split(";") if x.strip())
    return Workload(name, ops, log)


def fill_log(fs, how: str = "wrap") -> int:
    """Move the head of the log of a mounted `fs` to just before the end of
    the log area (how="wrap"), with transactions on /lost+found that leave
    the tree as it was (but its mode).  Returns the number of transactions."""
    if how == "empty":
        return 0
    if how != "wrap":
        raise ValueError(f"unknown log state {how!r}")
    wal = fs.wal
    area = wal.area_size
    lf = fs.lookup(ROOT_INO, b"lost+found").ino
    n = 0

    def gap():
        return area - wal.head_pos % area

    def step(fn, *a, **kw):
        nonlocal n
        before = gap()
        fn(*a, **kw)
        n += 1
        after = gap()
        if after > before or n > 100000:
            raise AssertionError("the log wrapped while being filled")
        return before - after
    # big steps: replace a 200-byte xattr value (a few lines per record)
    step(fs.setxattr, lf, b"user.fill", b"f" * 200)
    v = b"g"
    while gap() > 4000:
        step(fs.setxattr, lf, b"user.fill", v * 200)
        v = b"f" if v == b"g" else b"g"
    step(fs.removexattr, lf, b"user.fill")
    # small steps (inode-only transactions) until the next one would be the
    # last to fit
    mode = 0o750
    while True:
        d = step(fs.setattr, lf, mode=mode)
        mode ^= 0o050
        if gap() < 2 * d:
            break
    fs.setattr(lf, mode=0o700)  # as mkfs made it (a small record: still fits)
    wal.checkpoint()
    return n


_PATTERNS: dict[int, bytes] = {}


def data_for(tag: int, off: int, n: int) -> bytes:
    """Deterministic, never-zero, position-dependent data of write `tag`."""
    p = _PATTERNS.get(tag)
    if p is None:
        p = _PATTERNS[tag] = bytes(((i * 7 + tag * 31) % 255) + 1 for i in range(255)) * 2
    s = off % 255
    reps = (n + s) // 255 + 1
    return (p[s:255] + p[:255] * reps)[:n]


# --------------------------------------------------------------------------
# the starting tree
# --------------------------------------------------------------------------

#: how the pre-populated starting tree is made (on a fresh file system)
SETUP = (
    "mkdir A; mkdir B; mkdir A/C; creat A/foo; write A/foo 0 5000 101; "
    "setxattr A/foo user.k v0; creat A/bar; write A/bar 0 100 102; creat B/baz; "
    "write B/baz 0 3000 103; truncate B/baz 1000; link A/bar B/hl; "
    "symlink B/sym ../A/foo; creat junk; write junk 0 16384 199; unlink junk"
)

_BASE_CACHE: dict = {}


def base_image(cfg: Config, log: str = "empty") -> bytes:
    """The starting tree on a fresh, cleanly unmounted image (cached).

    B/baz was written to 3000 bytes and truncated to 1000: its block holds
    stale bytes past EOF.  `junk` was written and deleted: the first free
    data blocks hold non-zero garbage, so a missing zeroing shows.
    log="wrap": the same with the log's head just before the end of its
    area (see Workload)."""
    key = (cfg.image_size, cfg.inodes, log)
    b = _BASE_CACHE.get(key)
    if b is None and log == "wrap":
        from .fs import FileSystem
        img = MemoryImage(base_image(cfg))
        fs = FileSystem(img)
        fill_log(fs, "wrap")
        fs.close()
        b = _BASE_CACHE[key] = img.snapshot()
    if b is None:
        from mkfs import make_filesystem
        from .fs import FileSystem
        img = MemoryImage(cfg.image_size)
        make_filesystem(img, compute_geometry(cfg.image_size, cfg.inodes))
        fs = FileSystem(img)
        for op in parse_workload(SETUP).ops:
            err = execute(fs, op)
            if err:
                raise RuntimeError(f"setup {op}: {os.strerror(err)}")
        fs.close()
        b = _BASE_CACHE[key] = img.snapshot()
    return b


# --------------------------------------------------------------------------
# running operations on the file system
# --------------------------------------------------------------------------


def _lookup(fs, path: str) -> int:
    ino = ROOT_INO
    for comp in path.split("/"):
        ino = fs.lookup(ino, comp.encode()).ino
    return ino


def _parent(fs, path: str) -> tuple[int, bytes]:
    parts = path.split("/")
    ino = ROOT_INO
    for comp in parts[:-1]:
        ino = fs.lookup(ino, comp.encode()).ino
    return ino, parts[-1].encode()


def execute(fs, op: Op) -> int:
    """Run `op` on FileSystem `fs`; returns 0 or the errno it failed with."""
    a = op.args
    try:
        n = op.name
        if n == "creat":
            p, name = _parent(fs, a[0])
            fs.create(p, name, 0o644)
        elif n == "mkdir":
            p, name = _parent(fs, a[0])
            fs.mkdir(p, name, 0o755)
        elif n == "symlink":
            p, name = _parent(fs, a[0])
            fs.symlink(p, name, a[1].encode())
        elif n == "link":
            src = _lookup(fs, a[0])
            p, name = _parent(fs, a[1])
            fs.link(src, p, name)
        elif n == "unlink":
            p, name = _parent(fs, a[0])
            fs.unlink(p, name)
        elif n in ("openunlink", "deferunlink"):
            if n == "deferunlink":  # the release queues the inode for a batch
                fs.opts.reclaim_batch = max(fs.opts.reclaim_batch, 64)
            ino = _lookup(fs, a[0])
            p, name = _parent(fs, a[0])
            fs.open(ino)
            try:
                fs.unlink(p, name)
            finally:
                fs.release(ino)
        elif n == "reclaim":  # the queued inodes freed in one transaction
            fs.drain_reclaim()
        elif n == "hold":  # open, never released: unlinked later, an orphan
            fs.open(_lookup(fs, a[0]))
        elif n == "rmdir":
            p, name = _parent(fs, a[0])
            fs.rmdir(p, name)
        elif n == "rename":
            p1, n1 = _parent(fs, a[0])
            p2, n2 = _parent(fs, a[1])
            fs.rename(p1, n1, p2, n2, a[2])
        elif n == "write":
            ino = _lookup(fs, a[0])
            data = data_for(a[3], a[1], a[2])
            w = fs.write(ino, a[1], data)
            if w != len(data):
                raise OSError(errno.ENOSPC, f"short write {w}")
        elif n == "truncate":
            fs.setattr(_lookup(fs, a[0]), size=a[1])
        elif n == "falloc":
            fs.fallocate(_lookup(fs, a[0]), a[1], a[2], a[3])
        elif n == "setxattr":
            fs.setxattr(_lookup(fs, a[0]), a[1].encode(), a[2].encode())
        elif n == "removexattr":
            fs.removexattr(_lookup(fs, a[0]), a[1].encode())
        elif n == "chmod":
            fs.setattr(_lookup(fs, a[0]), mode=a[1])
        elif n in ("fsync", "fdatasync"):
            fs.fsync(_lookup(fs, a[0]), datasync=(n == "fdatasync"))
        else:  # pragma: no cover - OPSPEC and this agree
            raise ValueError(n)
    except OSError as e:
        return e.errno or errno.EIO
    return 0


# --------------------------------------------------------------------------
# the model (the oracle)
# --------------------------------------------------------------------------


class FileData:
    """What a regular file may contain after a crash (immutable).

    `cur` is its exact content now; `layers` the contents it may show (byte
    b may hold layer[b] of any layer longer than b); `sizes` the sizes it may
    have.  `cur` is always one of the layers."""

    __slots__ = ("cur", "layers", "sizes")

    def __init__(self, cur: bytes, layers=None, sizes=None):
        self.cur = bytes(cur)
        self.layers = (self.cur,) if layers is None else layers
        self.sizes = frozenset((len(self.cur),)) if sizes is None else frozenset(sizes)

    @staticmethod
    def _uniq(layers) -> tuple:
        out = []
        for x in layers:
            if x not in out:
                out.append(x)
        return tuple(out)

    def write(self, off: int, data: bytes) -> "FileData":
        cur = self.cur
        if off > len(cur):
            cur = cur + bytes(off - len(cur))
        new = cur[:off] + data + cur[off + len(data):]
        return FileData(new, self._uniq(self.layers + (new,)), self.sizes | {len(new)})

    def sync(self) -> "FileData":
        return FileData(self.cur)

    def truncate(self, size: int) -> "FileData":
        def cut(x):
            return x[:size] + bytes(max(0, size - len(x)))
        return FileData(cut(self.cur), self._uniq(tuple(cut(x) for x in self.layers)),
                        {size})

    def extend(self, end: int) -> "FileData":
        def ext(x):
            return x + bytes(end - len(x)) if len(x) < end else x
        return FileData(ext(self.cur), self._uniq(tuple(ext(x) for x in self.layers)),
                        {max(s, end) for s in self.sizes})

    def punch(self, off: int, end: int) -> "FileData":
        def z(x):
            if off >= len(x):
                return x
            e = min(end, len(x))
            return x[:off] + bytes(e - off) + x[e:]
        return FileData(z(self.cur), self._uniq(tuple(z(x) for x in self.layers)), self.sizes)

    def either_bytes(self, other: "FileData") -> "FileData":
        """Each byte from either, the size one of this file's (for a data
        change in place that is not atomic and does not change the size)."""
        return FileData(self.cur, self._uniq(self.layers + other.layers), self.sizes)

    @property
    def exact(self) -> bool:
        return len(self.layers) == 1

    def mismatch(self, data: bytes) -> str | None:
        """Why `data` is not a content this file may have (None if it may)."""
        n = len(data)
        if n not in self.sizes:
            return f"size {n}, expected {_fmt_set(self.sizes)}"
        layers = self.layers
        for x in layers:
            if len(x) >= n and x[:n] == data:
                return None
        bad = []
        for a in range(0, n, _L):
            e = min(n, a + _L)
            chunk = data[a:e]
            if any(len(x) >= e and x[a:e] == chunk for x in layers):
                continue
            for b in range(a, e):
                v = data[b]
                if not any(len(x) > b and x[b] == v for x in layers):
                    if bad and bad[-1][1] == b:
                        bad[-1][1] = b + 1
                    else:
                        bad.append([b, b + 1])
        if not bad:
            return None
        a, b = bad[0]
        exp = self.cur[a:min(b, a + 16)]
        return (f"bytes {a}..{b} hold {data[a:min(b, a + 16)].hex(' ')}"
                f"{' ..' if b - a > 16 else ''} (expected e.g. {exp.hex(' ') or 'EOF'}; "
                f"{len(bad)} bad range(s), {len(layers)} acceptable version(s))")


def _fmt_set(s) -> str:
    s = sorted(s)
    return str(s[0]) if len(s) == 1 else "one of " + ", ".join(map(str, s))


@dataclass(frozen=True)
class Node:
    kind: str  # "f" regular, "d" directory, "l" symlink, "o" other
    perm: int
    xattrs: tuple = ()  # sorted ((name, value), ...)
    target: bytes = b""
    data: FileData | None = None


class Model:
    """The state the file system must be in: a tree of `Node`s.

    Node ids of the starting tree are its inode numbers; new nodes get ids
    from 10**6 up (ids only have to be consistent, not equal to inodes)."""

    def __init__(self):
        self.nodes: dict = {}
        self.dirs: dict = {}  # dir id -> {name: id}
        self.parent: dict = {}  # dir id -> parent dir id
        self.next_id = 10 ** 6

    def copy(self) -> "Model":
        m = Model.__new__(Model)
        m.nodes = dict(self.nodes)
        m.dirs = {k: dict(v) for k, v in self.dirs.items()}
        m.parent = dict(self.parent)
        m.next_id = self.next_id
        return m

    @classmethod
    def from_obs(cls, obs: "Obs") -> "Model":
        m = cls()
        m.nodes[ROOT_INO] = _node_of(obs.inodes[ROOT_INO])
        m.dirs[ROOT_INO] = {}
        m.parent[ROOT_INO] = ROOT_INO
        for path in sorted(obs.paths, key=lambda p: p.count("/")):
            ino = obs.paths[path]
            pdir, name = m._resolve_parent(path)
            m.dirs[pdir][name] = ino
            if ino not in m.nodes:
                m.nodes[ino] = _node_of(obs.inodes[ino])
                if m.nodes[ino].kind == "d":
                    m.dirs[ino] = {}
                    m.parent[ino] = pdir
        return m

    # -- queries -----------------------------------------------------------
    def _resolve_parent(self, path: str):
        parts = path.split("/")
        cur = ROOT_INO
        for comp in parts[:-1]:
            cur = self.dirs[cur][comp]
        return cur, parts[-1]

    def lookup(self, path: str) -> tuple[int, int | None]:
        cur = ROOT_INO
        for comp in path.split("/"):
            if self.nodes[cur].kind != "d":
                return errno.ENOTDIR, None
            nxt = self.dirs[cur].get(comp)
            if nxt is None:
                return errno.ENOENT, None
            cur = nxt
        return 0, cur

    def lookup_parent(self, path: str):
        parts = path.split("/")
        cur = ROOT_INO
        for comp in parts[:-1]:
            if self.nodes[cur].kind != "d":
                return errno.ENOTDIR, None, None
            nxt = self.dirs[cur].get(comp)
            if nxt is None:
                return errno.ENOENT, None, None
            cur = nxt
        if self.nodes[cur].kind != "d":
            return errno.ENOTDIR, None, None
        return 0, cur, parts[-1]

    def paths(self) -> dict[str, int]:
        out = {}
        stack = [(ROOT_INO, "")]
        while stack:
            d, pre = stack.pop()
            for name, nid in self.dirs[d].items():
                p = pre + name
                out[p] = nid
                if self.nodes[nid].kind == "d":
                    stack.append((nid, p + "/"))
        return out

    def nlinks(self) -> dict[int, int]:
        n = {ROOT_INO: 2}
        for d, ents in self.dirs.items():
            n.setdefault(d, 2)
            for nid in ents.values():
                if self.nodes[nid].kind == "d":
                    n[d] = n.get(d, 2) + 1
                    n.setdefault(nid, 2)
                else:
                    n[nid] = n.get(nid, 0) + 1
        return n

    def _is_ancestor(self, anc: int, d: int) -> bool:
        seen = 0
        while True:
            if d == anc:
                return True
            if d == ROOT_INO or seen > len(self.dirs):
                return False
            d = self.parent[d]
            seen += 1

    def _names(self, nid: int) -> int:
        return sum(1 for ents in self.dirs.values() for x in ents.values() if x == nid)

    def _drop_name(self, d: int, name: str) -> None:
        nid = self.dirs[d].pop(name)
        node = self.nodes[nid]
        if node.kind == "d":
            del self.nodes[nid]
            del self.dirs[nid]
            del self.parent[nid]
        elif not self._names(nid):
            del self.nodes[nid]

    def _new(self, node: Node) -> int:
        nid = self.next_id
        self.next_id += 1
        self.nodes[nid] = node
        return nid

    # -- transitions -------------------------------------------------------
    def apply(self, op: Op):
        """(errno or 0, models acceptable while `op` is in flight, model after)."""
        post = self.copy()
        err, inflight = post._do(op, self)
        if err:
            return err, [self], self
        if inflight is None:
            inflight = [self, post]
        return 0, inflight, post

    def _do(self, op: Op, pre: "Model"):
        a = op.args
        n = op.name
        if n in ("creat", "mkdir", "symlink"):
            err, p, name = self.lookup_parent(a[0])
            if err:
                return err, None
            if name in self.dirs[p]:
                return errno.EEXIST, None
            if n == "creat":
                nid = self._new(Node("f", 0o644, data=FileData(b"")))
            elif n == "mkdir":
                nid = self._new(Node("d", 0o755))
                self.dirs[nid] = {}
                self.parent[nid] = p
            else:
                nid = self._new(Node("l", 0o777, target=a[1].encode()))
            self.dirs[p][name] = nid
            return 0, None
        if n == "link":
            err, src = self.lookup(a[0])
            if err:
                return err, None
            err, p, name = self.lookup_parent(a[1])
            if err:
                return err, None
            if self.nodes[src].kind == "d":
                return errno.EPERM, None
            if name in self.dirs[p]:
                return errno.EEXIST, None
            self.dirs[p][name] = src
            return 0, None
        if n == "reclaim":
            return 0, [pre]  # frees unnamed inodes only: nothing visible changes
        if n in ("unlink", "openunlink", "deferunlink"):
            if n != "unlink":
                err, _x = self.lookup(a[0])
                if err:
                    return err, None
            err, p, name = self.lookup_parent(a[0])
            if err:
                return err, None
            nid = self.dirs[p].get(name)
            if nid is None:
                return errno.ENOENT, None
            if self.nodes[nid].kind == "d":
                return errno.EISDIR, None
            self._drop_name(p, name)
            return 0, None
        if n == "rmdir":
            err, p, name = self.lookup_parent(a[0])
            if err:
                return err, None
            nid = self.dirs[p].get(name)
            if nid is None:
                return errno.ENOENT, None
            if self.nodes[nid].kind != "d":
                return errno.ENOTDIR, None
            if self.dirs[nid]:
                return errno.ENOTEMPTY, None
            self._drop_name(p, name)
            return 0, None
        if n == "rename":
            return self._rename(a[0], a[1], a[2]), None
        # operations on an existing inode
        err, nid = self.lookup(a[0])
        if err:
            return err, None
        node = self.nodes[nid]
        if n == "hold":
            return 0, None
        if n in ("fsync", "fdatasync"):
            if node.kind == "f":
                self.nodes[nid] = replace(node, data=node.data.sync())
            return 0, None
        if n == "chmod":
            self.nodes[nid] = replace(node, perm=a[1] & 0o7777)
            return 0, None
        if n == "setxattr":
            if node.kind not in ("f", "d"):
                return errno.EPERM, None
            x = dict(node.xattrs)
            x[a[1].encode()] = a[2].encode()
            self.nodes[nid] = replace(node, xattrs=tuple(sorted(x.items())))
            return 0, None
        if n == "removexattr":
            x = dict(node.xattrs)
            if a[1].encode() not in x:
                return errno.ENODATA, None
            del x[a[1].encode()]
            self.nodes[nid] = replace(node, xattrs=tuple(sorted(x.items())))
            return 0, None
        # data operations
        if node.kind == "d":
            return errno.EISDIR, None
        if node.kind != "f":
            return {"falloc": errno.ENODEV}.get(n, errno.EINVAL), None
        fd = node.data
        if n == "write":
            fd = fd.write(a[1], data_for(a[3], a[1], a[2]))
        elif n == "truncate":
            fd = fd.truncate(a[1])
        elif n == "falloc":
            mode, off, length = a[1], a[2], a[3]
            end = off + length
            if mode & 2:
                post = fd.punch(off, end)
                self.nodes[nid] = replace(node, data=post)
                # the partial blocks at the edges are zeroed in place (data)
                # before the transaction, which then frees the whole blocks
                # between them: in flight, the edges byte by byte either,
                # the whole blocks still old, the size the old one
                first_full = -(-off // BLOCK_SIZE) * BLOCK_SIZE
                last_full = end // BLOCK_SIZE * BLOCK_SIZE
                edges = fd.punch(off, min(end, first_full))
                if first_full < end:
                    edges = edges.punch(max(off, last_full), end)
                mid = pre.copy()
                mid.nodes[nid] = replace(node, data=fd.either_bytes(edges))
                return 0, [mid, self]
            if mode & 0x10:
                # zero range: the mapped part zeroed in place (data, byte by
                # byte either in flight, the size the old one), then the
                # transaction(s) (blocks; the size with the last)
                zeroed = fd.punch(off, end)
                post = zeroed if mode & 1 else zeroed.extend(end)
                self.nodes[nid] = replace(node, data=post)
                mid = pre.copy()
                mid.nodes[nid] = replace(node, data=fd.either_bytes(zeroed))
                return 0, [mid, self]
            if not mode & 1:
                fd = fd.extend(off + length)
        self.nodes[nid] = replace(node, data=fd)
        return 0, None

    def _rename(self, src: str, dst: str, flags: int) -> int:
        err, p1, n1 = self.lookup_parent(src)
        if err:
            return err
        err, p2, n2 = self.lookup_parent(dst)
        if err:
            return err
        s = self.dirs[p1].get(n1)
        if s is None:
            return errno.ENOENT
        d = self.dirs[p2].get(n2)
        exchange = flags & 2
        if exchange and d is None:
            return errno.ENOENT
        if flags & 1 and d is not None:
            return errno.EEXIST
        if p1 == p2 and n1 == n2:
            return 0
        src_dir = self.nodes[s].kind == "d"
        dst_dir = d is not None and self.nodes[d].kind == "d"
        if src_dir and p2 != p1 and self._is_ancestor(s, p2):
            return errno.EINVAL
        if exchange:
            if dst_dir and p1 != p2 and self._is_ancestor(d, p1):
                return errno.EINVAL
            self.dirs[p1][n1] = d
            self.dirs[p2][n2] = s
            if src_dir:
                self.parent[s] = p2
            if dst_dir:
                self.parent[d] = p1
            return 0
        if d is not None:
            if d == s:
                return 0
            if src_dir and not dst_dir:
                return errno.ENOTDIR
            if not src_dir and dst_dir:
                return errno.EISDIR
            if dst_dir and self.dirs[d]:
                return errno.ENOTEMPTY
            self._drop_name(p2, n2)
        del self.dirs[p1][n1]
        self.dirs[p2][n2] = s
        if src_dir:
            self.parent[s] = p2
        return 0

    def exact(self) -> "Model":
        """This model with every file at its current content only."""
        m = self.copy()
        for nid, node in m.nodes.items():
            if node.kind == "f" and not node.data.exact:
                m.nodes[nid] = replace(node, data=node.data.sync())
        return m


def _node_of(io: "IObs") -> Node:
    return Node(io.kind, io.perm, io.xattrs, io.target,
                FileData(io.data) if io.kind == "f" else None)


# --------------------------------------------------------------------------
# observing a file system
# --------------------------------------------------------------------------

_KIND = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l"}


@dataclass
class IObs:
    kind: str
    perm: int
    nlink: int
    size: int
    data: bytes = b""
    target: bytes = b""
    xattrs: tuple = ()


@dataclass
class Obs:
    """What a (recovered) image looks like, and what was wrong with it."""

    paths: dict = field(default_factory=dict)  # path -> ino
    inodes: dict = field(default_factory=dict)  # ino -> IObs
    problems: list = field(default_factory=list)
    #: image block -> (ino, file block) of regular-file data (derivation)
    blockmap: dict = field(default_factory=dict)
    #: the tracking image of the full check (None for derived observations)
    track: "TrackImage | None" = None
    derived: bool = False


def observe(fs, obs: Obs, track: "TrackImage | None" = None) -> None:
    """Fill `obs` with the tree of `fs` (raises on unreadable metadata)."""
    stack = [(ROOT_INO, "")]
    seen_dirs = {ROOT_INO}
    inodes = obs.inodes
    root = fs.iget(ROOT_INO)
    inodes[ROOT_INO] = _iobs(fs, root, obs, track)
    while stack:
        d, pre = stack.pop()
        for name, ino in sorted(fs.listdir(d).items()):
            path = pre + name.decode(errors="replace")
            obs.paths[path] = ino
            if ino not in inodes:
                inodes[ino] = _iobs(fs, fs.iget(ino), obs, track)
                if inodes[ino].kind == "d" and ino not in seen_dirs:
                    seen_dirs.add(ino)
                    stack.append((ino, path + "/"))


def _iobs(fs, inode: Inode, obs: Obs, track) -> IObs:
    kind = _KIND.get(stat.S_IFMT(inode.mode), "o")
    io = IObs(kind, inode.mode & 0o7777, inode.nlink, inode.size)
    io.xattrs = tuple(sorted(fs._xattrs(inode)))
    if kind == "f":
        # the mapping first (tracked as metadata reads), then the contents
        for s, n, p in fs.tree(inode).extents():
            for k in range(n):
                obs.blockmap[p + k] = (inode.ino, s + k)
        if track is not None:
            track.kind = "c"
        try:
            io.data = bytes(fs.read(inode.ino, 0, inode.size)) if inode.size else b""
        finally:
            if track is not None:
                track.kind = "r"
        if len(io.data) != inode.size:
            raise FormatError(f"inode {inode.ino}: read {len(io.data)} of {inode.size} bytes")
    elif kind == "l":
        io.target = fs.readlink(inode.ino)
    return io


# --------------------------------------------------------------------------
# comparing with the model
# --------------------------------------------------------------------------


def compare(obs: Obs, model: Model, limit: int = 12) -> list[str]:
    """Differences between an observed state and a model ([] = acceptable)."""
    diffs = []
    mp = model.paths()
    op = obs.paths
    n2i: dict = {}
    i2n: dict = {ROOT_INO: ROOT_INO}
    n2i[ROOT_INO] = ROOT_INO
    for path in sorted(set(mp) | set(op)):
        if path not in op:
            diffs.append(f"{path}: missing")
            continue
        if path not in mp:
            diffs.append(f"{path}: unexpected ({_kname(obs.inodes[op[path]].kind)})")
            continue
        nid, ino = mp[path], op[path]
        if n2i.setdefault(nid, ino) != ino:
            other = next(p for p, x in mp.items() if x == nid and p != path)
            diffs.append(f"{path}: should be the same file as {other} (inode {n2i[nid]}), "
                         f"is inode {ino}")
        elif i2n.setdefault(ino, nid) != nid:
            other = next(p for p, x in op.items() if x == ino and p != path)
            diffs.append(f"{path}: is the same inode ({ino}) as {other}, should be a "
                         f"different file")
    nl = model.nlinks()
    first_path = {}
    for path, nid in mp.items():
        first_path.setdefault(nid, path)
    first_path[ROOT_INO] = "/"
    for nid, ino in n2i.items():
        if i2n.get(ino) != nid:
            continue
        node = model.nodes[nid]
        io = obs.inodes[ino]
        where = first_path.get(nid, f"node {nid}")
        if io.kind != node.kind:
            diffs.append(f"{where}: is a {_kname(io.kind)}, expected a {_kname(node.kind)}")
            continue
        if io.perm != node.perm:
            diffs.append(f"{where}: mode {io.perm:o}, expected {node.perm:o}")
        if io.nlink != nl.get(nid):
            diffs.append(f"{where}: link count {io.nlink}, expected {nl.get(nid)}")
        if io.xattrs != node.xattrs:
            diffs.append(f"{where}: xattrs {_fmt_x(io.xattrs)}, expected {_fmt_x(node.xattrs)}")
        if node.kind == "l" and io.target != node.target:
            diffs.append(f"{where}: symlink target {io.target!r}, expected {node.target!r}")
        if node.kind == "f":
            why = node.data.mismatch(io.data)
            if why:
                diffs.append(f"{where}: {why}")
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
    return diffs


def _kname(k: str) -> str:
    return {"f": "file", "d": "directory", "l": "symlink"}.get(k, "special file")


def _fmt_x(x) -> str:
    return "{" + ", ".join(f"{k.decode()}={v.decode(errors='replace')}" for k, v in x) + "}"


# --------------------------------------------------------------------------
# checking one crash image
# --------------------------------------------------------------------------


_BUF_READERS: dict | None = None


def _buf_readers() -> dict:
    """{code object: kind} of the functions known to read `img.buf` directly,
    and what they read."""
    global _BUF_READERS
    if _BUF_READERS is None:
        from .fs import FileSystem
        from .wal import Transaction
        _BUF_READERS = {Transaction.write.__code__: "txwrite",
                        Transaction.entries.__code__: "txentries",
                        FileSystem._new_inode.__code__: "slot"}
    return _BUF_READERS


class TrackImage(Image):
    """An in-memory image (no copy of the bytearray it is given) that logs
    every read and write in order, for the derivation of states."""

    backend = "memory"
    direct_buf = False  # every read of buf is attributed (see below)

    def __init__(self, data: bytearray):
        self._data = data
        self._mv = memoryview(data)
        self.size = len(data)
        self.path = None
        self.readonly = False
        self.log: list = []
        self.kind = "r"  # "r": metadata read, "c": file-contents read
        self.all_read = False
        self._memo: dict = {}

    # A direct access to the bytes is attributed to its call site: the
    # known readers (a transaction staging or diffing its lines, the core
    # peeking at a new inode's slot) log exactly what they read; any other
    # access counts as reading everything (always sound, never derived).
    @property
    def buf(self):
        f = sys._getframe(1)
        kind = _buf_readers().get(f.f_code)
        if kind is None:
            self.all_read = True
        else:
            loc = f.f_locals
            if kind == "txwrite":
                off, n = loc["off"], loc["n"]
                a = off & ~(_L - 1)
                self.log.append((self.kind, a, ((off + n + _L - 1) & ~(_L - 1)) - a))
            elif kind == "txentries":
                for ln in loc["self"].lines:
                    self.log.append((self.kind, ln * _L, _L))
            else:  # "slot": 24 bytes at the start of inode `ino`'s slot
                self.log.append((self.kind, loc["self"].inode_off(loc["ino"]), 24))
        return self._mv

    @buf.setter
    def buf(self, v):
        pass

    @property
    def data(self):
        self.all_read = True
        return self._data

    def read(self, off: int, n: int):
        if off < 0 or off + n > self.size:
            raise ValueError(f"read [{off}, {off + n}) outside the image ({self.size})")
        self.log.append((self.kind, off, n))
        return self._mv[off:off + n]

    def write(self, off: int, data) -> None:
        n = len(data)
        if off < 0 or off + n > self.size:
            raise ValueError(f"write [{off}, {off + n}) outside the image ({self.size})")
        self._mv[off:off + n] = data
        self.log.append(("w", off, n))

    def flush(self, off: int, n: int) -> None:
        pass

    def fence(self) -> None:
        pass

    def snapshot(self) -> bytes:
        self.all_read = True
        return bytes(self._data)

    def close(self) -> None:
        pass

    def freeze(self) -> None:
        """The check is over: keep only its log, compactly (an array of
        (kind, offset, length) triples), and let the image bytes go."""
        codes = {"r": 0, "c": 1, "w": 2}
        flat = array("q")
        for kind, off, n in self.log:
            flat.extend((codes[kind], off, n))
        self.log = flat
        self._data = self._mv = None

    def classify(self, ln: int) -> str:
        """How the check depended on line `ln` of the image it started from:
        "n" not at all, "c" only through the read-back of file contents
        (before anything overwrote the line), "x" otherwise."""
        if self.all_read:
            return "x"
        r = self._memo.get(ln)
        if r is not None:
            return r
        lo = ln * _L
        hi = lo + _L
        mask = 0
        res = "n"
        log = self.log
        if not isinstance(log, array):
            self.freeze()
            log = self.log
        for i in range(0, len(log), 3):
            off = log[i + 1]
            n = log[i + 2]
            if off >= hi or off + n <= lo:
                continue
            kind = log[i]
            if kind == 2:  # a write
                a = max(off, lo) - lo
                b = min(off + n, hi) - lo
                mask |= ((1 << (b - a)) - 1) << a
            elif mask != _FULL:
                if kind == 0 or mask:  # a metadata read, or a partial line
                    res = "x"
                    break
                res = "c"
        self._memo[ln] = res
        return res


_FSCK = None


def fsck_check():
    """pmfs.fsck.check when it exists, else None."""
    global _FSCK
    if _FSCK is None:
        import importlib
        try:
            _mod = importlib.import_module("pmfs.fsck")
            _FSCK = getattr(_mod, "check", False)
        except ModuleNotFoundError as e:
            if e.name != "pmfs.fsck":
                raise
            _FSCK = False
    return _FSCK or None


@contextlib.contextmanager
def quiet_logs():
    """Silence pmfs' logging (damaged images are the point here)."""
    lg = logging.getLogger("pmfs")
    old = lg.level
    lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        lg.setLevel(old)


def _exc(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


def consistency_walk(fs) -> list[str]:
    """Structural checks through a mounted FileSystem (fsck's core, lite)."""
    from .fs import dtype_of
    probs = []
    from .layout import WAL_REC_SKIP, decode_wal_entries, wal_record_header
    try:
        # every committed record still in the log must be applied in place
        for _pos, txid, kind, raw, length in fs.wal.scan():
            if kind == WAL_REC_SKIP:
                continue
            nent = wal_record_header(raw)[3]
            for off, data in decode_wal_entries(raw, nent, length):
                if bytes(fs.img.read(off, len(data))) != bytes(data):
                    probs.append(f"WAL record {txid} is committed but not applied at "
                                 f"byte {off}")
                    break
    except Exception as e:
        probs.append(f"WAL unreadable: {_exc(e)}")
    try:
        orph = fs.orphans()
        if orph:
            probs.append(f"orphan list not empty after mount: {orph}")
    except Exception as e:
        probs.append(f"orphan list unreadable: {_exc(e)}")
    if fs.sb.state & SB_NEEDS_FSCK:
        probs.append("the superblock is flagged for fsck (corruption met)")
    refs: dict = {}
    subdirs: dict = {}
    stack = [ROOT_INO]
    seen = {ROOT_INO}
    while stack:
        d = stack.pop()
        try:
            dinode = fs.iget(d)
            entries = dict(fs.dir(dinode).entries)
        except Exception as e:
            probs.append(f"directory {d} unreadable: {_exc(e)}")
            continue
        for name, (ino, ftype, _pos) in entries.items():
            refs[ino] = refs.get(ino, 0) + 1
            try:
                child = fs.iget(ino)
            except Exception as e:
                probs.append(f"directory {d} entry {name!r} -> inode {ino}: {_exc(e)}")
                continue
            if dtype_of(child.mode) != ftype:
                probs.append(f"directory {d} entry {name!r}: type {ftype} but inode {ino} "
                             f"has mode {child.mode:o}")
            if stat.S_ISDIR(child.mode):
                subdirs[d] = subdirs.get(d, 0) + 1
                if child.parent != d:
                    probs.append(f"directory {ino} ({name!r} in {d}) has parent {child.parent}")
                if ino in seen:
                    probs.append(f"directory {ino} has more than one name")
                else:
                    seen.add(ino)
                    stack.append(ino)
    owner: dict = {}
    ibm, bbm = fs.ibm, fs.bbm
    if not ibm.test(0):
        probs.append("inode 0 (orphan head) is free in the inode bitmap")
    for ino in range(1, fs.inode_count):
        try:
            inode = fs._load_inode(ino)
        except FormatError as e:
            probs.append(str(e))
            continue
        used = inode.mode != 0
        if used != ibm.test(ino):
            probs.append(f"inode {ino}: {'in use' if used else 'free'} but "
                         f"{'free' if used else 'in use'} in the inode bitmap")
        if not used:
            continue
        if ino != ROOT_INO and ino not in refs:
            probs.append(f"inode {ino} (mode {inode.mode:o}) is in use but has no name")
            continue
        if stat.S_ISDIR(inode.mode):
            want = 2 + subdirs.get(ino, 0)
        else:
            want = refs.get(ino, 0)
        if inode.nlink != want:
            probs.append(f"inode {ino}: link count {inode.nlink}, {want} references")
        nblocks = 0
        mine = []
        try:
            if inode.xattr:
                mine.append(inode.xattr)
            if not inode.flags & I_INLINE:
                t = fs.tree(inode)
                for _s, n, p in t.extents():
                    mine.extend(range(p, p + n))
                mine.extend(t.node_blocks())
        except Exception as e:
            probs.append(f"inode {ino}: extent tree unreadable: {_exc(e)}")
        for b in mine:
            nblocks += 1
            if not fs.data_start <= b < fs.total_blocks:
                probs.append(f"inode {ino}: block {b} outside the data area")
            elif b in owner:
                probs.append(f"block {b} used by inode {owner[b]} and inode {ino}")
            else:
                owner[b] = ino
        if nblocks != inode.blocks:
            probs.append(f"inode {ino}: {inode.blocks} blocks charged, {nblocks} owned")
        if stat.S_ISDIR(inode.mode) and inode.size % BLOCK_SIZE:
            probs.append(f"directory {ino}: size {inode.size} not a block multiple")
    for b in range(fs.total_blocks):
        used = b < fs.data_start or b in owner
        if used != bbm.test(b):
            probs.append(f"block {b}: {'in use' if used else 'free'} but "
                         f"{'free' if used else 'in use'} in the block bitmap")
    return probs


def new_work(fs, obs: Obs) -> None:
    """Creates, writes, renames and deletes on a recovered file system."""
    r = ROOT_INO
    d = fs.mkdir(r, b"nw.dir", 0o755).ino
    f = fs.create(d, b"nw.file", 0o644).ino
    data = data_for(250, 0, 6000)
    fs.write(f, 0, data)
    fs.fsync(f)
    fs.setxattr(f, b"user.nw", b"1")
    fs.link(f, r, b"nw.link")
    fs.rename(r, b"nw.link", d, b"nw.link2")
    fs.write(f, 9000, data[:100])
    fs.setattr(f, size=3000)
    got = bytes(fs.read(f, 0, 6000))
    if got != data[:3000]:
        raise AssertionError("new file reads back wrong")
    # an existing file: grow it, then delete one name of it
    files = sorted(p for p, i in obs.paths.items() if obs.inodes[i].kind == "f")
    if files:
        p, name = _parent(fs, files[0])
        ino = fs.lookup(p, name).ino
        fs.write(ino, fs.getattr(ino).size, data[:300])
        fs.unlink(p, name)
    fs.unlink(d, b"nw.link2")
    fs.unlink(d, b"nw.file")
    fs.rmdir(r, b"nw.dir")


def _full_check(image: bytearray, cfg: Config) -> Obs:
    """Recover, check, observe and reuse one crash image (consumes it).

    1. mount (superblock selection, WAL replay, orphan processing), read the
       whole tree, run the consistency walk, unmount cleanly;
    2. fsck in check-only mode (when pmfs.fsck exists);
    3. mount again, do new work, unmount; fsck again (without pmfs.fsck:
       mount again and run the consistency walk).
    """
    from .fs import FileSystem, MountOptions
    timg = TrackImage(image)
    obs = Obs(track=timg)
    probs = obs.problems
    check = fsck_check() if cfg.fsck != "walk" else None
    if cfg.fsck == "fsck" and check is None:
        raise RuntimeError("pmfs.fsck is not available")

    def mount():
        return FileSystem(timg, MountOptions(atime="noatime"))

    def run_fsck(when):
        if check is None:
            return
        try:
            r = check(timg, repair=False, force=True)
            probs.extend(f"fsck{when}: {p}" for p in r.problems)
            if getattr(r, "fatal", None):
                probs.append(f"fsck{when} stopped: {r.fatal}")
        except Exception as e:
            probs.append(f"fsck{when} crashed: {_exc(e)}")

    with quiet_logs():
        try:
            fs = mount()
        except Exception as e:
            probs.append(f"mount failed: {_exc(e)}")
            return obs
        try:
            observe(fs, obs, timg)
        except Exception as e:
            probs.append(f"reading the recovered tree failed: {_exc(e)}")
        probs.extend(consistency_walk(fs))
        try:
            fs.close()
        except Exception as e:
            probs.append(f"unmount after recovery failed: {_exc(e)}")
            return obs
        run_fsck("")
        if not cfg.new_work or probs:
            return obs
        try:
            fs = mount()
            new_work(fs, obs)
            fs.close()
        except Exception as e:
            probs.append(f"new work failed: {_exc(e)}")
            return obs
        if check is None:
            try:
                fs = mount()
                probs.extend(f"after new work: {p}" for p in consistency_walk(fs))
                fs.close()
            except Exception as e:
                probs.append(f"remount after new work failed: {_exc(e)}")
        run_fsck(" after new work")
    return obs


def full_check(image: bytearray, cfg: Config) -> Obs:
    """Recover, check, observe and reuse one crash image (consumes it): see
    `_full_check`.  Only the log of what the check read is kept."""
    obs = _full_check(image, cfg)
    obs.track.freeze()
    return obs


def derive(base: Obs, patch: dict) -> Obs | None:
    """The observation of base's image with `patch` ({line: bytes}) applied,
    if the check of base never depended on those lines (else None)."""
    track = base.track
    if track is None:
        return None
    content = []
    for ln in patch:
        c = track.classify(ln)
        if c == "x":
            return None
        if c == "c":
            content.append(ln)
    obs = Obs(dict(base.paths), dict(base.inodes), list(base.problems), base.blockmap,
              None, True)
    if not content:
        return obs
    changed: dict = {}
    for ln in content:
        off = ln * _L
        hit = base.blockmap.get(off // BLOCK_SIZE)
        if hit is None:
            return None  # read as contents but not mapped: be safe
        ino, lblk = hit
        io = obs.inodes[ino]
        fo = lblk * BLOCK_SIZE + off % BLOCK_SIZE
        if fo >= io.size:
            continue
        buf = changed.get(ino)
        if buf is None:
            buf = changed[ino] = bytearray(io.data)
        e = min(fo + _L, io.size)
        buf[fo:e] = patch[ln][:e - fo]
    for ino, buf in changed.items():
        obs.inodes[ino] = replace(obs.inodes[ino], data=bytes(buf))
    return obs


# --------------------------------------------------------------------------
# the pmemcheck-style check
# --------------------------------------------------------------------------


def stored_lines(events, since: int = 0, until: int | None = None) -> set[int]:
    """The cache lines stored by events[since:until]."""
    mine = set()
    for e in events[since:until]:
        if e[0] == EV_STORE:
            off, n = e[1], len(e[2])
            mine.update(range(off // _L, (off + n - 1) // _L + 1))
    return mine


def unpersisted(timg: TracingImage, since: int, data_op: bool = False,
                must: set | frozenset = frozenset()) -> list[str]:
    """Stores made since event `since` that are still not durable.

    For a metadata operation or fsync nothing it stored may be left
    unflushed or unfenced; for a plain data write (`data_op`), nothing
    unflushed.  `must`: more lines that must be durable now (for fsync, the
    lines earlier writes to the file stored).  [] = all is well."""
    unflushed, unfenced = timg.pending()
    if not unflushed and (data_op or not unfenced):
        return []
    mine = stored_lines(timg.events, since)
    out = []
    uf = sorted(unflushed & mine)
    if uf:
        out.append(f"{len(uf)} line(s) stored but never flushed: {_fmt_lines(uf)}")
    if not data_op:
        ufe = sorted(unfenced & mine)
        if ufe:
            out.append(f"{len(ufe)} line(s) flushed but not fenced: {_fmt_lines(ufe)}")
    if must:
        late = sorted((unflushed | unfenced) & (set(must) - mine))
        if late:
            out.append(f"{len(late)} line(s) of earlier writes to the file are not durable "
                       f"after it returned: {_fmt_lines(late)}")
    return out


def persisted(timg: TracingImage, fn, *args, data_op: bool = False, **kw):
    """Run fn(*args, **kw) on a recording TracingImage's file system and
    raise AssertionError if it returned with a store of its own not durable
    (not flushed, or for metadata operations not fenced).  For tests."""
    if not timg.record:
        raise ValueError("the TracingImage must record events")
    start = len(timg.events)
    r = fn(*args, **kw)
    bad = unpersisted(timg, start, data_op=data_op)
    if bad:
        raise AssertionError(f"{getattr(fn, '__name__', fn)} returned with stores not "
                             f"durable: " + "; ".join(bad))
    return r


def region_of(geo, ln: int) -> str:
    """What lives at line `ln` of an image with geometry `geo`."""
    off = ln * _L
    b = off // BLOCK_SIZE
    if b < 2:
        return f"superblock replica {'AB'[b]}"
    if b == geo.wal_start:
        return "WAL header"
    if b < geo.ibitmap_start:
        return f"WAL log, byte {off - (geo.wal_start + 1) * BLOCK_SIZE}"
    if b < geo.bbitmap_start:
        return "inode bitmap"
    if b < geo.itable_start:
        return "block bitmap"
    if b < geo.data_start:
        ino = (off - geo.itable_start * BLOCK_SIZE) // 256
        return f"inode {ino}" + (" (orphan list head)" if ino == 0 else "")
    return f"data block {b} +{off % BLOCK_SIZE}"


def _fmt_lines(lines, limit: int = 6) -> str:
    s = ", ".join(f"{ln} (byte {ln * _L})" for ln in lines[:limit])
    return s + (f", ... ({len(lines)} in all)" if len(lines) > limit else "")


# --------------------------------------------------------------------------
# running a workload
# --------------------------------------------------------------------------


@dataclass
class Violation:
    kind: str  # state | pending | semantics | live
    workload: str
    message: list
    point: int = -1
    phase: str = "workload"
    op_index: int = -1
    op: str = ""
    where: str = ""
    state_kind: str = ""
    chosen: tuple = ()
    lines: tuple = ()

    def format(self) -> str:
        out = [f"[{self.kind}] workload: {self.workload}"]
        if self.point >= 0:
            out.append(f"  crash point: event {self.point} ({self.phase}); {self.where}")
            out.append(f"  crash state: {self.state_kind}; lines kept beyond the durable "
                       f"image: {', '.join(self.lines) or 'none'}")
        elif self.op:
            out.append(f"  operation {self.op_index}: {self.op}")
        out.extend("  " + m for m in self.message)
        if self.point >= 0:
            pts = self.point if self.phase == "workload" else self.phase.split()[-1]
            out.append(f"  reproduce: tools/crashtest --workload '{self.workload}' "
                       f"--point {pts} -v")
        return "\n".join(out)


@dataclass
class WorkloadResult:
    workload: str
    name: str = ""
    ops: int = 0
    points: int = 0
    states: int = 0
    unique: int = 0
    full: int = 0
    derived: int = 0
    recovery_images: int = 0
    recovery_states: int = 0
    nviolations: int = 0
    seconds: float = 0.0
    violations: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # errno per op (0 = ok)
    log: str = "empty"

    def add(self, v: Violation, keep: int) -> None:
        self.nviolations += 1
        if len(self.violations) < keep:
            self.violations.append(v)


class _Oracle:
    """Which models apply at each crash point of a workload trace."""

    def __init__(self, events, inflight, post, initial):
        self.begin = {}
        self.end = {}
        for i, e in enumerate(events):
            if e[0] == EV_MARK and e[1] in ("op-begin", "op-end"):
                (self.begin if e[1] == "op-begin" else self.end)[e[2]["i"]] = i
        self.inflight = inflight
        self.post = [[m] for m in post]
        self.initial = [initial]
        self.events = events

    def at(self, point: int):
        """(op index, in flight?, [acceptable models], a tag naming them)."""
        last = -1
        for j in sorted(self.begin):
            b = self.begin[j]
            e = self.end.get(j, 1 << 62)
            if b < point < e or (b < point and j not in self.end):
                return j, True, self.inflight[j], ("during", j)
            if e < point:
                last = j
        if last < 0:
            return -1, False, self.initial, ("initial",)
        return last, False, self.post[last], ("after", last)

    def describe(self, point: int, ops) -> str:
        j, flying, _m, _t = self.at(point)
        ev = self.events
        mark = ""
        for i in range(min(point, len(ev)) - 1, -1, -1):
            if ev[i][0] == EV_MARK:
                info = ", ".join(f"{k}={v}" for k, v in ev[i][2].items() if k != "op")
                mark = f"after mark '{ev[i][1]}'" + (f" ({info})" if info else "")
                break
        what = "end of trace" if point >= len(ev) else "before a fence"
        if j < 0:
            return f"{what}, before the first operation"
        if flying:
            return f"{what}, during op {j} '{ops[j]}', {mark}"
        return f"{what}, after op {j} '{ops[j]}' returned"


class _Explorer:
    """Checks the crash states of one workload (shared caches)."""

    def __init__(self, wl: Workload, cfg: Config, res: WorkloadResult, ops):
        self.wl = wl
        self.cfg = cfg
        self.res = res
        self.ops = ops
        self.cache: dict = {}  # image key -> Obs
        self.verdicts: dict = {}  # (key, oracle id) -> diffs or None

    def obs_for(self, sim: CrashSimulator, durable: bytes, st: CrashState) -> Obs:
        key = sim.key_of(durable, st.patch)
        obs = self.cache.get(key)
        if obs is not None:
            return key, obs
        self.res.unique += 1
        obs = None
        if self.cfg.fast and st.patch:
            obs = self._derive(sim, durable, st.patch)
            if obs is not None and obs.track is not None:
                self.cache[key] = obs  # the image itself was fully checked
                return key, obs
        if obs is None or self.cfg.verify_fast:
            img = bytearray(durable)
            for ln, c in st.patch.items():
                img[ln * _L:(ln + 1) * _L] = c
            full = full_check(img, self.cfg)
            self.res.full += 1
            if obs is not None:
                self.res.derived += 1
                if (full.paths, full.inodes, full.problems) != \
                        (obs.paths, obs.inodes, obs.problems):
                    raise AssertionError(f"derived state differs from its full check "
                                         f"(point {st.point}, lines {sorted(st.patch)})")
            obs = full
        else:
            self.res.derived += 1
        self.cache[key] = obs
        return key, obs

    def _base(self, sim, durable, patch) -> Obs:
        key = sim.key_of(durable, patch)
        obs = self.cache.get(key)
        if obs is None or obs.track is None:
            img = bytearray(durable)
            for ln, c in patch.items():
                img[ln * _L:(ln + 1) * _L] = c
            obs = full_check(img, self.cfg)
            self.res.full += 1
            self.cache[key] = obs
        return obs

    def _derive(self, sim, durable, patch) -> Obs | None:
        used: dict = {}
        for _round in range(3):
            base = self._base(sim, durable, used)
            rest = {ln: c for ln, c in patch.items() if ln not in used}
            if not rest:
                return base  # base is the image itself (fully checked)
            if base.track is not None and base.track.all_read:
                return None
            d = derive(base, rest)
            if d is not None:
                return d
            dep = {ln: c for ln, c in rest.items() if base.track.classify(ln) == "x"}
            if len(dep) == len(rest):
                return None
            used.update(dep)
        return None

    def check_states(self, sim: CrashSimulator, oracle: _Oracle | None, phase: str,
                     point_models=None, where: str = "", points=None,
                     models_tag=None) -> None:
        """Check every state of `sim`: against the oracle's models of each point,
        or (a crashed recovery) against `point_models` everywhere."""
        cfg = self.cfg
        res = self.res
        recovery = phase != "workload"
        for point, durable, states in sim.states(points=points, k=cfg.k,
                                                 max_states=cfg.max_states, seed=cfg.seed):
            if recovery:
                res.recovery_states += len(states)
            else:
                res.points += 1
                res.states += len(states)
            if point_models is not None:
                models, tag = point_models, models_tag
            else:
                _j, _f, models, tag = oracle.at(point)
            for st in states:
                key, obs = self.obs_for(sim, durable, st)
                vkey = (key, tag)
                if vkey in self.verdicts:
                    continue
                verdict = self._judge(obs, models)
                self.verdicts[vkey] = verdict
                if verdict is not None:
                    desc = (f"{where}; crashed at recovery event {point}" if recovery
                            else oracle.describe(point, self.ops))
                    res.add(Violation(
                        "state", str(self.wl), verdict, point, phase,
                        where=desc, state_kind=st.kind, chosen=st.chosen,
                        lines=self._describe_lines(st)), cfg.keep)
            if not recovery and cfg.recovery != "none":
                self._maybe_recover(sim, oracle, point, durable)

    def _maybe_recover(self, sim, oracle, point, durable) -> None:
        """At the fence that applies a logged transaction, crash its recovery."""
        ev = sim.events
        if point >= len(ev) or point == 0:
            return
        # the previous fence-or-mark must be "tx-logged": the log record is
        # durable and the in-place stores are not fenced yet
        i = point - 1
        while i >= 0 and ev[i][0] != EV_MARK and ev[i][0] != EV_FENCE:
            i -= 1
        if i < 0 or ev[i][0] != EV_MARK or ev[i][1] != "tx-logged":
            return
        if self.cfg.recovery == "first" and self.res.recovery_images:
            return
        self.res.recovery_images += 1
        _j, _f, models, tag = oracle.at(point)
        where = f"recovering the image of event {point} ({oracle.describe(point, self.ops)})"
        self.recovery_crash(durable, sim.reference, models, where, point, tag)

    def recovery_crash(self, image: bytes, reference: bytes, models, where: str,
                       point: int, tag) -> None:
        from .fs import FileSystem
        timg = TracingImage(MemoryImage(image))
        with quiet_logs():
            try:
                fs = FileSystem(timg)
                fs.wal  # noqa: B018 - mounted: the trace holds the whole recovery
            except Exception as e:
                self.res.add(Violation("state", str(self.wl), [f"mount failed: {_exc(e)}"],
                                       point, "workload", where=where, state_kind="durable"),
                             self.cfg.keep)
                return
        if not any(e[0] == EV_MARK and e[1] == "recover-tx" for e in timg.events):
            return
        sim = CrashSimulator(timg.initial, timg.events, reference=reference,
                             torn=self.cfg.torn, max_torn=self.cfg.max_torn)
        self.check_states(sim, None, f"recovery of event {point}", point_models=models,
                          where=where, models_tag=tag)

    def _judge(self, obs: Obs, models) -> list | None:
        if obs.problems:
            return ["recovered image is not consistent:"] + ["  " + p for p in obs.problems[:12]]
        diffs = []
        for k, m in enumerate(models):
            d = compare(obs, m)
            if not d:
                return None
            diffs.append(d)
        out = []
        labels = (["before the operation", "after the operation"] if len(models) == 2
                  else ["the expected state"] * len(models))
        for lab, d in zip(labels, diffs):
            out.append(f"differs from {lab}:")
            out.extend("  " + x for x in d)
        return out

    def _describe_lines(self, st: CrashState) -> tuple:
        depth = {}
        stores = []
        for c in st.chosen:
            if isinstance(c, tuple) and c[0] == "store":
                stores.append(str(c[1]))
            elif isinstance(c, tuple):
                depth[c[0]] = c[1]
        geo = compute_geometry(self.cfg.image_size, self.cfg.inodes)
        out = []
        for ln in sorted(st.patch):
            d = depth.get(ln, -1)
            at = "" if d == -1 else f", after its store #{d + 1} since the last fence"
            out.append(f"line {ln} = byte {ln * _L} ({region_of(geo, ln)}{at})")
        if stores:
            out.insert(0, f"the whole store(s) of event(s) {', '.join(stores)}:")
        return tuple(out)


def trace_workload(wl: Workload, cfg: Config = CI_CONFIG):
    """Run `wl` on a tracing image.  Returns (TracingImage, errnos, models,
    inflight models, pending/semantic violations)."""
    from .fs import FileSystem, MountOptions
    base = base_image(cfg, wl.log)
    timg = TracingImage(MemoryImage(base), record=False)
    fs = FileSystem(timg, MountOptions(atime="noatime"))
    if timg.pending() != (set(), set()):
        raise RuntimeError("the mount left stores unpersisted")
    timg.initial = bytes(timg.inner.buf)
    timg.record = True
    timg.events = []
    obs0 = Obs()
    observe(fs, obs0)
    model = Model.from_obs(obs0)
    initial = model
    posts, inflights, errs, viol = [], [], [], []
    written: dict = {}  # ino -> lines stored by writes to it
    for i, op in enumerate(wl.ops):
        try:
            ino = _lookup(fs, op.path)
        except OSError:
            ino = None
        timg.mark("op-begin", i=i, op=str(op))
        start = len(timg.events)
        err = execute(fs, op)
        timg.mark("op-end", i=i, err=err)
        errs.append(err)
        must = frozenset()
        if op.name in DATA_OPS and ino is not None:
            written.setdefault(ino, set()).update(stored_lines(timg.events, start))
        elif op.name in ("fsync", "fdatasync") and ino is not None:
            must = written.pop(ino, frozenset())
        if cfg.pending_check:
            bad = unpersisted(timg, start, data_op=op.name in DATA_OPS, must=must)
            if bad:
                viol.append(Violation("pending", str(wl), bad, op_index=i, op=str(op)))
        merr, inflight, post = model.apply(op)
        if merr != err:
            viol.append(Violation("semantics", str(wl), [
                f"the file system returned {_errname(err)}, the model {_errname(merr)}"],
                op_index=i, op=str(op)))
        if cfg.live_check:
            live = Obs()
            try:
                observe(fs, live)
                d = compare(live, post.exact())
            except Exception as e:
                d = [f"reading the live file system failed: {_exc(e)}"]
            if d:
                viol.append(Violation("live", str(wl),
                                      ["the live file system differs from the model:"]
                                      + ["  " + x for x in d], op_index=i, op=str(op)))
        posts.append(post)
        inflights.append(inflight)
        model = post
    return timg, errs, initial, posts, inflights, viol


def _errname(e: int) -> str:
    return "success" if not e else errno.errorcode.get(e, str(e))


def run_workload(wl: Workload, cfg: Config = CI_CONFIG) -> WorkloadResult:
    """Trace `wl`, crash it at every fence, check every crash state."""
    t0 = time.perf_counter()
    res = WorkloadResult(str(wl), wl.name, len(wl.ops))
    res.log = wl.log
    with quiet_logs():
        timg, errs, initial, posts, inflights, viol = trace_workload(wl, cfg)
    res.errors = errs
    for v in viol:
        res.add(v, cfg.keep)
    oracle = _Oracle(timg.events, inflights, posts, initial)
    sim = CrashSimulator(timg.initial, timg.events, torn=cfg.torn, max_torn=cfg.max_torn)
    ex = _Explorer(wl, cfg, res, wl.ops)
    points = None
    if cfg.points is not None:
        points = [p for p in cfg.points if 0 <= p <= len(timg.events)]
    ex.check_states(sim, oracle, "workload", points=points)
    res.seconds = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------
# workload generators
# --------------------------------------------------------------------------

FILES = ("A/foo", "A/bar", "B/baz", "A/new", "B/new")
DIRS = ("A/C", "B/D")


def candidate_ops(model: Model, tag: int = 1) -> list[Op]:
    """ACE-style: the operations worth trying on the small name set, valid
    ones only (the model decides)."""
    ops = []
    files = [p for p in FILES if model.lookup(p)[0] == 0
             and model.nodes[model.lookup(p)[1]].kind == "f"]
    absent = [p for p in FILES + ("A/C/E",) if model.lookup(p)[0] == errno.ENOENT]
    dirs = [p for p in DIRS if model.lookup(p)[0] == 0]
    O = Op  # noqa: N806
    for p in absent:
        ops.append(O("creat", (p,)))
    for p in ("B/D", "A/C/E"):
        ops.append(O("mkdir", (p,)))
    ops.append(O("symlink", ("B/s2", "../A/foo")))
    for s in files:
        for d in ("A/new", "B/new"):
            if d != s:
                ops.append(O("link", (s, d)))
    for p in files + ["B/hl", "B/sym"]:
        ops.append(O("unlink", (p,)))
    for p in dirs:
        ops.append(O("rmdir", (p,)))
    ops.append(O("openunlink", ("A/foo",)))
    if "A/foo" in files:
        ops.append(O("hold", ("A/foo",)))  # then (seq-2) unlinked: an orphan
    # renames: same dir, across, replacing, exchanging, directories
    for s in files[:3]:
        for d in ("A/new", "B/new", "A/bar", "B/baz", "A/foo"):
            if d != s:
                ops.append(O("rename", (s, d, 0)))
    ops.append(O("rename", ("A/foo", "B/baz", 2)))
    ops.append(O("rename", ("A/foo", "A/bar", 2)))
    ops.append(O("rename", ("A/C", "B/D", 0)))
    ops.append(O("rename", ("A/C", "A/D", 0)))
    ops.append(O("rename", ("A/C", "B/baz", 2)))
    ops.append(O("rename", ("B/sym", "A/new", 0)))
    ops.append(O("rename", ("A/bar", "B/hl", 0)))
    for p in files:
        _e, nid = model.lookup(p)
        size = len(model.nodes[nid].data.cur)
        ops.append(O("write", (p, min(100, size // 2), 200, tag)))        # overwrite
        ops.append(O("write", (p, size, 300, tag)))                       # append
        ops.append(O("write", (p, size + 8192, 100, tag)))                # into a hole
        if size > 4000:
            ops.append(O("write", (p, 4000, 200, tag)))                   # across blocks
        if size % BLOCK_SIZE:
            ops.append(O("write", (p, size + 10, 50, tag)))               # past EOF, same block
        ops.append(O("truncate", (p, 0)))
        ops.append(O("truncate", (p, max(1, size // 3))))
        ops.append(O("truncate", (p, size + 2000)))
        ops.append(O("falloc", (p, 0, 0, size + 6000)))
        ops.append(O("falloc", (p, 1, 8192, 8192)))
        if size > 1500:
            ops.append(O("falloc", (p, 3, 1000, 5000)))
            ops.append(O("falloc", (p, 0x10, 1000, size + 3000)))    # zero range, grows
            ops.append(O("falloc", (p, 0x11, 500, 5000)))            # zero range, keep size
    for p, v in (("A/foo", "v1"), ("A/bar", "x"), ("A/C", "dv")):
        ops.append(O("setxattr", (p, "user.k", v)))
    ops.append(O("removexattr", ("A/foo", "user.k")))
    ops.append(O("chmod", ("A/foo", 0o600)))
    ops.append(O("chmod", ("A/C", 0o700)))
    out, seen = [], set()
    for op in ops:
        if op in seen:
            continue
        seen.add(op)
        if model.apply(op)[0] == 0:
            out.append(op)
    return out


_SYNC_TARGET = {"creat": 0, "link": 1, "rename": 1, "write": 0, "truncate": 0, "falloc": 0,
                "setxattr": 0, "symlink": None, "chmod": 0}


def _sync_variants(model_after: Model, op: Op, data_only: bool) -> list[Op]:
    """fsync/fdatasync of the file the operation touched, if it still exists."""
    i = _SYNC_TARGET.get(op.name)
    if i is None:
        return []
    path = op.args[i]
    err, nid = model_after.lookup(path)
    if err or model_after.nodes[nid].kind != "f":
        return []
    out = [Op("fsync", (path,))]
    if op.name in ("write", "truncate", "falloc") and not data_only:
        out.append(Op("fdatasync", (path,)))
    return out


def _initial_model(cfg: Config) -> Model:
    from .fs import FileSystem
    fs = FileSystem(MemoryImage(base_image(cfg)))
    obs = Obs()
    observe(fs, obs)
    return Model.from_obs(obs)


def seq1_workloads(cfg: Config = CI_CONFIG) -> list[Workload]:
    """Every seq-1 workload: one operation, alone or followed by fsync or
    fdatasync of the file it touched."""
    m0 = _initial_model(cfg)
    out = []
    for op in candidate_ops(m0, 1):
        post = m0.apply(op)[2]
        out.append(Workload(f"seq1-{len(out)}", (op,)))
        for s in _sync_variants(post, op, False):
            out.append(Workload(f"seq1-{len(out)}", (op, s)))
    return out


def seq2_workloads(cfg: Config = CI_CONFIG) -> list[Workload]:
    """Every seq-2 workload: two operations, the second followed by an
    fsync of the file it touched when it has one."""
    m0 = _initial_model(cfg)
    out = []
    for op1 in candidate_ops(m0, 1):
        m1 = m0.apply(op1)[2]
        for op2 in candidate_ops(m1, 2):
            m2 = m1.apply(op2)[2]
            syncs = _sync_variants(m2, op2, True)
            ops = (op1, op2) + tuple(syncs[:1])
            out.append(Workload(f"seq2-{len(out)}", ops))
    return out


def sample(workloads: list, n: int, seed: int = 0) -> list:
    """A fixed sample of n workloads (stable across runs)."""
    if n >= len(workloads):
        return list(workloads)
    rng = random.Random(seed)
    idx = sorted(rng.sample(range(len(workloads)), n))
    return [workloads[i] for i in idx]


RANDOM_FILES = tuple(f"{d}/f{i}" for d in ("A", "B", "A/C") for i in range(3)) + \
    ("A/foo", "A/bar", "B/baz", "B/hl")
RANDOM_DIRS = ("A/d0", "B/d0", "A/C", "A/d0/e", "B/d1")


def random_workload(seed: int, nops: int = 12, cfg: Config = CI_CONFIG,
                    invalid: float = 0.05) -> Workload:
    """A random workload: mostly valid operations on a larger name set, with
    random fsyncs; a few invalid ones (their errors must change nothing)."""
    rng = random.Random(seed)
    m = _initial_model(cfg)
    ops = []
    tries = 0
    while len(ops) < nops and tries < nops * 50:
        tries += 1
        op = _random_op(rng, m, len(ops) + 1)
        if op is None:
            continue
        err, _inf, post = m.apply(op)
        if err and rng.random() > invalid:
            continue
        ops.append(op)
        m = post
    return Workload(f"random-{seed}", tuple(ops))


def _random_op(rng: random.Random, m: Model, tag: int) -> Op | None:
    paths = m.paths()
    files = [p for p, n in paths.items() if m.nodes[n].kind == "f"]
    dirs = [p for p, n in paths.items() if m.nodes[n].kind == "d" and p != "lost+found"]
    names = list(RANDOM_FILES) + [p + "/g" for p in dirs]
    kind = rng.choices(
        ["creat", "mkdir", "write", "write", "write", "truncate", "falloc", "link", "unlink",
         "rmdir", "rename", "symlink", "setxattr", "removexattr", "fsync", "fdatasync",
         "chmod", "openunlink", "hold"],
        [6, 3, 8, 8, 8, 3, 3, 3, 4, 2, 6, 2, 2, 1, 4, 2, 1, 1, 2])[0]
    f = rng.choice(files) if files else None
    if kind == "creat":
        return Op("creat", (rng.choice(names),))
    if kind == "mkdir":
        return Op("mkdir", (rng.choice(RANDOM_DIRS),))
    if kind == "symlink":
        return Op("symlink", (rng.choice(names), rng.choice(["x", "../A/foo", "a" * 150])))
    if kind in ("unlink", "openunlink", "hold"):
        return Op(kind, (rng.choice(files + ["B/sym"]),)) if files else None
    if kind == "rmdir":
        return Op("rmdir", (rng.choice(RANDOM_DIRS + ("A/C",)),))
    if kind == "link":
        return Op("link", (f, rng.choice(names))) if f else None
    if kind == "rename":
        src = rng.choice(files + dirs) if files or dirs else None
        if src is None:
            return None
        dst = rng.choice(names + list(RANDOM_DIRS) + files)
        return Op("rename", (src, dst, rng.choice([0, 0, 0, 1, 2])))
    if kind in ("setxattr", "removexattr"):
        p = rng.choice(files + dirs) if files or dirs else None
        if p is None:
            return None
        name = rng.choice(["user.a", "user.b", "user.k"])
        if kind == "setxattr":
            return Op("setxattr", (p, name, rng.choice(["1", "two", "v" * 40])))
        return Op("removexattr", (p, name))
    if kind == "chmod":
        p = rng.choice(files + dirs) if files or dirs else None
        return Op("chmod", (p, rng.choice([0o600, 0o644, 0o755, 0o700]))) if p else None
    if f is None:
        return None
    size = len(m.nodes[paths[f]].data.cur)
    if kind in ("fsync", "fdatasync"):
        return Op(kind, (f,))
    if kind == "write":
        how = rng.random()
        if how < 0.35 and size:
            off = rng.randrange(size)
            n = rng.randint(1, min(3000, max(1, size - off)))
        elif how < 0.7:
            off, n = size, rng.randint(1, 5000)
        else:
            off, n = size + rng.randint(1, 12000), rng.randint(1, 2000)
        return Op("write", (f, off, n, tag))
    if kind == "truncate":
        return Op("truncate", (f, rng.choice([0, size // 2, size + rng.randint(1, 9000)])))
    if kind == "falloc":
        mode = rng.choice([0, 1, 3])
        off = rng.randrange(max(1, size + 4096))
        return Op("falloc", (f, mode, off, rng.randint(1, 9000)))
    return None


#: the CI suite: every seq-1 workload, this fixed sample of seq-2, these
#: random workloads (seeds 0..n-1, ops each), and this sample of seq-1
#: workloads on a wrapping log
CI_SEQ2_SAMPLE = 120
CI_RANDOM = (2, 10)
CI_LOG_SAMPLE = 12
#: the long run: every seq-1 and seq-2 workload, every seq-1 workload on a
#: wrapping log, and these random ones
FULL_RANDOM = (40, 20)


#: deferred reclaim: inodes queued at their last release, then freed in one
#: batch transaction (while other work goes on), in every suite
RECLAIM_WORKLOADS = (
    "deferunlink A/foo; deferunlink A/bar; reclaim",
    "deferunlink A/foo; deferunlink B/baz; creat A/new; reclaim",
    "deferunlink A/bar; write A/foo 0 5000 3; reclaim; fsync A/foo",
    "deferunlink B/baz; reclaim; creat B/new",
)


#: speculative preallocation past EOF: an append to a 64 KiB file takes
#: blocks past it; appends into them, truncate up over them and a write past
#: a gap expose them (zeroed).  Long (half a million states): full suite only
PREALLOC_WORKLOADS = (
    "creat A/x; write A/x 0 65532 1; write A/x 65532 4100 2; write A/x 69632 4096 3; "
    "truncate A/x 90000; write A/x 100000 10 4",
)


def prealloc_workloads() -> list[Workload]:
    return [parse_workload(t, f"prealloc-{i}") for i, t in enumerate(PREALLOC_WORKLOADS)]


def reclaim_workloads() -> list[Workload]:
    return [parse_workload(t, f"reclaim-{i}") for i, t in enumerate(RECLAIM_WORKLOADS)]


def with_log(workloads, log: str) -> list[Workload]:
    return [Workload(f"{w.name}-{log}", w.ops, log) for w in workloads]


def suite(name: str, cfg: Config = CI_CONFIG) -> list[Workload]:
    """The workloads of a named suite: "ci", "full", "seq1", "seq2"."""
    if name == "seq1":
        return seq1_workloads(cfg)
    if name == "seq2":
        return seq2_workloads(cfg)
    s1 = seq1_workloads(cfg)
    if name == "ci":
        n, k = CI_RANDOM
        logs = sample(s1, CI_LOG_SAMPLE, 2)
        return (s1 + sample(seq2_workloads(cfg), CI_SEQ2_SAMPLE, 1) + with_log(logs, "wrap")
                + reclaim_workloads() + [random_workload(s, k, cfg) for s in range(n)])
    if name == "full":
        n, k = FULL_RANDOM
        rc = reclaim_workloads()
        return (s1 + seq2_workloads(cfg) + with_log(s1, "wrap") + rc + with_log(rc, "wrap")
                + prealloc_workloads() + [random_workload(s, k, cfg) for s in range(n)])
    raise ValueError(f"unknown suite {name!r} (ci, full, seq1, seq2)")


# --------------------------------------------------------------------------
# many workloads
# --------------------------------------------------------------------------


@dataclass
class Report:
    results: list = field(default_factory=list)
    seconds: float = 0.0
    jobs: int = 1

    def total(self, attr: str) -> int:
        return sum(getattr(r, attr) for r in self.results)

    @property
    def violations(self) -> list:
        return [v for r in self.results for v in r.violations]

    @property
    def nviolations(self) -> int:
        return self.total("nviolations")

    def summary(self) -> str:
        st = self.total("states") + self.total("recovery_states")
        checked = self.total("unique")
        rate = st / self.seconds if self.seconds else 0.0
        lines = [
            f"workloads: {len(self.results)} ({self.total('ops')} operations)",
            f"crash points: {self.total('points')}; crash states built: {st} "
            f"({self.total('states')} of workloads, {self.total('recovery_states')} of "
            f"{self.total('recovery_images')} crashed recoveries)",
            f"distinct images checked: {checked} ({self.total('full')} full checks = "
            f"recover + fsck + compare + new work, {self.total('derived')} derived)",
            f"time: {self.seconds:.1f} s on {self.jobs} worker(s); {rate:.0f} states/s",
            f"violations: {self.nviolations}",
        ]
        return "\n".join(lines)


def _run_one(args):
    wl, cfg = args
    try:
        return run_workload(wl, cfg)
    except Exception as e:  # a crash of the explorer itself is a finding too
        r = WorkloadResult(str(wl), wl.name, len(wl.ops))
        r.add(Violation("error", str(wl), [f"the explorer failed: {_exc(e)}",
                                           traceback.format_exc()]), cfg.keep)
        return r


def run_workloads(workloads, cfg: Config = CI_CONFIG, jobs: int = 1,
                  progress=None) -> Report:
    """Run many workloads, on `jobs` processes; `progress(done, total, result)`."""
    t0 = time.perf_counter()
    rep = Report(jobs=jobs)
    workloads = list(workloads)
    for log in sorted({w.log for w in workloads} | {"empty"}):
        base_image(cfg, log)  # built once, inherited by forked workers
    if jobs <= 1 or len(workloads) <= 1:
        it = map(_run_one, [(w, cfg) for w in workloads])
        pool = None
    else:
        import multiprocessing as mp
        ctx = mp.get_context("fork")
        pool = ctx.Pool(jobs)
        it = pool.imap_unordered(_run_one, [(w, cfg) for w in workloads], chunksize=1)
    try:
        for r in it:
            rep.results.append(r)
            if progress:
                progress(len(rep.results), len(workloads), r)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    order = {str(w): i for i, w in enumerate(workloads)}
    rep.results.sort(key=lambda r: order.get(r.workload, 0))
    rep.seconds = time.perf_counter() - t0
    return rep


__all__ = [
    "Config", "CI_CONFIG", "Op", "Workload", "parse_op", "parse_workload", "data_for",
    "base_image", "execute", "FileData", "Model", "Obs", "observe", "compare", "full_check",
    "consistency_walk", "unpersisted", "run_workload", "run_workloads", "trace_workload",
    "seq1_workloads", "seq2_workloads", "random_workload", "sample", "Report",
    "WorkloadResult", "Violation", "TrackImage", "derive", "suite", "region_of",
    "persisted", "stored_lines", "fill_log", "with_log", "LOG_STATES",
]
