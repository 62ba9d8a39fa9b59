"""mkfs.pmfs, run as the installed console script."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import uuid as uuidlib

import pytest

from pmfs.fs import FileSystem
from pmfs.layout import BLOCK_SIZE, ROOT_INO, compute_geometry, fs_seed, min_image_size
from pmfs.pmem import open_image
from pmfs.superblock import SuperblockManager
from pmfs.wal import WAL

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 8, 16
M = 1 << 20


def mkfs_path() -> str:
    here = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "mkfs.pmfs")
    if os.access(here, os.X_OK):
        return here
    found = shutil.which("mkfs.pmfs")
    assert found, "the mkfs.pmfs console script is not installed (pip install -e .)"
    return found


MKFS = mkfs_path()


class Result:
    def __init__(self, p: subprocess.CompletedProcess):
        self.rc, self.out, self.err = p.returncode, p.stdout, p.stderr

    def one_line_error(self) -> str:
        msg = self.err.strip()
        assert msg.startswith("mkfs.pmfs: ") and "\n" not in msg, self.err
        return msg


def mkfs(*args, cwd=None) -> Result:
    env = dict(os.environ)
    env.pop("PMFS_DEBUG", None)
    p = subprocess.run([MKFS, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=120)
    r = Result(p)
    assert "Traceback" not in r.err and "Traceback" not in r.out, r.err
    return r


def superblock(path):
    img = open_image(str(path), readonly=True)
    try:
        m = SuperblockManager(img)
        sb = m.load()
        pending = WAL(img, sb.wal_start, sb.wal_blocks, fs_seed(sb.uuid)).pending()
        return sb, pending, m.other_valid
    finally:
        img.close()


def fallocate_supported(d) -> bool:
    p = os.path.join(d, ".probe")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, 1 << 16)
        return os.fstat(fd).st_blocks * 512 >= 1 << 16
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(p)


# --------------------------------------------------------------------------
# a successful mkfs, checked in-process
# --------------------------------------------------------------------------

def test_mkfs_creates_a_clean_file_system(tmp_path):
    img = tmp_path / "fs.img"
    u = "12345678-9abc-4def-8123-456789abcdef"
    r = mkfs("-L", "my volume", "-U", u, "-N", 1000, "-J", "512k", img, "64M")
    assert r.rc == EXIT_OK, r.err
    assert r.err == ""
    assert "inode table" in r.out and "my volume" in r.out and u in r.out
    st = os.stat(img)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 64 * M
    if fallocate_supported(tmp_path):
        assert st.st_blocks * 512 >= st.st_size  # allocated by default

    geo = compute_geometry(64 * M, 1000, 512 * 1024 // BLOCK_SIZE)
    sb, pending, both = superblock(img)
    assert sb.clean and pending == 0 and both
    assert sb.label == "my volume"
    assert sb.uuid == uuidlib.UUID(u).bytes
    assert sb.inode_count == 1008  # -N rounded up to whole inode-table blocks
    assert sb.wal_blocks == 128
    assert {k: getattr(sb, k) for k in geo.as_dict()} == geo.as_dict()
    assert sb.owner_pid == 0 and sb.mount_count >= 1
    assert sb.free_blocks == geo.data_blocks - 1 and sb.free_inodes == 1008 - 3

    fs = FileSystem(open_image(str(img)))
    try:
        root = fs.getattr(ROOT_INO)
        assert stat.S_ISDIR(root.mode) and stat.S_IMODE(root.mode) == 0o755
        assert (root.uid, root.gid) == (os.getuid(), os.getgid())
        assert root.nlink == 3
        entries = fs.listdir(ROOT_INO)
        assert list(entries) == [b"lost+found"]
        lf = fs.lookup(ROOT_INO, b"lost+found")
        assert lf.ino == entries[b"lost+found"]
        assert lf.mode == stat.S_IFDIR | 0o700 and lf.nlink == 2 and lf.parent == ROOT_INO
        assert fs.listdir(lf.ino) == {}
        names = [e[0] for e in fs.readdir(ROOT_INO)]
        assert names == [b".", b"..", b"lost+found"]
        sf = fs.statfs()
        assert sf["f_bsize"] == BLOCK_SIZE
        assert sf["f_blocks"] == geo.data_blocks
        assert sf["f_bfree"] == sf["f_bavail"] == geo.data_blocks - 1  # the root's block
        assert sf["f_files"] == 1008 - 1  # slot 0 is the orphan-list head
        assert sf["f_ffree"] == 1008 - 3  # orphan head, root, lost+found
        assert fs.orphans() == []
        # it is a working file system
        f = fs.create(ROOT_INO, b"hello", 0o644)
        fs.write(f.ino, 0, b"world")
    finally:
        fs.close()
    sb, pending, _ = superblock(img)
    assert sb.clean and pending == 0 and sb.free_inodes == 1008 - 4


def test_quiet_prints_nothing_and_sparse(tmp_path):
    img = tmp_path / "q.img"
    r = mkfs("-q", "--sparse", img, "1G")
    assert r.rc == EXIT_OK and r.out == "" and r.err == ""
    st = os.stat(img)
    assert st.st_size == 1 << 30
    assert st.st_blocks * 512 < 16 * M  # sparse: only the metadata written
    sb, pending, _ = superblock(img)
    assert sb.clean and pending == 0
    assert sb.total_blocks == (1 << 30) // BLOCK_SIZE
    assert sb.wal_blocks == 1024  # default: 1/256 of the image
    assert sb.inode_count == (1 << 30) // 16384


@pytest.mark.parametrize("size,nbytes", [("64M", 64 * M), ("2m", 2 * M), ("1.5MiB", 3 * M // 2),
                                         ("1048576", M), ("4096k", 4 * M)])
def test_size_suffixes(tmp_path, size, nbytes):
    img = tmp_path / "s.img"
    r = mkfs("-q", "--sparse", img, size)
    assert r.rc == EXIT_OK, r.err
    assert os.stat(img).st_size == nbytes
    assert superblock(img)[0].total_blocks == nbytes // BLOCK_SIZE


def test_uuid_options(tmp_path):
    seen = set()
    for opt, check in [("random", lambda u: uuidlib.UUID(bytes=u).version == 4),
                       ("RANDOM", lambda u: uuidlib.UUID(bytes=u).version == 4),
                       ("time", lambda u: uuidlib.UUID(bytes=u).version == 1),
                       ("clear", lambda u: u == bytes(16))]:
        img = tmp_path / f"{opt}.img"
        assert mkfs("-q", "--sparse", "-U", opt, img, "2M").rc == EXIT_OK
        u = superblock(img)[0].uuid
        assert check(u), opt
        seen.add(u)
    assert len(seen) == 4  # two random uuids differ
    # default: random
    img = tmp_path / "default.img"
    assert mkfs("-q", "--sparse", img, "2M").rc == EXIT_OK
    assert superblock(img)[0].uuid not in seen
    r = mkfs("-U", "not-a-uuid", tmp_path / "bad.img", "2M")
    assert r.rc == EXIT_USAGE and "UUID" in r.one_line_error()
    assert not (tmp_path / "bad.img").exists()


def test_block_size_option(tmp_path):
    for bs in ("4096", "4k"):
        img = tmp_path / f"b{bs}.img"
        assert mkfs("-q", "--sparse", "-b", bs, img, "2M").rc == EXIT_OK
        assert superblock(img)[0].block_size == 4096
    for bs in ("1024", "8192", "junk"):
        r = mkfs("-b", bs, tmp_path / "x.img", "2M")
        assert r.rc == EXIT_USAGE and "block size" in r.one_line_error()
        assert not (tmp_path / "x.img").exists()


def test_dry_run_writes_nothing(tmp_path):
    img = tmp_path / "dry.img"
    r = mkfs("-n", "-L", "dry", img, "64M")
    assert r.rc == EXIT_OK and r.err == ""
    assert not img.exists()
    geo = compute_geometry(64 * M)
    for word in ("superblocks", "WAL", "inode bitmap", "block bitmap", "inode table", "data",
                 "dry run", "dry"):
        assert word in r.out
    assert str(geo.data_start) in r.out and str(geo.itable_blocks) in r.out
    # an existing file is left untouched, even a foreign one
    other = tmp_path / "other"
    other.write_bytes(b"precious" * 1000)
    r = mkfs("-n", other, "2M")
    assert r.rc == EXIT_OK and other.read_bytes() == b"precious" * 1000


def test_inode_and_wal_options(tmp_path):
    img = tmp_path / "n.img"
    assert mkfs("-q", "--sparse", "-N", 17, img, "8M").rc == EXIT_OK
    assert superblock(img)[0].inode_count == 32
    for bad in ("0", "-5", "many"):
        r = mkfs("-q", "-N", bad, tmp_path / "x", "8M")
        assert r.rc == EXIT_USAGE and "inode" in r.one_line_error()
    img = tmp_path / "j.img"
    assert mkfs("-q", "--sparse", "-J", "1M", img, "8M").rc == EXIT_OK
    assert superblock(img)[0].wal_blocks == 256
    # a WAL below its minimum, or one that leaves no room: one line, exit 8
    r = mkfs("-q", "-J", "100k", tmp_path / "x", "8M")
    assert r.rc == EXIT_ERROR and "WAL" in r.one_line_error()
    r = mkfs("-q", "-J", "8M", tmp_path / "x", "8M")
    assert r.rc == EXIT_ERROR and "too small" in r.one_line_error()
    assert not (tmp_path / "x").exists()


def test_label_too_long(tmp_path):
    r = mkfs("-L", "x" * 64, tmp_path / "x", "2M")
    assert r.rc == EXIT_USAGE and "label" in r.one_line_error()
    img = tmp_path / "ok.img"
    assert mkfs("-q", "--sparse", "-L", "\u00e9" * 31, img, "2M").rc == EXIT_OK
    assert superblock(img)[0].label == "\u00e9" * 31


# --------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["512k", str(min_image_size() - BLOCK_SIZE), "1"])
def test_size_too_small(tmp_path, size):
    img = tmp_path / "small.img"
    r = mkfs(img, size)
    assert r.rc == EXIT_ERROR
    msg = r.one_line_error()
    assert "too small" in msg and str(min_image_size()) in msg
    assert r.out == ""
    assert not img.exists()


def test_smallest_image(tmp_path):
    img = tmp_path / "min.img"
    assert mkfs("-q", img, min_image_size()).rc == EXIT_OK
    sb, pending, _ = superblock(img)
    assert sb.total_blocks * BLOCK_SIZE == min_image_size() and sb.clean
    fs = FileSystem(open_image(str(img)))
    try:
        assert fs.statfs()["f_bfree"] > 0
    finally:
        fs.close()


def test_missing_size(tmp_path):
    r = mkfs(tmp_path / "new.img")
    assert r.rc == EXIT_USAGE and "SIZE" in r.one_line_error()
    assert not (tmp_path / "new.img").exists()
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    r = mkfs(empty)
    assert r.rc == EXIT_USAGE and "SIZE" in r.one_line_error()
    r = mkfs("--sparse", tmp_path / "x.img", "lots")
    assert r.rc == EXIT_USAGE and "size" in r.one_line_error()


def test_existing_pmfs_needs_force(tmp_path):
    img = tmp_path / "fs.img"
    assert mkfs("-q", "--sparse", img, "4M").rc == EXIT_OK
    old = superblock(img)[0]
    before = img.read_bytes()
    r = mkfs(img)
    assert r.rc == EXIT_ERROR
    msg = r.one_line_error()
    assert "pmfs" in msg and "use -F" in msg
    assert img.read_bytes() == before
    # with -F: a new file system; SIZE resizes, none keeps the size
    r = mkfs("-q", "-F", "--sparse", img)
    assert r.rc == EXIT_OK, r.err
    new = superblock(img)[0]
    assert new.uuid != old.uuid and new.total_blocks == old.total_blocks and new.clean
    assert mkfs("-q", "-F", "--sparse", img, "8M").rc == EXIT_OK
    assert os.stat(img).st_size == 8 * M and superblock(img)[0].total_blocks == 2048


def test_damaged_pmfs_replica_still_detected(tmp_path):
    img = tmp_path / "fs.img"
    assert mkfs("-q", "--sparse", img, "4M").rc == EXIT_OK
    with open(img, "r+b") as f:  # replica A gone: B still says pmfs
        f.write(bytes(512))
    r = mkfs(img)
    assert r.rc == EXIT_ERROR and "use -F" in r.one_line_error()


def test_foreign_signature(tmp_path):
    img = tmp_path / "ext4.img"
    data = bytearray(4 * M)
    data[1080:1082] = b"\x53\xef"
    img.write_bytes(bytes(data))
    r = mkfs(img)
    assert r.rc == EXIT_ERROR
    msg = r.one_line_error()
    assert "ext2/3/4" in msg and "-F" in msg
    assert img.read_bytes() == bytes(data)
    r = mkfs("-F", "--sparse", "-q", img)
    assert r.rc == EXIT_OK, r.err
    sb, pending, _ = superblock(img)
    assert sb.clean and sb.total_blocks == 1024 and pending == 0
    with open(img, "rb") as f:
        f.seek(1080)
        assert f.read(2) != b"\x53\xef"  # the old signature is gone


def test_plain_nonempty_file_is_formatted(tmp_path):
    img = tmp_path / "junk.img"
    img.write_bytes(b"\x00" * 100 + b"random text" * 1000)
    r = mkfs("-q", "--sparse", img, "2M")
    assert r.rc == EXIT_OK, r.err
    assert superblock(img)[0].clean


def test_image_is_a_directory(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    r = mkfs(d, "64M")
    assert r.rc == EXIT_ERROR and "directory" in r.one_line_error()
    assert list(d.iterdir()) == []


def test_image_in_missing_directory(tmp_path):
    r = mkfs(tmp_path / "no" / "such" / "img", "2M")
    assert r.rc == EXIT_ERROR
    r.one_line_error()


def test_unknown_option_and_help(tmp_path):
    r = mkfs("--frobnicate", tmp_path / "x", "2M")
    assert r.rc == EXIT_USAGE and "--help" in r.one_line_error()
    assert not (tmp_path / "x").exists()
    r = mkfs()
    assert r.rc == EXIT_USAGE
    r.one_line_error()
    r = mkfs("--help")
    assert r.rc == 0 and r.err == ""
    assert "usage: mkfs.pmfs" in r.out and "-F" in r.out and "IMAGE" in r.out
    r = mkfs("-V")
    assert r.rc == 0 and "mkfs.pmfs" in r.out


def test_prefault_writes_the_whole_image(shm_dir):
    """--prefault leaves no page of the image unwritten (on tmpfs a page that
    is only reserved reads as a hole to SEEK_HOLE; a written one is data)."""
    size = 64 * M
    plain = os.path.join(shm_dir, "plain.img")
    pre = os.path.join(shm_dir, "pre.img")
    assert mkfs("-q", plain, "64M").rc == EXIT_OK
    assert mkfs("-q", "--prefault", pre, "64M").rc == EXIT_OK
    for path in (plain, pre):
        assert os.stat(path).st_size == size
        assert os.stat(path).st_blocks * 512 >= size  # both reserved
        sb, pending, _ = superblock(path)
        assert sb.clean and pending == 0
    with open(plain, "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) < size  # reserved, unwritten
    with open(pre, "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == size  # every page written
        # the unused end of the data area reads as zeros
        f.seek(size - M)
        assert f.read(M) == bytes(M)
    # an existing image is emptied and written again
    assert mkfs("-q", "-F", "--prefault", plain).rc == EXIT_OK
    with open(plain, "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == size
    # a prefaulted image is a file system like any other
    img = open_image(pre)
    try:
        fs = FileSystem(img)
        ino = fs.create(ROOT_INO, b"f", stat.S_IFREG | 0o644).ino
        fs.write(ino, 0, b"x" * 10000)
        assert fs.read(ino, 0, 10000) == b"x" * 10000
        fs.close()
    finally:
        img.close()


def test_prefault_usage_errors(tmp_path):
    r = mkfs("--prefault", "--sparse", tmp_path / "x.img", "16M")
    assert r.rc == EXIT_USAGE and "mutually exclusive" in r.one_line_error()
    assert not (tmp_path / "x.img").exists()
    r = mkfs("--prefault", "/dev/null")
    assert r.rc == EXIT_USAGE and "image files, not devices" in r.one_line_error()
