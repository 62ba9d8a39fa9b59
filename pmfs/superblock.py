"""The dual-copy superblock: replica selection and crash-safe updates.

Two replicas live at the start of blocks 0 and 1.  A replica is valid when
its magic and checksum are right and its commit word equals its version.
An update never touches the active (newest valid) replica: it writes the
other one completely with the commit word zeroed, persists it, then stores
the commit word (one aligned 8-byte store) and persists that.  A crash at
any point leaves the old replica valid, so a torn update can never make the
image unmountable; mount uses the valid replica with the highest version.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

from .layout import (BLOCK_SIZE, FORMAT_VERSION, SB_CLEAN, SB_COMMIT_OFF, SB_MAGIC, SB_SIZE,
                     FormatError, Superblock)
from .pmem import Image

REPLICA_OFFSETS = (0, BLOCK_SIZE)


class SuperblockError(Exception):
    """No usable superblock: a one-line reason for the user."""

    def __init__(self, msg: str, errno_: int = errno.EINVAL, foreign: bool = False):
        super().__init__(msg)
        self.errno = errno_
        self.foreign = foreign


def read_replicas(img: Image) -> list[tuple[Superblock | None, str | None]]:
    """[(superblock or None, reason it is invalid or None)] for A and B."""
    out = []
    for off in REPLICA_OFFSETS:
        if off + SB_SIZE > img.size:
            out.append((None, "beyond the end of the image"))
            continue
        try:
            out.append((Superblock.decode(img.read(off, SB_SIZE)), None))
        except FormatError as e:
            out.append((None, str(e)))
    return out


def looks_like_pmfs(img: Image) -> bool:
    """True if either replica carries the pmfs magic (valid or not)."""
    return any(off + 8 <= img.size and bytes(img.read(off, 8)) == SB_MAGIC
               for off in REPLICA_OFFSETS)


class SuperblockManager:
    """Selects the active replica and performs updates."""

    def __init__(self, img: Image):
        self.img = img
        self.sb: Superblock | None = None
        self.active = -1  # index of the active replica
        self.replica_errors: list[str | None] = [None, None]

    def load(self, check_geometry: bool = True) -> Superblock:
        reps = read_replicas(self.img)
        self.replica_errors = [err for _sb, err in reps]
        best = -1
        for i, (sb, _err) in enumerate(reps):
            if sb is not None and (best < 0 or sb.version > reps[best][0].version):
                best = i
        if best < 0:
            if not looks_like_pmfs(self.img):
                raise SuperblockError(
                    f"{self.img.path or 'image'}: not a pmfs file system (no pmfs superblock)",
                    foreign=True)
            raise SuperblockError(
                f"{self.img.path or 'image'}: both superblock replicas are damaged "
                f"({reps[0][1]}; {reps[1][1]})", errno.EUCLEAN)
        sb = reps[best][0]
        if sb.format_version > FORMAT_VERSION or sb.incompat:
            raise SuperblockError(
                f"{self.img.path or 'image'}: format version {sb.format_version} "
                f"(features {sb.incompat:#x}) is newer than this pmfs supports "
                f"(version {FORMAT_VERSION}); upgrade pmfs", errno.EPROTONOSUPPORT)
        if check_geometry:
            errs = sb.geometry_errors(self.img.size)
            if errs:
                raise SuperblockError(f"{self.img.path or 'image'}: {errs[0]}", errno.EUCLEAN)
        self.sb = sb
        self.active = best
        return sb

    @property
    def other_valid(self) -> bool:
        return self.replica_errors[1 - self.active] is None

    def write(self, sb: Superblock) -> Superblock:
        """Commit `sb` as the next version into the inactive replica."""
        if self.img.readonly:
            raise OSError(errno.EROFS, "image is read-only")
        cur = self.sb
        target = 1 - self.active if self.active >= 0 else 0
        sb.version = (cur.version + 1) if cur is not None else max(sb.version, 1)
        sb.write_time = time.time_ns()
        write_replica(self.img, target, sb)
        self.sb = sb
        self.active = target
        self.replica_errors[target] = None
        return sb

    def update(self, **changes) -> Superblock:
        sb = Superblock(**{k: getattr(self.sb, k) for k in Superblock.__dataclass_fields__})
        for k, v in changes.items():
            setattr(sb, k, v)
        return self.write(sb)

    def sync_replicas(self) -> None:
        """Make the inactive replica a valid copy too (fsck's repair)."""
        self.update()

    def mark_mounted(self) -> Superblock:
        sb = self.sb
        return self.update(state=sb.state & ~SB_CLEAN, mount_count=sb.mount_count + 1,
                           mount_time=time.time_ns(), owner_pid=os.getpid(),
                           owner_host=socket.gethostname()[:63])


def write_replica(img: Image, index: int, sb: Superblock) -> None:
    """Write replica `index` (0 = A, 1 = B) with the commit-last protocol."""
    off = REPLICA_OFFSETS[index]
    raw = bytearray(sb.encode())
    commit = bytes(raw[SB_COMMIT_OFF:SB_COMMIT_OFF + 8])
    raw[SB_COMMIT_OFF:SB_COMMIT_OFF + 8] = bytes(8)
    img.mark("sb-write", replica=index, version=sb.version)
    img.write(off, raw)
    img.persist(off, SB_SIZE)
    img.write(off + SB_COMMIT_OFF, commit)
    img.persist(off + SB_COMMIT_OFF, 8)
    img.mark("sb-committed", replica=index, version=sb.version)


def commit_word(img: Image, index: int) -> int:
    return struct.unpack_from("<Q", img.read(REPLICA_OFFSETS[index] + SB_COMMIT_OFF, 8))[0]
