"""Every long operation shows a live progress line on a terminal, and
nothing of it when its output is not a terminal.

Each program or tool runs twice, briefly: on a pseudo-terminal, where its
output must hold a progress line (carriage return + erase-line, the text
rewritten in place), and with its output going to pipes, where neither a
carriage return nor an escape sequence may appear.  (mkfs.pmfs is tested
the same way in test_cli_help.py.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import fresh_image, fuse_available, prog
from test_cli_help import run_on_pty

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
#: a live line: written after an erase, and erased again (rewritten in place)
LIVE = re.compile(rb"\r\x1b\[K([^\r\n]*)(?=\r\x1b\[K)")

pytestmark = pytest.mark.timeout(300)


def tool(name):
    return [sys.executable, os.path.join(TOOLS, name)]


def live_lines(out: bytes) -> list[str]:
    return [m.group(1).decode("utf-8", "replace") for m in LIVE.finditer(out)]


def piped(cmd, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def work(shm_dir):
    return shm_dir


def _fsck(work):
    img = os.path.join(work, "f.img")
    with open(img, "wb") as f:
        f.write(bytes(fresh_image(32 << 20).data))
    return [prog("fsck.pmfs"), "-f", "-n", img], rb"Pass 5", r"^Pass [1-5]: +\d+\.\d%$"


def _crashtest(work):
    return tool("crashtest") + ["--seq2", "4", "-j", "1"], rb"violations: 0", \
        r"^crashtest: +\d+\.\d% \([1-4]/4 workloads, \d+ crash states, \d+ s\)$"


def _bench(work):
    if os.geteuid() != 0:
        pytest.skip("tools/bench runs as root")
    return tool("bench") + ["--quick", "--systems", "tmpfs", "--only", "create"], \
        rb"create", r"^tmpfs: (preparing|mounting|create \d+ files|unmounting)$"


def _soak(work):
    return tool("soak") + ["--seconds", "2", "--workers", "2", "--image-size", "64M",
                           "--workdir", os.path.join(work, "soak")], rb"errors: 0", \
        r"^soak: (\d+/2 s, \d of 2 workers running, daemon RSS \d+ MiB|checking the tree|" \
        r"unmounting|fsck\.pmfs -f -n|mounting again, checking the tree)$"


def _killtest(work):
    return tool("killtest") + ["--rounds", "1", "--duration-per-round", "0.3",
                               "--dir", work], rb"0 violation", \
        r"^killtest: round 1/1: .+$"


def _difftest(work):
    return tool("difftest") + ["--ops", "300", "--remount-every", "0", "--crash-every", "0",
                               "--workdir", os.path.join(work, "diff")], rb"0 mismatch", \
        r"^difftest: +\d+\.\d% \(\d+/300 ops, 0 mismatches, 0 remounts, 0 crashes, \d+ s\)$"


def _mkbig(work):
    return tool("mkbig") + [os.path.join(work, "big.img"), "--size", "64M", "--files", "2000",
                            "--per-dir", "500", "--big-dir", "500", "--big-file", "4M"], \
        rb"mkbig: built", r"^mkbig: (/tree|/big|/bigfile): +\d+\.\d% \(.*\)$|^mkbig: unmounting"


def _fsck_fuzz(work):
    return tool("fsck-fuzz") + ["--cases", "2", "--size", "4"], rb"all cases passed", \
        r"^fsck-fuzz: +\d+\.\d% \(case [12]/2, seed [01], 0 failed\)$"


CASES = {"fsck.pmfs": _fsck, "crashtest": _crashtest, "bench": _bench, "soak": _soak,
         "killtest": _killtest, "difftest": _difftest, "mkbig": _mkbig,
         "fsck-fuzz": _fsck_fuzz}
NEEDS_FUSE = {"bench", "soak", "killtest", "difftest"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_progress_on_a_terminal_only(name, work):
    if name in NEEDS_FUSE and not fuse_available():
        pytest.fail("FUSE is not available (/dev/fuse, fusermount3)")
    if name == "bench" and not shutil.which("fio"):
        pytest.skip("fio is not installed")
    cmd, done_marker, shape = CASES[name](work)
    rc, out = run_on_pty(cmd, timeout=240)
    assert rc == 0, out.decode(errors="replace")[-3000:]
    assert done_marker in out
    lines = live_lines(out)
    shown = [ln for ln in lines if ln]
    assert shown, f"{name} showed no progress line on a terminal:\n{out[-2000:]!r}"
    for ln in shown:
        assert re.search(shape, ln), f"{name}: unexpected progress line {ln!r}"
    # the live line is erased before the program's final report
    before = out.rsplit(done_marker, 1)[0]
    last_live = before.rfind(b"\r\x1b[K")
    assert last_live >= 0 and b"\r\x1b[K" + before[last_live + 4:] == before[last_live:]
    for d in ("soak", "diff"):
        shutil.rmtree(os.path.join(work, d), ignore_errors=True)
    for f in os.listdir(work):
        if f.startswith("big.img"):
            os.unlink(os.path.join(work, f))
    # not a terminal: not a trace of it
    r = piped(cmd)
    assert r.returncode == 0, (r.stdout + r.stderr).decode(errors="replace")[-3000:]
    assert done_marker in r.stdout + r.stderr
    assert b"\r" not in r.stdout + r.stderr and b"\x1b" not in r.stdout + r.stderr
