"""Unit tests of pmfs/layout.py: every on-media structure's encoding,
decoding and checksum, the geometry, and agreement with docs/FORMAT.md."""

from __future__ import annotations

import ast
import re
import struct
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from pmfs import layout as L
from pmfs.layout import (BLOCK_SIZE, CACHELINE, INODE_SIZE, FormatError, Inode, Superblock,
                         compute_geometry, fs_seed)

SEED = fs_seed(bytes(range(16)))
OTHER_SEED = fs_seed(bytes(range(1, 17)))
FORMAT_MD = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"


def flip(raw, i, mask=0x01) -> bytes:
    b = bytearray(raw)
    b[i] ^= mask
    return bytes(b)


# --------------------------------------------------------------------------
# checksums
# --------------------------------------------------------------------------

def test_checksum_primitives():
    u = bytes(range(16))
    assert fs_seed(u) == xxhash.xxh3_64_intdigest(u, 0x706D6673)
    assert fs_seed(u) != fs_seed(bytes(16))
    s = L.seed_for(SEED, L.TAG_INODE, 7)
    assert s == (SEED ^ (L.TAG_INODE << 56) ^ (7 * 0x9E3779B97F4A7C15)) & L.MASK64
    assert 0 <= s < 1 << 64
    # tag and location both change the seed
    assert len({L.seed_for(SEED, t, loc) for t in range(1, 9) for loc in range(50)}) == 400
    assert L.csum64(b"abc", 5) == xxhash.xxh3_64_intdigest(b"abc", 5)
    assert L.csum32(b"abc", 5) == xxhash.xxh3_64_intdigest(b"abc", 5) & 0xFFFFFFFF


# --------------------------------------------------------------------------
# superblock
# --------------------------------------------------------------------------

def make_sb(**kw) -> Superblock:
    geo = compute_geometry(64 << 20)
    args = dict(geo.as_dict(), uuid=bytes(range(16)), label="vol")
    args.update(kw)
    return Superblock(**args)


def test_superblock_round_trip_every_field():
    sb = make_sb(label="lab\u00e9l", version=77, format_version=1, incompat=0, compat=0x20,
                 state=L.SB_NEEDS_FSCK | L.SB_CLEAN, mount_count=9, mkfs_time=-5,
                 mount_time=1 << 62, write_time=3, free_blocks=11, free_inodes=12,
                 fsck_time=-(1 << 63), owner_pid=4242, owner_host="host.example",
                 error_count=99)
    raw = sb.encode()
    assert len(raw) == L.SB_SIZE == 512
    assert raw[:8] == L.SB_MAGIC
    assert struct.unpack_from("<Q", raw, L.SB_COMMIT_OFF)[0] == 77
    dec = Superblock.decode(raw)
    assert dec == sb  # every field but `commit` (compare=False)
    assert dec.commit == 77
    for f in Superblock.__dataclass_fields__:
        assert getattr(dec, f) == (77 if f == "commit" else getattr(sb, f)), f
    assert dec.encode() == raw
    assert dec.clean


def test_superblock_checksum_definition():
    raw = make_sb().encode()
    csum = struct.unpack_from("<Q", raw, L.SB_CSUM_OFF)[0]
    assert csum == xxhash.xxh3_64_intdigest(raw[:L.SB_COMMIT_OFF], 0x504D46535550)
    assert raw[344:L.SB_COMMIT_OFF] == bytes(L.SB_COMMIT_OFF - 344)


def test_superblock_label_limits():
    assert Superblock.decode(make_sb(label="x" * 63).encode()).label == "x" * 63
    with pytest.raises(ValueError):
        make_sb(label="x" * 64).encode()
    # the owner host is cut to 63 bytes (keeps a terminating NUL)
    assert Superblock.decode(make_sb(owner_host="h" * 80).encode()).owner_host == "h" * 63


def test_superblock_commit_word_must_equal_version():
    sb = make_sb(version=5)
    raw = bytearray(sb.encode())
    struct.pack_into("<Q", raw, L.SB_COMMIT_OFF, 0)  # update interrupted
    with pytest.raises(FormatError, match="not committed"):
        Superblock.decode(raw)
    struct.pack_into("<Q", raw, L.SB_COMMIT_OFF, 4)
    with pytest.raises(FormatError):
        Superblock.decode(raw)
    struct.pack_into("<Q", raw, L.SB_COMMIT_OFF, 5)
    assert Superblock.decode(raw).version == 5


def test_superblock_bad_magic_and_short():
    raw = make_sb().encode()
    with pytest.raises(FormatError, match="magic"):
        Superblock.decode(b"XXXXXXXX" + raw[8:])
    with pytest.raises(FormatError):
        Superblock.decode(raw[:300])
    with pytest.raises(FormatError):
        Superblock.decode(bytes(512))


def test_superblock_any_flipped_byte_is_rejected():
    raw = make_sb(version=3).encode()
    for i in range(L.SB_SIZE):
        for mask in (0x01, 0x80):
            with pytest.raises(FormatError):
                Superblock.decode(flip(raw, i, mask))


def test_superblock_geometry_errors():
    sb = make_sb()
    size = sb.total_blocks * BLOCK_SIZE
    assert sb.geometry_errors() == []
    assert sb.geometry_errors(size) == []
    assert sb.geometry_errors(size + 12345) == []
    errs = sb.geometry_errors(size - BLOCK_SIZE)
    assert len(errs) == 1 and "truncated" in errs[0]
    # a foreign geometry (valid checksum but regions that do not follow
    # from total_blocks / inode_count / wal_blocks)
    for name in ("wal_start", "ibitmap_start", "ibitmap_blocks", "bbitmap_start",
                 "bbitmap_blocks", "itable_start", "itable_blocks", "data_start"):
        bad = Superblock.decode(make_sb(**{name: getattr(sb, name) + 1}).encode())
        errs = bad.geometry_errors(size)
        assert errs and any("inconsistent geometry" in e for e in errs), name
    assert any("block size" in e for e in make_sb(block_size=8192).geometry_errors())
    assert any("inode size" in e for e in make_sb(inode_size=128).geometry_errors())
    assert any("root inode" in e for e in make_sb(root_ino=2).geometry_errors())
    # a geometry that cannot hold a file system at all
    errs = make_sb(total_blocks=10).geometry_errors()
    assert errs and "too small" in errs[0]


# --------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------

def check_geometry(g, size):
    assert g.total_blocks == size // BLOCK_SIZE
    assert g.wal_start == 2  # blocks 0 and 1: superblock replicas
    regions = [(g.wal_start, g.wal_blocks), (g.ibitmap_start, g.ibitmap_blocks),
               (g.bbitmap_start, g.bbitmap_blocks), (g.itable_start, g.itable_blocks),
               (g.data_start, g.data_blocks)]
    pos = 2
    for start, n in regions:
        assert start == pos, regions  # contiguous, in order, no overlap
        assert n > 0
        pos = start + n
    assert pos == g.total_blocks
    assert g.inode_count % L.INODES_PER_BLOCK == 0
    assert g.itable_blocks * L.INODES_PER_BLOCK == g.inode_count
    assert (g.ibitmap_blocks - 1) * L.BITS_PER_BITMAP_BLOCK < g.inode_count \
        <= g.ibitmap_blocks * L.BITS_PER_BITMAP_BLOCK
    assert (g.bbitmap_blocks - 1) * L.BITS_PER_BITMAP_BLOCK < g.total_blocks \
        <= g.bbitmap_blocks * L.BITS_PER_BITMAP_BLOCK
    assert g.data_blocks >= L.MIN_DATA_BLOCKS
    assert g.wal_blocks >= L.MIN_WAL_BLOCKS


@pytest.mark.parametrize("size", [L.min_image_size(), 1 << 20, (1 << 20) + 4095, 64 << 20,
                                  (1 << 30) + 123, 100 << 30, 16 << 40])
def test_geometry_regions_contiguous(size):
    g = compute_geometry(size)
    check_geometry(g, size)
    assert g.inode_count >= max(L.MIN_INODES, size // L.DEFAULT_INODE_RATIO)
    assert g.inode_count - size // L.DEFAULT_INODE_RATIO < L.INODES_PER_BLOCK \
        or g.inode_count == L.MIN_INODES
    assert g.as_dict()["data_start"] == g.data_start


@settings(max_examples=150, deadline=None)
@given(size=st.integers(min_value=L.min_image_size(), max_value=1 << 44),
       inodes=st.one_of(st.none(), st.integers(min_value=1, max_value=1 << 20)),
       wal=st.one_of(st.none(), st.integers(min_value=64, max_value=20000)))
def test_geometry_property(size, inodes, wal):
    try:
        g = compute_geometry(size, inodes, wal)
    except ValueError as e:
        # only an explicit -N / -J can make a size >= the minimum fail
        assert inodes is not None or wal is not None
        assert "too small" in str(e) and "at least" in str(e)
        return
    check_geometry(g, size)
    if inodes is not None:
        assert g.inode_count == -(-inodes // 16) * 16
    if wal is not None:
        assert g.wal_blocks == wal


def test_geometry_default_image_size_always_fits():
    # every size mkfs accepts must lay out with default -N / -J
    for size in range(L.min_image_size(), L.min_image_size() + 64 * BLOCK_SIZE, 4096):
        check_geometry(compute_geometry(size), size)


def test_geometry_too_small_readable():
    m = L.min_image_size()
    assert m == 135 * BLOCK_SIZE
    check_geometry(compute_geometry(m, L.MIN_INODES, L.MIN_WAL_BLOCKS), m)
    check_geometry(compute_geometry(m), m)
    # the tightest layout: 2 + 64 + 1 + 1 + 1 metadata blocks + 64 data blocks
    tight = 133 * BLOCK_SIZE
    assert tight <= m
    g = compute_geometry(tight, L.MIN_INODES, L.MIN_WAL_BLOCKS)
    check_geometry(g, tight)
    assert g.data_blocks == L.MIN_DATA_BLOCKS
    for size in (0, 4096, tight - 1, 512 << 10):
        with pytest.raises(ValueError) as ei:
            compute_geometry(size, L.MIN_INODES, L.MIN_WAL_BLOCKS)
        msg = str(ei.value)
        assert "too small" in msg and "at least" in msg and "\n" not in msg
        assert str(tight) in msg  # says how much is needed
    with pytest.raises(ValueError, match="at least 16 inodes"):
        compute_geometry(64 << 20, 0)
    with pytest.raises(ValueError, match="WAL"):
        compute_geometry(64 << 20, None, 63)
    with pytest.raises(ValueError, match="2\\^32 inodes"):
        compute_geometry(1 << 50, (1 << 32) + 1)
    with pytest.raises(ValueError, match="too large"):
        compute_geometry(BLOCK_SIZE << 48, 16)


def test_geometry_inode_rounding():
    size = 64 << 20
    for n, want in [(1, 16), (15, 16), (16, 16), (17, 32), (100, 112), (4096, 4096),
                    (4097, 4112)]:
        g = compute_geometry(size, n)
        assert g.inode_count == want, n
        assert g.itable_blocks == want // 16
    # enough inodes for a second inode-bitmap block
    g = compute_geometry(1 << 30, L.BITS_PER_BITMAP_BLOCK + 1)
    assert g.ibitmap_blocks == 2
    check_geometry(g, 1 << 30)


def test_default_wal_size_bounds():
    assert L.default_wal_blocks(0) == L.MIN_WAL_BLOCKS
    assert L.default_wal_blocks(64 * 256 - 1) == L.MIN_WAL_BLOCKS
    assert L.default_wal_blocks(1000 * 256) == 1000
    assert L.default_wal_blocks(1 << 40) == L.MAX_WAL_BLOCKS
    assert compute_geometry(64 << 20).wal_blocks == 64  # 256 KiB
    assert compute_geometry(1 << 30).wal_blocks == 1024  # 1/256 of 1 GiB
    assert compute_geometry(16 << 40).wal_blocks == 16384  # 64 MiB cap
    assert compute_geometry(16 << 40, None, 100).wal_blocks == 100


# --------------------------------------------------------------------------
# WAL header and records
# --------------------------------------------------------------------------

def test_wal_header_round_trip_and_binding():
    h = L.WalHeader(seq=9, tail_pos=123456789012, tail_txid=77)
    for slot in (0, 1):
        raw = h.encode(SEED, slot)
        assert len(raw) == CACHELINE
        assert raw[:8] == L.WAL_HDR_MAGIC
        assert L.WalHeader.decode(raw, SEED, slot) == h
        with pytest.raises(FormatError, match="checksum"):
            L.WalHeader.decode(raw, SEED, 1 - slot)  # slot-bound
        with pytest.raises(FormatError):
            L.WalHeader.decode(raw, OTHER_SEED, slot)  # file-system-bound
        for i in range(CACHELINE):
            with pytest.raises(FormatError):
                L.WalHeader.decode(flip(raw, i), SEED, slot)
    with pytest.raises(FormatError, match="magic"):
        L.WalHeader.decode(bytes(CACHELINE), SEED, 0)


ENTRIES = [(4096, b"a" * 64), (8192 + 3, b"xyz"), (12288, bytes(range(256)) * 2),
           (999, b"")]


def test_wal_record_encode_decode():
    rec = L.encode_wal_record(SEED, 42, ENTRIES)
    assert len(rec) % CACHELINE == 0
    kind, txid, length, nent, csum = L.wal_record_header(rec)
    assert (kind, txid, length, nent) == (L.WAL_REC_TX, 42, len(rec), len(ENTRIES))
    # the length is the smallest cache-line multiple holding the entries
    need = L.WAL_REC.size + sum(L.WAL_ENT.size + L.align(len(d), 8) for _o, d in ENTRIES)
    assert length == L.align(need, CACHELINE) and length - need < CACHELINE
    assert L.verify_wal_record(SEED, rec, 42, csum)
    got = [(o, bytes(d)) for o, d in L.decode_wal_entries(rec, nent, length)]
    assert got == ENTRIES
    # checksum: whole record with the csum field zeroed, seeded by txid
    z = bytearray(rec)
    z[L.WAL_REC_CSUM_OFF:L.WAL_REC_CSUM_OFF + 8] = bytes(8)
    assert csum == xxhash.xxh3_64_intdigest(bytes(z), L.seed_for(SEED, L.TAG_WALREC, 42))


def test_wal_record_bound_to_txid_and_fs():
    rec = L.encode_wal_record(SEED, 42, ENTRIES)
    _k, _t, _l, _n, csum = L.wal_record_header(rec)
    assert not L.verify_wal_record(SEED, rec, 43, csum)
    assert not L.verify_wal_record(OTHER_SEED, rec, 42, csum)


def test_wal_record_torn_or_corrupt_detected():
    rec = L.encode_wal_record(SEED, 7, ENTRIES)
    _k, _t, length, _n, csum = L.wal_record_header(rec)
    # any single flipped byte: either the magic is gone or the checksum fails
    for i in range(len(rec)):
        bad = flip(rec, i)
        hdr = L.wal_record_header(bad)
        if hdr is None:
            assert i < 4
            continue
        assert not L.verify_wal_record(SEED, bad, 7, hdr[4]), i
    # a torn record: any cache line still holding old (here: zero) content
    for ln in range(len(rec) // CACHELINE):
        torn = bytearray(rec)
        torn[ln * CACHELINE:(ln + 1) * CACHELINE] = bytes(CACHELINE)
        hdr = L.wal_record_header(torn)
        assert hdr is None or not L.verify_wal_record(SEED, torn, 7, csum)
    # a torn 8-byte word inside a line
    for w in range(0, len(rec), 8):
        torn = bytearray(rec)
        torn[w:w + 8] = b"\xee" * 8
        hdr = L.wal_record_header(torn)
        assert hdr is None or not L.verify_wal_record(SEED, torn, 7, hdr[4]), w


def test_wal_record_entries_overrun():
    rec = L.encode_wal_record(SEED, 1, [(0, b"q" * 40)])
    _k, _t, length, nent, _c = L.wal_record_header(rec)
    with pytest.raises(FormatError):
        list(L.decode_wal_entries(rec, nent + 5, length))  # more entries than bytes
    with pytest.raises(FormatError):
        list(L.decode_wal_entries(rec, nent, L.WAL_REC.size + L.WAL_ENT.size + 10))


def test_wal_skip_record():
    rec = L.encode_skip_record(SEED, 12, 3000)
    assert len(rec) == CACHELINE
    kind, txid, length, nent, csum = L.wal_record_header(rec)
    assert (kind, txid, length, nent) == (L.WAL_REC_SKIP, 12, 3000, 0)
    assert L.verify_wal_record(SEED, rec, 12, csum)
    assert not L.verify_wal_record(SEED, rec, 13, csum)
    assert rec[L.WAL_REC.size:] == bytes(CACHELINE - L.WAL_REC.size)
    for i in range(4, CACHELINE):
        bad = flip(rec, i)
        assert not L.verify_wal_record(SEED, bad, 12, L.wal_record_header(bad)[4]), i
    assert L.wal_record_header(bytes(64)) is None


# --------------------------------------------------------------------------
# bitmaps
# --------------------------------------------------------------------------

def test_bitmap_trailer():
    bits = bytes((i * 37) & 0xFF for i in range(L.BITMAP_BYTES))
    tr = L.encode_bitmap_trailer(SEED, 3, bits)
    assert len(tr) == CACHELINE
    block = bits + tr
    assert len(block) == BLOCK_SIZE
    magic, _pad, loc, c = struct.unpack_from("<IIQQ", tr)
    assert (magic, loc) == (L.BITMAP_MAGIC, 3)
    assert c == xxhash.xxh3_64_intdigest(bits, L.seed_for(SEED, L.TAG_BITMAP, 3))
    assert tr[24:] == bytes(40)
    assert L.verify_bitmap_block(SEED, 3, block)
    assert not L.verify_bitmap_block(SEED, 4, block)  # location-bound
    assert not L.verify_bitmap_block(OTHER_SEED, 3, block)
    for i in (0, 1, 100, L.BITMAP_BYTES - 1):
        for bit in range(8):
            assert not L.verify_bitmap_block(SEED, 3, flip(block, i, 1 << bit))
    for i in list(range(L.BITMAP_BYTES, L.BITMAP_BYTES + 4)) + \
            list(range(L.BITMAP_BYTES + 8, L.BITMAP_BYTES + 24)):  # magic, index, csum
        assert not L.verify_bitmap_block(SEED, 3, flip(block, i))
    assert not L.verify_bitmap_block(SEED, 0, bytes(BLOCK_SIZE))


# --------------------------------------------------------------------------
# inodes
# --------------------------------------------------------------------------

ALL_FIELDS = dict(mode=0o100644, uid=1000, gid=(1 << 32) - 1, flags=L.I_ORPHAN,
                  nlink=3, generation=0xDEADBEEF, size=(1 << 44) + 5, blocks=1 << 33,
                  atime=-1, mtime=(1 << 63) - 1, ctime=-(1 << 63), btime=17, rdev=0x1234,
                  parent=99, xattr=12345, orphan_next=7, orphan_prev=8)


def inode_fields(i: Inode) -> dict:
    return {s: getattr(i, s) for s in Inode.__slots__}


def test_inode_round_trip_every_field():
    ents = [(0, 10, 500), (10, 1, 900), (100, 7, 1 << 40)]
    ino = Inode(5, depth=0, count=len(ents), root=L.encode_root_entries(ents), **ALL_FIELDS)
    raw = ino.encode(SEED)
    assert len(raw) == INODE_SIZE
    dec = Inode.decode(5, raw, SEED)
    for k, v in ALL_FIELDS.items():
        assert getattr(dec, k) == v, k
    assert dec.ino == 5 and dec.depth == 0 and dec.count == 3
    assert dec.root[8:] == ino.root[8:]
    assert L.decode_root_entries(dec.root, dec.count) == ents
    assert dec.encode(SEED) == raw
    assert not dec.is_free
    # checksum definition
    c = struct.unpack_from("<Q", raw, L.INODE_CSUM_OFF)[0]
    assert c == xxhash.xxh3_64_intdigest(raw[:L.INODE_CSUM_OFF],
                                         L.seed_for(SEED, L.TAG_INODE, 5))
    assert raw[112:120] == bytes(8)  # reserved
    # copy() is a faithful, independent copy
    cp = dec.copy()
    assert inode_fields(cp) == inode_fields(dec)
    cp.size = 1
    assert dec.size == ALL_FIELDS["size"]


def test_inode_extent_root_header_and_depth():
    ents = [(0, 0, 1000 + i) for i in range(L.EXT_ROOT_MAX)]
    ino = Inode(9, mode=0o100600, depth=2, count=7, root=L.encode_root_entries(ents))
    raw = ino.encode(SEED)
    assert struct.unpack_from("<HHI", raw, L.INLINE_OFF) == (2, 7, 0)
    assert raw[L.EXT_ROOT_OFF:L.EXT_ROOT_OFF + 16] == struct.pack("<IIQ", 0, 0, 1000)
    assert raw[240:248] == bytes(8)  # spare
    dec = Inode.decode(9, raw, SEED)
    assert (dec.depth, dec.count) == (2, 7)
    assert L.decode_root_entries(dec.root, dec.count) == ents
    with pytest.raises(ValueError):
        L.encode_root_entries(ents + [(9, 9, 9)])
    with pytest.raises(FormatError):
        L.decode_root_entries(dec.root, 8)


def test_inode_inline_data():
    target = bytes(range(1, 129))  # exactly INLINE_MAX bytes
    ino = Inode(3, mode=0o120777, flags=L.I_INLINE, nlink=1, size=len(target),
                root=target, depth=5, count=6)
    raw = ino.encode(SEED)
    assert raw[L.INLINE_OFF:L.INODE_CSUM_OFF] == target  # not overwritten by depth/count
    dec = Inode.decode(3, raw, SEED)
    assert dec.flags & L.I_INLINE
    assert dec.root[:dec.size] == target
    assert dec.encode(SEED) == raw
    short = Inode(3, mode=0o120777, flags=L.I_INLINE, size=5, root=b"hello")
    dec = Inode.decode(3, short.encode(SEED), SEED)
    assert dec.root == b"hello" + bytes(L.INLINE_MAX - 5)


def test_inode_checksum_bound_to_slot():
    raw = Inode(5, **ALL_FIELDS).encode(SEED)
    assert L.inode_checksum_ok(5, raw, SEED)
    for other in (0, 4, 6, 5 + 16, 1 << 20):
        assert not L.inode_checksum_ok(other, raw, SEED)
        with pytest.raises(FormatError, match="checksum"):
            Inode.decode(other, raw, SEED)
    assert not L.inode_checksum_ok(5, raw, OTHER_SEED)
    # verify=False decodes without checking
    assert Inode.decode(6, raw, SEED, verify=False).uid == 1000


def test_inode_flipped_byte_detected():
    raw = Inode(5, **ALL_FIELDS).encode(SEED)
    for i in range(INODE_SIZE):
        with pytest.raises(FormatError):
            Inode.decode(5, flip(raw, i), SEED)
        assert not L.inode_checksum_ok(5, flip(raw, i), SEED)


def test_zero_inode_slot_is_free_and_verifies():
    z = bytes(INODE_SIZE)
    assert L.inode_checksum_ok(123, z, SEED)
    ino = Inode.decode(123, z, SEED)
    assert ino.is_free and ino.mode == 0 and ino.ino == 123
    # a freed slot (mode 0 with its generation) carries a real checksum
    freed = Inode(123, generation=4).encode(SEED)
    assert freed != z
    dec = Inode.decode(123, freed, SEED)
    assert dec.is_free and dec.generation == 4
    with pytest.raises(FormatError):
        Inode.decode(124, freed, SEED)


# --------------------------------------------------------------------------
# extent nodes
# --------------------------------------------------------------------------

def test_extent_node_round_trip():
    ents = [(i * 10, 5, 100000 + i * 7) for i in range(L.EXT_NODE_MAX)]
    for depth, e in [(0, ents), (3, ents[:1]), (1, [])]:
        raw = L.encode_extent_node(SEED, 777, 42, depth, e)
        assert len(raw) == BLOCK_SIZE
        magic, d, count, owner, c, pad = L.EXT_NODE_HDR.unpack_from(raw)
        assert (magic, d, count, owner, pad) == (L.EXTENT_MAGIC, depth, len(e), 42, 0)
        z = bytearray(raw)
        z[16:24] = bytes(8)
        assert c == xxhash.xxh3_64_intdigest(bytes(z), L.seed_for(SEED, L.TAG_EXTENT, 777))
        assert L.decode_extent_node(SEED, 777, raw) == (depth, e)
        assert L.decode_extent_node(SEED, 777, raw, owner=42) == (depth, e)
        assert raw[32 + 16 * len(e):] == bytes(BLOCK_SIZE - 32 - 16 * len(e))


def test_extent_node_errors():
    raw = L.encode_extent_node(SEED, 777, 42, 0, [(0, 1, 2), (1, 3, 9)])
    with pytest.raises(FormatError, match="checksum"):
        L.decode_extent_node(SEED, 778, raw)  # bound to its block
    with pytest.raises(FormatError, match="owned by inode 42"):
        L.decode_extent_node(SEED, 777, raw, owner=43)
    with pytest.raises(FormatError, match="magic"):
        L.decode_extent_node(SEED, 777, bytes(BLOCK_SIZE))
    for i in list(range(0, 80)) + [500, 4095]:
        with pytest.raises(FormatError):
            L.decode_extent_node(SEED, 777, flip(raw, i))
    bad = bytearray(raw)
    struct.pack_into("<H", bad, 6, L.EXT_NODE_MAX + 1)
    with pytest.raises(FormatError, match="count"):
        L.decode_extent_node(SEED, 777, bad)
    with pytest.raises(ValueError):
        L.encode_extent_node(SEED, 1, 1, 0, [(0, 0, 0)] * (L.EXT_NODE_MAX + 1))


# --------------------------------------------------------------------------
# directory records
# --------------------------------------------------------------------------

def test_dirent_round_trip_and_checksum():
    name = b"hello.txt"
    rec_len = L.dirent_size(len(name))
    assert rec_len == 32 and L.dirent_size(0) == 16 and L.dirent_size(255) == 272
    raw = L.encode_dirent(SEED, 12, 4096 + 64, 99, rec_len, L.DT_REG, name)
    assert len(raw) == L.DIRENT.size + len(name)
    blk = bytearray(BLOCK_SIZE)
    blk[64:64 + len(raw)] = raw
    assert L.decode_dirent(SEED, 12, 4096 + 64, blk, 64) == (99, rec_len, L.DT_REG, name)
    c = struct.unpack_from("<I", raw, L.DIRENT_CSUM_OFF)[0]
    seed = L.seed_for(SEED, L.TAG_DIRENT, (12 << 32) ^ (4096 + 64))
    assert c == xxhash.xxh3_64_intdigest(raw[:12] + name, seed) & 0xFFFFFFFF
    # bound to the directory and to the record's offset
    with pytest.raises(FormatError, match="checksum"):
        L.decode_dirent(SEED, 13, 4096 + 64, blk, 64)
    with pytest.raises(FormatError, match="checksum"):
        L.decode_dirent(SEED, 12, 64, blk, 64)
    for i in range(64, 64 + len(raw)):
        if 72 <= i < 74:  # rec_len: may fail the length checks instead
            continue
        with pytest.raises(FormatError):
            L.decode_dirent(SEED, 12, 4096 + 64, flip(blk, i), 64)
    # slack after the name is not covered
    blk[64 + len(raw)] = 0xAA
    assert L.decode_dirent(SEED, 12, 4096 + 64, blk, 64)[3] == name


def test_dirent_free_record_and_length_checks():
    free = L.encode_dirent(SEED, 2, 0, 0, BLOCK_SIZE, 0, b"")
    blk = bytearray(BLOCK_SIZE)
    blk[:len(free)] = free
    assert L.decode_dirent(SEED, 2, 0, blk, 0) == (0, BLOCK_SIZE, 0, b"")
    for rec_len, off in [(8, 0), (20, 0), (0, 0), (BLOCK_SIZE, 8), (4104, 0)]:
        b = bytearray(BLOCK_SIZE)
        rec = L.encode_dirent(SEED, 2, off, 5, rec_len & 0xFFFF, 8, b"n")
        b[off:off + len(rec)] = rec
        with pytest.raises(FormatError, match="record length"):
            L.decode_dirent(SEED, 2, off, b, off)
    b = bytearray(BLOCK_SIZE)
    rec = L.encode_dirent(SEED, 2, 0, 5, 16, 8, b"toolongname")
    b[:len(rec)] = rec
    with pytest.raises(FormatError, match="overruns"):
        L.decode_dirent(SEED, 2, 0, b, 0)


# --------------------------------------------------------------------------
# xattr blocks
# --------------------------------------------------------------------------

def test_xattr_round_trip():
    items = [(b"user.a", b"1"), (b"trusted.bb", bytes(300)), (b"security.x" * 20, b"")]
    raw = L.encode_xattr_block(SEED, 555, 17, items)
    assert len(raw) == BLOCK_SIZE
    magic, count, used, owner, c, pad = L.XATTR_HDR.unpack_from(raw)
    assert (magic, count, used, owner, pad) == (L.XATTR_MAGIC, 3,
                                                L.xattr_entries_size(items), 17, 0)
    assert used == sum(4 + len(k) + len(v) for k, v in items)
    assert L.decode_xattr_block(SEED, 555, raw) == items
    assert L.decode_xattr_block(SEED, 555, raw, owner=17) == items
    assert raw[32:36] == struct.pack("<BBH", 6, 0, 1)
    assert raw[32 + used:] == bytes(BLOCK_SIZE - 32 - used)
    z = bytearray(raw)
    z[16:24] = bytes(8)
    assert c == xxhash.xxh3_64_intdigest(bytes(z), L.seed_for(SEED, L.TAG_XATTR, 555))
    assert L.decode_xattr_block(SEED, 9, L.encode_xattr_block(SEED, 9, 1, []), 1) == []


def test_xattr_errors():
    items = [(b"user.k", b"v" * 10)]
    raw = L.encode_xattr_block(SEED, 555, 17, items)
    with pytest.raises(FormatError, match="checksum"):
        L.decode_xattr_block(SEED, 556, raw)
    with pytest.raises(FormatError, match="owned"):
        L.decode_xattr_block(SEED, 555, raw, owner=18)
    with pytest.raises(FormatError, match="magic"):
        L.decode_xattr_block(SEED, 555, bytes(BLOCK_SIZE))
    for i in list(range(0, 60)) + [1000, 4095]:
        with pytest.raises(FormatError):
            L.decode_xattr_block(SEED, 555, flip(raw, i))
    # fills the block exactly, then one byte too many
    exact = [(b"user.big", bytes(L.XATTR_SPACE - 4 - 8))]
    assert L.xattr_entries_size(exact) == L.XATTR_SPACE
    assert L.decode_xattr_block(SEED, 1, L.encode_xattr_block(SEED, 1, 2, exact)) == exact
    with pytest.raises(ValueError):
        L.encode_xattr_block(SEED, 1, 2, [(b"user.big", bytes(L.XATTR_SPACE - 4 - 7))])
    # a count that claims more entries than `used` holds
    bad = bytearray(raw)
    struct.pack_into("<H", bad, 4, 2)
    z = bytearray(bad)
    z[16:24] = bytes(8)
    struct.pack_into("<Q", bad, 16, L.csum64(bytes(z), L.seed_for(SEED, L.TAG_XATTR, 555)))
    with pytest.raises(FormatError, match="overrun"):
        L.decode_xattr_block(SEED, 555, bad)


# --------------------------------------------------------------------------
# docs/FORMAT.md agrees with the code
# --------------------------------------------------------------------------

_FMT_ITEM = re.compile(r"(\d*)([xcbB?hHiIlLqQnNefdspP])")


def struct_fields(s: struct.Struct) -> list[tuple[int, int]]:
    """(offset, size) of each field of a little-endian struct format."""
    fmt = s.format
    assert fmt[0] in "<=", fmt  # no native alignment in on-media structs
    out = []
    pos = 0
    for cnt, code in _FMT_ITEM.findall(fmt[1:]):
        n = int(cnt) if cnt else 1
        size = struct.calcsize("<" + code)
        if code in "sp":
            out.append((pos, n))
            pos += n
        elif code == "x":
            pos += n
        else:
            for _ in range(n):
                out.append((pos, size))
                pos += size
    assert pos == s.size
    return out


def _tables_after(marker_re):
    text = FORMAT_MD.read_text()
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = marker_re.match(line.strip())
        if not m:
            continue
        rows = []
        j = i + 1
        while j < len(lines) and not lines[j].startswith("|"):
            j += 1
        while j < len(lines) and lines[j].startswith("|"):
            cells = [c.strip() for c in lines[j].strip().strip("|").split("|")]
            rows.append(cells)
            j += 1
        assert len(rows) >= 3, f"no table after {line!r}"
        out.append((m, rows[2:]))  # skip the header and the --- line
    return out


def _eval(expr: str):
    """`NAME`, `NAME.size` or `name()` of pmfs.layout."""
    expr = expr.strip().strip("`")
    if expr.endswith("()"):
        return getattr(L, expr[:-2])()
    obj = L
    for part in expr.split("."):
        obj = getattr(obj, part)
    return obj


def test_format_md_constants_match_code():
    tables = _tables_after(re.compile(r"<!-- constants -->"))
    assert len(tables) == 1
    rows = tables[0][1]
    assert len(rows) > 40
    for name, value, *_ in rows:
        want = ast.literal_eval(value.strip("`"))
        assert _eval(name) == want, f"FORMAT.md says {name} = {value}"


def test_format_md_sizes_match_code():
    tables = _tables_after(re.compile(r"<!-- sizes -->"))
    assert len(tables) == 1
    for what, size, code in tables[0][1]:
        assert _eval(code) == int(size), f"FORMAT.md: {what} is {size} bytes, code {code}"


def test_format_md_struct_tables_match_code():
    tables = _tables_after(re.compile(r"<!-- struct: (.*) size=(\S+) -->"))
    names = set()
    for m, rows in tables:
        total = _eval(m.group(2))
        spans = [(int(r[0]), int(r[1])) for r in rows]
        # the rows tile the structure exactly
        pos = 0
        for off, n in spans:
            assert off == pos, f"{m.group(0)}: row at {off}, expected {pos}"
            assert n > 0
            pos += n
        assert pos == total, f"{m.group(0)}: rows cover {pos} bytes, structure is {total}"
        # every field of every struct quoted is a row of the table
        for spec in m.group(1).split():
            name, base = spec.split("@")
            names.add(name)
            for off, n in struct_fields(_eval(name)):
                assert (int(base) + off, n) in spans, \
                    f"{m.group(0)}: field of {name} at {int(base) + off}+{n} is not in the table"
    assert names >= {"_SB", "_WALHDR", "WAL_REC", "WAL_ENT", "_BMTRAILER", "_INODE_HEAD",
                     "_EXT_ROOT_HDR", "EXTENT", "EXT_NODE_HDR", "DIRENT", "XATTR_HDR",
                     "XATTR_ENT"}


def test_documented_sizes():
    # the sizes FORMAT.md is built around, asserted directly as well
    assert L._SB.size == 344 and L.SB_SIZE == 512
    assert L.SB_COMMIT_OFF == 496 and L.SB_CSUM_OFF == 504
    assert L.SB_COMMIT_OFF % 8 == 0 and L.SB_COMMIT_OFF // CACHELINE == (L.SB_SIZE - 1) // 64
    assert L._WALHDR.size == 64 and L.WAL_REC.size == 32 and L.WAL_ENT.size == 16
    assert L.BITMAP_BYTES + CACHELINE == BLOCK_SIZE and L.BITS_PER_BITMAP_BLOCK == 32256
    assert L._INODE_HEAD.size == 120 and INODE_SIZE == 256
    assert L.INLINE_OFF + L.INLINE_MAX == L.INODE_CSUM_OFF == 248
    assert L.EXT_ROOT_OFF + 16 * L.EXT_ROOT_MAX == 240
    assert L.EXT_NODE_HDR.size + 16 * L.EXT_NODE_MAX == BLOCK_SIZE
    assert L.DIRENT.size == 16 and L.XATTR_HDR.size == 32 and L.XATTR_ENT.size == 4
    assert L.XATTR_SPACE == BLOCK_SIZE - 32
