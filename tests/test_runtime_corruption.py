"""Damaged metadata met while mounted.

With the daemon serving an image on /dev/shm, a structure is damaged *in the
image file* behind its back (the daemon maps the file MAP_SHARED, so
os.pwrite on the file changes what it sees): an inode, a directory block, an
extent-tree node, an xattr block.  The objects are made in a first mount and
the image is mounted again, so the daemon's DRAM caches are cold and it has
to read the damaged bytes; the mount uses attr_timeout=0,entry_timeout=0 so
the kernel asks the daemon every time.

Then, for each kind of damage:

* accessing the object returns EIO, every time, for that object only;
* every other file keeps working and the daemon keeps serving (new files can
  be made, written and read);
* the daemon logs the damage once, however often it is met;
* after unmount the superblock carries SB_NEEDS_FSCK, `fsck.pmfs -n`
  reports the damage (exit 4), `fsck.pmfs -y` repairs it (exit 1), after
  which `fsck.pmfs -f -n` is clean (exit 0) and the image mounts and works.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess

import pytest

from conftest import PmfsMount, fuse_available, fuse_mounted, mkfs, prog
from pmfs.layout import (BLOCK_SIZE, INODE_SIZE, SB_NEEDS_FSCK, Inode,
                         decode_root_entries, fs_seed)
from pmfs.pmem import open_image
from pmfs.superblock import SuperblockManager

pytestmark = pytest.mark.fuse

OPTS = "attr_timeout=0,entry_timeout=0"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def slurp(path: str) -> bytes:
    """The content of a file (closed at once: an open file on the mount
    would keep an unmount busy)."""
    with open(path, "rb") as f:
        return f.read()


def fsck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([prog("fsck.pmfs"), *args], capture_output=True, text=True,
                          timeout=120)


def superblock(image: str):
    img = open_image(image, readonly=True)
    try:
        return SuperblockManager(img).load()
    finally:
        img.close()


def read_inode(image: str, ino: int) -> Inode:
    sb = superblock(image)
    with open(image, "rb") as f:
        raw = os.pread(f.fileno(), INODE_SIZE, sb.itable_start * BLOCK_SIZE + ino * INODE_SIZE)
    return Inode.decode(ino, raw, fs_seed(sb.uuid))


def inode_offset(image: str, ino: int) -> int:
    return superblock(image).itable_start * BLOCK_SIZE + ino * INODE_SIZE


def first_extent_block(image: str, ino: int) -> tuple[int, int]:
    """(depth, image block of the first root entry) of inode `ino`."""
    inode = read_inode(image, ino)
    ents = decode_root_entries(inode.root, inode.count)
    assert ents, f"inode {ino} maps nothing"
    return inode.depth, ents[0][2]


def flip(image: str, off: int, mask: int = 0xFF) -> None:
    """Damage one byte of the image file (the daemon sees it at once)."""
    fd = os.open(image, os.O_RDWR)
    try:
        b = os.pread(fd, 1, off)
        os.pwrite(fd, bytes([b[0] ^ mask]), off)
    finally:
        os.close(fd)


def expect_eio(fn, *args) -> None:
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == errno.EIO, f"{fn.__name__}{args}: {e.value!r}, expected EIO"


def corruption_lines(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if "corrupted metadata" in ln]


@pytest.fixture
def prepared(shm_dir):
    """An image holding the objects to damage, made in a first mount, and a
    mount of it with cold caches.  Yields (mount, {name: ino})."""
    if not fuse_available():
        pytest.fail("FUSE is not available (/dev/fuse, fusermount3)")
    image = os.path.join(shm_dir, "fs.img")
    mkfs(image, "32M")
    mnt = os.path.join(shm_dir, "mnt")
    m = PmfsMount(image, mnt, OPTS)
    m.mount()
    try:
        p = m.path
        for name in ("victim", "bystander"):
            with open(os.path.join(p, name), "wb") as f:
                f.write(name.encode() * 100)
        os.mkdir(os.path.join(p, "dir"))
        for i in range(5):
            with open(os.path.join(p, "dir", f"entry{i}"), "wb") as f:
                f.write(b"%d" % i)
        os.mkdir(os.path.join(p, "otherdir"))
        with open(os.path.join(p, "otherdir", "kept"), "wb") as f:
            f.write(b"kept")
        # a file with more extents than the inode root holds (7): one every
        # other block, so none merge -> a depth-1 extent tree
        fd = os.open(os.path.join(p, "fragmented"), os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            for i in range(24):
                os.pwrite(fd, bytes([65 + i]) * BLOCK_SIZE, 2 * i * BLOCK_SIZE)
        finally:
            os.close(fd)
        with open(os.path.join(p, "xfile"), "wb") as f:
            f.write(b"x")
        os.setxattr(os.path.join(p, "xfile"), "user.colour", b"blue")
        os.setxattr(os.path.join(p, "xfile"), "user.shape", b"round")
        inos = {n: os.lstat(os.path.join(p, n)).st_ino
                for n in ("victim", "bystander", "dir", "otherdir", "fragmented", "xfile")}
    finally:
        assert m.unmount() == 0
    r = fsck("-f", "-n", image)
    assert r.returncode == 0, r.stdout + r.stderr
    assert first_extent_block(image, inos["fragmented"])[0] >= 1, "no extent node made"
    assert read_inode(image, inos["xfile"]).xattr != 0
    m.mount()
    try:
        yield m, inos
    finally:
        m.unmount()
        assert not fuse_mounted(mnt)


def still_serving(p: str, unlink: bool = True) -> None:
    """The daemon answers, and everything but the damaged object works."""
    with open(os.path.join(p, "bystander"), "rb") as f:
        assert f.read() == b"bystander" * 100
    assert slurp(os.path.join(p, "otherdir", "kept")) == b"kept"
    q = os.path.join(p, "otherdir", "new-after-damage")
    with open(q, "wb") as f:
        f.write(b"fresh" * 1000)
        f.flush()
        os.fsync(f.fileno())
    with open(q, "rb") as f:
        assert f.read() == b"fresh" * 1000
    os.rename(q, q + ".renamed")
    if unlink:
        os.unlink(q + ".renamed")
        assert sorted(os.listdir(os.path.join(p, "otherdir"))) == ["kept"]


def after_unmount(m: PmfsMount, damaged: str, check_gone=None) -> None:
    """Unmount, then: needs-fsck flag, fsck -n exit 4 naming the damage (the
    regex `damaged`), -y exit 1 fixing it, clean afterwards, mounts and
    works."""
    assert m.unmount() == 0
    log = m.log_text()
    assert "Traceback" not in log, log
    sb = superblock(m.image)
    assert sb.state & SB_NEEDS_FSCK, f"superblock state {sb.state:#x} lacks SB_NEEDS_FSCK"
    r = fsck("-n", m.image)
    assert r.returncode == 4, f"fsck -n exit {r.returncode}\n{r.stdout}{r.stderr}"
    assert re.search(damaged + r".*\[not fixed\]", r.stdout), r.stdout
    assert "Traceback" not in r.stderr
    r = fsck("-y", m.image)
    assert r.returncode == 1, f"fsck -y exit {r.returncode}\n{r.stdout}{r.stderr}"
    assert re.search(damaged + r".*\[fixed\]", r.stdout), r.stdout
    r = fsck("-f", "-n", m.image)
    assert r.returncode == 0, f"fsck -f -n after repair exit {r.returncode}\n{r.stdout}"
    assert not superblock(m.image).state & SB_NEEDS_FSCK
    m.mount()
    p = m.path
    with open(os.path.join(p, "bystander"), "rb") as f:
        assert f.read() == b"bystander" * 100
    assert slurp(os.path.join(p, "otherdir", "kept")) == b"kept"
    if check_gone:
        check_gone(p)
    with open(os.path.join(p, "after-repair"), "wb") as f:
        f.write(b"ok")
    assert m.unmount() == 0
    r = fsck("-f", "-n", m.image)
    assert r.returncode == 0, r.stdout + r.stderr


def assert_logged_once(m: PmfsMount, pattern: str) -> None:
    lines = corruption_lines(m.log_text())
    hits = [ln for ln in lines if re.search(pattern, ln)]
    assert len(hits) == 1, (f"expected the damage ({pattern}) logged once, got "
                            f"{len(hits)}:\n" + "\n".join(lines))


# --------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------


def test_damaged_inode(prepared):
    m, inos = prepared
    p = m.path
    ino = inos["victim"]
    flip(m.image, inode_offset(m.image, ino) + 4)  # a byte of the uid
    victim = os.path.join(p, "victim")
    for _ in range(5):
        expect_eio(os.stat, victim)
        expect_eio(open, victim, "rb")
    still_serving(p)
    assert_logged_once(m, rf"inode {ino}\b")
    after_unmount(m, rf"inode {ino}: checksum mismatch")


def test_damaged_directory_block(prepared):
    m, inos = prepared
    p = m.path
    d = inos["dir"]
    depth, blk = first_extent_block(m.image, d)
    assert depth == 0
    # the name of the first record in the directory's first block
    flip(m.image, blk * BLOCK_SIZE + 16, 0x01)
    dpath = os.path.join(p, "dir")
    for _ in range(5):
        expect_eio(os.listdir, dpath)
        expect_eio(os.stat, os.path.join(dpath, "entry3"))
    assert os.stat(dpath).st_ino == d  # the directory's inode itself is fine
    still_serving(p)
    assert_logged_once(m, rf"directory {d}\b")
    after_unmount(m, rf"directory {d}: .*damaged records")


def test_damaged_extent_node(prepared):
    m, inos = prepared
    p = m.path
    ino = inos["fragmented"]
    depth, node = first_extent_block(m.image, ino)
    assert depth >= 1
    flip(m.image, node * BLOCK_SIZE + 40)  # inside the first entry
    fpath = os.path.join(p, "fragmented")
    st = os.stat(fpath)  # the inode is fine: only its map is damaged
    assert st.st_size == 47 * BLOCK_SIZE
    for _ in range(5):
        fd = os.open(fpath, os.O_RDONLY)
        try:
            expect_eio(os.pread, fd, BLOCK_SIZE, 0)
        finally:
            os.close(fd)
    still_serving(p)
    assert_logged_once(m, rf"extent node {node}\b")
    after_unmount(m, rf"extent node {node}: checksum mismatch")


def test_damaged_xattr_block(prepared):
    m, inos = prepared
    p = m.path
    ino = inos["xfile"]
    blk = read_inode(m.image, ino).xattr
    flip(m.image, blk * BLOCK_SIZE + 40)  # inside the first entry
    xpath = os.path.join(p, "xfile")
    for _ in range(5):
        expect_eio(os.getxattr, xpath, "user.colour")
        expect_eio(os.listxattr, xpath)
    # the file's data and attributes are not damaged
    assert slurp(xpath) == b"x"
    still_serving(p)
    assert_logged_once(m, rf"xattr block {blk}\b")
    after_unmount(m, rf"xattr block {blk}: checksum mismatch")


def test_damaged_inode_leaves_its_directory_listable(prepared):
    """readdir of a directory holding a damaged inode lists the others (the
    damaged one is EIO when it is looked up, not the whole directory)."""
    m, inos = prepared
    p = m.path
    ino = inos["victim"]
    flip(m.image, inode_offset(m.image, ino) + 4)
    # met first by readdir (which answers every entry with its attributes)
    for _ in range(3):
        names = set(os.listdir(p))
        assert {"bystander", "dir", "otherdir", "fragmented", "xfile",
                "lost+found"} <= names
    assert superblock(m.image).state & SB_NEEDS_FSCK, "damage met by readdir not flagged"
    expect_eio(os.stat, os.path.join(p, "victim"))
    still_serving(p)
    assert_logged_once(m, rf"inode {ino}\b")
    log = m.log_text()
    assert "Traceback" not in log and "internal error" not in log, log
    after_unmount(m, rf"inode {ino}: checksum mismatch")


def test_damaged_extent_node_met_when_freeing(prepared):
    """A file whose extent tree is damaged is replaced by a rename: the
    kernel holds it (rename looks the target up), so it is freed later, as
    an orphan -- at the latest when the file system is unmounted.  The
    rename works (or is EIO and changes nothing); freeing meets the damage:
    logged once as corruption (no traceback), flagged, repairable."""
    m, inos = prepared
    p = m.path
    ino = inos["fragmented"]
    depth, node = first_extent_block(m.image, ino)
    flip(m.image, node * BLOCK_SIZE + 40)
    src = os.path.join(p, "victim")
    dst = os.path.join(p, "fragmented")
    try:
        os.rename(src, dst)
        renamed = True
    except OSError as e:
        assert e.errno == errno.EIO, repr(e)
        renamed = False
        assert os.stat(dst).st_ino == ino
    with open(dst if renamed else src, "rb") as f:
        assert f.read() == b"victim" * 100
    still_serving(p)
    assert m.unmount() == 0
    log = m.log_text()
    assert "Traceback" not in log, log
    assert_logged_once(m, rf"extent node {node}\b")
    m.mount()
    after_unmount(m, rf"extent node {node}: checksum mismatch")


def test_damaged_orphan_list_head(prepared):
    """Inode slot 0 heads the orphan list: unlinking an open file needs it.
    The daemon reads it once, at mount (orphan processing), and keeps it in
    DRAM, so the damage is met there: logged, and the unlink is EIO
    (nothing changes) or works; the daemon goes on."""
    m, inos = prepared
    assert m.unmount() == 0
    flip(m.image, inode_offset(m.image, 0) + 96)  # its orphan `next`
    m.mount()
    p = m.path
    victim = os.path.join(p, "victim")
    fd = os.open(victim, os.O_RDWR)
    try:
        try:
            os.unlink(victim)
            unlinked = True
        except OSError as e:
            assert e.errno == errno.EIO, repr(e)
            unlinked = False
            assert os.stat(victim).st_ino == inos["victim"]
        assert os.pread(fd, 9, 0) == b"victimvic"
        os.pwrite(fd, b"still writable", 0)
    finally:
        os.close(fd)
    assert os.path.exists(victim) != unlinked
    # every unlink of a file the kernel holds needs the orphan list: EIO
    # for those is the price of a damaged list head
    still_serving(p, unlink=False)
    assert_logged_once(m, r"inode 0\b|orphan")
    after_unmount(m, r"orphan list: its head")


def test_entry_naming_a_zeroed_inode(prepared):
    """An inode slot wiped to zeros (a valid *free* slot, no checksum to
    fail) while its name stays in the directory: the name is damage, not a
    missing file -- EIO for lookup, create, unlink, rename and link of that
    name (never ENOENT from stat and EEXIST from create at once), logged
    once, the image marked for fsck; the directory's other names work."""
    m, inos = prepared
    p = m.path
    ino = inos["victim"]
    fd = os.open(m.image, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(INODE_SIZE), inode_offset(m.image, ino))
    finally:
        os.close(fd)
    victim = os.path.join(p, "victim")
    for _ in range(3):
        expect_eio(os.stat, victim)
        expect_eio(open, victim, "rb")
        expect_eio(os.open, victim, os.O_CREAT | os.O_WRONLY, 0o644)
        expect_eio(os.unlink, victim)
        expect_eio(os.rename, victim, os.path.join(p, "elsewhere"))
        expect_eio(os.rename, os.path.join(p, "bystander"), victim)
        expect_eio(os.mkdir, victim)
    assert "victim" not in os.listdir(p)  # the listing skips it
    assert os.path.exists(os.path.join(p, "bystander"))
    still_serving(p)
    assert_logged_once(m, r"directory entry b'victim' names inode \d+, which is free")
    after_unmount(m, r"victim",
                  check_gone=lambda q: not os.path.lexists(os.path.join(q, "victim")))


def test_mount_fuzz_bounded():
    """tools/mount-fuzz in a CI-sized run: random damage to populated
    images met by pmfs-inspect and by the daemon (before the mount, and
    behind its back while it serves), a walk and changes through the mount,
    then fsck -y and a clean fsck -f -n; no traceback, the daemon never
    dies."""
    import sys
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "tools", "mount-fuzz")
    r = subprocess.run([sys.executable, tool, "--seed", "100", "--cases", "8"],
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "mount-fuzz: 8 cases" in out and "all cases passed" in out, out
    assert "Traceback" not in out, out
