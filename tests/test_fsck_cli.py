"""fsck.pmfs on the command line: the real console script on image files.

Exit codes, mutually exclusive modes, one-line messages for operational
errors, the quick check of a clean image, refusing a mounted image, and
the -n / -y / -p behaviour on a damaged image file.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys

import pytest

from pmfs.layout import DT_REG, ROOT_INO
from pmfs.pmem import open_image
from test_fsck_helpers import (MIB, Geo, build_image, copy_of, image_file, lookup_path, mount,
                               read_file, snapshot)

pytestmark = pytest.mark.timeout(120)


def fsck_cmd() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "fsck.pmfs")
    if os.path.exists(exe):
        return [exe]
    found = shutil.which("fsck.pmfs")
    assert found, "the fsck.pmfs console script is not installed (pip install -e .)"
    return [found]


def fsck(*args, input=None) -> subprocess.CompletedProcess:
    return subprocess.run(fsck_cmd() + list(args), capture_output=True, text=True,
                          timeout=60, input=input, stdin=None if input else subprocess.DEVNULL)


@pytest.fixture(scope="module")
def base():
    return build_image()


@pytest.fixture
def clean_file(tmp_path, base):
    return image_file(tmp_path, base)


@pytest.fixture
def damaged_file(tmp_path, base):
    """An image with a dangling entry (unsafe) and a wrong link count (safe)."""
    img = copy_of(base)
    g = Geo(img)
    g.add_entry(lookup_path(img, b"/a"), b"ghost", 400, DT_REG)
    ino = lookup_path(img, b"/f1")
    i = g.inode(ino)
    i.nlink = 9
    g.put_inode(i)
    return image_file(tmp_path, img)


def one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def test_clean_image_without_force_is_quick(clean_file):
    p = fsck("-n", clean_file)
    assert p.returncode == 0, p.stderr
    assert "clean" in p.stdout and "Pass 1" not in p.stdout
    p = fsck("-y", clean_file)
    assert p.returncode == 0 and "clean" in p.stdout
    p = fsck("-p", clean_file)
    assert p.returncode == 0 and "clean" in p.stdout


def test_forced_check_of_a_clean_image(clean_file):
    before = read_file(clean_file)
    p = fsck("-n", "-f", clean_file)
    assert p.returncode == 0, p.stdout + p.stderr
    for n in range(1, 6):
        assert f"Pass {n}:" in p.stdout
    assert "0 errors found" in p.stdout
    assert read_file(clean_file) == before
    p = fsck("-f", "-y", "-v", clean_file)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "pass 5 done" in p.stdout


def test_damaged_image_n_y_and_second_run(damaged_file, base):
    before = read_file(damaged_file)
    # the damage was made behind the file system's back: it still says clean,
    # and without -f a clean file system is not checked (as e2fsck)
    p = fsck("-n", damaged_file)
    assert p.returncode == 0 and "clean" in p.stdout
    p = fsck("-n", "-f", damaged_file)
    assert p.returncode == 4, p.stdout + p.stderr
    assert "ghost" in p.stdout and "link count 9, should be 2" in p.stdout
    assert "[not fixed]" in p.stdout and "still has errors" in p.stdout
    assert read_file(damaged_file) == before
    p = fsck("-y", "-f", damaged_file)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "[fixed]" in p.stdout and "FILE SYSTEM WAS MODIFIED" in p.stdout
    p = fsck("-y", "-f", damaged_file)
    assert p.returncode == 0, p.stdout
    p = fsck("-n", damaged_file)
    assert p.returncode == 0 and "clean" in p.stdout
    img = open_image(damaged_file, readonly=True)
    try:
        assert snapshot(img) == snapshot(base)
    finally:
        img.close()


def test_preen(damaged_file, tmp_path, base):
    before = read_file(damaged_file)
    p = fsck("-p", "-f", damaged_file)
    assert p.returncode == 4, p.stdout + p.stderr
    assert "UNEXPECTED INCONSISTENCY" in p.stdout
    assert read_file(damaged_file) == before
    # only safe problems: preen fixes them
    img = copy_of(base)
    g = Geo(img)
    i = g.inode(lookup_path(img, b"/f1"))
    i.nlink = 9
    g.put_inode(i)
    path = image_file(tmp_path, img, "safe")
    p = fsck("-a", "-f", path)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Pass 1" not in p.stdout  # preen is terse
    assert all(line.startswith(path) or not line.strip() for line in p.stdout.splitlines())
    assert fsck("-p", "-f", path).returncode == 0


def test_log_replay_from_the_command_line(tmp_path, base):
    img = copy_of(base)
    fs = mount(img)

    class Crash(Exception):
        pass

    def hook(stage, tx):
        if stage == "logged":
            raise Crash()
    fs.wal.debug_hook = hook
    with pytest.raises(Crash):
        fs.create(ROOT_INO, b"replayed", 0o644)
    path = image_file(tmp_path, img)
    before = read_file(path)
    p = fsck("-n", path)  # not clean: checked without -f
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 committed transaction(s) to replay" in p.stdout
    assert read_file(path) == before
    p = fsck("-y", path)
    assert p.returncode == 1 and "replayed" in p.stdout, p.stdout
    assert fsck("-n", path).returncode == 0
    im = open_image(path, readonly=True)
    try:
        assert b"/replayed" in snapshot(im)
    finally:
        im.close()


@pytest.mark.parametrize("args", [("-n", "-y"), ("-p", "-n"), ("-y", "-a"), ("-p", "-y", "-n")])
def test_modes_are_mutually_exclusive(clean_file, args):
    p = fsck(*args, clean_file)
    assert p.returncode == 16
    assert "mutually exclusive" in one_line(p.stderr)


def test_usage_errors(clean_file):
    assert fsck().returncode == 16
    p = fsck("--no-such-option", clean_file)
    assert p.returncode == 16 and one_line(p.stderr).startswith("fsck.pmfs:")


def test_missing_image(tmp_path):
    p = fsck("-n", str(tmp_path / "nothing-here"))
    assert p.returncode == 8
    assert "no such file" in one_line(p.stderr)


@pytest.mark.parametrize("what", ["zeros", "random", "empty", "dir"])
def test_foreign_file(tmp_path, what):
    path = str(tmp_path / "foreign")
    if what == "dir":
        os.mkdir(path)
    else:
        with open(path, "wb") as f:
            f.write({"zeros": bytes(8 * MIB), "random": os.urandom(8 * MIB), "empty": b""}[what])
    for mode in ("-n", "-y", "-p"):
        p = fsck(mode, path)
        assert p.returncode == 8, (mode, p.stdout, p.stderr)
        line = one_line(p.stderr)
        assert line.startswith("fsck.pmfs: ")
        if what in ("zeros", "random"):
            assert "not a pmfs file system" in line


def test_mounted_image_is_refused(clean_file):
    before = read_file(clean_file)
    fd = os.open(clean_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what the daemon holds while mounted
        for mode in ("-n", "-y", "-p"):
            p = fsck(mode, "-f", clean_file)
            assert p.returncode == 8, (mode, p.stdout, p.stderr)
            assert "in use" in one_line(p.stderr)
    finally:
        os.close(fd)
    assert read_file(clean_file) == before
    assert fsck("-n", "-f", clean_file).returncode == 0


def test_check_while_another_check_reads(clean_file):
    fd = os.open(clean_file, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # another -n run
        assert fsck("-n", "-f", clean_file).returncode == 0
        p = fsck("-y", "-f", clean_file)  # a repair needs the image alone
        assert p.returncode == 8 and "in use" in one_line(p.stderr)
    finally:
        os.close(fd)


def test_interactive_needs_a_terminal(clean_file):
    p = fsck("-f", clean_file)
    assert p.returncode == 8
    assert "terminal" in one_line(p.stderr)


@pytest.mark.parametrize("answer,code", [(b"n", 4), (b"y", 1)])
def test_interactive_with_a_terminal(damaged_file, answer, code):
    import pty
    before = read_file(damaged_file)
    pid, fd = pty.fork()
    if pid == 0:  # the child: fsck on the terminal
        try:
            os.execv(fsck_cmd()[0], ["fsck.pmfs", "-f", damaged_file])
        finally:
            os._exit(127)
    out = b""
    answered = False
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        out += data
        if b"[y/N]" in out and not answered:
            os.write(fd, answer + b"\n")
            answered = True
    _pid, status = os.waitpid(pid, 0)
    os.close(fd)
    text = out.decode(errors="replace")
    assert answered, text
    assert os.waitstatus_to_exitcode(status) == code, text
    assert "Pass 1:" in text  # with progress on the terminal
    if answer == b"n":
        assert read_file(damaged_file) == before
    else:
        assert fsck("-n", "-f", damaged_file).returncode == 0


def test_cancelled_by_the_user(monkeypatch, clean_file, capsys):
    import pmfs.fsck as fsck_mod

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(fsck_mod, "check", interrupted)
    with pytest.raises(SystemExit) as e:
        fsck_mod.main(["-y", "-f", clean_file])
    assert e.value.code == 32
    assert "interrupted" in capsys.readouterr().err


def test_both_superblocks_destroyed(tmp_path, base):
    img = copy_of(base)
    img.write(0, bytes(8192))
    path = image_file(tmp_path, img)
    p = fsck("-y", path)
    assert p.returncode == 8
    assert "not a pmfs file system" in one_line(p.stderr)


def test_truncated_image(tmp_path, base):
    path = image_file(tmp_path, base)
    with open(path, "r+b") as f:
        f.truncate(4 * MIB)
    p = fsck("-n", path)
    assert p.returncode == 8
    assert "truncated" in one_line(p.stderr)


def test_version():
    p = fsck("-V")
    assert p.returncode == 0 and "fsck.pmfs" in p.stdout
