"""mkfs.pmfs: create a pmfs file system in an image file or on a device.

    mkfs.pmfs [options] IMAGE [SIZE]

The formatter writes the dual superblock, an empty WAL, the inode and block
bitmaps, a zeroed inode table and the root directory, then creates
/lost+found through the file-system core (one ordinary transaction).

Exit codes: 0 success, 8 operational error, 16 usage error.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import sys
import time
import uuid as uuidlib

from pmfs import __version__
from pmfs.alloc import Bitmap
from pmfs.cli import ArgumentParser, Progress, QuietError, UsageError, human, parse_size, run
from pmfs.layout import (BLOCK_SIZE, INODE_SIZE, MIN_WAL_BLOCKS, ORPHAN_HEAD_INO, ROOT_INO,
                         SB_CLEAN, Geometry, Inode, Superblock, compute_geometry, fs_seed, min_image_size)
from pmfs.pmem import open_image
from pmfs.superblock import write_replica
from pmfs.wal import WAL

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 8, 16

#: signatures of other file systems / containers we refuse to overwrite
#: without -F: (offset, bytes, name)
SIGNATURES = [
    (1080, b"\x53\xef", "an ext2/3/4 file system"),
    (0, b"XFSB", "an XFS file system"),
    (65600, b"_BHRfS_M", "a btrfs file system"),
    (4086, b"SWAPSPACE2", "swap space"),
    (4086, b"SWAP-SPACE", "swap space"),
    (0, b"LUKS\xba\xbe", "a LUKS container"),
    (32769, b"CD001", "an ISO 9660 image"),
    (3, b"NTFS    ", "an NTFS file system"),
    (82, b"FAT32   ", "a FAT32 file system"),
    (54, b"FAT1", "a FAT file system"),
    (0, b"hsqs", "a squashfs image"),
    (1024, b"\x10\x20\xf5\xf2", "an F2FS file system"),
    (0, b"QFI\xfb", "a qcow2 image"),
]


def detect_signature(path: str) -> str | None:
    """What `path` holds, if it is something recognisable (else None)."""
    try:
        with open(path, "rb") as f:
            head = f.read(65536 + 4096)
    except OSError:
        return None
    if head[:8] == b"PMFS\x00SB\x01" or head[BLOCK_SIZE:BLOCK_SIZE + 8] == b"PMFS\x00SB\x01":
        return "a pmfs file system"
    for off, sig, name in SIGNATURES:
        if head[off:off + len(sig)] == sig:
            return name
    return None


def parse_uuid(text: str) -> bytes:
    t = text.lower()
    if t in ("random", "time"):
        return (uuidlib.uuid1() if t == "time" else uuidlib.uuid4()).bytes
    if t == "clear":
        return bytes(16)
    try:
        return uuidlib.UUID(text).bytes
    except ValueError:
        raise UsageError(f"invalid UUID {text!r} (use a UUID, 'random', 'time' or "
                         f"'clear')") from None


def format_image(img, geo: Geometry, label: str = "", uuid: bytes | None = None,
                 owner: tuple[int, int] = (0, 0), progress: Progress | None = None,
                 zero_metadata: bool = True) -> Superblock:
    """Write an empty pmfs file system (without lost+found) into `img`."""
    uuid = uuid if uuid is not None else uuidlib.uuid4().bytes
    seed = fs_seed(uuid)
    now = time.time_ns()
    # invalidate any old superblock first: a crash half-way through mkfs
    # leaves an image that is clearly not a (valid) file system
    img.zero(0, 2 * BLOCK_SIZE)
    if zero_metadata:
        start = geo.wal_start * BLOCK_SIZE
        end = geo.data_start * BLOCK_SIZE
        step = 64 << 20
        p = start
        while p < end:
            k = min(step, end - p)
            img.zero(p, k, drain=False)
            p += k
            if progress:
                progress.update(p - start, end - start, "zeroing metadata")
        img.fence()
    WAL.format(img, geo.wal_start, seed)
    ibm = Bitmap(img, seed, geo.ibitmap_start, geo.ibitmap_blocks, geo.inode_count, "inode")
    ibm._mask_tail()
    ibm._set_range(ORPHAN_HEAD_INO, 1, True)
    ibm._set_range(ROOT_INO, 1, True)
    ibm.write_all()
    bbm = Bitmap(img, seed, geo.bbitmap_start, geo.bbitmap_blocks, geo.total_blocks, "block")
    bbm._mask_tail()
    bbm._set_range(0, geo.data_start, True)
    bbm.write_all()
    itable = geo.itable_start * BLOCK_SIZE
    head = Inode(ORPHAN_HEAD_INO)
    img.write(itable, head.encode(seed))
    uid, gid = owner
    root = Inode(ROOT_INO, mode=stat.S_IFDIR | 0o755, uid=uid, gid=gid, nlink=2,
                 generation=1, atime=now, mtime=now, ctime=now, btime=now, parent=ROOT_INO)
    img.write(itable + ROOT_INO * INODE_SIZE, root.encode(seed))
    img.persist(itable, 2 * INODE_SIZE)
    sb = Superblock(uuid=uuid, label=label, total_blocks=geo.total_blocks,
                    inode_count=geo.inode_count, wal_start=geo.wal_start,
                    wal_blocks=geo.wal_blocks, ibitmap_start=geo.ibitmap_start,
                    ibitmap_blocks=geo.ibitmap_blocks, bbitmap_start=geo.bbitmap_start,
                    bbitmap_blocks=geo.bbitmap_blocks, itable_start=geo.itable_start,
                    itable_blocks=geo.itable_blocks, data_start=geo.data_start,
                    version=1, state=SB_CLEAN, mkfs_time=now, write_time=now,
                    free_blocks=geo.total_blocks - geo.data_start,
                    free_inodes=geo.inode_count - 2)
    write_replica(img, 0, sb)
    write_replica(img, 1, sb)
    img.sync_all()
    return sb


def make_filesystem(img, geo: Geometry, label: str = "", uuid: bytes | None = None,
                    owner: tuple[int, int] = (0, 0), progress: Progress | None = None,
                    zero_metadata: bool = True, lost_found: bool = True) -> Superblock:
    """format_image + /lost+found, leaving the image clean."""
    from pmfs.fs import FileSystem, MountOptions
    sb = format_image(img, geo, label, uuid, owner, progress, zero_metadata)
    if lost_found:
        fs = FileSystem(img, MountOptions())
        try:
            fs.mkdir(ROOT_INO, b"lost+found", 0o700)
        finally:
            fs.close()
        sb = fs.sbm.sb
    return sb


def describe_layout(geo: Geometry, label: str, uuid: bytes) -> str:
    bs = BLOCK_SIZE
    rows = [
        ("superblocks", 0, 2),
        ("WAL", geo.wal_start, geo.wal_blocks),
        ("inode bitmap", geo.ibitmap_start, geo.ibitmap_blocks),
        ("block bitmap", geo.bbitmap_start, geo.bbitmap_blocks),
        ("inode table", geo.itable_start, geo.itable_blocks),
        ("data", geo.data_start, geo.data_blocks),
    ]
    out = [f"pmfs file system: {human(geo.total_blocks * bs)} "
           f"({geo.total_blocks} blocks of {bs} bytes)",
           f"  label: {label or '(none)'}   uuid: {uuidlib.UUID(bytes=uuid)}",
           f"  {'region':<14}{'first block':>12}{'blocks':>12}{'size':>12}"]
    for name, start, n in rows:
        out.append(f"  {name:<14}{start:>12}{n:>12}{human(n * bs):>12}")
    out.append(f"  inodes: {geo.inode_count - 1} ({INODE_SIZE} bytes each)   "
               f"usable space: {human(geo.data_blocks * bs)}")
    return "\n".join(out)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="mkfs.pmfs",
        description="Create a pmfs file system in IMAGE (a file, created with its space "
                    "allocated if it does not exist -- see --sparse -- or a block/DAX "
                    "device). An image file is private to its owner (mode 0600, also "
                    "an existing one).",
        epilog="Exit codes: 0 success, 8 operational error, 16 usage error.")
    p.add_argument("image", metavar="IMAGE", help="image file or device")
    p.add_argument("size", metavar="SIZE", nargs="?",
                   help="size with optional suffix (64M, 8G); needed to create a file, "
                        "resizes an existing file")
    p.add_argument("-L", dest="label", default="", help="volume label (up to 63 bytes)")
    p.add_argument("-U", dest="uuid", default="random",
                   help="UUID: a UUID, 'random' (default), 'time' or 'clear'")
    p.add_argument("-b", dest="blocksize", default=str(BLOCK_SIZE),
                   help="block size; only 4096 is supported")
    p.add_argument("-N", dest="inodes", help="number of inodes (default: one per 16 KiB)")
    p.add_argument("-J", dest="wal", metavar="SIZE",
                   help="WAL size (default: 1/256 of the image, 256K..64M)")
    p.add_argument("-F", dest="force", action="store_true",
                   help="format even if IMAGE holds a file system")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")
    p.add_argument("-n", dest="dry_run", action="store_true",
                   help="print the layout, write nothing")
    p.add_argument("--sparse", action="store_true",
                   help="leave a new or resized image file sparse (default: reserve its "
                        "space now with posix_fallocate, so that the file system cannot "
                        "run out of space under the image)")
    p.add_argument("--prefault", action="store_true",
                   help="also write zeros over the whole image file, so that its memory "
                        "exists before the first use of each block (like PMDK's "
                        "prefault.at_create): on tmpfs a reserved page still costs a page "
                        "fault and zeroing (on a virtual machine, a fault in the host) the "
                        "first time it is written. Slower to format; not with --sparse, "
                        "and image files only")
    p.add_argument("--debug", action="store_true", help="tracebacks on errors")
    p.add_argument("-V", "--version", action="version", version=f"mkfs.pmfs {__version__}")
    return p


def main_args(argv) -> int:
    a = build_parser().parse_args(argv)
    try:
        bs = parse_size(a.blocksize)
    except UsageError:
        raise UsageError(f"invalid block size {a.blocksize!r}") from None
    if bs != BLOCK_SIZE:
        raise UsageError(f"block size {bs} is not supported (only {BLOCK_SIZE})")
    label = a.label
    if len(label.encode("utf-8")) > 63:
        raise UsageError("label longer than 63 bytes")
    uuid = parse_uuid(a.uuid)
    inodes = None
    if a.inodes is not None:
        try:
            inodes = int(a.inodes)
        except ValueError:
            raise UsageError(f"invalid inode count {a.inodes!r}") from None
        if inodes <= 0:
            raise UsageError("the inode count must be positive")
    if a.prefault and a.sparse:
        raise UsageError("--prefault and --sparse are mutually exclusive")
    wal_blocks = None
    if a.wal is not None:
        wal_blocks = parse_size(a.wal) // BLOCK_SIZE
    size = parse_size(a.size) if a.size is not None else None
    # a symlink (e.g. /dev/disk/by-id/...) names the file it points to
    path = os.path.realpath(a.image) if os.path.islink(a.image) else a.image
    exists = os.path.lexists(path)
    if exists:
        try:
            st = os.stat(path)
        except OSError as e:
            raise QuietError(f"{path}: {e.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            raise QuietError(f"{path}: is a directory")
        is_dev = stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)
        if not (stat.S_ISREG(st.st_mode) or is_dev):
            raise QuietError(f"{path}: not a regular file or device")
        if is_dev and a.prefault:
            raise UsageError(f"{path}: --prefault is for image files, not devices")
        if is_dev:
            with open(path, "rb") as f:
                dev_size = f.seek(0, os.SEEK_END)
            if size is not None and size > dev_size:
                raise QuietError(f"{path}: SIZE {human(size)} is larger than the device "
                                 f"({human(dev_size)})")
            cur = dev_size
        else:
            cur = st.st_size
        if size is None:
            size = cur
            if size == 0:
                raise UsageError(f"{path} is empty: give a SIZE")
        what = detect_signature(path) if cur else None
        if what and not a.force and not a.dry_run:
            raise QuietError(f"{path} holds {what}; use -F to overwrite it")
    else:
        if size is None:
            raise UsageError(f"{path} does not exist: give a SIZE to create it")
        is_dev = False
    if size < min_image_size():
        raise QuietError(f"SIZE {size} is too small: a pmfs image needs at least "
                         f"{min_image_size()} bytes ({human(min_image_size())})")
    if wal_blocks is not None and wal_blocks < MIN_WAL_BLOCKS:
        raise QuietError(f"-J {a.wal}: the WAL needs at least {MIN_WAL_BLOCKS} blocks "
                         f"({human(MIN_WAL_BLOCKS * BLOCK_SIZE)})")
    try:
        geo = compute_geometry(size, inodes, wal_blocks)
    except ValueError as e:
        # say which of the sizes does not fit, and what to change
        try:
            compute_geometry(size, inodes)
        except ValueError:
            pass
        else:
            raise QuietError(f"{human(size)} is too small for a {human(wal_blocks * BLOCK_SIZE)}"
                             f" WAL (-J): give a smaller -J or a larger SIZE") from None
        msg = str(e)
        m = re.search(r"at least (\d+) bytes", msg)
        if inodes is not None and m:
            need = int(m.group(1))
            raise QuietError(f"{human(size)} is too small for {inodes} inodes (-N): they "
                             f"need an image of at least {human(need)}; give a smaller -N "
                             f"or a larger SIZE") from None
        raise QuietError(msg) from None
    if a.dry_run:
        print(describe_layout(geo, label, uuid))
        if exists and what and not a.force:
            print(f"(dry run: nothing written; {path} holds {what}: formatting it "
                  f"would need -F)")
        else:
            print("(dry run: nothing written)")
        return EXIT_OK
    # create or size the file, holding the image's lock from the first
    # change on: a mounted image (its daemon holds the lock) is never touched
    progress = Progress("mkfs.pmfs", quiet=a.quiet)

    def lock(fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QuietError(f"{path} is in use (mounted, being checked by fsck.pmfs or read "
                             f"by pmfs-inspect); unmount it first") from None

    if not exists:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise QuietError(f"{path}: cannot create: {e.strerror}") from None
        lock(fd)
        try:
            os.ftruncate(fd, geo.total_blocks * BLOCK_SIZE)
            if not a.sparse:
                _preallocate(fd, geo.total_blocks * BLOCK_SIZE, path, progress, a.prefault)
        except (OSError, QuietError) as e:
            os.close(fd)
            os.unlink(path)
            if isinstance(e, QuietError):
                raise
            raise QuietError(f"{path}: cannot size the image: {e.strerror}") from None
        zero_meta = False  # a new sparse file reads as zeros
    else:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise QuietError(f"{path}: cannot open for writing: {e.strerror}") from None
        lock(fd)
        zero_meta = is_dev
        if not is_dev:
            try:
                # empty the file (fast and leaves no stale metadata), then size it
                os.ftruncate(fd, 0)
                os.ftruncate(fd, geo.total_blocks * BLOCK_SIZE)
                if not a.sparse:
                    _preallocate(fd, geo.total_blocks * BLOCK_SIZE, path, progress,
                                 a.prefault)
            except (OSError, QuietError) as e:
                os.close(fd)
                if isinstance(e, QuietError):
                    raise
                raise QuietError(f"{path}: cannot size the image: {e.strerror}") from None
        if not is_dev and stat.S_IMODE(st.st_mode) & 0o077:
            # the image holds the data of every file in it: only its owner
            # may read it, as for an image mkfs creates
            try:
                os.fchmod(fd, 0o600)
                if not a.quiet:
                    print(f"mkfs.pmfs: {path}: mode {stat.S_IMODE(st.st_mode):04o} changed "
                          f"to 0600 (other users could have read or changed every file "
                          f"in it)", file=sys.stderr)
            except OSError as e:
                os.close(fd)
                raise QuietError(f"{path}: cannot make it private (chmod 600): "
                                 f"{e.strerror}") from None
    try:
        img = open_image(path)  # the lock is held through `fd`
        try:
            uid, gid = (os.getuid(), os.getgid())
            make_filesystem(img, geo, label, uuid, (uid, gid), progress, zero_meta)
        finally:
            progress.done()
            img.close()
    finally:
        os.close(fd)
    if not a.quiet:
        print(describe_layout(geo, label, uuid))
        print(f"  backend: {'libpmem (persistent memory)' if img.is_pmem else 'msync'}")
    return EXIT_OK


#: posix_fallocate works in chunks of this size, so that progress can be shown
PREALLOC_CHUNK = 64 << 20


def _preallocate(fd: int, size: int, path: str, progress: Progress | None = None,
                 prefault: bool = False) -> None:
    """Reserve the image's space (posix_fallocate); with `prefault`, write
    zeros over it too, so that its pages exist and are mapped in no later
    fault path."""
    zeros = bytes(PREALLOC_CHUNK) if prefault else b""
    what = "writing zeros over the image" if prefault else "allocating the image"
    try:
        off = 0
        can_reserve = True
        while off < size:
            n = min(PREALLOC_CHUNK, size - off)
            if can_reserve:
                try:
                    os.posix_fallocate(fd, off, n)
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        raise QuietError(f"{path}: not enough space to allocate "
                                         f"{human(size)} (use --sparse for a sparse "
                                         f"image)") from None
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    if not prefault:
                        return  # the file system cannot preallocate: stay sparse
                    can_reserve = False
            if prefault:
                done = 0
                while done < n:
                    try:
                        done += os.pwrite(fd, memoryview(zeros)[done:n], off + done)
                    except OSError as e:
                        if e.errno in (errno.ENOSPC, errno.EDQUOT):
                            raise QuietError(f"{path}: not enough space to write "
                                             f"{human(size)}") from None
                        raise
            off += n
            if progress:
                progress.update(off, size, what)
    finally:
        if progress:
            progress.done()


def main(argv=None) -> int:
    sys.exit(run("mkfs.pmfs", main_args, argv, usage_code=EXIT_USAGE, error_code=EXIT_ERROR))


if __name__ == "__main__":
    main()
