"""fsck.pmfs: one test per class of damage, through the in-process API.

Each test damages a real image built through the core (files with content,
directories, hard links, symlinks, xattrs, a fifo, a multi-block directory,
a file with an extent index) and checks the e2fsck contract:

* check-only (`check(img)`, what `-n` runs) reports the damage with exit 4
  and does not change one byte of the image;
* repair (`check(img, repair=True)`, what `-y` runs) exits 1;
* a second run is clean (exit 0, no problems, nothing to recover);
* every file the damage did not touch reads back bit for bit through
  FileSystem (and what it touched is saved where it can be).

Crash leftovers that mount itself recovers from (log records, a torn
record, an interrupted superblock update, orphans) are "notes", not
errors: check-only exits 0 for them, repair exits 1 (image modified).
"""

from __future__ import annotations

import stat

import pytest

from pmfs.crashsim import CrashSimulator, apply
from pmfs.fsck import EXIT_FIXED, EXIT_UNCORRECTED, OverlayImage, check
from pmfs.layout import (BLOCK_SIZE, DT_DIR, DT_LNK, DT_REG, I_ORPHAN, ROOT_INO, SB_CLEAN,
                         SB_FSCK_RUNNING, SB_NEEDS_FSCK)
from pmfs.pmem import MemoryImage, TracingImage
from pmfs.superblock import SuperblockManager, read_replicas
from test_fsck_helpers import (Geo, build_image, content, copy_of, flip, lookup_path, mount,
                               snapshot)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def base():
    return build_image()


@pytest.fixture(scope="module")
def orig(base):
    return snapshot(base)


@pytest.fixture
def img(base):
    return copy_of(base)


def under(path: bytes, roots) -> bool:
    return any(path == r or path.startswith(r + b"/") for r in roots)


def cycle(img, orig, expect: str, affected=(), notes_only=False):
    """The -n / -y / second run contract; returns (snapshot after, repair result)."""
    before = bytes(img.buf)
    r = check(img)
    assert bytes(img.buf) == before, "check without repair changed the image"
    if notes_only:
        assert r.exit_code == 0, r.problems
        assert not r.problems
        assert any(expect in n for n in r.notes), r.notes
    else:
        assert r.exit_code == EXIT_UNCORRECTED, (r.exit_code, r.problems)
        assert any(expect in p for p in r.problems), r.problems
        assert r.errors_found == len(r.problems) and r.errors_fixed == 0
    predicted = list(r.problems)
    r = check(img, repair=True)
    assert r.exit_code == EXIT_FIXED, (r.exit_code, r.problems, r.fatal)
    assert r.problems == predicted, "-n did not predict what -y does"
    assert r.errors_fixed == r.errors_found
    r2 = check(img, repair=True)
    assert (r2.exit_code, r2.problems, r2.notes) == (0, [], []), (r2.problems, r2.notes)
    r3 = check(img)
    assert (r3.exit_code, r3.problems, r3.notes) == (0, [], [])
    snap = snapshot(img)
    for path, desc in orig.items():
        if not under(path, affected):
            assert snap.get(path) == desc, f"{path!r} changed"
    return snap, r


# --------------------------------------------------------------------------
# the clean case
# --------------------------------------------------------------------------


def test_clean_image_is_clean(img, orig):
    before = bytes(img.buf)
    r = check(img)
    assert (r.exit_code, r.problems, r.notes, r.errors_found) == (0, [], [], 0)
    assert "0 errors found" in r.summary
    assert bytes(img.buf) == before
    r = check(img, repair=True)
    assert (r.exit_code, r.problems, r.errors_fixed) == (0, [], 0)
    assert snapshot(img) == orig
    sb = SuperblockManager(img).load()
    assert sb.state & SB_CLEAN and not sb.state & (SB_FSCK_RUNNING | SB_NEEDS_FSCK)
    assert sb.fsck_time > 0


def test_counts_in_summary(img, orig):
    r = check(img)
    nfiles = sum(1 for d in orig.values() if d[0] != "dir")
    ndirs = sum(1 for d in orig.values() if d[0] == "dir") + 1  # + the root
    # hard links: one inode, two names
    assert f"{nfiles - 1} files, {ndirs} directories" in r.summary, r.summary


def test_quick_check_without_force(img):
    r = check(img, force=False)
    assert r.exit_code == 0 and "clean" in r.summary
    # a damaged image that still says clean is not checked without -f ...
    g = Geo(img)
    ino = lookup_path(img, b"/f1")
    i = g.inode(ino)
    i.nlink = 9
    g.put_inode(i)
    assert check(img, force=False).exit_code == 0
    assert check(img, force=True).exit_code == EXIT_UNCORRECTED
    # ... but one flagged for fsck (or not clean) is
    sbm = SuperblockManager(img)
    sb = sbm.load()
    sbm.update(state=sb.state | SB_NEEDS_FSCK)
    assert check(img, force=False).exit_code == EXIT_UNCORRECTED
    r = check(img, repair=True, force=False)
    assert r.exit_code == EXIT_FIXED
    sb = SuperblockManager(img).load()
    assert not sb.state & SB_NEEDS_FSCK and sb.state & SB_CLEAN
    assert check(img, force=False).exit_code == 0


def test_interrupted_repair_forces_a_check(img):
    sbm = SuperblockManager(img)
    sb = sbm.load()
    sbm.update(state=sb.state | SB_FSCK_RUNNING)
    r = check(img, force=False)
    assert "clean," not in r.summary and "errors found" in r.summary
    check(img, repair=True)
    assert not SuperblockManager(img).load().state & SB_FSCK_RUNNING


# --------------------------------------------------------------------------
# pass 1: inodes
# --------------------------------------------------------------------------


def test_flipped_inode_checksum(img, orig):
    g = Geo(img)
    ino = lookup_path(img, b"/a/f2")
    flip(img, g.inode_off(ino) + 250, 3)  # a bit of the checksum itself
    snap, _r = cycle(img, orig, f"inode {ino}: checksum mismatch")
    assert snap == orig  # nothing lost: the contents were fine


def test_flipped_inode_field_keeps_the_file(img, orig):
    g = Geo(img)
    ino = lookup_path(img, b"/frag1")  # an inode with an extent index
    flip(img, g.inode_off(ino) + 50, 5)  # mtime
    snap, _r = cycle(img, orig, f"inode {ino}: checksum mismatch")
    assert snap == orig


def test_inode_with_bad_checksum_and_garbage_is_cleared(img, orig):
    g = Geo(img)
    ino = lookup_path(img, b"/two")
    raw = bytearray(img.read(g.inode_off(ino), 256))
    raw[0:4] = (0o170000 | 0o777).to_bytes(4, "little")  # no such file type
    img.write(g.inode_off(ino), bytes(raw))
    snap, r = cycle(img, orig, f"inode {ino}", affected=[b"/two"])
    assert b"/two" not in snap
    assert any("points at unused inode" in p for p in r.problems)


def test_extent_outside_the_data_area(img, orig):
    g = Geo(img)
    ino = lookup_path(img, b"/a/f2")
    (s, n, p), = g.extents(ino)[0]
    g.set_root_extents(ino, [(s, n, 5)])  # block 5: the log
    snap, r = cycle(img, orig, "outside the data area", affected=[b"/a/f2", b"/s1"])
    # the mapping is dropped (a hole now), the size kept, nothing else touched
    kind, _mode, size, data, _x = snap[b"/a/f2"]
    assert size == 3 * BLOCK_SIZE and data == bytes(size)
    assert any("block bitmap" in p and "unused" in p for p in r.problems)
    fs = mount(copy_of(img))
    assert fs.statfs()["f_bfree"] == mount(copy_of(img), readonly=True).bbm.free


def test_damaged_extent_node(img, orig):
    g = Geo(img)
    ino = lookup_path(img, b"/frag1")
    ext, nodes = g.extents(ino)
    assert nodes, "frag1 should have an index node"
    flip(img, nodes[0] * BLOCK_SIZE + 100)
    snap, _r = cycle(img, orig, f"extent node {nodes[0]}", affected=[b"/frag1"])
    kind, _mode, size, data, _x = snap[b"/frag1"]
    assert size == 40 * BLOCK_SIZE and data == bytes(size)  # the extents were in the node


def test_bad_block_count(img, orig):
    g = Geo(img)
    ino = lookup_path(img, b"/a/b/big")
    i = g.inode(ino)
    i.blocks += 3
    g.put_inode(i)
    cycle(img, orig, f"inode {ino}: block count")
    assert g.inode(ino).blocks == 51


def test_bad_xattr_block(img, orig):
    g = Geo(img)
    ino = lookup_path(img, b"/f1")
    x = g.inode(ino).xattr
    flip(img, x * BLOCK_SIZE + 40)
    snap, _r = cycle(img, orig, "extended attributes", affected=[b"/f1", b"/a/hardlink"])
    assert snap[b"/f1"][3] == orig[b"/f1"][3] and snap[b"/f1"][4] == ()


def test_special_file_with_blocks(img, orig):
    g = Geo(img)
    ino = lookup_path(img, b"/fifo")
    (_s, _n, p), = g.extents(lookup_path(img, b"/one"))[0]
    g.set_root_extents(ino, [(0, 1, p)])
    cycle(img, orig, "fifo or socket with data blocks")


def test_free_slot_with_bad_checksum(img, orig):
    g = Geo(img)
    fs = mount(img)
    f = fs.create(ROOT_INO, b"gone", 0o644)
    fs.unlink(ROOT_INO, b"gone")  # a freed, checksummed slot
    fs.close()
    flip(img, g.inode_off(f.ino) + 30)
    snap, _r = cycle(img, orig, f"inode {f.ino}: free inode slot with a bad checksum")
    assert snap == orig


# --------------------------------------------------------------------------
# pass 1b: blocks owned twice
# --------------------------------------------------------------------------


def test_doubly_used_block(img, orig):
    g = Geo(img)
    one, two = lookup_path(img, b"/one"), lookup_path(img, b"/two")
    e1, _ = g.extents(one)
    g.set_root_extents(two, e1)  # /two's block is now /one's (and its own leaked)
    snap, r = cycle(img, orig, f"also used by inode(s) {one}", affected=[b"/two"])
    assert snap[b"/one"] == orig[b"/one"]
    assert snap[b"/two"][3] == orig[b"/one"][3]  # the copy
    assert g.extents(one)[0] == e1 and g.extents(two)[0][0][2] != e1[0][2]
    # the copies are independent
    fs = mount(img)
    fs.write(two, 0, b"changed")
    fs.close()
    assert snapshot(img)[b"/one"] == orig[b"/one"]
    assert check(img).exit_code == 0


def test_block_shared_with_an_extent_node(img, orig):
    g = Geo(img)
    frag = lookup_path(img, b"/frag1")
    _ext, nodes = g.extents(frag)
    two = lookup_path(img, b"/two")
    g.set_root_extents(two, [(0, 1, nodes[0])])  # data of /two = frag1's node
    snap, _r = cycle(img, orig, f"also used by inode(s) {frag}", affected=[b"/two"])
    assert snap[b"/frag1"] == orig[b"/frag1"]  # the metadata owner keeps the block


# --------------------------------------------------------------------------
# pass 2: directories
# --------------------------------------------------------------------------


def test_dangling_directory_entry(img, orig):
    g = Geo(img)
    a = lookup_path(img, b"/a")
    g.add_entry(a, b"ghost", 400, DT_REG)  # inode 400 is free
    snap, _r = cycle(img, orig, "entry b'ghost' points at unused inode 400")
    assert snap == orig


def test_entry_of_an_inode_whose_slot_was_lost(img, orig):
    g = Geo(img)
    ino = lookup_path(img, b"/a/b/c/deep")
    img.write(g.inode_off(ino), bytes(256))
    snap, r = cycle(img, orig, f"points at unused inode {ino}", affected=[b"/a/b/c/deep"])
    assert b"/a/b/c/deep" not in snap
    assert any("inode bitmap" in p for p in r.problems)
    assert any("block bitmap" in p for p in r.problems)


def test_corrupted_directory_record(img, orig):
    g = Geo(img)
    many = lookup_path(img, b"/many")
    recs = [r for r in g.dir_records(many) if r[2]]
    off, _pos, victim, _rl, _ft, name = recs[10]
    flip(img, off + 20)  # in the name: the record no longer verifies
    path = b"/many/" + name
    snap, _r = cycle(img, orig, "damaged records", affected=[path])
    assert path not in snap
    # the inode is saved in lost+found, contents intact
    saved = snap[b"/lost+found/#%d" % victim]
    assert saved == orig[path]


def test_zeroed_directory_block(img, orig):
    g = Geo(img)
    many = lookup_path(img, b"/many")
    (s, n, p) = g.extents(many)[0][0]
    recs = [r for r in g.dir_records(many) if r[2] and r[1] < BLOCK_SIZE]
    img.write(p * BLOCK_SIZE, bytes(BLOCK_SIZE))
    lost = [b"/many/" + r[5] for r in recs]
    snap, _r = cycle(img, orig, "damaged records", affected=lost)
    for _o, _p, ino, _rl, _ft, name in recs:
        assert snap[b"/lost+found/#%d" % ino] == orig[b"/many/" + name]
    assert all(path not in snap for path in lost)


def test_illegal_and_duplicate_names_and_wrong_type(img, orig):
    g = Geo(img)
    a = lookup_path(img, b"/a")
    one = lookup_path(img, b"/one")
    two = lookup_path(img, b"/two")
    g.add_entry(a, b"x/y", one, DT_REG)  # illegal character
    g.add_entry(a, b"f2", two, DT_REG)  # a second 'f2' in /a
    g.add_entry(a, b"..", two, DT_REG)  # '..' is never stored
    g.add_entry(ROOT_INO, b"typed", one, DT_LNK)  # wrong file type
    snap, r = cycle(img, orig, "illegal name")
    text = "\n".join(r.problems)
    assert "rename it to b'x.y'" in text
    assert "is a duplicate name" in text
    assert "has the illegal name b'..'" in text
    assert "has file type" in text
    assert snap[b"/a/x.y"] == orig[b"/one"] and snap[b"/typed"] == orig[b"/one"]
    assert snap[b"/a/f2"] == orig[b"/a/f2"]
    fs = mount(copy_of(img), readonly=True)
    assert fs.getattr(one).nlink == 3  # /one, /a/x.y, /typed


def test_second_name_of_a_directory_and_wrong_dotdot(img, orig):
    g = Geo(img)
    a, b = lookup_path(img, b"/a"), lookup_path(img, b"/a/b")
    g.add_entry(ROOT_INO, b"alias", b, DT_DIR)  # a directory hard link
    c = lookup_path(img, b"/a/b/c")
    i = g.inode(c)
    i.parent = a  # '..' of c names a directory that does not hold it
    g.put_inode(i)
    snap, r = cycle(img, orig, "has a second name")
    assert any(f"directory {c}: '..' is {a}, should be {b}" in p for p in r.problems)
    assert b"/alias" not in snap
    assert g.inode(c).parent == b


def test_directory_size_and_hole(img, orig):
    g = Geo(img)
    many = lookup_path(img, b"/many")
    i = g.inode(many)
    i.size += BLOCK_SIZE  # one block more than mapped: a hole at the end
    g.put_inode(i)
    snap, _r = cycle(img, orig, f"directory {many}: size")
    assert snap == orig


# --------------------------------------------------------------------------
# pass 3: connectivity
# --------------------------------------------------------------------------


def test_lost_directory_goes_to_lost_and_found(img, orig):
    g = Geo(img)
    a = lookup_path(img, b"/a")
    b = g.remove_entry(a, b"b")
    snap, r = cycle(img, orig, f"directory {b} is not connected to the root",
                    affected=[b"/a/b"])
    assert any(f"inode {a}: link count 3, should be 2" in p for p in r.problems)
    for path, desc in orig.items():
        if under(path, [b"/a/b"]):
            assert snap[b"/lost+found/#%d" % b + path[len(b"/a/b"):]] == desc
    fs = mount(copy_of(img), readonly=True)
    assert fs.getattr(b).parent == lookup_path(img, b"/lost+found")


def test_missing_lost_and_found_is_created(img, orig):
    g = Geo(img)
    lf = g.remove_entry(ROOT_INO, b"lost+found")
    b = g.remove_entry(lookup_path(img, b"/a"), b"b")
    snap, r = cycle(img, orig, "'/lost+found' is missing", affected=[b"/a/b", b"/lost+found"])
    new_lf = lookup_path(img, b"/lost+found")
    assert new_lf != lf
    assert snap[b"/lost+found/#%d/big" % b] == orig[b"/a/b/big"]
    assert snap[b"/lost+found/#%d" % lf][0] == "dir"  # the old one, reconnected


def test_unreachable_directory_loop(img, orig):
    g = Geo(img)
    a = lookup_path(img, b"/a")
    c = lookup_path(img, b"/a/b/c")
    g.remove_entry(ROOT_INO, b"a")
    g.add_entry(c, b"loop", a, DT_DIR)  # /a is now only inside its own subtree
    i = g.inode(a)
    i.parent = c
    g.put_inode(i)
    snap, r = cycle(img, orig, "form a loop", affected=[b"/a", b"/s1"])
    moved = {p: d for p, d in snap.items() if p.startswith(b"/lost+found/#")}
    for path, desc in orig.items():
        if under(path, [b"/a"]) and desc[0] == "file":
            assert desc in moved.values(), path


def test_unnamed_file_is_reconnected(img, orig):
    g = Geo(img)
    ino = g.remove_entry(lookup_path(img, b"/a/b"), b"big")
    snap, _r = cycle(img, orig, f"inode {ino} (1 link) has no name", affected=[b"/a/b/big"])
    assert snap[b"/lost+found/#%d" % ino] == orig[b"/a/b/big"]


def test_root_inode_destroyed(img, orig):
    g = Geo(img)
    img.write(g.inode_off(ROOT_INO), bytes(256))
    snap, r = cycle(img, orig, "root directory is missing", affected=list(orig))
    # every file survives somewhere under /lost+found
    files = {d for d in snap.values() if d[0] == "file"}
    for path, desc in orig.items():
        if desc[0] == "file":
            assert desc in files, path


# --------------------------------------------------------------------------
# pass 4: link counts, orphans
# --------------------------------------------------------------------------


def test_wrong_link_count(img, orig):
    g = Geo(img)
    ino = lookup_path(img, b"/f1")
    i = g.inode(ino)
    i.nlink = 7
    g.put_inode(i)
    snap, _r = cycle(img, orig, f"inode {ino}: link count 7, should be 2")
    assert snap == orig
    assert mount(copy_of(img), readonly=True).getattr(ino).nlink == 2


def test_wrong_directory_link_count(img, orig):
    g = Geo(img)
    a = lookup_path(img, b"/a")
    i = g.inode(a)
    i.nlink = 1
    g.put_inode(i)
    cycle(img, orig, f"inode {a}: link count 1, should be 3")


def test_orphan_flag_without_the_list(img, orig):
    g = Geo(img)
    ino = lookup_path(img, b"/one")
    i = g.inode(ino)
    i.flags |= I_ORPHAN
    g.put_inode(i)
    snap, _r = cycle(img, orig, "orphan list")
    assert snap == orig and not g.inode(ino).flags & I_ORPHAN


def test_orphan_list_to_a_free_inode(img, orig):
    g = Geo(img)
    h = g.inode(0)
    h.orphan_next = 300
    g.put_inode(h)
    snap, _r = cycle(img, orig, "orphan list: it links to unused inode 300")
    assert snap == orig and g.inode(0).orphan_next == 0


def test_orphan_list_loop(img, orig):
    g = Geo(img)
    one, two = lookup_path(img, b"/one"), lookup_path(img, b"/two")
    h = g.inode(0)
    h.orphan_next = one
    g.put_inode(h)
    for ino, nxt, prv in ((one, two, 0), (two, one, one)):
        i = g.inode(ino)
        i.flags |= I_ORPHAN
        i.orphan_next, i.orphan_prev = nxt, prv
        g.put_inode(i)
    snap, _r = cycle(img, orig, "orphan list")
    assert snap == orig


def test_unlinked_inode_not_on_the_list_is_freed(img, orig):
    g = Geo(img)
    ino = g.remove_entry(ROOT_INO, b"two")
    i = g.inode(ino)
    i.nlink = 0
    g.put_inode(i)
    ext, _ = g.extents(ino)
    snap, _r = cycle(img, orig, f"inode {ino}: no links and no name", affected=[b"/two"])
    assert not g.test_bit("i", ino)
    assert g.inode(ino).mode == 0
    assert not g.test_bit("b", ext[0][2])


def test_orphans_left_by_a_crash_are_recovery_not_errors(img, orig):
    g = Geo(img)
    fs = mount(img)
    one = fs.lookup(ROOT_INO, b"one").ino
    blocks = [p for _s, _n, p in fs.tree(fs.iget(one)).extents()]
    fs.open(one)
    fs.unlink(ROOT_INO, b"one")  # unlinked while open: on the orphan list
    # (the power fails: never released, never unmounted)
    snap, r = cycle(img, orig, f"inode {one}: unlinked while open", affected=[b"/one"],
                    notes_only=True)
    assert b"/one" not in snap
    assert not g.test_bit("i", one) and not any(g.test_bit("b", p) for p in blocks)


def test_interrupted_truncation_is_completed(img, orig):
    g = Geo(img)
    ino = lookup_path(img, b"/a/b/big")
    i = g.inode(ino)
    i.size = 2 * BLOCK_SIZE  # the size was cut, the blocks not yet freed
    i.flags |= I_ORPHAN
    g.put_inode(i)
    h = g.inode(0)
    h.orphan_next = ino
    g.put_inode(h)
    ext, _ = g.extents(ino)
    snap, _r = cycle(img, orig, "interrupted truncation", affected=[b"/a/b/big"],
                     notes_only=True)
    assert snap[b"/a/b/big"][3] == orig[b"/a/b/big"][3][:2 * BLOCK_SIZE]
    assert g.inode(ino).blocks == 2
    (_s, _n, p), = ext
    assert g.test_bit("b", p + 1) and not g.test_bit("b", p + 2)


# --------------------------------------------------------------------------
# pass 5: bitmaps, counters
# --------------------------------------------------------------------------


def test_leaked_block(img, orig):
    g = Geo(img)
    blk = g.sb.total_blocks - 5
    assert not g.test_bit("b", blk)
    free = mount(copy_of(img), readonly=True).bbm.free
    g.set_bit("b", blk, True)
    snap, _r = cycle(img, orig, "1 block marked in use but unused")
    assert snap == orig and not g.test_bit("b", blk)
    fs = mount(copy_of(img), readonly=True)
    assert fs.bbm.free == free and fs.sb.free_blocks == free


def test_used_block_marked_free(img, orig):
    g = Geo(img)
    (_s, _n, p), = g.extents(lookup_path(img, b"/one"))[0]
    g.set_bit("b", p, False)
    snap, _r = cycle(img, orig, "1 block in use but marked free")
    assert snap == orig and g.test_bit("b", p)


def test_leaked_inode(img, orig):
    g = Geo(img)
    g.set_bit("i", 450, True)
    snap, _r = cycle(img, orig, "1 inode marked in use but unused")
    assert not g.test_bit("i", 450)


def test_bitmap_block_checksum(img, orig):
    g = Geo(img)
    flip(img, g.sb.bbitmap_start * BLOCK_SIZE + BLOCK_SIZE - 64 + 17)  # trailer checksum
    snap, _r = cycle(img, orig, "fail their checksum")
    assert snap == orig
    mount(copy_of(img)).close()  # mount verifies every bitmap block


def test_free_counts_of_a_clean_superblock(img, orig):
    sbm = SuperblockManager(img)
    sb = sbm.load()
    sbm.update(free_blocks=sb.free_blocks + 7)
    cycle(img, orig, "superblock: free counts")
    assert SuperblockManager(img).load().free_blocks == sb.free_blocks


# --------------------------------------------------------------------------
# the superblock
# --------------------------------------------------------------------------


def _replica_off(img, newest: bool) -> int:
    reps = read_replicas(img)
    order = sorted(range(2), key=lambda i: reps[i][0].version)
    return (order[1] if newest else order[0]) * BLOCK_SIZE


def test_torn_superblock_replica_is_recovery(img, orig):
    off = _replica_off(img, newest=False)
    raw = bytearray(img.read(off, 512))
    raw[200:300] = bytes(100)  # half a new version written ...
    raw[496:504] = bytes(8)  # ... commit word not yet stored
    img.write(off, bytes(raw))
    snap, _r = cycle(img, orig, "interrupted update", notes_only=True)
    assert snap == orig
    assert all(sb is not None for sb, _e in read_replicas(img))


def test_damaged_superblock_replica(img, orig):
    off = _replica_off(img, newest=False)
    img.write(off, b"GARBAGE!")
    snap, _r = cycle(img, orig, "is damaged (bad superblock magic)")
    assert snap == orig
    assert all(sb is not None for sb, _e in read_replicas(img))


def test_newest_replica_damaged_falls_back(img, orig):
    off = _replica_off(img, newest=True)
    img.write(off, bytes(512))
    snap, _r = cycle(img, orig, "is damaged")
    assert snap == orig


def test_both_replicas_flipped_are_salvaged(img, orig):
    for off in (0, BLOCK_SIZE):
        flip(img, off + 40)  # in the label: checksum mismatch, fields fine
    assert all(sb is None for sb, _e in read_replicas(img))
    snap, r = cycle(img, orig, "salvage")
    assert snap == orig


def test_no_superblock_at_all_is_an_operational_error(img):
    img.write(0, bytes(2 * BLOCK_SIZE))
    r = check(img)
    assert r.exit_code == 8 and "not a pmfs file system" in r.fatal
    r = check(img, repair=True)
    assert r.exit_code == 8 and r.problems == [r.fatal]


# --------------------------------------------------------------------------
# the log
# --------------------------------------------------------------------------


class Crash(Exception):
    pass


def crash_after_commit(img, op):
    """Run op on a mounted image; the power fails right after its log record
    is durable (committed), before it is applied in place."""
    fs = mount(img)

    def hook(stage, tx):
        if stage == "logged":
            raise Crash()
    fs.wal.debug_hook = hook
    with pytest.raises(Crash):
        op(fs)
    return fs


def _last_record(fs):
    recs = list(fs.wal.scan())
    pos, _txid, _kind, _raw, length = recs[-1]
    return fs.wal.area_off + pos % fs.wal.area_size, length


def test_committed_but_unapplied_transaction(img, orig):
    crash_after_commit(img, lambda fs: fs.mkdir(ROOT_INO, b"newdir", 0o755))
    r = check(img)
    assert r.exit_code == 0 and "0 errors found" in r.summary
    assert "2 directories" not in r.summary  # the check saw the replayed mkdir
    snap, _r = cycle(img, orig, "committed transaction(s)", notes_only=True)
    assert snap[b"/newdir"][0] == "dir"


def test_committed_transaction_on_an_image_marked_clean(img, orig):
    crash_after_commit(img, lambda fs: fs.create(ROOT_INO, b"newfile", 0o644))
    sbm = SuperblockManager(img)
    sb = sbm.load()
    sbm.update(state=sb.state | SB_CLEAN)  # clean means: the log is empty
    snap, _r = cycle(img, orig, "superblock marked clean but the log holds 1")
    assert b"/newfile" in snap


def test_torn_last_record(img, orig):
    fs = crash_after_commit(img, lambda fs: fs.create(ROOT_INO, b"newfile", 0o644))
    off, length = _last_record(fs)
    flip(img, off + length - 100)  # the record is torn: not committed
    snap, _r = cycle(img, orig, "torn record of uncommitted transaction", notes_only=True)
    assert b"/newfile" not in snap and snap == orig


def test_log_header_destroyed(img, orig):
    g = Geo(img)
    img.write(g.sb.wal_start * BLOCK_SIZE, bytes(128))
    snap, _r = cycle(img, orig, "log: WAL header damaged")
    assert snap == orig
    fs = mount(img)
    fs.create(ROOT_INO, b"after", 0o644)
    fs.close()
    assert check(img).exit_code == 0


def test_torn_log_header_slot_is_recovery(img, orig):
    g = Geo(img)
    fs = mount(img)
    fs.create(ROOT_INO, b"x1", 0o644)
    fs.close()
    hdr = g.sb.wal_start * BLOCK_SIZE
    slot = fs.wal.hdr_slot  # the newest slot: damage the other one
    flip(img, hdr + (1 - slot) * 64 + 20)
    snap, _r = cycle(img, orig, "log header", notes_only=True)


# --------------------------------------------------------------------------
# preen
# --------------------------------------------------------------------------


def test_preen_fixes_safe_problems(img, orig):
    g = Geo(img)
    ino = lookup_path(img, b"/f1")
    i = g.inode(ino)
    i.nlink = 5
    g.put_inode(i)
    g.set_bit("b", g.sb.total_blocks - 3, True)
    r = check(img, repair=True, preen=True)
    assert r.exit_code == EXIT_FIXED and not r.preen_halted
    assert r.errors_fixed == r.errors_found == 3  # + the superblock's free count
    assert check(img).exit_code == 0 and snapshot(img) == orig


def test_preen_refuses_unsafe_problems_and_changes_nothing(img, orig):
    g = Geo(img)
    g.add_entry(lookup_path(img, b"/a"), b"ghost", 400, DT_REG)
    i = g.inode(lookup_path(img, b"/f1"))
    i.nlink = 5
    g.put_inode(i)
    before = bytes(img.buf)
    r = check(img, repair=True, preen=True)
    assert r.exit_code == EXIT_UNCORRECTED and r.preen_halted
    assert any("ghost" in line for line in r.unsafe)
    assert bytes(img.buf) == before
    assert check(img, repair=True).exit_code == EXIT_FIXED


# --------------------------------------------------------------------------
# properties of the implementation
# --------------------------------------------------------------------------


def test_overlay_never_writes_its_base(img):
    ov = OverlayImage(img)
    before = bytes(img.buf)
    ov.write(5000, b"x" * 9000)
    ov.zero(100, 50)
    assert bytes(ov.read(5000, 9000)) == b"x" * 9000
    assert bytes(ov.read(4990, 20)) == before[4990:5000] + b"x" * 10
    assert bytes(ov.read(100, 50)) == bytes(50)
    assert bytes(img.buf) == before


def test_read_only_image_is_checked_without_writing(tmp_path, img):
    from pmfs.pmem import open_image
    from test_fsck_helpers import image_file, read_file
    crash_after_commit(img, lambda fs: fs.create(ROOT_INO, b"newfile", 0o644))
    path = image_file(tmp_path, img)
    before = read_file(path)
    ro = open_image(path, readonly=True, lock="shared")
    try:
        r = check(ro)
        assert r.exit_code == 0 and any("committed" in n for n in r.notes)
        r = check(ro, repair=True)
        assert r.exit_code == 8  # cannot repair a read-only image
    finally:
        ro.close()
    assert read_file(path) == before


def test_repairs_are_crash_safe(img, orig):
    """Crash the repair itself at every fence: a new fsck run on any of
    those states repairs the image completely, and every file the damage
    did not touch survives."""
    g = Geo(img)
    a = lookup_path(img, b"/a")
    b = g.remove_entry(a, b"b")  # -> lost+found (tree rebuild, dir add, nlink)
    one, two = lookup_path(img, b"/one"), lookup_path(img, b"/two")
    g.set_root_extents(two, g.extents(one)[0])  # -> clone
    f1 = lookup_path(img, b"/f1")
    i = g.inode(f1)
    i.nlink = 4
    g.put_inode(i)
    tr = TracingImage(img)
    r = check(tr, repair=True)
    assert r.exit_code == EXIT_FIXED
    sim = CrashSimulator(tr.initial, tr.events)
    pts = sim.fence_points()
    assert len(pts) > 20
    step = max(1, len(pts) // 25)
    n = 0
    for _point, durable, states in sim.states(points=pts[::step], k=1, max_states=2):
        for st in [None] + list(states)[:2]:
            im = MemoryImage(bytes(durable) if st is None else bytes(apply(durable, st)))
            r1 = check(im, repair=True)
            assert not r1.exit_code & 12, (r1.exit_code, r1.problems, r1.fatal)
            r2 = check(im)
            assert (r2.exit_code, r2.problems, r2.notes) == (0, [], []), r2.problems
            snap = snapshot(im)
            for path, desc in orig.items():
                if not under(path, [b"/a/b", b"/two"]):
                    assert snap.get(path) == desc, path
                else:  # the lost directory is saved, whole, in lost+found
                    if under(path, [b"/a/b"]):
                        assert snap[b"/lost+found/#%d" % b + path[4:]] == desc, path
            n += 1
    assert n >= 20


def test_damage_everywhere_in_one_image(img, orig):
    """Several classes at once; one repair fixes all of them."""
    g = Geo(img)
    ino = lookup_path(img, b"/a/f2")
    flip(img, g.inode_off(ino) + 250)
    g.add_entry(ROOT_INO, b"ghost", 401, DT_REG)
    b = g.remove_entry(lookup_path(img, b"/a"), b"b")
    g.set_bit("b", g.sb.total_blocks - 9, True)
    i = g.inode(lookup_path(img, b"/f1"))
    i.nlink = 1
    g.put_inode(i)
    snap, r = cycle(img, orig, "checksum mismatch", affected=[b"/a/b"])
    assert len(r.problems) >= 6
    assert snap[b"/lost+found/#%d/c/deep" % b] == orig[b"/a/b/c/deep"]


@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_new_work_after_repair(img, kind):
    """A repaired image is a working file system."""
    g = Geo(img)
    g.remove_entry(lookup_path(img, b"/a"), b"b")
    check(img, repair=True)
    fs = mount(img)
    lf = fs.lookup(ROOT_INO, b"lost+found").ino
    if kind == "file":
        f = fs.create(lf, b"new", 0o644)
        fs.write(f.ino, 0, content("new", 20000))
    elif kind == "dir":
        d = fs.mkdir(lf, b"newdir", 0o755)
        for k in range(100):
            fs.create(d.ino, b"n%03d" % k, 0o644)
    else:
        fs.symlink(lf, b"ln", b"t" * 500)
    for name in list(fs.listdir(lf)):
        ino = fs.lookup(lf, name).ino
        if stat.S_ISDIR(fs.getattr(ino).mode):
            fs.rename(lf, name, ROOT_INO, b"restored-" + name.lstrip(b"#"))
    fs.close()
    r = check(img)
    assert (r.exit_code, r.problems) == (0, [])
