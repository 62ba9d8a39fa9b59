"""docs/DESIGN.md's table of flushes and fences is what the code does.

Every row of the table "Flushes and fences, operation by operation" names
a scenario and the order of persistence events the operation makes, in a
compact notation:

    data   file data or zeroes stored into data blocks outside the log (flushed)
    log    the transaction's log record and the log-header slot naming it (flushed)
    apply  the logged cache lines stored in place (flushed)
    F      a fence

Each scenario runs here on a TracingImage, its events are reduced to that
notation, and the result must equal the documented one; a scenario the
table does not document (or a row without a scenario) fails too.  So when
the code's ordering changes, the design document has to change with it.
"""

from __future__ import annotations

import os
import re
import stat

import pytest

from mkfs import make_filesystem
from pmfs.fs import FileSystem, MountOptions
from pmfs.layout import BLOCK_SIZE, ROOT_INO, compute_geometry
from pmfs.pmem import EV_FENCE, EV_FLUSH, EV_MARK, MemoryImage, TracingImage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN = os.path.join(ROOT, "docs", "DESIGN.md")
SECTION = "### Flushes and fences, operation by operation"
R = ROOT_INO


def signature(fs: FileSystem, events) -> str:
    sb = fs.sb
    wal_lo = sb.wal_start * BLOCK_SIZE
    wal_hi = (sb.wal_start + sb.wal_blocks) * BLOCK_SIZE
    data_lo = sb.data_start * BLOCK_SIZE
    out: list[str] = []
    cur: list[str] = []
    phase = None
    for ev in events:
        if ev[0] == EV_MARK:
            phase = {"tx-begin": "log", "tx-logged": "apply"}.get(ev[1])
            continue
        if ev[0] == EV_FLUSH:
            off = ev[1]
            if wal_lo <= off < wal_hi:
                kind = "log"
            elif phase == "apply":
                kind = "apply"
            elif off >= data_lo:
                kind = "data"
            else:  # metadata flushed outside a transaction: never expected
                kind = f"meta@{off}"
            if not cur or cur[-1] != kind:
                cur.append(kind)
        elif ev[0] == EV_FENCE:
            out.extend(cur)
            out.append("F")
            cur = []
    out.extend(cur)
    return " ".join(out)


def fresh(sync: bool = False):
    size = 16 << 20
    mem = MemoryImage(size)
    make_filesystem(mem, compute_geometry(size, None))
    img = TracingImage(mem, record=False)
    return img, FileSystem(img, MountOptions(sync=sync))


def _file(fs, name=b"f", data=b"x" * 100):
    ino = fs.create(R, name, 0o644).ino
    if data:
        fs.write(ino, 0, data)
    return ino


def _holes(fs, n):
    """A file with n separate one-block holes (blocks 0, 2, 4, ... mapped)."""
    ino = _file(fs, b"h", None)
    for i in range(n + 1):
        fs.write(ino, 2 * i * BLOCK_SIZE, b"m")
    return ino


def _open_unlinked(fs):
    ino = _file(fs, b"o", b"y" * 5000)
    fs.open(ino, os.O_RDWR)
    fs.unlink(R, b"o")
    return ino


def _queued_orphans(fs):
    """reclaim_batch 3: two orphans released (queued, nothing stored), a
    third open and unlinked; its release fills the batch."""
    fs.opts.reclaim_batch = 3
    for name in (b"q1", b"q2"):
        ino = _file(fs, name, b"q" * 5000)
        fs.open(ino, os.O_RDWR)
        fs.unlink(R, name)
        fs.release(ino)
    assert len(fs.reclaim_queue) == 2
    return _open_unlinked(fs)


def _appended(fs):
    """An open file grown to 17 blocks by appends: blocks preallocated past EOF."""
    ino = _file(fs, b"a", b"a" * (16 * BLOCK_SIZE))
    fs.open(ino, os.O_WRONLY)
    fs.write(ino, 16 * BLOCK_SIZE, b"b" * BLOCK_SIZE)
    assert ino in fs.eof_blocks
    return ino


#: scenario -> (mount with -o sync?, set-up(fs) -> state, the operation(fs, state))
SCENARIOS = {
    "create": (False, lambda fs: None, lambda fs, s: fs.create(R, b"c", 0o644)),
    "mknod": (False, lambda fs: None, lambda fs, s: fs.mknod(R, b"p", stat.S_IFIFO | 0o644)),
    "mkdir": (False, lambda fs: None, lambda fs, s: fs.mkdir(R, b"d", 0o755)),
    "create-grows-dir": (False, lambda fs: fs.mkdir(R, b"d", 0o755).ino,
                         lambda fs, d: fs.create(d, b"c", 0o644)),
    "symlink": (False, lambda fs: None, lambda fs, s: fs.symlink(R, b"s", b"target")),
    "symlink-long": (False, lambda fs: None, lambda fs, s: fs.symlink(R, b"s", b"t" * 200)),
    "link": (False, _file, lambda fs, f: fs.link(f, R, b"f2")),
    "unlink": (False, lambda fs: fs.link(_file(fs), R, b"f2"),
               lambda fs, s: fs.unlink(R, b"f2")),
    "unlink-last": (False, _file, lambda fs, f: fs.unlink(R, b"f")),
    "unlink-open": (False, lambda fs: fs.open(_file(fs), os.O_RDWR),
                    lambda fs, s: fs.unlink(R, b"f")),
    "release-orphan": (False, _open_unlinked, lambda fs, ino: fs.release(ino)),
    "release-orphan-batch": (False, _queued_orphans, lambda fs, ino: fs.release(ino)),
    "rmdir": (False, lambda fs: fs.mkdir(R, b"d", 0o755), lambda fs, s: fs.rmdir(R, b"d")),
    "rename": (False, _file, lambda fs, f: fs.rename(R, b"f", R, b"g")),
    "rename-replace": (False, lambda fs: (_file(fs), _file(fs, b"g")),
                       lambda fs, s: fs.rename(R, b"f", R, b"g")),
    "rename-exchange": (False, lambda fs: (_file(fs), _file(fs, b"g")),
                        lambda fs, s: fs.rename(R, b"f", R, b"g", 2)),
    "setattr": (False, _file, lambda fs, f: fs.setattr(f, mode=0o600, uid=7, mtime=1)),
    "truncate-down": (False, lambda fs: _file(fs, data=b"x" * 9000),
                      lambda fs, f: fs.setattr(f, size=10)),
    "truncate-up": (False, _file, lambda fs, f: fs.setattr(f, size=20000)),
    "setxattr": (False, _file, lambda fs, f: fs.setxattr(f, b"user.k", b"v")),
    "removexattr": (False, lambda fs: (f := _file(fs), fs.setxattr(f, b"user.k", b"v"))[0],
                    lambda fs, f: fs.removexattr(f, b"user.k")),
    "fallocate": (False, _file, lambda fs, f: fs.fallocate(f, 0, 0, 65536)),
    "fallocate-17-holes": (False, lambda fs: _holes(fs, 17),
                           lambda fs, f: fs.fallocate(f, 0, 0, 36 * BLOCK_SIZE)),
    "punch-hole": (False, lambda fs: _file(fs, data=b"x" * 20000),
                   lambda fs, f: fs.fallocate(f, 3, 100, 12000)),
    "zero-range": (False, lambda fs: _file(fs, data=b"x" * 20000),
                   lambda fs, f: fs.fallocate(f, 0x10, 100, 30000)),
    "write-new-blocks": (False, _file, lambda fs, f: fs.write(f, 8192, b"z" * 5000)),
    "write-extend": (False, _file, lambda fs, f: fs.write(f, 100, b"e" * 100)),
    "write-append-prealloc": (False, lambda fs: _file(fs, data=b"a" * (15 * BLOCK_SIZE)),
                              lambda fs, f: fs.write(f, 15 * BLOCK_SIZE, b"b" * BLOCK_SIZE)),
    "release-trim": (False, _appended, lambda fs, f: fs.release(f)),
    "write-overwrite": (False, _file, lambda fs, f: fs.write(f, 0, b"o" * 50)),
    "write-overwrite-sync": (True, _file, lambda fs, f: fs.write(f, 0, b"o" * 50)),
    "fsync": (False, lambda fs: (f := _file(fs), fs.write(f, 0, b"o"))[0],
              lambda fs, f: fs.fsync(f)),
    "fsync-nothing-pending": (False, _file, lambda fs, f: fs.fsync(f)),
    "fdatasync": (False, lambda fs: (f := _file(fs), fs.write(f, 0, b"o"))[0],
                  lambda fs, f: fs.fsync(f, datasync=True)),
}


def documented() -> dict[str, str]:
    text = open(DESIGN).read()
    assert SECTION in text, f"docs/DESIGN.md has no section {SECTION!r}"
    body = text.split(SECTION, 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in body.splitlines():
        m = re.match(r"^\|\s*`([a-z0-9-]+)`\s*\|.*\|\s*`([^`]*)`\s*\|\s*$", line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} documented twice"
            rows[m.group(1)] = m.group(2)
    return rows


def traced(name: str) -> str:
    sync, setup, op = SCENARIOS[name]
    img, fs = fresh(sync)
    state = setup(fs)
    img.events = []
    img.record = True
    op(fs, state)
    img.record = False
    return signature(fs, img.events)


def test_every_scenario_is_documented():
    doc = documented()
    assert sorted(doc) == sorted(SCENARIOS)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_documented_order_is_the_code(name):
    doc = documented()
    assert name in doc, f"docs/DESIGN.md does not document {name}"
    assert traced(name) == doc[name], f"{name}: the code does {traced(name)!r}"
