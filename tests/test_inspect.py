"""pmfs-inspect: read-only inspection of an image, checked against the core.

Images are built in-process (FileSystem on a MemoryImage), written to a file
and inspected through the command's entry point (`run(main_args)`, what the
console script runs) or the console script itself.  Everything the tool
shows is compared with what FileSystem says about the same image, or with
an independent decoding of the raw bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import uuid as uuidlib

import pytest

from conftest import PmfsMount, fresh_image, fuse_available, mkfs, prog
from mkfs import make_filesystem
from pmfs import inspector
from pmfs.cli import run
from pmfs.fs import FileSystem, MountOptions
from pmfs.layout import (BITMAP_BYTES, BLOCK_SIZE, I_ORPHAN, ROOT_INO, WAL_REC,
                         compute_geometry, encode_wal_record)
from pmfs.pmem import ImageBusy, MemoryImage, open_image
from pmfs.superblock import SuperblockManager

BS = BLOCK_SIZE
ROOT = ROOT_INO
NAMES = [b"caf\xc3\xa9", b"bad\xff", b"new\nline", b"back\\slash", b"plain"]

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def inspect(capsys, *args):
    """Run pmfs-inspect in-process: (exit code, stdout, stderr)."""
    rc = run(inspector.PROG, inspector.main_args, [str(a) for a in args], usage_code=16,
             error_code=8)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def inspect_json(capsys, *args):
    rc, out, err = inspect(capsys, "--json", *args)
    return rc, json.loads(out), err


def one_line_error(err: str, rc: int, code: int = 8) -> str:
    assert rc == code, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if not ln.startswith("pmfs-inspect: note:")]
    assert len(lines) == 1 and lines[0].startswith("pmfs-inspect: "), err
    return lines[0]


def save(data: bytes, path: str) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def digest(path: str) -> tuple[str, int]:
    with open(path, "rb") as f:
        h = hashlib.sha256(f.read()).hexdigest()
    return h, os.stat(path).st_mtime_ns


def open_fs(data: bytes) -> FileSystem:
    """A read-write FileSystem on a private copy (replays like a mount)."""
    return FileSystem(MemoryImage(data), MountOptions())


def build_populated():
    """An image with one of everything; returns (bytes, {name: ino})."""
    img = MemoryImage(32 << 20)
    make_filesystem(img, compute_geometry(32 << 20), label="tour")
    fs = FileSystem(img, MountOptions())
    ino = {}
    d = fs.mkdir(ROOT, b"dir", 0o755).ino
    ino["dir"] = d
    sub = fs.mkdir(d, b"sub", 0o700).ino
    ino["sub"] = sub
    f = fs.create(d, b"data", 0o640).ino
    fs.write(f, 0, b"A" * (3 * BS))
    fs.write(f, 100 * BS, b"B" * BS)  # a hole between two extents
    fs.setxattr(f, b"user.text", b"hello")
    fs.setxattr(f, b"user.bin", b"\x00\x01\xffz\\")
    ino["data"] = f
    big = fs.create(ROOT, b"big", 0o644).ino
    for k in range(0, 40, 2):  # 20 one-block extents: an extent tree of depth 1
        fs.write(big, k * BS, bytes([k]) * BS)
    ino["big"] = big
    ino["sym"] = fs.symlink(ROOT, b"sym", b"dir/data").ino
    ino["longsym"] = fs.symlink(ROOT, b"longsym", b"x/" * 150).ino
    ino["chr"] = fs.mknod(ROOT, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3)).ino
    ino["fifo"] = fs.mknod(ROOT, b"fifo", stat.S_IFIFO | 0o600).ino
    for n in NAMES:
        ino[n] = fs.create(sub, n, 0o600).ino
    fs.close()
    return bytes(img.data), ino


@pytest.fixture(scope="module")
def populated():
    return build_populated()


@pytest.fixture
def pop_image(populated, shm_dir):
    data, ino = populated
    return save(data, os.path.join(shm_dir, "pop.img")), ino, data


def crashed_between_log_and_apply():
    """A crash after a create's log record is durable, before it is applied."""
    img = fresh_image()
    fs = FileSystem(img, MountOptions())
    fs.create(ROOT, b"before", 0o644)

    class Crash(Exception):
        pass

    def hook(stage, tx):
        if stage == "logged":
            raise Crash()
    fs.wal.debug_hook = hook
    with pytest.raises(Crash):
        fs.create(ROOT, b"after", 0o644)
    return bytes(img.data), fs


# --------------------------------------------------------------------------
# the summary
# --------------------------------------------------------------------------


def test_summary_of_a_fresh_image(capsys, shm_dir):
    img = MemoryImage(16 << 20)
    u = uuidlib.uuid4()
    make_filesystem(img, compute_geometry(16 << 20, 512), label="lbl", uuid=u.bytes)
    path = save(bytes(img.data), os.path.join(shm_dir, "a.img"))
    rc, d, err = inspect_json(capsys, path)
    assert rc == 0, err
    sb = d["superblock"]
    reps = sb["replicas"]
    assert [r["valid"] for r in reps] == [True, True]
    active = [r for r in reps if r["active"]]
    assert len(active) == 1
    assert active[0]["version"] == max(r["version"] for r in reps) == sb["version"]
    assert sb["uuid"] == str(u) and sb["label"] == "lbl"
    assert sb["clean"] and not sb["needs_fsck"] and not sb["fsck_running"]
    assert sb["flags"] == ["clean"]
    assert sb["mount_count"] == 1  # make_filesystem mounts once for lost+found
    geo = compute_geometry(16 << 20, 512)
    assert sb["geometry"] == geo.as_dict()
    assert sb["geometry_errors"] == []
    assert sb["backend"]["name"] in ("msync", "libpmem") and sb["backend"]["reason"]
    assert sb["mkfs_time"]["ns"] > 0 and sb["fsck_time"]["ns"] == 0
    # usage agrees with statfs of the same image
    st = open_fs(bytes(img.data)).statfs()
    u_ = d["usage"]
    assert u_["blocks"]["free"] == st["f_bfree"]
    assert u_["blocks"]["data"] == st["f_blocks"]
    assert u_["inodes"]["total"] == st["f_files"] == 511
    assert u_["inodes"]["free"] == st["f_ffree"]
    assert u_["inodes"]["used"] == 2  # root and lost+found
    assert u_["free_extents"]["count"] >= 1
    assert d["wal"]["state"] == "empty" and d["wal"]["pending"] == 0
    assert d["wal"]["torn"] is None
    assert d["orphans"] == 0 and d["errors"] == []
    # the text form says the same
    rc, out, err = inspect(capsys, path)
    assert rc == 0 and err == ""
    assert f"uuid:            {u}" in out
    assert "label:           lbl" in out
    assert "clean (unmounted cleanly)" in out
    assert "state:           empty (nothing to replay)" in out
    assert f"replica {active[0]['name']} (block {active[0]['block']}): valid, version " \
           f"{active[0]['version']}   <- active" in out
    assert f"{geo.inode_count - 1} total, 2 used" in out


def test_fragmentation_matches_the_raw_bitmap(capsys, shm_dir):
    img = fresh_image(8 << 20)
    fs = FileSystem(img, MountOptions())
    files = [fs.create(ROOT, b"f%d" % i, 0o644).ino for i in range(60)]
    for i, f in enumerate(files):
        fs.write(f, 0, b"x" * ((i % 5) + 1) * BS)
    for i in range(0, 60, 2):
        fs.unlink(ROOT, b"f%d" % i)
    fs.close()
    data = bytes(img.data)
    path = save(data, os.path.join(shm_dir, "frag.img"))
    # independent decoding of the block bitmap: runs of clear bits
    sbm = SuperblockManager(MemoryImage(data))
    sb = sbm.load()
    bits = b"".join(data[(sb.bbitmap_start + i) * BS:(sb.bbitmap_start + i) * BS + BITMAP_BYTES]
                    for i in range(sb.bbitmap_blocks))
    runs, n = [], 0
    for blk in range(sb.data_start, sb.total_blocks):
        if bits[blk >> 3] >> (blk & 7) & 1:
            if n:
                runs.append(n)
            n = 0
        else:
            n += 1
    if n:
        runs.append(n)
    expect = {}
    for r in runs:
        k = r.bit_length() - 1
        c, b = expect.get(k, (0, 0))
        expect[k] = (c + 1, b + r)
    rc, d, err = inspect_json(capsys, path)
    assert rc == 0, err
    fe = d["usage"]["free_extents"]
    assert fe["count"] == len(runs) > 10  # the deletions left holes
    assert fe["largest"] == max(runs)
    assert d["usage"]["blocks"]["free"] == sum(runs)
    got = {h["min"].bit_length() - 1: (h["extents"], h["blocks"]) for h in fe["histogram"]}
    assert got == expect
    for h in fe["histogram"]:
        assert h["max"] == 2 * h["min"] - 1
    assert abs(sum(h["percent"] for h in fe["histogram"]) - 100.0) < 0.1
    rc, out, _ = inspect(capsys, path)
    assert f"free extents:    {len(runs)}, largest {max(runs)} blocks" in out


# --------------------------------------------------------------------------
# inodes, paths, directories
# --------------------------------------------------------------------------


def test_inode_details_match_the_core(capsys, pop_image):
    path, ino, data = pop_image
    fs = open_fs(data)
    for name in ("data", "big", "sym", "longsym", "chr", "fifo", "dir", "sub"):
        n = ino[name]
        inode = fs.getattr(n)
        rc, d, err = inspect_json(capsys, path, "inode", n)
        assert rc == 0, (name, err)
        assert d["ino"] == n and d["checksum_ok"] and not d["free"]
        for k in ("mode", "uid", "gid", "size", "nlink", "blocks", "generation", "flags"):
            assert d[k] == getattr(inode, k), (name, k)
        for k in ("atime", "mtime", "ctime", "btime"):
            assert d[k]["ns"] == getattr(inode, k)
            assert d[k]["human"][:4].isdigit()
        assert d["mode_string"] == stat.filemode(inode.mode)
        assert d["st_blocks"] == inode.blocks * 8
        if not stat.S_ISLNK(inode.mode) or not inode.flags & 1:
            ext = [(e["file_block"], e["blocks"], e["image_block"]) for e in d["extents"]]
            assert ext == list(fs.tree(inode).extents()), name
            assert d["extent_tree"]["node_blocks"] == list(fs.tree(inode).node_blocks())
        got_x = [(bytes.fromhex(x["name_hex"]), bytes.fromhex(x["value_hex"]))
                 for x in d["xattrs"]]
        assert got_x == [(k, fs.getxattr(n, k)) for k in fs.listxattr(n)]
        if stat.S_ISLNK(inode.mode):
            assert bytes.fromhex(d["symlink"]["target_hex"]) == fs.readlink(n)
        if stat.S_ISDIR(inode.mode):
            assert d["parent"] == inode.parent
            assert d["entries"] == len(fs.listdir(n))
    # what the layout of the populated image promises
    rc, d, _ = inspect_json(capsys, path, "inode", ino["data"])
    assert [(e["file_block"], e["blocks"]) for e in d["extents"]] == [(0, 3), (100, 1)]
    assert {x["name"]: x["value"] for x in d["xattrs"]} == \
        {"user.text": "hello", "user.bin": "\\x00\\x01\\xffz\\\\"}
    rc, d, _ = inspect_json(capsys, path, "inode", ino["big"])
    assert len(d["extents"]) == 20 and d["extent_tree"]["depth"] >= 1
    assert d["extent_tree"]["node_blocks"]
    rc, d, _ = inspect_json(capsys, path, "inode", ino["sym"])
    assert d["symlink"] == {"target": "dir/data", "target_hex": b"dir/data".hex(),
                            "inline": True} and d["flag_names"] == ["inline"]
    rc, d, _ = inspect_json(capsys, path, "inode", ino["longsym"])
    assert d["symlink"]["inline"] is False and d["symlink"]["target"] == "x/" * 150
    rc, d, _ = inspect_json(capsys, path, "inode", ino["chr"])
    assert d["rdev"]["major"] == 1 and d["rdev"]["minor"] == 3
    # the text form
    rc, out, err = inspect(capsys, path, "inode", ino["data"])
    assert rc == 0 and err == ""
    assert "type:            regular file" in out
    assert "mode:            0640 (-rw-r-----" in out
    assert "file blocks 0-2" in out and "file blocks 100 " in out
    assert 'user.bin = "\\x00\\x01\\xffz\\\\"' in out
    rc, out, _ = inspect(capsys, path, "inode", ino["sym"])
    assert 'target:          "dir/data" (inline)' in out


def test_stat_by_path_equals_inode_by_number(capsys, pop_image):
    path, ino, _ = pop_image
    for p, key in (("/dir/data", "data"), ("dir/sub/../data", "data"), ("/sym", "sym"),
                   ("/./dir//sub/", "sub"), ("/", None), ("/..", None)):
        rc, d, err = inspect_json(capsys, path, "stat", p)
        assert rc == 0, (p, err)
        n = ino[key] if key else ROOT
        rc2, d2, _ = inspect_json(capsys, path, "inode", n)
        assert d["ino"] == n and d["path"] == p
        d.pop("path")
        assert d == d2
    # symlinks are not followed, missing names and non-directories are errors
    rc, d, _ = inspect_json(capsys, path, "stat", "/sym")
    assert d["type"] == "symlink"
    rc, out, err = inspect(capsys, path, "stat", "/dir/nope")
    assert "no such file or directory" in one_line_error(err, rc)
    rc, out, err = inspect(capsys, path, "stat", "/big/x")
    assert "not a directory" in one_line_error(err, rc)
    rc, out, err = inspect(capsys, path, "stat", os.fsdecode(b"/dir/sub/bad\xff"))
    assert rc == 0 and f"inode {ino[b'bad' + bytes([0xff])]} " in out


def test_ls_matches_listdir_and_escapes_names(capsys, pop_image):
    path, ino, data = pop_image
    fs = open_fs(data)
    for p, dino in (("/", ROOT), ("/dir", ino["dir"]), ("/dir/sub", ino["sub"])):
        rc, d, err = inspect_json(capsys, path, "ls", p)
        assert rc == 0, err
        got = {bytes.fromhex(e["name_hex"]): e["ino"] for e in d["entries"]}
        assert got == fs.listdir(dino)
        assert [bytes.fromhex(e["name_hex"]) for e in d["entries"]] == sorted(got)
        for e in d["entries"]:
            inode = fs.getattr(e["ino"])
            assert e["mode"] == inode.mode and e["size"] == inode.size
            assert e["nlink"] == inode.nlink and e["mtime"]["ns"] == inode.mtime
            assert e["dirent_type"] == e["type"]
    rc, d, _ = inspect_json(capsys, path, "ls", "/dir/sub")
    names = {e["name"] for e in d["entries"]}
    assert names == {"café", "bad\\xff", "new\\nline", "back\\\\slash", "plain"}
    rc, out, err = inspect(capsys, path, "ls", "/dir/sub")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["inode", "type", "mode", "links", "uid", "gid", "size",
                                "mtime", "name"]
    assert len(lines) == 1 + len(NAMES)  # one line per entry, even for "new\nline"
    assert any(ln.endswith("  new\\nline") for ln in lines)
    assert any(ln.endswith("  café") for ln in lines)
    rc, out, _ = inspect(capsys, path, "ls")
    assert "sym -> dir/data" in out
    row = next(ln for ln in out.splitlines() if ln.endswith(" null"))
    assert row.split()[1:3] == ["chrdev", "crw-rw-rw-"] and "1, 3" in row
    # ls of a file lists the file
    rc, d, _ = inspect_json(capsys, path, "ls", "/dir/data")
    assert rc == 0 and not d["directory"]
    assert [(e["name"], e["ino"]) for e in d["entries"]] == [("data", ino["data"])]


def test_free_inode_and_out_of_range(capsys, pop_image):
    path, ino, data = pop_image
    rc, d, _ = inspect_json(capsys, path, "inode", 2000)
    assert rc == 0 and d["free"] and d["checksum_ok"]
    rc, out, _ = inspect(capsys, path, "inode", "0")
    assert rc == 0 and "orphan-list head" in out
    count = SuperblockManager(MemoryImage(data)).load().inode_count
    rc, out, err = inspect(capsys, path, "inode", count)
    assert "out of range" in one_line_error(err, rc)


# --------------------------------------------------------------------------
# the log: replay into a private copy, --no-replay, torn records
# --------------------------------------------------------------------------


def test_pending_transaction_shown_after_replay_by_default(capsys, shm_dir):
    data, crashed_fs = crashed_between_log_and_apply()
    path = save(data, os.path.join(shm_dir, "crash.img"))
    before = digest(path)
    rc, d, err = inspect_json(capsys, path)
    assert rc == 0, err
    w = d["wal"]
    assert w["pending"] == 1 and w["state"] == "pending" and w["replayed"]
    assert w["replay_changes_bytes"] > 0
    assert w["records"][-1]["txid"] == crashed_fs.wal.next_txid
    wheres = {e["where"] for r in w["records"] for e in r["entries"]}
    assert any(x.startswith("inode") for x in wheres)
    assert "inode bitmap block 0" in wheres
    assert not d["superblock"]["clean"]
    # default: the state after replay, which is what a mount sees
    rc, d, err = inspect_json(capsys, path, "ls", "/")
    names = {e["name"] for e in d["entries"]}
    assert {"before", "after"} <= names
    assert names == {n.decode() for n in open_fs(data).listdir(ROOT)}
    rc, out, err = inspect(capsys, path, "ls")
    assert "after" in out
    assert "shown as after replay (--no-replay for the raw state)" in err
    # --no-replay: the raw state, before or after the subcommand
    for args in (("--no-replay", "ls"), ("ls", "--no-replay")):
        rc, d, err = inspect_json(capsys, path, *args)
        assert rc == 0, err
        names = {e["name"] for e in d["entries"]}
        assert "before" in names and "after" not in names
        assert d["replayed"] is False and d["wal_pending"] == 1
        assert d["notes"] == ["the log holds 1 committed transaction(s), not replayed: the "
                              "raw state is shown"]
    rc, out, err = inspect(capsys, path, "--no-replay")
    assert "1 committed transaction(s) pending replay" in out
    assert "raw state (not replayed)" in out
    rc, out, err = inspect(capsys, path, "wal")
    assert rc == 0 and "inode bitmap block 0" in out and "replay changes" in out
    assert digest(path) == before, "inspection changed the image"


def test_torn_record_after_the_committed_ones(capsys, shm_dir):
    img = fresh_image()
    fs = FileSystem(img, MountOptions())
    fs.create(ROOT, b"x", 0o644)
    w = fs.wal
    txid = w.next_txid
    rec = bytearray(encode_wal_record(fs.fsseed, txid, [(fs.inode_off(9), b"\x55" * 64)]))
    rec[WAL_REC.size + 20] ^= 0xFF  # a line of the record never made it
    img.write(w.area_off + w.head_pos % w.area_size, bytes(rec))
    data = bytes(img.data)
    path = save(data, os.path.join(shm_dir, "torn.img"))
    rc, d, err = inspect_json(capsys, path, "wal")
    assert rc == 0, err
    t = d["wal"]["torn"]
    assert t["txid"] == txid and t["pos"] == w.head_pos and "checksum" in t["reason"]
    assert d["wal"]["pending"] == 1  # the tail record, already applied
    assert d["wal"]["replay_changes_bytes"] == 0
    rc, out, _ = inspect(capsys, path)
    assert f"uncommitted:     txid {txid} at position {w.head_pos} after them: a torn " \
           f"record (checksum mismatch" in out
    assert d["wal"]["uncommitted"] == 1
    assert "already applied in place" in out
    rc, out, err = inspect(capsys, path, "ls")
    assert rc == 0 and "x" in out.split()
    # the last record is always replayable and applied already: no note about it
    assert err == ""
    # a record with a stale (smaller) txid is not a torn record
    rec = bytearray(encode_wal_record(fs.fsseed, txid - 1, [(fs.inode_off(9), b"\x55" * 64)]))
    img.write(w.area_off + w.head_pos % w.area_size, bytes(rec))
    path = save(bytes(img.data), path)
    rc, d, _ = inspect_json(capsys, path, "wal")
    assert d["wal"]["torn"] is None and d["wal"]["uncommitted"] == 0


# --------------------------------------------------------------------------
# orphans
# --------------------------------------------------------------------------


def test_orphans_of_a_crashed_image(capsys, shm_dir):
    img = fresh_image()
    fs = FileSystem(img, MountOptions())
    a = fs.create(ROOT, b"a", 0o644).ino
    fs.write(a, 0, b"z" * 3 * BS)
    b = fs.create(ROOT, b"b", 0o644).ino
    for n in (a, b):
        fs.open(n, os.O_RDWR)
    fs.unlink(ROOT, b"a")
    fs.unlink(ROOT, b"b")
    assert sorted(fs.orphans()) == sorted([a, b])
    data = bytes(img.data)  # a crash: both still open
    path = save(data, os.path.join(shm_dir, "orph.img"))
    rc, d, err = inspect_json(capsys, path, "orphans")
    assert rc == 0, err
    assert [o["ino"] for o in d["orphans"]] == fs.orphans()
    for o in d["orphans"]:
        assert o["nlink"] == 0 and o["type"] == "file" and o["state"].startswith("unlinked")
        assert o["flags"] & I_ORPHAN
    assert {o["ino"]: o["blocks"] for o in d["orphans"]}[a] == 3
    rc, d, _ = inspect_json(capsys, path, "inode", a)
    assert "orphan" in d["flag_names"] and d["nlink"] == 0
    rc, d, _ = inspect_json(capsys, path)
    assert d["orphans"] == 2
    rc, out, _ = inspect(capsys, path, "orphans")
    assert out.startswith("orphan list: 2 inode(s)")
    # after a mount processed them, the list is empty
    fs2 = open_fs(data)
    fs2.close()
    path = save(bytes(fs2.img.data), path)
    rc, out, _ = inspect(capsys, path, "orphans")
    assert rc == 0 and out.strip() == "orphan list: empty"


def test_broken_orphan_list_is_reported(capsys, shm_dir):
    img = fresh_image()
    fs = FileSystem(img, MountOptions())
    a = fs.create(ROOT, b"a", 0o644).ino
    fs.open(a, os.O_RDWR)
    fs.unlink(ROOT, b"a")
    # make the orphan point back at itself (a loop), with a valid checksum
    inode = fs.iget(a)
    inode.orphan_next = a
    img.write(fs.inode_off(a), inode.encode(fs.fsseed))
    path = save(bytes(img.data), os.path.join(shm_dir, "loop.img"))
    # (the raw state: replaying the log's last record would restore part of
    # the inode's lines and break its checksum instead)
    rc, d, err = inspect_json(capsys, path, "--no-replay", "orphans")
    assert rc == 8 and "loops back to inode" in " ".join(d["errors"])
    assert [o["ino"] for o in d["orphans"]] == [a]
    assert "loops back" in one_line_error(err, rc)


# --------------------------------------------------------------------------
# damage: reported, exit 8, never a traceback
# --------------------------------------------------------------------------


def test_damaged_inode(capsys, pop_image, shm_dir):
    path, ino, data = pop_image
    fs = open_fs(data)
    buf = bytearray(data)
    off = fs.inode_off(ino["data"])
    buf[off + 40] ^= 0x01  # atime: the checksum no longer matches
    path = save(bytes(buf), os.path.join(shm_dir, "dmg.img"))
    rc, out, err = inspect(capsys, path, "inode", ino["data"])
    line = one_line_error(err, rc)
    assert f"inode {ino['data']}: checksum mismatch" in line
    assert "checksum:        MISMATCH" in out and "type:            regular file" in out
    rc, d, err = inspect_json(capsys, path, "inode", ino["data"])
    assert rc == 8 and not d["checksum_ok"] and d["errors"]
    # ls shows the other entries and flags the damaged one
    rc, out, err = inspect(capsys, path, "ls", "/dir")
    one_line_error(err, rc)
    assert "sub" in out and "checksum mismatch" in out
    # a path through it cannot be resolved: one line
    rc, out, err = inspect(capsys, path, "stat", "/dir/data/x")
    assert "checksum mismatch" in one_line_error(err, rc)


def test_damaged_directory_block_and_debug(capsys, pop_image, shm_dir):
    path, ino, data = pop_image
    fs = open_fs(data)
    (s, n, p), = list(fs.tree(fs.getattr(ino["sub"])).extents())
    buf = bytearray(data)
    buf[p * BS + 16] ^= 0xFF  # the first record's name
    path = save(bytes(buf), os.path.join(shm_dir, "dmgdir.img"))
    rc, out, err = inspect(capsys, path, "ls", "/dir/sub")
    line = one_line_error(err, rc)
    assert "damaged" in line and f"directory {ino['sub']}" in line
    rc, out, err = inspect(capsys, path, "inode", ino["sub"])
    assert rc == 8 and f"DAMAGED: directory: directory {ino['sub']}" in out
    rc, out, err = inspect(capsys, path, "--debug", "ls", "/dir/sub")
    assert rc == 8 and "Traceback" in err
    # the rest of the image is still readable
    rc, out, err = inspect(capsys, path, "ls", "/dir")
    assert rc == 0 and "data" in out


def test_damaged_superblock_replicas(capsys, pop_image, shm_dir):
    path, ino, data = pop_image
    sbm = SuperblockManager(MemoryImage(data))
    sbm.load()
    act = sbm.active
    buf = bytearray(data)
    buf[act * BS + 40] ^= 0xFF  # the label of the active replica
    path = save(bytes(buf), os.path.join(shm_dir, "sb.img"))
    rc, d, err = inspect_json(capsys, path)
    assert rc == 0, err  # the other replica is valid: a normal situation
    reps = d["superblock"]["replicas"]
    assert not reps[act]["valid"] and "checksum" in reps[act]["reason"]
    assert reps[1 - act]["active"] and d["superblock"]["active"] == "AB"[1 - act]
    rc, out, _ = inspect(capsys, path)
    assert f"replica {'AB'[act]} (block {act}): INVALID (superblock checksum mismatch)" in out
    # both replicas damaged: the summary still shows them, exit 8
    buf[(1 - act) * BS + 40] ^= 0xFF
    path = save(bytes(buf), path)
    rc, out, err = inspect(capsys, path)
    assert "both superblock replicas are damaged" in one_line_error(err, rc)
    assert out.count("INVALID (superblock checksum mismatch)") == 2
    rc, d, err = inspect_json(capsys, path)
    assert rc == 8 and d["errors"] and "usage" not in d
    rc, out, err = inspect(capsys, path, "ls")
    assert "both superblock replicas are damaged" in one_line_error(err, rc)
    assert out == ""
    # an interrupted superblock update (commit word never written)
    buf = bytearray(data)
    buf[act * BS + 496:act * BS + 504] = bytes(8)
    path = save(bytes(buf), path)
    rc, d, _ = inspect_json(capsys, path)
    assert rc == 0 and d["superblock"]["replicas"][act]["commit"] == 0
    assert "not committed" in d["superblock"]["replicas"][act]["reason"]


def test_damaged_bitmap_block(capsys, pop_image, shm_dir):
    path, ino, data = pop_image
    sb = SuperblockManager(MemoryImage(data)).load()
    buf = bytearray(data)
    buf[sb.bbitmap_start * BS + 1000] ^= 0x10
    path = save(bytes(buf), os.path.join(shm_dir, "bm.img"))
    rc, out, err = inspect(capsys, path)
    assert "block bitmap block 0" in one_line_error(err, rc)
    assert "DAMAGED: block bitmap block 0" in out
    # FileSystem refuses such an image; the inspector still resolves paths
    rc, out, err = inspect(capsys, path, "ls", "/dir")
    assert rc == 0 and "data" in out


def test_not_pmfs_and_operational_errors(capsys, shm_dir):
    junk = save(os.urandom(1 << 20), os.path.join(shm_dir, "junk.img"))
    for args in ((junk,), (junk, "ls")):
        rc, out, err = inspect(capsys, *args)
        assert "not a pmfs file system" in one_line_error(err, rc)
    rc, out, err = inspect(capsys, os.path.join(shm_dir, "missing.img"))
    assert "no such file" in one_line_error(err, rc)
    rc, out, err = inspect(capsys, shm_dir)
    assert "is a directory" in one_line_error(err, rc)
    # a truncated image: the superblock is shown, usage is not
    data = bytes(fresh_image(8 << 20).data)
    path = save(data[:6 << 20], os.path.join(shm_dir, "short.img"))
    rc, out, err = inspect(capsys, path)
    assert "truncated image" in one_line_error(err, rc)
    assert "<- active" in out and "Usage" not in out


def test_usage_errors(capsys, pop_image):
    path, _ino, _data = pop_image
    for args in ((), (path, "inode"), (path, "inode", "abc"), (path, "inode", "-3"),
                 (path, "bogus"), (path, "ls", "/", "extra"), ("--frobnicate", path)):
        rc, out, err = inspect(capsys, *args)
        line = one_line_error(err, rc, 16)
        assert out == ""
        assert "see --help" in line or "invalid inode number" in line


# --------------------------------------------------------------------------
# read-only, snapshots, the real program
# --------------------------------------------------------------------------


def test_never_writes_the_image(capsys, shm_dir):
    data, _fs = crashed_between_log_and_apply()
    path = save(data, os.path.join(shm_dir, "ro.img"))
    os.chmod(path, 0o444)
    before = digest(path)
    for args in ((), ("wal",), ("ls", "/"), ("stat", "/after"), ("inode", "1"),
                 ("orphans",), ("--no-replay",), ("--json", "ls")):
        rc, out, err = inspect(capsys, path, *args)
        assert rc == 0, (args, err)
    assert digest(path) == before


def test_large_image_snapshots_only_metadata(capsys, pop_image, monkeypatch):
    path, ino, _data = pop_image
    rc, full, _ = inspect_json(capsys, path, "ls", "/dir/sub")
    monkeypatch.setattr(inspector, "FULL_SNAPSHOT_MAX", 0)
    # as if mounted: the daemon's exclusive lock means a snapshot is needed
    holder = open_image(path, readonly=True, lock="exclusive")
    try:
        rc, part, err = inspect_json(capsys, path, "ls", "/dir/sub")
    finally:
        holder.close()
    assert rc == 0, err
    assert any("read in place" in n for n in part["notes"])
    assert part["entries"] == full["entries"]


def test_unmounted_image_is_read_in_place_under_a_shared_lock(pop_image):
    path, _ino, _data = pop_image
    insp = inspector.Inspection(path)
    try:
        insp.open()
        assert insp.quiet and insp.img.snap_end == 0  # nothing copied
        assert insp.vol.resolve("/dir/sub") > 0
        # a mount (exclusive lock) cannot start while it is being inspected
        with pytest.raises(ImageBusy):
            open_image(path, lock="exclusive")
    finally:
        insp.close()
    open_image(path, lock="exclusive").close()
    # mounted (locked): a snapshot, the metadata regions copied
    holder = open_image(path, readonly=True, lock="exclusive")
    insp = inspector.Inspection(path)
    try:
        insp.open()
        assert not insp.quiet and insp.img.snap_end > 0
        assert insp.vol.resolve("/dir/sub") > 0
    finally:
        insp.close()
        holder.close()


def test_snapshot_of_a_sparse_region_allocates_only_its_data(shm_dir):
    """The copy of a mostly empty 64 MiB region costs memory for its data
    pages only (the inode table of a large image is mostly holes)."""
    path = os.path.join(shm_dir, "sparse.img")
    with open(path, "wb") as f:
        f.truncate(64 << 20)
        f.seek(5 << 20)
        f.write(b"x" * 4096)
    img = open_image(path, readonly=True)
    try:
        def rss_kib():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
        before = rss_kib()
        copy = img.read_copy(0, 64 << 20)
        grown = rss_kib() - before
        assert bytes(copy[5 << 20:(5 << 20) + 4096]) == b"x" * 4096
        assert copy[:4096] == bytes(4096) and copy[-4096:] == bytes(4096)
        assert grown < 16 << 10, f"copying 64 MiB with 4 KiB of data grew RSS by {grown} KiB"
    finally:
        img.close()


def test_console_script_and_broken_pipe(shm_dir):
    img = fresh_image(8 << 20, inodes=4096)
    fs = FileSystem(img, MountOptions())
    for i in range(3000):
        fs.mknod(ROOT, b"file-with-a-longish-name-%05d" % i, stat.S_IFREG | 0o644)
    fs.close()
    path = save(bytes(img.data), os.path.join(shm_dir, "many.img"))
    r = subprocess.run([prog("pmfs-inspect"), path, "ls", "/", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["entries"]) == 3001
    # a reader that goes away early: no error message, no traceback
    p = subprocess.Popen([prog("pmfs-inspect"), path, "ls", "/"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=30)
    p.stderr.close()
    assert err == "" and p.returncode in (0, 141)


@pytest.mark.fuse
def test_inspect_a_mounted_image(shm_dir):
    if not fuse_available():
        pytest.fail("FUSE is not available (/dev/fuse, fusermount3)")
    image = os.path.join(shm_dir, "m.img")
    mkfs(image, "64M", "-L", "live")
    m = PmfsMount(image, os.path.join(shm_dir, "mnt")).mount()
    try:
        os.mkdir(os.path.join(m.path, "d"))
        for i in range(20):
            with open(os.path.join(m.path, "d", f"f{i}"), "wb") as f:
                f.write(b"%d" % i * 5000)
        held = open(os.path.join(m.path, "d", "f0"), "rb")
        os.unlink(os.path.join(m.path, "d", "f0"))
        held_ino = os.fstat(held.fileno()).st_ino

        def insp(*args):
            r = subprocess.run([prog("pmfs-inspect"), "--json", image, *args],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)
        d = insp()
        sb = d["superblock"]
        assert not sb["clean"] and sb["label"] == "live"
        assert sb["owner"]["pid"] == m.proc.pid and sb["owner"]["running"] is True
        # the daemon keeps its last record in the log, already applied
        assert d["wal"]["replay_changes_bytes"] == 0
        ls = insp("ls", "/d")
        assert sorted(e["name"] for e in ls["entries"]) == sorted(f"f{i}" for i in range(1, 20))
        for e in ls["entries"]:
            assert e["size"] == len(b"%d" % int(e["name"][1:]) * 5000)
            assert e["ino"] == os.stat(os.path.join(m.path, "d", e["name"])).st_ino
        orph = insp("orphans")
        assert [o["ino"] for o in orph["orphans"]] == [held_ino]
        st = insp("stat", "/d/f7")
        assert st["size"] == 5000 and st["ino"] == os.stat(os.path.join(m.path, "d/f7")).st_ino
        held.close()
    finally:
        m.unmount()
    d = json.loads(subprocess.run([prog("pmfs-inspect"), "--json", image],
                                  capture_output=True, text=True).stdout)
    assert d["superblock"]["clean"] and d["wal"]["state"] == "empty" and d["orphans"] == 0
    assert d["superblock"]["owner"] == {"pid": 0, "host": "", "running": None}


# --------------------------------------------------------------------------
# cat: a file's bytes out of the image
# --------------------------------------------------------------------------


def cat(path, *args):
    return subprocess.run([prog("pmfs-inspect"), path, "cat", *map(str, args)],
                          capture_output=True, timeout=60)


def test_cat_writes_the_exact_bytes(pop_image, shm_dir):
    path, ino, data = pop_image
    fs = open_fs(data)
    for name, p in (("data", "/dir/data"), ("big", "/big")):
        want = bytes(fs.read(ino[name], 0, fs.iget(ino[name]).size))
        assert len(want) == fs.iget(ino[name]).size
        for arg in (p, ino[name], hex(ino[name])):
            r = cat(path, arg)
            assert r.returncode == 0 and r.stderr == b"", r.stderr
            assert r.stdout == want, (name, arg)
    # holes read as zeros, and a hole up to EOF (a truncate up) too
    img = MemoryImage(data)
    fs = FileSystem(img, MountOptions())
    f = fs.create(ROOT, b"sparse", 0o644).ino
    fs.write(f, 5 * BS + 7, b"middle")
    fs.setattr(f, size=40 * BS + 3)
    e = fs.create(ROOT, b"empty", 0o644).ino
    fs.close()
    p2 = save(bytes(img.data), os.path.join(shm_dir, "sparse.img"))
    r = cat(p2, "/sparse")
    assert r.returncode == 0
    assert r.stdout == bytes(5 * BS + 7) + b"middle" + bytes(40 * BS + 3 - 5 * BS - 13)
    r = cat(p2, e)
    assert r.returncode == 0 and r.stdout == b""


def test_cat_of_what_is_not_a_regular_file(pop_image):
    path, ino, _data = pop_image
    for arg, key, what in (("/dir", "dir", "a directory"), ("/sym", "sym", "a symbolic link"),
                           ("/fifo", "fifo", "a fifo"), ("/null", "chr", "a character device")):
        r = cat(path, arg)
        err = r.stderr.decode()
        assert r.returncode == 8 and err.count("\n") == 1 and r.stdout == b"", err
        assert err == f"pmfs-inspect: inode {ino[key]} is {what}, not a regular file\n"
    r = cat(path, "/nope")
    assert r.returncode == 8 and r.stderr == b"pmfs-inspect: /nope: no such file or directory\n"
    r = subprocess.run([prog("pmfs-inspect"), "--json", path, "cat", "/big"],
                       capture_output=True)
    assert r.returncode == 16 and b"--json does not apply" in r.stderr


def test_cat_rescues_a_file_from_an_image_that_does_not_mount(pop_image, shm_dir):
    path, ino, data = pop_image
    want = bytes(open_fs(data).read(ino["data"], 0, 101 * BS))
    sb = SuperblockManager(MemoryImage(data)).load()
    buf = bytearray(data)
    buf[sb.bbitmap_start * BS + 1000] ^= 0x10  # FileSystem refuses this image
    with pytest.raises(Exception):
        open_fs(bytes(buf))
    p = save(bytes(buf), os.path.join(shm_dir, "bm.img"))
    r = cat(p, "/dir/data")
    assert r.returncode == 0 and r.stdout == want
    # never written
    assert open(p, "rb").read() == bytes(buf)
