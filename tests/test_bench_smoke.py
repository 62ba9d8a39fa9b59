"""Smoke test of tools/bench: it runs, cleans up and writes sane JSON.

Runs `tools/bench --quick` on pmfs and a kernel tmpfs directory (plus
libfuse's C passthrough_ll when gcc and libfuse3-dev can build it), and
checks the JSON: every row present for every system, positive finite
numbers, the pmfs backend reported, nothing left mounted.  Never a timing
assertion: the figures depend on the machine and its load.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "tools", "bench")

pytestmark = pytest.mark.fuse


def _can_build_c_passthrough() -> bool:
    if not (shutil.which("gcc") and shutil.which("pkg-config")):
        return False
    if subprocess.run(["pkg-config", "--exists", "fuse3"]).returncode != 0:
        return False
    ex = "/usr/share/doc/libfuse3-dev/examples/passthrough_ll.c"
    return os.path.exists(ex) or os.path.exists(ex + ".gz")


def _bench_mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if "/pmfs-bench-" in line.split()[1]]


def _run(*args, timeout=90):
    return subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_list_and_usage():
    r = _run("--list", timeout=30)
    assert r.returncode == 0, r.stderr
    assert "seq_write" in r.stdout and "rename" in r.stdout
    r = _run("--systems", "nosuchfs", timeout=30)
    assert r.returncode != 0
    assert "nosuchfs" in r.stderr


def test_quick_run_json(tmp_path):
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        pytest.skip("FUSE is not available (/dev/fuse, fusermount3)")
    if not shutil.which("fio"):
        pytest.skip("fio is not installed")
    if os.geteuid() != 0:
        pytest.skip("tools/bench mounts and drops caches: run as root")
    systems = ["pmfs", "tmpfs"]
    if _can_build_c_passthrough():
        systems.append("passthrough_ll")
    out = tmp_path / "bench.json"
    before = _bench_mounts()
    r = _run("--quick", "--no-progress", "--systems", ",".join(systems), "--json", str(out),
             timeout=150)
    assert _bench_mounts() == before, "tools/bench left a mount behind"
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"

    doc = json.loads(out.read_text())
    assert doc["mode"] == "quick"
    assert doc["order"] == systems
    for key in ("cpu", "cores", "kernel"):
        assert doc["machine"][key]
    # the venv that runs the tests has the C module built (setup.sh)
    assert doc["machine"]["pmfs_commit_path"] == "C (pmfs._accel)"
    assert "pmfs commit path: C (pmfs._accel)" in r.stdout
    row_ids = [row["id"] for row in doc["rows"]]
    assert len(row_ids) >= 15 and len(set(row_ids)) == len(row_ids)
    for must in ("seq_write", "seq_read_cold", "rand_overwrite_fsync", "rand_read_cold",
                 "create", "stat_cold", "rename", "unlink", "readdir", "fsync_p99_us",
                 "parallel_create", "small_write"):
        assert must in row_ids
    for sid in systems:
        info = doc["systems"][sid]
        assert info["available"], f"{sid}: {info['error']}"
        assert info["description"]
        res = doc["results"][sid]
        for rid in row_ids:
            assert rid in res, f"{sid}: row {rid} missing"
            v = res[rid].get("value")
            assert v is not None, f"{sid} {rid}: {res[rid]}"
            assert math.isfinite(v) and v > 0, f"{sid} {rid}: {v}"
    assert doc["systems"]["pmfs"]["backend"] in ("libpmem", "msync")
    assert not doc["systems"]["pmfs"]["notes"], doc["systems"]["pmfs"]["notes"]
    # ratios pmfs / reference for every reference and row
    for ref in systems[1:]:
        for rid in row_ids:
            assert doc["ratios"][ref][rid] > 0
    # the table names every system and row title
    for row in doc["rows"]:
        assert row["title"].strip() in r.stdout
    assert "pmfs/tmpfs" in r.stdout
