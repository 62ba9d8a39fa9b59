"""The dual-copy superblock: replica selection under every torn write, and
the errors a mount reports for unusable superblocks."""

from __future__ import annotations

import errno
import struct

import pytest

from mkfs import make_filesystem
from pmfs import layout as L
from pmfs.crashsim import CrashSimulator, apply
from pmfs.layout import BLOCK_SIZE, Superblock, compute_geometry
from pmfs.pmem import EV_FENCE, EV_STORE, MemoryImage, TracingImage
from pmfs.superblock import (REPLICA_OFFSETS, SuperblockError, SuperblockManager, commit_word,
                             looks_like_pmfs, read_replicas, write_replica)

SIZE = L.min_image_size()
_FORMATTED: dict = {}


def formatted() -> bytes:
    """A freshly formatted image (built once, copied by each test)."""
    if "img" not in _FORMATTED:
        img = MemoryImage(SIZE)
        make_filesystem(img, compute_geometry(SIZE), label="sbtest")
        _FORMATTED["img"] = img.snapshot()
    return _FORMATTED["img"]


def load(image) -> SuperblockManager:
    m = SuperblockManager(MemoryImage(image))
    m.load()
    return m


def damage(buf: bytearray, replica: int, at: int = 40) -> None:
    buf[REPLICA_OFFSETS[replica] + at] ^= 0xFF


# --------------------------------------------------------------------------
# torn updates
# --------------------------------------------------------------------------

UPDATES = [dict(label="first"), dict(state=0, mount_count=7, owner_host="h" * 63),
           dict(label="third", free_blocks=3), dict(error_count=5)]


@pytest.mark.parametrize("torn", [False, True], ids=["lines", "torn-words"])
@pytest.mark.parametrize("start", ["both-valid", "inactive-damaged", "inactive-torn"])
def test_every_crash_state_selects_old_or_new(start, torn):
    """torn-words: every aligned 8-byte word is its own unit of atomicity
    (the only hardware guarantee), so a line can hold any word-prefix of a
    store to it."""
    base = bytearray(formatted())
    m0 = SuperblockManager(MemoryImage(base))
    sb0 = m0.load()
    if start == "inactive-damaged":
        damage(base, 1 - m0.active, 300)
    elif start == "inactive-torn":  # an update interrupted before its commit word
        struct.pack_into("<Q", base, REPLICA_OFFSETS[1 - m0.active] + L.SB_COMMIT_OFF, 0)
    inner = MemoryImage(base)
    tr = TracingImage(inner)
    m = SuperblockManager(tr)
    assert m.load() == sb0
    versions = [m.sb]
    for ch in UPDATES:
        versions.append(m.update(**ch))
    assert [v.version for v in versions] == list(range(sb0.version, sb0.version + 5))

    sim = (CrashSimulator(tr.initial, tr.events, torn=True, max_torn=None) if torn
           else CrashSimulator(tr.initial, tr.events))
    marks = sim.marks()
    writes = [i for i, label, _ in marks if label == "sb-write"]
    commits = [i for i, label, _ in marks if label == "sb-committed"]
    assert len(writes) == len(commits) == len(UPDATES)
    points = sim.store_points()
    assert sum(1 for e in tr.events if e[0] in (EV_STORE, EV_FENCE)) + 1 == len(points)
    seen_new = seen_old = nstates = ntorn = 0
    whole = {bytes(tr.initial[o:o + L.SB_SIZE]) for o in REPLICA_OFFSETS}
    whole |= {v.encode() for v in versions}
    for point, durable, states in sim.states(points=points, k=2, max_states=None):
        done = sum(1 for i in commits if i < point)
        started = sum(1 for i in writes if i < point)
        allowed = {done} | ({done + 1} if started > done else set())
        for st in states:
            nstates += 1
            image = apply(durable, st)
            img = MemoryImage(image)
            ntorn += any(bytes(image[o:o + L.SB_SIZE]) not in whole for o in REPLICA_OFFSETS)
            mgr = SuperblockManager(img)
            try:
                sb = mgr.load()
            except SuperblockError as e:  # pragma: no cover - the failure we test for
                pytest.fail(f"crash at event {point} ({st.kind}, {st.chosen}): {e}")
            idx = sb.version - sb0.version
            assert idx in allowed, (point, st.kind, st.chosen, sb.version)
            # consistent content: exactly the superblock that was written
            assert sb == versions[idx], (point, st.kind, st.chosen)
            assert sb.commit == sb.version
            if idx == done:
                seen_old += 1
            else:
                seen_new += 1
                # the new version always lands in the replica that was inactive
                assert mgr.active == (m0.active + idx) % 2
    # the exploration really covered torn states on both sides
    assert seen_new >= len(UPDATES) and seen_old > 0 and ntorn > 50 and nstates > 80
    if torn:
        assert any(st.kind == "torn" for _p, _d, sts in sim.states(points=points, k=1)
                   for st in sts)


def test_crash_before_commit_word_keeps_old_version():
    base = bytearray(formatted())
    img = MemoryImage(base)
    m = SuperblockManager(img)
    old = m.load()
    new = Superblock(**{k: getattr(old, k) for k in Superblock.__dataclass_fields__})
    new.version = old.version + 1
    new.label = "never committed"
    raw = bytearray(new.encode())
    raw[L.SB_COMMIT_OFF:L.SB_COMMIT_OFF + 8] = bytes(8)
    img.write(REPLICA_OFFSETS[1 - m.active], raw)  # body complete, commit word missing
    m2 = SuperblockManager(img)
    assert m2.load() == old
    assert "not committed" in m2.replica_errors[1 - m2.active]
    assert not m2.other_valid
    # storing the commit word makes it the active version
    img.write(REPLICA_OFFSETS[1 - m.active] + L.SB_COMMIT_OFF,
              struct.pack("<Q", new.version))
    assert load(img.snapshot()).sb.label == "never committed"


# --------------------------------------------------------------------------
# selection and errors
# --------------------------------------------------------------------------

def test_repeated_updates_alternate_replicas():
    img = MemoryImage(formatted())
    m = SuperblockManager(img)
    sb = m.load()
    active, version = m.active, sb.version
    assert commit_word(img, active) == version
    for n in range(6):
        new = m.update(mount_count=n)
        assert m.active == 1 - active
        assert new.version == version + 1
        assert commit_word(img, m.active) == new.version
        assert commit_word(img, active) == version  # the old replica untouched
        reps = read_replicas(img)
        assert reps[m.active][0] == new and reps[active][0].version == version
        again = load(img.snapshot())
        assert again.sb == new and again.active == m.active and again.other_valid
        active, version = m.active, new.version


def test_highest_valid_version_wins_either_replica():
    base = bytearray(formatted())
    sb = load(base).sb
    for newer in (0, 1):
        buf = bytearray(base)
        for i, v in ((newer, sb.version + 10), (1 - newer, sb.version + 3)):
            s = Superblock(**{k: getattr(sb, k) for k in Superblock.__dataclass_fields__})
            s.version = v
            buf[REPLICA_OFFSETS[i]:REPLICA_OFFSETS[i] + L.SB_SIZE] = s.encode()
        m = load(buf)
        assert m.active == newer and m.sb.version == sb.version + 10


def test_one_replica_damaged_uses_the_other():
    base = bytearray(formatted())
    m0 = load(base)
    for bad in (0, 1):
        buf = bytearray(base)
        damage(buf, bad)
        m = load(buf)
        assert m.active == 1 - bad
        assert m.sb.uuid == m0.sb.uuid
        assert m.replica_errors[bad] and "checksum" in m.replica_errors[bad]
        assert not m.other_valid
        # the next update repairs the damaged replica
        m.update()
        assert m.active == bad and load(m.img.snapshot()).other_valid


def test_both_replicas_damaged():
    buf = bytearray(formatted())
    damage(buf, 0)
    damage(buf, 1, 200)
    with pytest.raises(SuperblockError) as ei:
        SuperblockManager(MemoryImage(buf)).load()
    assert "damaged" in str(ei.value)
    assert not ei.value.foreign
    assert ei.value.errno == errno.EUCLEAN
    assert looks_like_pmfs(MemoryImage(buf))


def test_one_magic_left_is_damage_not_foreign():
    buf = bytearray(formatted())
    buf[0:8] = b"garbage!"
    damage(buf, 1)
    with pytest.raises(SuperblockError) as ei:
        SuperblockManager(MemoryImage(buf)).load()
    assert not ei.value.foreign and "damaged" in str(ei.value)


@pytest.mark.parametrize("kind", ["zeros", "ext4", "random"])
def test_foreign_bytes(kind):
    buf = bytearray(SIZE)
    if kind == "ext4":
        buf[1080:1082] = b"\x53\xef"
    elif kind == "random":
        import random
        r = random.Random(5)
        buf[:3 * BLOCK_SIZE] = bytes(r.getrandbits(8) for _ in range(3 * BLOCK_SIZE))
    img = MemoryImage(buf)
    assert not looks_like_pmfs(img)
    with pytest.raises(SuperblockError) as ei:
        SuperblockManager(img).load()
    assert ei.value.foreign
    assert "not a pmfs file system" in str(ei.value)


def test_image_too_short_for_replicas():
    img = MemoryImage(100)
    reps = read_replicas(img)
    assert all(sb is None for sb, _ in reps)
    with pytest.raises(SuperblockError) as ei:
        SuperblockManager(img).load()
    assert ei.value.foreign


@pytest.mark.parametrize("field,value", [("format_version", L.FORMAT_VERSION + 1),
                                         ("incompat", 0x1), ("incompat", 1 << 31)])
def test_newer_format_refused(field, value):
    buf = bytearray(formatted())
    sb = load(buf).sb
    for i in (0, 1):
        s = Superblock(**{k: getattr(sb, k) for k in Superblock.__dataclass_fields__})
        setattr(s, field, value)
        buf[REPLICA_OFFSETS[i]:REPLICA_OFFSETS[i] + L.SB_SIZE] = s.encode()
    with pytest.raises(SuperblockError) as ei:
        SuperblockManager(MemoryImage(buf)).load()
    assert "newer" in str(ei.value)
    assert ei.value.errno == errno.EPROTONOSUPPORT and not ei.value.foreign


def test_unknown_compat_flags_accepted():
    buf = bytearray(formatted())
    m = load(buf)
    m.update(compat=0x80)
    assert load(m.img.snapshot()).sb.compat == 0x80


def test_truncated_image_and_bad_geometry():
    base = formatted()
    with pytest.raises(SuperblockError, match="truncated") as ei:
        SuperblockManager(MemoryImage(base[:-BLOCK_SIZE])).load()
    assert ei.value.errno == errno.EUCLEAN
    # check_geometry=False still reads it (fsck)
    m = SuperblockManager(MemoryImage(base[:-BLOCK_SIZE]))
    assert m.load(check_geometry=False).total_blocks * BLOCK_SIZE == len(base)
    # a checksum-valid replica with a foreign geometry
    m = load(base)
    m.update(itable_start=m.sb.itable_start + 1)
    with pytest.raises(SuperblockError, match="inconsistent geometry"):
        SuperblockManager(MemoryImage(m.img.snapshot())).load()


def test_write_refused_on_readonly_image():
    img = MemoryImage(formatted())
    m = SuperblockManager(img)
    m.load()
    img.readonly = True
    before = img.snapshot()
    with pytest.raises(OSError) as ei:
        m.update(label="x")
    assert ei.value.errno == errno.EROFS
    assert img.snapshot() == before


def test_write_replica_protocol_order():
    """The commit word is stored last, after a fence that made the rest durable."""
    img = MemoryImage(formatted())
    tr = TracingImage(img)
    sb = load(img.snapshot()).sb
    sb.version += 1
    write_replica(tr, 1, sb)
    ev = [e for e in tr.events if e[0] != "M"]
    kinds = [e[0] for e in ev]
    assert kinds == ["S", "F", "B", "S", "F", "B"]
    first, second = ev[0], ev[3]
    assert first[1] == BLOCK_SIZE and len(first[2]) == L.SB_SIZE
    assert first[2][L.SB_COMMIT_OFF:L.SB_COMMIT_OFF + 8] == bytes(8)
    assert second[1] == BLOCK_SIZE + L.SB_COMMIT_OFF
    assert second[2] == struct.pack("<Q", sb.version)
    assert commit_word(img, 1) == sb.version
