"""On-media format of a pmfs image: every byte that reaches the media.

This module is the on-media contract.  It has no I/O: it turns records into
bytes and bytes into records, computes checksums and the geometry of an
image.  docs/FORMAT.md describes the same layout for humans; the two must
agree (tests/test_layout.py checks the struct sizes quoted there).

All integers are little endian.  The block size is 4096 bytes, the cache
line 64 bytes, and the only store the hardware is assumed to make atomic
is an aligned 8-byte store.

Image layout, in blocks::

    0                superblock replica A
    1                superblock replica B
    wal_start        WAL header block (two 64-byte header slots)
    wal_start+1 ...  WAL log area (circular), wal_blocks-1 blocks
    ibitmap_start    inode bitmap blocks
    bbitmap_start    block bitmap blocks
    itable_start     inode table (16 inodes of 256 bytes per block)
    data_start       data area: file data, directory blocks, extent-tree
                     nodes, xattr blocks, ... up to total_blocks

Checksums are xxh3-64.  Every structure's checksum is seeded with the file
system's seed (derived from its uuid), a structure tag and the structure's
location, so that a structure copied to the wrong place, or left over from
an earlier file system on the same image, does not verify.
"""

from __future__ import annotations

import operator
import struct
import uuid as uuidlib
from dataclasses import dataclass, field, fields

import xxhash

from .accel import ACCEL

BLOCK_SIZE = 4096
BLOCK_SHIFT = 12
CACHELINE = 64
INODE_SIZE = 256
INODES_PER_BLOCK = BLOCK_SIZE // INODE_SIZE
FORMAT_VERSION = 1
ROOT_INO = 1
#: inode slot 0 is never a file: it is the head of the orphan list
ORPHAN_HEAD_INO = 0
MAX_NAME = 255
#: longest symlink target (PATH_MAX - 1, like Linux)
MAX_SYMLINK = 4095
#: file offsets are 32-bit block numbers: the largest file is 16 TiB
MAX_FILE_BLOCKS = 1 << 32
MAX_FILE_SIZE = MAX_FILE_BLOCKS * BLOCK_SIZE

# --------------------------------------------------------------------------
# checksums
# --------------------------------------------------------------------------

_xxh3 = xxhash.xxh3_64_intdigest

# structure tags, mixed into the seed (top byte)
TAG_SUPER = 0x01
TAG_WALHDR = 0x02
TAG_WALREC = 0x03
TAG_BITMAP = 0x04
TAG_INODE = 0x05
TAG_EXTENT = 0x06
TAG_DIRENT = 0x07
TAG_XATTR = 0x08

_SUPER_SEED = 0x504D46535550  # constant: the superblock carries the uuid itself
MASK64 = (1 << 64) - 1


def fs_seed(uuid_bytes: bytes) -> int:
    """The per-file-system checksum seed: a hash of the uuid."""
    return _xxh3(uuid_bytes, 0x706D6673)


def seed_for(fsseed: int, tag: int, location: int) -> int:
    return (fsseed ^ (tag << 56) ^ (location * 0x9E3779B97F4A7C15)) & MASK64


def csum64(data, seed: int) -> int:
    return _xxh3(data, seed)


def csum32(data, seed: int) -> int:
    return _xxh3(data, seed) & 0xFFFFFFFF


class FormatError(Exception):
    """Bytes that do not decode as the structure they should hold."""


# --------------------------------------------------------------------------
# superblock
# --------------------------------------------------------------------------

SB_MAGIC = b"PMFS\x00SB\x01"
SB_SIZE = 512
SB_COMMIT_OFF = 496  # the commit word: equals `version` once committed
SB_CSUM_OFF = 504

# superblock state flags
SB_CLEAN = 0x1  # unmounted cleanly: WAL empty, counters exact
SB_NEEDS_FSCK = 0x2  # corruption was met while mounted
SB_FSCK_RUNNING = 0x4  # a repair was interrupted

_SB = struct.Struct(
    "<8s"  # 0   magic
    "I"  # 8   format version
    "I"  # 12  incompatible feature flags (none defined)
    "16s"  # 16  uuid
    "64s"  # 32  label, NUL padded UTF-8
    "Q"  # 96  version: incremented on every superblock update
    "I"  # 104 block size
    "I"  # 108 inode size
    "Q"  # 112 total blocks
    "Q"  # 120 inode count
    "Q"  # 128 wal_start
    "Q"  # 136 wal_blocks
    "Q"  # 144 ibitmap_start
    "Q"  # 152 ibitmap_blocks
    "Q"  # 160 bbitmap_start
    "Q"  # 168 bbitmap_blocks
    "Q"  # 176 itable_start
    "Q"  # 184 itable_blocks
    "Q"  # 192 data_start
    "Q"  # 200 root inode
    "I"  # 208 state flags (SB_*)
    "I"  # 212 mount count
    "q"  # 216 mkfs time, ns
    "q"  # 224 last mount time, ns
    "q"  # 232 last superblock write time, ns
    "Q"  # 240 free blocks at last clean unmount
    "Q"  # 248 free inodes at last clean unmount
    "q"  # 256 last fsck time, ns
    "I"  # 264 pid of the daemon that has it mounted (0 = none)
    "I"  # 268 compatible feature flags (none defined)
    "64s"  # 272 hostname of that daemon
    "Q"  # 336 errors met while mounted (since last fsck)
)
assert _SB.size == 344
_SB_PAD = SB_COMMIT_OFF - _SB.size


@dataclass
class Superblock:
    uuid: bytes
    label: str
    total_blocks: int
    inode_count: int
    wal_start: int
    wal_blocks: int
    ibitmap_start: int
    ibitmap_blocks: int
    bbitmap_start: int
    bbitmap_blocks: int
    itable_start: int
    itable_blocks: int
    data_start: int
    root_ino: int = ROOT_INO
    version: int = 1
    format_version: int = FORMAT_VERSION
    incompat: int = 0
    compat: int = 0
    block_size: int = BLOCK_SIZE
    inode_size: int = INODE_SIZE
    state: int = SB_CLEAN
    mount_count: int = 0
    mkfs_time: int = 0
    mount_time: int = 0
    write_time: int = 0
    free_blocks: int = 0
    free_inodes: int = 0
    fsck_time: int = 0
    owner_pid: int = 0
    owner_host: str = ""
    error_count: int = 0
    #: the commit word as read from the media (not part of the checksum)
    commit: int = field(default=0, compare=False)

    @property
    def clean(self) -> bool:
        return bool(self.state & SB_CLEAN)

    def encode(self) -> bytes:
        """The 512-byte replica, checksummed, with the commit word = version.

        Writers store bytes [0, SB_COMMIT_OFF) and [SB_CSUM_OFF, 512) first
        and the commit word last (see superblock.py).
        """
        label = self.label.encode("utf-8")
        host = self.owner_host.encode("utf-8")[:63]
        if len(label) > 63:
            raise ValueError("label longer than 63 bytes")
        body = _SB.pack(
            SB_MAGIC, self.format_version, self.incompat, self.uuid, label,
            self.version, self.block_size, self.inode_size, self.total_blocks,
            self.inode_count, self.wal_start, self.wal_blocks,
            self.ibitmap_start, self.ibitmap_blocks, self.bbitmap_start,
            self.bbitmap_blocks, self.itable_start, self.itable_blocks,
            self.data_start, self.root_ino, self.state, self.mount_count,
            self.mkfs_time, self.mount_time, self.write_time, self.free_blocks,
            self.free_inodes, self.fsck_time, self.owner_pid, self.compat,
            host, self.error_count,
        ) + bytes(_SB_PAD)
        csum = csum64(body, _SUPER_SEED)
        return body + struct.pack("<QQ", self.version, csum)

    @classmethod
    def decode(cls, raw) -> "Superblock":
        """Decode and verify a replica; FormatError if it is not valid.

        Valid means: magic, checksum, and a commit word equal to the version
        (a replica whose update was interrupted is not valid).
        """
        raw = bytes(raw[:SB_SIZE])
        if len(raw) < SB_SIZE or raw[:8] != SB_MAGIC:
            raise FormatError("bad superblock magic")
        commit, csum = struct.unpack_from("<QQ", raw, SB_COMMIT_OFF)
        if csum64(raw[:SB_COMMIT_OFF], _SUPER_SEED) != csum:
            raise FormatError("superblock checksum mismatch")
        v = _SB.unpack_from(raw)
        sb = cls(
            uuid=v[3], label=v[4].rstrip(b"\0").decode("utf-8", "replace"),
            version=v[5], block_size=v[6], inode_size=v[7], total_blocks=v[8],
            inode_count=v[9], wal_start=v[10], wal_blocks=v[11],
            ibitmap_start=v[12], ibitmap_blocks=v[13], bbitmap_start=v[14],
            bbitmap_blocks=v[15], itable_start=v[16], itable_blocks=v[17],
            data_start=v[18], root_ino=v[19], state=v[20], mount_count=v[21],
            mkfs_time=v[22], mount_time=v[23], write_time=v[24],
            free_blocks=v[25], free_inodes=v[26], fsck_time=v[27],
            owner_pid=v[28], compat=v[29],
            owner_host=v[30].rstrip(b"\0").decode("utf-8", "replace"),
            error_count=v[31], format_version=v[1], incompat=v[2],
            commit=commit,
        )
        if commit != sb.version:
            raise FormatError("superblock replica not committed")
        return sb

    def geometry_errors(self, image_size: int | None = None) -> list[str]:
        """Reasons this (checksum-valid) superblock cannot be used."""
        errs = []
        if self.block_size != BLOCK_SIZE:
            errs.append(f"block size {self.block_size} (only {BLOCK_SIZE} is supported)")
        if self.inode_size != INODE_SIZE:
            errs.append(f"inode size {self.inode_size} (only {INODE_SIZE} is supported)")
        try:
            expect = compute_geometry(self.total_blocks * BLOCK_SIZE, self.inode_count,
                                      self.wal_blocks)
        except ValueError as e:
            errs.append(str(e))
        else:
            for name in ("wal_start", "ibitmap_start", "ibitmap_blocks", "bbitmap_start",
                         "bbitmap_blocks", "itable_start", "itable_blocks", "data_start"):
                if getattr(expect, name) != getattr(self, name):
                    errs.append(f"inconsistent geometry ({name})")
                    break
        if self.root_ino != ROOT_INO:
            errs.append(f"root inode {self.root_ino}")
        if image_size is not None and image_size < self.total_blocks * BLOCK_SIZE:
            errs.append(
                f"image is {image_size} bytes but the file system needs "
                f"{self.total_blocks * BLOCK_SIZE} (truncated image?)")
        return errs


# --------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------

#: one inode per this many bytes of image, unless -N says otherwise
DEFAULT_INODE_RATIO = 16384
MIN_WAL_BLOCKS = 64  # 256 KiB
MAX_WAL_BLOCKS = 16384  # 64 MiB
MIN_DATA_BLOCKS = 64
MIN_INODES = 16
BITMAP_BYTES = BLOCK_SIZE - CACHELINE  # bit area of a bitmap block
BITS_PER_BITMAP_BLOCK = BITMAP_BYTES * 8  # 32256


@dataclass
class Geometry:
    total_blocks: int
    inode_count: int
    wal_start: int
    wal_blocks: int
    ibitmap_start: int
    ibitmap_blocks: int
    bbitmap_start: int
    bbitmap_blocks: int
    itable_start: int
    itable_blocks: int
    data_start: int

    @property
    def data_blocks(self) -> int:
        return self.total_blocks - self.data_start

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def default_wal_blocks(total_blocks: int) -> int:
    """WAL size: 1/256 of the image, between 256 KiB and 64 MiB."""
    return max(MIN_WAL_BLOCKS, min(MAX_WAL_BLOCKS, total_blocks // 256))


def default_inode_count(image_size: int) -> int:
    return max(MIN_INODES, image_size // DEFAULT_INODE_RATIO)


def compute_geometry(image_size: int, inode_count: int | None = None,
                     wal_blocks: int | None = None) -> Geometry:
    """Lay out an image of `image_size` bytes (rounded down to blocks).

    Raises ValueError with a user-readable reason if it cannot hold a file
    system.
    """
    total = image_size // BLOCK_SIZE
    if inode_count is None:
        inode_count = default_inode_count(total * BLOCK_SIZE)
    # whole inode-table blocks; slot 0 is the orphan-list head
    inode_count = -(-inode_count // INODES_PER_BLOCK) * INODES_PER_BLOCK
    if inode_count < MIN_INODES:
        raise ValueError(f"at least {MIN_INODES} inodes are needed")
    if inode_count > 1 << 32:
        raise ValueError("at most 2^32 inodes are supported")
    if total >= 1 << 48:
        raise ValueError("image too large (at most 2^48 blocks)")
    if wal_blocks is None:
        wal_blocks = default_wal_blocks(total)
    if wal_blocks < MIN_WAL_BLOCKS:
        raise ValueError(f"the WAL needs at least {MIN_WAL_BLOCKS} blocks")
    wal_start = 2
    ibitmap_start = wal_start + wal_blocks
    ibitmap_blocks = -(-inode_count // BITS_PER_BITMAP_BLOCK)
    bbitmap_start = ibitmap_start + ibitmap_blocks
    bbitmap_blocks = -(-total // BITS_PER_BITMAP_BLOCK) if total else 1
    itable_start = bbitmap_start + bbitmap_blocks
    itable_blocks = inode_count // INODES_PER_BLOCK
    data_start = itable_start + itable_blocks
    if total < data_start + MIN_DATA_BLOCKS:
        need = (data_start + MIN_DATA_BLOCKS) * BLOCK_SIZE
        raise ValueError(
            f"{image_size} bytes is too small for {inode_count} inodes: "
            f"at least {need} bytes ({-(-need // (1 << 20))} MiB) are needed")
    return Geometry(total, inode_count, wal_start, wal_blocks, ibitmap_start,
                    ibitmap_blocks, bbitmap_start, bbitmap_blocks, itable_start,
                    itable_blocks, data_start)


def min_image_size() -> int:
    """The smallest image that holds a file system with default options."""
    total = 1
    while True:
        try:
            compute_geometry(total * BLOCK_SIZE)
            return total * BLOCK_SIZE
        except ValueError:
            total += 1


# --------------------------------------------------------------------------
# WAL
# --------------------------------------------------------------------------

WAL_HDR_MAGIC = b"PMFSWALH"
#: one header slot = one cache line; the header block holds two
_WALHDR = struct.Struct("<8sQQQ24sQ")  # magic seq tail_pos tail_txid pad csum
assert _WALHDR.size == CACHELINE


@dataclass
class WalHeader:
    seq: int
    tail_pos: int  # logical byte position of the oldest record to replay
    tail_txid: int  # txid of the record expected at tail_pos

    def encode(self, fsseed: int, slot: int) -> bytes:
        return encode_wal_header(fsseed, slot, self.seq, self.tail_pos, self.tail_txid)

    @classmethod
    def decode(cls, raw, fsseed: int, slot: int) -> "WalHeader":
        raw = bytes(raw[:CACHELINE])
        magic, seq, pos, txid, _pad, csum = _WALHDR.unpack(raw)
        if magic != WAL_HDR_MAGIC:
            raise FormatError("bad WAL header magic")
        if csum64(raw[:56], seed_for(fsseed, TAG_WALHDR, slot)) != csum:
            raise FormatError("WAL header checksum mismatch")
        return cls(seq, pos, txid)


_WALHDR_BODY = struct.Struct("<8sQQQ24x")
_PACK_Q = struct.Struct("<Q").pack
_PACK_INTO_Q = struct.Struct("<Q").pack_into


def encode_wal_header(fsseed: int, slot: int, seq: int, tail_pos: int, tail_txid: int) -> bytes:
    """One 64-byte WAL header slot."""
    body = _WALHDR_BODY.pack(WAL_HDR_MAGIC, seq, tail_pos, tail_txid)
    return body + _PACK_Q(csum64(body, seed_for(fsseed, TAG_WALHDR, slot)))


WAL_REC_MAGIC = 0x524C5750  # b"PWLR"
WAL_REC_TX = 0
WAL_REC_SKIP = 1  # padding to the end of the log area: continue at its start
#: record header: magic u32, kind u16, pad u16, txid u64, length u32,
#: nentries u32, csum u64 -- csum covers the record with the csum field zeroed
WAL_REC = struct.Struct("<IHHQIIQ")
assert WAL_REC.size == 32
#: entry header: image offset u64, length u32, pad u32; data follows, 8-aligned
WAL_ENT = struct.Struct("<QII")
assert WAL_ENT.size == 16
WAL_REC_CSUM_OFF = 24


def align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


#: the C packer (pmfs/_accel.c), where it packs the layout above
_wal_record_c = (ACCEL.wal_record if ACCEL is not None
                 and (ACCEL.WAL_REC_SIZE, ACCEL.WAL_ENT_SIZE, ACCEL.WAL_REC_CSUM_OFF)
                 == (WAL_REC.size, WAL_ENT.size, WAL_REC_CSUM_OFF) else None)


def encode_wal_record(fsseed: int, txid: int, entries) -> bytes:
    """A log record: header + entries, padded to a cache-line multiple."""
    if _wal_record_c is not None:
        rec = _wal_record_c(WAL_REC_MAGIC, txid, entries)
        _PACK_INTO_Q(rec, WAL_REC_CSUM_OFF, _xxh3(rec, seed_for(fsseed, TAG_WALREC, txid)))
        return rec
    size = WAL_REC.size
    for _off, data in entries:
        size += WAL_ENT.size + ((len(data) + 7) & ~7)
    total = (size + CACHELINE - 1) & ~(CACHELINE - 1)
    rec = bytearray(total)
    WAL_REC.pack_into(rec, 0, WAL_REC_MAGIC, WAL_REC_TX, 0, txid, total, len(entries), 0)
    p = WAL_REC.size
    pack_ent = WAL_ENT.pack_into
    for off, data in entries:
        n = len(data)
        pack_ent(rec, p, off, n, 0)
        p += WAL_ENT.size
        rec[p:p + n] = data
        p += (n + 7) & ~7
    struct.pack_into("<Q", rec, WAL_REC_CSUM_OFF,
                     csum64(rec, seed_for(fsseed, TAG_WALREC, txid)))
    return rec


def encode_skip_record(fsseed: int, txid: int, length: int) -> bytes:
    """The header line of a SKIP record: `length` bytes to the end of the log
    area are padding.  Its checksum covers this line only."""
    rec = bytearray(WAL_REC.pack(WAL_REC_MAGIC, WAL_REC_SKIP, 0, txid, length, 0, 0)
                    + bytes(CACHELINE - WAL_REC.size))
    struct.pack_into("<Q", rec, WAL_REC_CSUM_OFF,
                     csum64(rec, seed_for(fsseed, TAG_WALREC, txid)))
    return bytes(rec)


def wal_record_header(raw):
    """(kind, txid, length, nentries, csum) of a record header; None if no magic."""
    magic, kind, _pad, txid, length, nent, csum = WAL_REC.unpack_from(raw)
    if magic != WAL_REC_MAGIC:
        return None
    return kind, txid, length, nent, csum


def verify_wal_record(fsseed: int, raw, txid: int, csum: int) -> bool:
    rec = bytearray(raw)
    struct.pack_into("<Q", rec, WAL_REC_CSUM_OFF, 0)
    return csum64(rec, seed_for(fsseed, TAG_WALREC, txid)) == csum


def decode_wal_entries(raw, nentries: int, limit: int):
    """Yield (image offset, memoryview) of each entry of a verified record."""
    mv = memoryview(raw)
    pos = WAL_REC.size
    for _ in range(nentries):
        if pos + WAL_ENT.size > limit:
            raise FormatError("WAL record entries overrun the record")
        off, n, _pad = WAL_ENT.unpack_from(mv, pos)
        pos += WAL_ENT.size
        if pos + n > limit:
            raise FormatError("WAL record entry overruns the record")
        yield off, mv[pos:pos + n]
        pos += align(n, 8)


# --------------------------------------------------------------------------
# bitmaps
# --------------------------------------------------------------------------

BITMAP_MAGIC = 0x504D4250  # b"PBMP"
#: trailer in the last cache line of a bitmap block: magic u32, pad u32,
#: image block number of this bitmap block u64, csum u64 (seeded with that
#: block number: a bitmap block copied anywhere else does not verify)
_BMTRAILER = struct.Struct("<IIQQ")


def encode_bitmap_trailer(fsseed: int, tag_loc: int, bits) -> bytes:
    """Trailer line for a bitmap block whose bit area is `bits`."""
    c = csum64(bits, seed_for(fsseed, TAG_BITMAP, tag_loc))
    return _BMTRAILER.pack(BITMAP_MAGIC, 0, tag_loc, c) + bytes(CACHELINE - _BMTRAILER.size)


def verify_bitmap_block(fsseed: int, tag_loc: int, block) -> bool:
    magic, _pad, loc, c = _BMTRAILER.unpack_from(block, BITMAP_BYTES)
    return (magic == BITMAP_MAGIC and loc == tag_loc
            and csum64(block[:BITMAP_BYTES], seed_for(fsseed, TAG_BITMAP, tag_loc)) == c)


# --------------------------------------------------------------------------
# inodes
# --------------------------------------------------------------------------

# inode flags
I_INLINE = 0x1  # symlink target stored in the extent area
I_ORPHAN = 0x2  # on the orphan list (unlinked while open, or being truncated)

_INODE_HEAD = struct.Struct(
    "<I"  # 0   mode (0: free slot)
    "I"  # 4   uid
    "I"  # 8   gid
    "I"  # 12  flags (I_*)
    "I"  # 16  nlink
    "I"  # 20  generation
    "Q"  # 24  size
    "Q"  # 32  blocks: 4 KiB blocks charged to the inode (data + metadata)
    "q"  # 40  atime ns
    "q"  # 48  mtime ns
    "q"  # 56  ctime ns
    "q"  # 64  btime ns (creation)
    "Q"  # 72  rdev
    "Q"  # 80  parent (directories: inode number of ..)
    "Q"  # 88  xattr block (0: none)
    "Q"  # 96  orphan list: next
    "Q"  # 104 orphan list: prev
    "Q"  # 112 reserved
)
assert _INODE_HEAD.size == 120
#: 120: extent root header: depth u16 (0: the root holds extents), count u16,
#: pad u32; 128: seven 16-byte root entries, 8 spare bytes; 248: csum u64.
#: With I_INLINE the 128 bytes 120..247 hold inline data instead.
_EXT_ROOT_HDR = struct.Struct("<HHI")
#: the head and the extent root header in one go (Inode.encode)
_INODE_HEAD_EXT = struct.Struct(_INODE_HEAD.format + "HHI")
INODE_CSUM_OFF = 248
INLINE_OFF = 120  # inline data (symlink targets) use bytes 120..247
INLINE_MAX = INODE_CSUM_OFF - INLINE_OFF  # 128
EXT_ROOT_OFF = 128
EXT_ROOT_MAX = 7
assert _INODE_HEAD_EXT.size == EXT_ROOT_OFF
_ZERO_INODE = bytes(INODE_SIZE)


#: the C encoder and decoder (pmfs/_accel.c), where they pack the layout above
_C_INODE_LAYOUT = (INODE_SIZE, INODE_CSUM_OFF, INLINE_OFF, EXT_ROOT_OFF, I_INLINE, TAG_INODE)
_inode_encode_c = _inode_decode_c = None
if ACCEL is not None and (ACCEL.INODE_SIZE, ACCEL.INODE_CSUM_OFF, ACCEL.INLINE_OFF,
                          ACCEL.EXT_ROOT_OFF, ACCEL.I_INLINE,
                          ACCEL.TAG_INODE) == _C_INODE_LAYOUT:
    _inode_encode_c, _inode_decode_c = ACCEL.inode_encode, ACCEL.inode_decode


class Inode:
    """An inode as held in DRAM.  `ino` is its slot number."""

    __slots__ = ("ino", "mode", "uid", "gid", "flags", "nlink", "generation", "size",
                 "blocks", "atime", "mtime", "ctime", "btime", "rdev", "parent", "xattr",
                 "orphan_next", "orphan_prev", "depth", "count", "root")

    def __init__(self, ino: int, mode: int = 0, uid: int = 0, gid: int = 0, flags: int = 0,
                 nlink: int = 0, generation: int = 0, size: int = 0, blocks: int = 0,
                 atime: int = 0, mtime: int = 0, ctime: int = 0, btime: int = 0,
                 rdev: int = 0, parent: int = 0, xattr: int = 0, orphan_next: int = 0,
                 orphan_prev: int = 0, depth: int = 0, count: int = 0,
                 root: bytes = bytes(INLINE_MAX)):
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.flags = flags
        self.nlink = nlink
        self.generation = generation
        self.size = size
        self.blocks = blocks
        self.atime = atime
        self.mtime = mtime
        self.ctime = ctime
        self.btime = btime
        self.rdev = rdev
        self.parent = parent
        self.xattr = xattr
        self.orphan_next = orphan_next
        self.orphan_prev = orphan_prev
        self.depth = depth
        self.count = count
        # bytes 120..247: with I_INLINE the inline data, otherwise 8 bytes of
        # extent-root header space (unused) followed by the 7 root entries
        self.root = root

    @property
    def is_free(self) -> bool:
        return self.mode == 0

    def encode(self, fsseed: int) -> bytes:
        if _inode_encode_c is not None:
            raw = _inode_encode_c(
                fsseed, self.ino, self.mode, self.uid, self.gid, self.flags, self.nlink,
                self.generation, self.size, self.blocks, self.atime, self.mtime, self.ctime,
                self.btime, self.rdev, self.parent, self.xattr, self.orphan_next,
                self.orphan_prev, self.depth, self.count, self.root, _xxh3)
            if raw is not None:
                return raw
            # a field out of its range: struct.pack below says which
        root = self.root
        if len(root) != INLINE_MAX:
            root = bytes(root[:INLINE_MAX]).ljust(INLINE_MAX, b"\0")
        if self.flags & I_INLINE:
            body = _INODE_HEAD.pack(
                self.mode, self.uid, self.gid, self.flags, self.nlink, self.generation,
                self.size, self.blocks, self.atime, self.mtime, self.ctime, self.btime,
                self.rdev, self.parent, self.xattr, self.orphan_next, self.orphan_prev,
                0) + root
        else:
            body = _INODE_HEAD_EXT.pack(
                self.mode, self.uid, self.gid, self.flags, self.nlink, self.generation,
                self.size, self.blocks, self.atime, self.mtime, self.ctime, self.btime,
                self.rdev, self.parent, self.xattr, self.orphan_next, self.orphan_prev,
                0, self.depth, self.count, 0) + root[EXT_ROOT_OFF - INLINE_OFF:]
        return body + _PACK_Q(_xxh3(body, seed_for(fsseed, TAG_INODE, self.ino)))

    @classmethod
    def decode(cls, ino: int, raw, fsseed: int, verify: bool = True) -> "Inode":
        if _inode_decode_c is not None and len(raw) >= INODE_SIZE:
            v = _inode_decode_c(raw, ino, fsseed, verify, _xxh3)
            if v is not None:
                return cls(ino, *v[:17], depth=v[17], count=v[18], root=v[19])
            # the checksum does not match: the code below raises
        raw = bytes(raw[:INODE_SIZE])
        if verify and raw != _ZERO_INODE:
            (c,) = struct.unpack_from("<Q", raw, INODE_CSUM_OFF)
            if csum64(raw[:INODE_CSUM_OFF], seed_for(fsseed, TAG_INODE, ino)) != c:
                raise FormatError(f"inode {ino}: checksum mismatch")
        v = _INODE_HEAD.unpack_from(raw)
        depth, count, _pad = _EXT_ROOT_HDR.unpack_from(raw, INLINE_OFF)
        return cls(ino, *v[:17], depth=depth, count=count,
                   root=raw[INLINE_OFF:INODE_CSUM_OFF])

    def copy(self) -> "Inode":
        n = Inode.__new__(Inode)
        n.restore(self.snapshot())
        return n

    def snapshot(self) -> tuple:
        """All fields, cheaply (see restore)."""
        return _inode_fields(self)

    def restore(self, values: tuple) -> None:
        for s, v in zip(Inode.__slots__, values):
            setattr(self, s, v)


_inode_fields = operator.attrgetter(*Inode.__slots__)


def inode_checksum_ok(ino: int, raw, fsseed: int) -> bool:
    raw = bytes(raw)
    if raw == _ZERO_INODE:
        return True
    (c,) = struct.unpack_from("<Q", raw, INODE_CSUM_OFF)
    return csum64(raw[:INODE_CSUM_OFF], seed_for(fsseed, TAG_INODE, ino)) == c


# --------------------------------------------------------------------------
# extents
# --------------------------------------------------------------------------

#: an extent (leaf entry): file block u32, length u32, image block u64
#: an index entry: first file block u32, pad u32, child node block u64
EXTENT = struct.Struct("<IIQ")
assert EXTENT.size == 16
EXTENT_MAGIC = 0x4E545850  # b"PXTN"
#: node header: magic u32, depth u16, count u16, owner ino u64, csum u64, pad u64
EXT_NODE_HDR = struct.Struct("<IHHQQQ")
assert EXT_NODE_HDR.size == 32
EXT_NODE_CSUM_OFF = 16
EXT_NODE_MAX = (BLOCK_SIZE - EXT_NODE_HDR.size) // EXTENT.size  # 254


def encode_extent_node(fsseed: int, blockno: int, owner: int, depth: int,
                       entries) -> bytes:
    """A 4 KiB extent-tree node holding `entries` [(a, b, c), ...]."""
    if len(entries) > EXT_NODE_MAX:
        raise ValueError("extent node overflow")
    body = bytearray(BLOCK_SIZE)
    EXT_NODE_HDR.pack_into(body, 0, EXTENT_MAGIC, depth, len(entries), owner, 0, 0)
    p = EXT_NODE_HDR.size
    pack = EXTENT.pack_into
    for e in entries:
        pack(body, p, *e)
        p += EXTENT.size
    struct.pack_into("<Q", body, EXT_NODE_CSUM_OFF,
                     csum64(body, seed_for(fsseed, TAG_EXTENT, blockno)))
    return bytes(body)


def decode_extent_node(fsseed: int, blockno: int, raw, owner: int | None = None):
    """(depth, [(a, b, c), ...]) of a node; FormatError if it does not verify."""
    magic, depth, count, own, c, _pad = EXT_NODE_HDR.unpack_from(raw)
    if magic != EXTENT_MAGIC:
        raise FormatError(f"extent node {blockno}: bad magic")
    if count > EXT_NODE_MAX:
        raise FormatError(f"extent node {blockno}: bad entry count {count}")
    if owner is not None and own != owner:
        raise FormatError(f"extent node {blockno}: owned by inode {own}, not {owner}")
    body = bytearray(raw[:BLOCK_SIZE])
    struct.pack_into("<Q", body, EXT_NODE_CSUM_OFF, 0)
    if csum64(body, seed_for(fsseed, TAG_EXTENT, blockno)) != c:
        raise FormatError(f"extent node {blockno}: checksum mismatch")
    ents = list(EXTENT.iter_unpack(bytes(raw[EXT_NODE_HDR.size:EXT_NODE_HDR.size
                                             + count * EXTENT.size])))
    return depth, ents


def decode_root_entries(root: bytes, count: int):
    if count > EXT_ROOT_MAX:
        raise FormatError(f"extent root holds {count} entries (max {EXT_ROOT_MAX})")
    return list(EXTENT.iter_unpack(root[8:8 + count * EXTENT.size]))


def encode_root_entries(entries) -> bytes:
    if len(entries) > EXT_ROOT_MAX:
        raise ValueError("extent root overflow")
    b = bytearray(INLINE_MAX)
    p = 8
    for e in entries:
        EXTENT.pack_into(b, p, *e)
        p += EXTENT.size
    return bytes(b)


# --------------------------------------------------------------------------
# directories
# --------------------------------------------------------------------------

#: directory record header: ino u64 (0: free), rec_len u16, name_len u8,
#: file type u8, csum u32; the name follows.  Records tile each 4 KiB
#: directory block exactly; rec_len is a multiple of 8.
DIRENT = struct.Struct("<QHBBI")
assert DIRENT.size == 16
DIRENT_CSUM_OFF = 12
DIRENT_MIN = DIRENT.size

# file types in directory records (as in struct dirent's d_type)
DT_UNKNOWN, DT_FIFO, DT_CHR, DT_DIR, DT_BLK, DT_REG, DT_LNK, DT_SOCK = 0, 1, 2, 4, 6, 8, 10, 12


def dirent_size(name_len: int) -> int:
    return align(DIRENT.size + name_len, 8)


def dirent_csum(fsseed: int, dir_ino: int, pos: int, hdr12, name) -> int:
    return csum32(bytes(hdr12) + bytes(name),
                  seed_for(fsseed, TAG_DIRENT, (dir_ino << 32) ^ pos))


#: the C encoder and block parser (pmfs/_accel.c), where they pack this layout
_dirent_encode_c = _dirent_block_c = None
if ACCEL is not None and (ACCEL.DIRENT_SIZE, ACCEL.DIRENT_CSUM_OFF, ACCEL.TAG_DIRENT) \
        == (DIRENT.size, DIRENT_CSUM_OFF, TAG_DIRENT) and BLOCK_SIZE == 4096:
    _dirent_encode_c, _dirent_block_c = ACCEL.dirent_encode, ACCEL.dirent_block


def encode_dirent(fsseed: int, dir_ino: int, pos: int, ino: int, rec_len: int,
                  ftype: int, name: bytes) -> bytes:
    """A directory record at logical directory offset `pos` (header + name)."""
    if _dirent_encode_c is not None:
        rec = _dirent_encode_c(fsseed, dir_ino, pos, ino, rec_len, ftype, name, _xxh3)
        if rec is not None:
            return rec
        # a field out of its range: struct.pack below says which
    hdr = struct.pack("<QHBB", ino, rec_len, len(name), ftype)
    c = dirent_csum(fsseed, dir_ino, pos, hdr, name)
    return hdr + struct.pack("<I", c) + name


def decode_dirent(fsseed: int, dir_ino: int, pos: int, raw, off: int):
    """(ino, rec_len, ftype, name) of the record at `off` in block bytes `raw`."""
    if off + DIRENT.size > BLOCK_SIZE:
        raise FormatError(f"directory {dir_ino} offset {pos}: record header overruns the block")
    ino, rec_len, name_len, ftype, c = DIRENT.unpack_from(raw, off)
    if rec_len < DIRENT_MIN or rec_len % 8 or off + rec_len > BLOCK_SIZE:
        raise FormatError(f"directory {dir_ino} offset {pos}: bad record length {rec_len}")
    if DIRENT.size + name_len > rec_len:
        raise FormatError(f"directory {dir_ino} offset {pos}: name overruns record")
    name = bytes(raw[off + DIRENT.size:off + DIRENT.size + name_len])
    if dirent_csum(fsseed, dir_ino, pos, raw[off:off + DIRENT_CSUM_OFF], name) != c:
        raise FormatError(f"directory {dir_ino} offset {pos}: checksum mismatch")
    return ino, rec_len, ftype, name


def parse_dirent_block(fsseed: int, dir_ino: int, base: int, raw) -> list:
    """[(offset in block, ino, rec_len, ftype, name)] of every record of a
    directory block at directory offset `base`; FormatError if damaged."""
    if _dirent_block_c is not None:
        recs = _dirent_block_c(fsseed, dir_ino, base, raw, _xxh3)
        if recs is not None:
            return recs
        # damaged (or not representable in C): the code below says how
    out = []
    off = 0
    while off < BLOCK_SIZE:
        ino, rec_len, ftype, name = decode_dirent(fsseed, dir_ino, base + off, raw, off)
        out.append((off, ino, rec_len, ftype, name))
        off += rec_len
    if off != BLOCK_SIZE:
        raise FormatError(f"directory {dir_ino} block at {base}: records overrun the block")
    return out


# --------------------------------------------------------------------------
# xattrs
# --------------------------------------------------------------------------

XATTR_MAGIC = 0x54415850  # b"PXAT"
#: block header: magic u32, count u16, used u16 (bytes of entries),
#: owner ino u64, csum u64, pad u64.  Entries follow, packed:
#: name_len u8, pad u8, value_len u16, name, value.
XATTR_HDR = struct.Struct("<IHHQQQ")
assert XATTR_HDR.size == 32
XATTR_CSUM_OFF = 16
XATTR_ENT = struct.Struct("<BBH")
XATTR_SPACE = BLOCK_SIZE - XATTR_HDR.size


def xattr_entries_size(items) -> int:
    return sum(XATTR_ENT.size + len(k) + len(v) for k, v in items)


def encode_xattr_block(fsseed: int, blockno: int, owner: int, items) -> bytes:
    """items: [(name bytes, value bytes)], in the order to store."""
    body = bytearray(BLOCK_SIZE)
    p = XATTR_HDR.size
    for k, v in items:
        XATTR_ENT.pack_into(body, p, len(k), 0, len(v))
        p += XATTR_ENT.size
        body[p:p + len(k)] = k
        p += len(k)
        body[p:p + len(v)] = v
        p += len(v)
    if p > BLOCK_SIZE:
        raise ValueError("xattr block overflow")
    XATTR_HDR.pack_into(body, 0, XATTR_MAGIC, len(items), p - XATTR_HDR.size, owner, 0, 0)
    struct.pack_into("<Q", body, XATTR_CSUM_OFF,
                     csum64(body, seed_for(fsseed, TAG_XATTR, blockno)))
    return bytes(body)


def decode_xattr_block(fsseed: int, blockno: int, raw, owner: int | None = None):
    magic, count, used, own, c, _pad = XATTR_HDR.unpack_from(raw)
    if magic != XATTR_MAGIC:
        raise FormatError(f"xattr block {blockno}: bad magic")
    if owner is not None and own != owner:
        raise FormatError(f"xattr block {blockno}: owned by inode {own}, not {owner}")
    body = bytearray(raw[:BLOCK_SIZE])
    struct.pack_into("<Q", body, XATTR_CSUM_OFF, 0)
    if csum64(body, seed_for(fsseed, TAG_XATTR, blockno)) != c:
        raise FormatError(f"xattr block {blockno}: checksum mismatch")
    items = []
    p = XATTR_HDR.size
    end = XATTR_HDR.size + used
    if end > BLOCK_SIZE:
        raise FormatError(f"xattr block {blockno}: bad length")
    for _ in range(count):
        if p + XATTR_ENT.size > end:
            raise FormatError(f"xattr block {blockno}: entries overrun")
        kl, _pad, vl = XATTR_ENT.unpack_from(body, p)
        p += XATTR_ENT.size
        if p + kl + vl > end or kl == 0:
            raise FormatError(f"xattr block {blockno}: entry overrun")
        items.append((bytes(body[p:p + kl]), bytes(body[p + kl:p + kl + vl])))
        p += kl + vl
    return items


def new_uuid() -> bytes:
    return uuidlib.uuid4().bytes
