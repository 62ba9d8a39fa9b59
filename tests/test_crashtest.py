"""The crash explorer (pmfs/crashtest.py, tools/crashtest): its oracle, its
machinery, and the CI runs -- every seq-1 workload, a fixed sample of seq-2
workloads and two random workloads, each crashed at every fence, with zero
violations.  The deliberately broken variants are in test_crash_broken.py,
the crash-state construction in test_crash_sim.py."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from pmfs import crashtest as ct
from pmfs.crashtest import FileData, Model, Obs, Op, compare, data_for, parse_workload
from pmfs.fs import FileSystem
from pmfs.pmem import MemoryImage, TracingImage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "crashtest")
JOBS = 2


# --------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------


def test_workload_text_round_trips():
    wl = parse_workload("log=wrap: mkdir B/x")
    assert wl.log == "wrap" and str(wl) == "log=wrap: mkdir B/x"
    with pytest.raises(ValueError):
        parse_workload("log=nope: mkdir B/x")
    text = ("creat A/x; write A/x 0 300 7; rename A/x B/y exchange; falloc B/y punch 10 20; "
            "chmod A/foo 600; rename A/foo A/z; symlink B/s ../A/foo; fdatasync B/y")
    wl = parse_workload(text)
    assert str(wl) == text
    assert parse_workload(str(wl)) == wl
    assert wl.ops[2] == Op("rename", ("A/x", "B/y", 2))
    assert wl.ops[3] == Op("falloc", ("B/y", 3, 10, 20))
    assert wl.ops[4].args == ("A/foo", 0o600)
    with pytest.raises(ValueError):
        parse_workload("frobnicate A/x")
    with pytest.raises(ValueError):
        parse_workload("write A/x 0")


def test_data_is_position_dependent_and_never_zero():
    a = data_for(3, 0, 1000)
    assert 0 not in a
    assert data_for(3, 100, 50) == a[100:150]
    assert data_for(4, 0, 1000) != a


def test_generators_cover_the_operation_vocabulary():
    s1 = ct.seq1_workloads()
    names = {op.name for w in s1 + ct.reclaim_workloads() for op in w.ops}
    assert names == set(ct.OPSPEC)
    assert {"deferunlink", "reclaim"} <= {op.name for w in ct.suite("ci") for op in w.ops}
    assert len(s1) >= 120
    # every generated workload is valid according to the model
    m0 = ct._initial_model(ct.CI_CONFIG)
    for w in s1:
        m = m0
        for op in w.ops:
            err, _inf, m = m.apply(op)
            assert err == 0, (str(w), op)
    # exchanges, cross-directory, replacing and directory renames are there
    renames = [op for w in s1 for op in w.ops if op.name == "rename"]
    assert any(op.args[2] == 2 for op in renames)
    assert any(op.args[0].split("/")[0] != op.args[1].split("/")[0] for op in renames)
    assert any(op.args[0] == "A/C" for op in renames)
    s2 = ct.seq2_workloads()
    assert len(s2) > 2000 and all(2 <= len(w.ops) <= 3 for w in s2)
    assert ct.sample(s2, 10, 1) == ct.sample(s2, 10, 1)
    r1, r2 = ct.random_workload(5, 15), ct.random_workload(5, 15)
    assert r1 == r2 and len(r1.ops) == 15 and r1 != ct.random_workload(6, 15)


# --------------------------------------------------------------------------
# the oracle
# --------------------------------------------------------------------------


def test_filedata_overwrite_is_byte_by_byte_old_or_new():
    old = bytes(range(1, 201))
    f = FileData(old).write(50, b"\xee" * 100)
    assert f.mismatch(old) is None
    assert f.mismatch(f.cur) is None
    mixed = old[:50] + b"\xee" * 30 + old[80:]
    assert f.mismatch(mixed) is None
    assert "bytes 60..61" in f.mismatch(mixed[:60] + b"\x00" + mixed[61:])
    assert f.sync().mismatch(old) is not None
    assert f.sync().mismatch(f.cur) is None


def test_filedata_append_is_old_size_or_new_size_with_new_data():
    old = b"a" * 100
    f = FileData(old).write(100, b"b" * 50)
    assert f.sizes == {100, 150}
    assert f.mismatch(old) is None
    assert f.mismatch(old + b"b" * 50) is None
    # the new size without the new data: never
    assert "bytes 100..150" in f.mismatch(old + bytes(50))
    assert "size 120" in f.mismatch(old + b"b" * 20)


def test_filedata_hole_reads_zero_and_truncate_zeroes():
    f = FileData(b"x" * 10).write(100, b"y" * 10)
    assert f.mismatch(b"x" * 10 + bytes(90) + b"y" * 10) is None
    assert f.mismatch(b"x" * 10 + b"\x01" + bytes(89) + b"y" * 10) is not None
    t = FileData(b"x" * 100).truncate(10).truncate(50)
    assert t.sizes == {50} and t.mismatch(b"x" * 10 + bytes(40)) is None
    assert t.mismatch(b"x" * 50) is not None
    p = FileData(b"x" * 100).punch(10, 20)
    assert p.cur == b"x" * 10 + bytes(10) + b"x" * 80 and p.mismatch(b"x" * 100) is not None
    e = FileData(b"x" * 10).extend(30)
    assert e.mismatch(b"x" * 10 + bytes(20)) is None


def _model_and_obs():
    fs = FileSystem(MemoryImage(ct.base_image(ct.CI_CONFIG)))
    obs = Obs()
    ct.observe(fs, obs)
    return Model.from_obs(obs), obs


def test_model_matches_the_starting_tree_and_reports_differences():
    m, obs = _model_and_obs()
    assert compare(obs, m) == []
    assert set(obs.paths) >= {"A/foo", "A/bar", "A/C", "B/baz", "B/hl", "B/sym", "lost+found"}
    assert obs.paths["A/bar"] == obs.paths["B/hl"]
    # each kind of difference is reported precisely
    err, _inf, m2 = m.apply(Op("unlink", ("B/hl",)))
    assert err == 0
    d = compare(obs, m2)
    assert "B/hl: unexpected (file)" in d and any("A/bar: link count 2, expected 1" in x
                                                    for x in d)
    _e, _i, m3 = m.apply(Op("setxattr", ("A/foo", "user.k", "zz")))
    assert any("A/foo: xattrs" in x for x in compare(obs, m3))
    _e, _i, m4 = m.apply(Op("chmod", ("A/C", 0o700)))
    assert compare(obs, m4) == ["A/C: mode 755, expected 700"]
    _e, _i, m5 = m.apply(Op("rename", ("A/foo", "B/new", 0)))
    d = compare(obs, m5)
    assert "A/foo: unexpected (file)" in d and "B/new: missing" in d
    _e, _i, m6 = m.apply(Op("truncate", ("B/baz", 10)))
    assert compare(obs, m6) == ["B/baz: size 1000, expected 10"]


def test_model_predicts_errors_like_the_file_system():
    m, _obs = _model_and_obs()
    cases = [
        (Op("creat", ("A/foo",)), errno.EEXIST), (Op("creat", ("Q/x",)), errno.ENOENT),
        (Op("creat", ("A/foo/x",)), errno.ENOTDIR), (Op("unlink", ("A/C",)), errno.EISDIR),
        (Op("rmdir", ("A",)), errno.ENOTEMPTY), (Op("rmdir", ("A/foo",)), errno.ENOTDIR),
        (Op("link", ("A/C", "B/x")), errno.EPERM),
        (Op("rename", ("A", "A/C/x", 0)), errno.EINVAL),
        (Op("rename", ("A/C", "A/foo", 0)), errno.ENOTDIR),
        (Op("rename", ("A/foo", "A/C", 0)), errno.EISDIR),
        (Op("rename", ("A", "B", 0)), errno.ENOTEMPTY),
        (Op("rename", ("A/foo", "B/nope", 2)), errno.ENOENT),
        (Op("rename", ("A/foo", "A/bar", 1)), errno.EEXIST),
        (Op("write", ("A/C", 0, 1, 1)), errno.EISDIR),
        (Op("truncate", ("B/sym", 0)), errno.EINVAL),
        (Op("falloc", ("B/sym", 0, 0, 10)), errno.ENODEV),
        (Op("setxattr", ("B/sym", "user.a", "1")), errno.EPERM),
        (Op("removexattr", ("A/bar", "user.zz")), errno.ENODATA),
        (Op("rename", ("A/bar", "B/hl", 0)), 0),
    ]
    fs = FileSystem(MemoryImage(ct.base_image(ct.CI_CONFIG)))
    for op, want in cases:
        assert m.apply(op)[0] == want, op
        assert ct.execute(fs, op) == want, op


def test_in_flight_punch_allows_each_byte_either_way_at_the_edges_only():
    m, obs = _model_and_obs()
    ino = obs.paths["A/foo"]
    old = obs.inodes[ino].data  # 5,000 bytes
    # inside one block: all of it is an edge, zeroed in place
    err, inflight, post = m.apply(Op("falloc", ("A/foo", 3, 1000, 2000)))
    assert err == 0 and len(inflight) == 2 and inflight[1] is post
    fd = inflight[0].nodes[ino].data
    half = old[:1000] + bytes(500) + old[1500:]
    assert fd.mismatch(half) is None
    assert post.nodes[ino].data.mismatch(half) is not None
    # a whole block goes with the transaction: all old or all zero
    err, inflight, post = m.apply(Op("falloc", ("A/foo", 3, 100, 8200)))  # block 1 whole
    fd = inflight[0].nodes[ino].data
    edges_half = old[:100] + bytes(2000) + old[2100:]
    assert fd.mismatch(edges_half) is None
    block_half = old[:4096] + bytes(400) + old[4496:]
    assert fd.mismatch(block_half) is not None
    assert post.nodes[ino].data.mismatch(block_half) is not None
    assert post.nodes[ino].data.mismatch(old[:100] + bytes(4900)) is None


def test_in_flight_zero_range_keeps_the_old_size():
    m, obs = _model_and_obs()
    ino = obs.paths["A/foo"]
    old = obs.inodes[ino].data
    err, inflight, post = m.apply(Op("falloc", ("A/foo", 0x10, 1000, 9000)))
    assert err == 0 and len(inflight) == 2
    fd = inflight[0].nodes[ino].data
    assert fd.sizes == {5000}
    assert fd.mismatch(old[:1000] + bytes(1234) + old[2234:]) is None
    # the new size only with the range zero
    assert post.nodes[ino].data.mismatch(old[:1000] + bytes(9000)) is None
    assert post.nodes[ino].data.mismatch(old + bytes(5000)) is not None
    assert fd.mismatch(old + bytes(5000)) is not None


# --------------------------------------------------------------------------
# the machinery
# --------------------------------------------------------------------------


def test_persisted_helper_catches_a_store_left_behind():
    img = TracingImage(MemoryImage(ct.base_image(ct.CI_CONFIG)))
    fs = FileSystem(img)
    ino = ct.persisted(img, fs.mkdir, 1, b"new", 0o755).ino
    assert ino > 1
    ct.persisted(img, fs.write, ino_of(fs, "A/foo"), 0, b"z" * 100, data_op=True)

    def sloppy():
        img.write(ct.compute_geometry(2 << 20, 48).data_start * 4096 + 64, b"x")
    with pytest.raises(AssertionError, match="never flushed"):
        ct.persisted(img, sloppy)

    def unfenced():
        off = 300 * 4096
        img.write(off, b"y")
        img.flush(off, 1)
    with pytest.raises(AssertionError, match="not fenced"):
        ct.persisted(img, unfenced)
    ct.persisted(img, unfenced, data_op=True)  # data may wait for fsync


def ino_of(fs, path):
    return ct._lookup(fs, path)


def test_trace_marks_every_operation():
    wl = parse_workload("creat A/x; write A/x 0 100 1; fsync A/x; unlink A/x")
    timg, errs, _m0, posts, inflights, viol = ct.trace_workload(wl)
    assert errs == [0, 0, 0, 0] and viol == []
    marks = [(e[1], e[2].get("i")) for e in timg.events if e[0] == "M"
             and e[1] in ("op-begin", "op-end")]
    assert marks == [(k, i) for i in range(4) for k in ("op-begin", "op-end")]
    assert len(posts) == len(inflights) == 4
    assert "A/x" not in posts[-1].paths() and "A/x" in posts[0].paths()


def test_derived_states_equal_full_checks():
    """The fast path is exact: every derived state is also fully checked."""
    cfg = ct.Config(verify_fast=True)
    wls = [parse_workload(t) for t in (
        "write A/foo 4000 200 1; fsync A/foo", "write A/bar 100 5000 1",
        "write B/baz 9192 100 1; truncate B/baz 20", "falloc A/foo punch 1000 5000",
        "rename A/foo B/baz; openunlink A/bar")] + [ct.random_workload(3, 6)]
    rep = ct.run_workloads(wls, cfg, JOBS)
    assert rep.nviolations == 0, "\n\n".join(v.format() for v in rep.violations)
    assert rep.total("derived") > 300


def test_harsher_crash_model_is_clean_too():
    """Torn multi-word stores and subsets of up to 3 lines/stores."""
    wls = [parse_workload(t) for t in ("rename A/foo B/baz", "mkdir B/D; rename A/C B/D/E",
                                       "write A/bar 100 5000 1; fsync A/bar",
                                       "symlink B/s2 " + "x" * 200)]
    # the same cap on sampled subsets per point, with and without the harsher model
    base = ct.run_workloads(wls, ct.Config(max_states=48), JOBS)
    harsh = ct.run_workloads(wls, ct.Config(torn=True, k=3, max_states=48), JOBS)
    assert harsh.nviolations == 0, "\n\n".join(v.format() for v in harsh.violations)
    assert harsh.total("states") > base.total("states")
    timg = ct.trace_workload(wls[0])[0]
    sim = ct.CrashSimulator(timg.initial, timg.events, torn=True)
    kinds = [st.kind for _p, _d, sts in sim.states(k=3, max_states=48) for st in sts]
    assert kinds.count("torn") > 20 and "stores" in kinds


def test_reproducer_reruns_one_point():
    wl = parse_workload("rename A/foo B/new")
    r = ct.run_workload(wl)
    assert r.nviolations == 0 and r.points >= 2
    timg = ct.trace_workload(wl)[0]
    fences = [i for i, e in enumerate(timg.events) if e[0] == "B"]
    one = ct.run_workload(wl, ct.Config(points=(fences[1],)))
    assert one.points == 1 and 0 < one.states < r.states


def test_cli(tmp_path):
    env = dict(os.environ)
    out = subprocess.run([sys.executable, TOOL, "--workload", "creat A/x; write A/x 0 300 1",
                          "-v", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "violations: 0" in out.stdout and "crash states built:" in out.stdout
    import json
    rep = json.load(open(tmp_path / "r.json"))
    assert rep["summary"]["workloads"] == 1 and rep["summary"]["states"] > 50
    out = subprocess.run([sys.executable, TOOL, "--list", "--suite", "seq1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.count("\n") == len(ct.seq1_workloads())
    out = subprocess.run([sys.executable, TOOL, "--workload", "frob x"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown operation" in out.stderr


# --------------------------------------------------------------------------
# CI: the acceptance runs
# --------------------------------------------------------------------------


def _assert_clean(rep: ct.Report, min_states: int, valid: bool = True) -> None:
    assert rep.nviolations == 0, rep.summary() + "\n\n" + "\n\n".join(
        v.format() for v in rep.violations[:10])
    for r in rep.results:
        if valid:  # generated from the model: every operation succeeds
            assert all(e == 0 for e in r.errors), (r.workload, r.errors)
        assert r.points >= 1
    assert rep.total("states") + rep.total("recovery_states") >= min_states
    print("\n" + rep.summary())


def test_ci_every_seq1_workload():
    wls = ct.seq1_workloads()
    rep = ct.run_workloads(wls, ct.CI_CONFIG, JOBS)
    _assert_clean(rep, 15000)
    assert rep.total("recovery_states") > 3000
    assert rep.total("full") > 2000


def test_ci_seq2_sample():
    wls = ct.sample(ct.seq2_workloads(), ct.CI_SEQ2_SAMPLE, 1)
    rep = ct.run_workloads(wls, ct.CI_CONFIG, JOBS)
    _assert_clean(rep, 20000)


def test_ci_log_wrap():
    """Workloads whose first record wraps around the circular log, behind a
    SKIP record at its end."""
    from pmfs.layout import BLOCK_SIZE
    wls = ct.with_log(ct.sample(ct.seq1_workloads(), ct.CI_LOG_SAMPLE, 2), "wrap")
    geo = ct.compute_geometry(ct.CI_CONFIG.image_size, ct.CI_CONFIG.inodes)
    area = (geo.wal_start + 1) * BLOCK_SIZE
    wrapped = 0
    for w in wls:
        ev = ct.trace_workload(w)[0].events
        if any(e[0] == "M" and e[1] == "tx-begin" for e in ev):
            # its first record went to the start of the log area
            assert area in [e[1] for e in ev if e[0] == "S"], str(w)
            wrapped += 1
    assert wrapped >= ct.CI_LOG_SAMPLE // 2
    rep = ct.run_workloads(wls, ct.CI_CONFIG, JOBS)
    _assert_clean(rep, 1000)


def test_ci_random_workloads():
    n, k = ct.CI_RANDOM
    wls = [ct.random_workload(s, k) for s in range(n)]
    rep = ct.run_workloads(wls, ct.CI_CONFIG, JOBS)
    _assert_clean(rep, 1000, valid=False)
