"""The daemon's log: where it goes, what -o debug traces, the unmount summary.

* ``-o log=PATH`` sends the log to PATH, in the foreground and in the
  background (daemonized) alike; nothing goes to stderr then;
* in the foreground without ``log=`` the log goes to stderr;
* ``-o debug`` traces every request on exactly one line, data abbreviated;
* at unmount the log gets a summary: requests served, errors, what recovery
  did at mount (after a crash: transactions replayed, orphans processed).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import PmfsMount, fuse_available, fuse_mounted, mkfs, prog

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120)]

SUMMARY = re.compile(r"served (\d+) requests in \d+ s, (\d+) errors; recovery at mount "
                     r"replayed (\d+) transaction\(s\) and processed (\d+) orphan\(s\); "
                     r"(\d+) corruption event\(s\)")
#: one traced request: "... pmfs.fuseops[pid] DEBUG: name(args) -> result"
TRACE = re.compile(r" pmfs\.fuseops\[\d+\] DEBUG: (\w+)\((.*)\) -> (.+)$")


@pytest.fixture
def image(shm_dir):
    if not fuse_available():
        pytest.fail("FUSE is not available (/dev/fuse, fusermount3)")
    path = os.path.join(shm_dir, "fs.img")
    mkfs(path, "64M")
    return path


def summaries(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(x) for x in m.groups()) for m in SUMMARY.finditer(text)]


def wait_for(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaps counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_log_file_and_unmount_summary(image, shm_dir):
    m = PmfsMount(image, os.path.join(shm_dir, "mnt")).mount()
    try:
        for i in range(5):
            with open(os.path.join(m.path, f"f{i}"), "w") as f:
                f.write("x" * 100)
        os.listdir(m.path)
    finally:
        rc = m.unmount()
    assert rc == 0
    log = m.log_text()
    assert f"opened {image} (" in log
    assert f"mounted {image} on {m.path}" in log
    assert f"{image} cleanly unmounted" in log
    (served, errors, replayed, orphans, corrupt), = summaries(log)
    assert served >= 15  # 5 x (lookup, create, write, flush, release) at least
    assert (errors, replayed, orphans, corrupt) == (0, 0, 0, 0)
    # the summary is the last thing logged, and nothing is traced without debug
    assert SUMMARY.search(log.strip().splitlines()[-1])
    assert not any(TRACE.search(ln) for ln in log.splitlines())
    assert "not cleanly unmounted" not in log
    # with log=PATH nothing goes to stderr
    assert m.stderr == ""


def test_debug_traces_every_request_on_one_line(image, shm_dir):
    m = PmfsMount(image, os.path.join(shm_dir, "mnt"), "debug").mount()
    payload = b"Q" * (300 << 10)
    try:
        p = os.path.join(m.path, "traced-name")
        with open(p, "wb") as f:
            f.write(payload)
        with open(p, "rb") as f:
            assert f.read() == payload
        os.mkdir(os.path.join(m.path, "d"))
        open(os.path.join(m.path, "d", "x"), "w").close()
        with pytest.raises(OSError):
            os.rmdir(os.path.join(m.path, "d"))  # ENOTEMPTY
        os.setxattr(p, "user.k", b"v" * 200)
    finally:
        assert m.unmount() == 0
    log = m.log_text()
    lines = log.splitlines()
    traced = [TRACE.search(ln) for ln in lines]
    traced = [t for t in traced if t]
    (served, errors, *_), = summaries(log)
    # exactly one line per request served
    assert len(traced) == served > 10
    ops = [t.group(1) for t in traced]
    for op in ("lookup", "create", "write", "read", "mkdir", "rmdir", "setxattr",
               "release", "getattr"):
        assert op in ops, op
    assert any(t.group(1) == "create" and "b'traced-name'" in t.group(2) for t in traced)
    assert any(t.group(1) == "rmdir" and t.group(3) == os.strerror(39) for t in traced)
    # data is abbreviated: a write shows its size, never its bytes
    writes = [t for t in traced if t.group(1) == "write"]
    assert writes and all(re.search(r"<\d+ bytes>", t.group(2)) for t in writes)
    assert sum(int(re.search(r"<(\d+) bytes>", t.group(2)).group(1)) for t in writes) \
        == len(payload)
    assert "QQQQQQQQ" not in log and "vvvvvvvv" not in log
    assert max(len(ln) for ln in lines) < 400
    assert errors == 0  # ENOTEMPTY is an answer, not an error


def test_foreground_logs_to_stderr(image, shm_dir):
    mnt = os.path.join(shm_dir, "mnt")
    os.makedirs(mnt)
    proc = subprocess.Popen([prog("mount.pmfs"), image, mnt, "-f"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: fuse_mounted(mnt) or proc.poll() is not None)
        assert fuse_mounted(mnt), proc.communicate()
        with open(os.path.join(mnt, "a"), "w") as f:
            f.write("a")
        subprocess.run(["fusermount3", "-u", mnt], check=True)
        out, err = proc.communicate(timeout=30)
    finally:
        if fuse_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt])
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    err = err.decode()
    assert f"mounted {image} on {mnt}" in err
    assert f"{image} cleanly unmounted" in err
    (served, errors, replayed, orphans, corrupt), = summaries(err)
    assert served > 0 and errors == 0
    assert out == b""


def test_background_daemon_logs_to_file(image, shm_dir):
    mnt = os.path.join(shm_dir, "mnt")
    os.makedirs(mnt)
    log = os.path.join(shm_dir, "bg.log")
    r = subprocess.run([prog("mount.pmfs"), image, mnt, "-o", f"log={log}"],
                       capture_output=True, text=True, timeout=30)
    pid = None
    try:
        assert r.returncode == 0, r.stderr
        assert r.stdout == "" and r.stderr == ""
        assert fuse_mounted(mnt)
        with open(os.path.join(mnt, "b"), "w") as f:
            f.write("b")
        m = re.search(r"pmfs\[(\d+)\] INFO: mounted", open(log).read())
        assert m, open(log).read()
        pid = int(m.group(1))
        subprocess.run(["fusermount3", "-u", mnt], check=True)
        assert wait_for(lambda: summaries(open(log).read()))
        assert wait_for(lambda: gone(pid))  # the daemon exits after its summary
    finally:
        if fuse_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt])
        if pid and not wait_for(lambda: gone(pid), 10):
            os.kill(pid, signal.SIGKILL)
    text = open(log).read()
    assert f"{image} cleanly unmounted" in text
    (served, errors, *_), = summaries(text)
    assert served > 0 and errors == 0


def test_summary_reports_recovery_after_a_crash(image, shm_dir):
    mnt = os.path.join(shm_dir, "mnt")
    m = PmfsMount(image, mnt).mount()
    try:
        with open(os.path.join(mnt, "kept"), "w") as f:
            f.write("kept")
        held = os.open(os.path.join(mnt, "gone"), os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(held, b"x" * 10000)
        os.unlink(os.path.join(mnt, "gone"))
        m.kill()  # SIGKILL with the unlinked file still open: an orphan
        try:
            os.close(held)
        except OSError:  # ENOTCONN: the daemon is gone
            pass
    finally:
        m.unmount()
    m2 = PmfsMount(image, mnt).mount()
    try:
        with open(os.path.join(mnt, "kept")) as f:
            assert f.read() == "kept"
        assert not os.path.exists(os.path.join(mnt, "gone"))
    finally:
        assert m2.unmount() == 0
    log = m2.log_text()
    assert re.search(rf"{re.escape(image)} was not cleanly unmounted: replayed 1 "
                     rf"transaction\(s\), processed 1 orphan\(s\)", log), log
    (served, errors, replayed, orphans, corrupt), = summaries(log)  # one clean unmount
    assert (replayed, orphans, errors, corrupt) == (1, 1, 0, 0)


def test_summary_counts_errors(image, shm_dir):
    mnt = os.path.join(shm_dir, "mnt")
    with PmfsMount(image, mnt) as m:
        with open(os.path.join(mnt, "victim"), "w") as f:
            f.write("v")
        ino = os.stat(os.path.join(mnt, "victim")).st_ino
    # damage the inode's checksum while unmounted
    r = subprocess.run([prog("pmfs-inspect"), "--json", image], capture_output=True,
                       text=True, check=True)
    geo = json.loads(r.stdout)["superblock"]["geometry"]
    off = geo["itable_start"] * 4096 + ino * 256 + 40
    with open(image, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 1]))
    m = PmfsMount(image, mnt).mount()
    try:
        with pytest.raises(OSError) as e:
            os.stat(os.path.join(mnt, "victim"))
        assert e.value.errno == 5  # EIO
    finally:
        assert m.unmount() == 0
    log = m.log_text()
    assert f"corrupted metadata: inode {ino}: checksum mismatch" in log
    (served, errors, replayed, orphans, corrupt) = summaries(log)[-1]
    assert errors >= 1 and corrupt >= 1
    # and the image is flagged for fsck
    r = subprocess.run([prog("pmfs-inspect"), "--json", image], capture_output=True,
                       text=True)
    assert json.loads(r.stdout)["superblock"]["needs_fsck"] is True


# --------------------------------------------------------------------------
# syslog, the default destination, and a log that cannot be opened
# --------------------------------------------------------------------------


def bg_mount(image, mnt, *opts, env=None):
    e = dict(os.environ)
    e.update(env or {})
    os.makedirs(mnt, exist_ok=True)
    return subprocess.run([prog("mount.pmfs"), image, mnt, *opts], capture_output=True,
                          text=True, timeout=30, env=e)


def bg_unmount(mnt):
    subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
    if fuse_mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)


class SyslogServer:
    """A datagram socket standing in for /dev/log."""

    def __init__(self, path):
        import socket
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode("utf-8", "replace"))
            except OSError:
                return self.messages

    def close(self):
        self.sock.close()


def test_log_syslog(image, shm_dir):
    srv = SyslogServer(os.path.join(shm_dir, "log.sock"))
    mnt = os.path.join(shm_dir, "mnt")
    env = {"PMFS_SYSLOG_SOCKET": srv.path}
    try:
        r = bg_mount(image, mnt, "-o", "log=syslog", env=env)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        try:
            with open(os.path.join(mnt, "s"), "w") as f:
                f.write("s")
        finally:
            bg_unmount(mnt)
        assert wait_for(lambda: any(SUMMARY.search(m) for m in srv.drain()))
        msgs = srv.messages
        # facility daemon (3), severity info (6): <30>; one message per record
        assert any(re.fullmatch(rf"<30>pmfs\[\d+\]: INFO: mounted {re.escape(image)} on "
                                rf"{re.escape(mnt)}\x00?", m) for m in msgs), msgs
        assert any(m.startswith("<30>") and SUMMARY.search(m) for m in msgs), msgs
        assert not any(m.startswith("<28>") for m in msgs), msgs  # no warnings
        assert not os.path.exists("syslog")  # log=syslog is no file name
        # in the background without log=, syslog is the default when it listens
        srv.messages.clear()
        r = bg_mount(image, mnt, env=env)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        bg_unmount(mnt)
        assert wait_for(lambda: any(SUMMARY.search(m) for m in srv.drain()))
    finally:
        bg_unmount(mnt)
        srv.close()


def test_log_syslog_unavailable_and_the_file_fallback(image, shm_dir):
    mnt = os.path.join(shm_dir, "mnt")
    env = {"PMFS_SYSLOG_SOCKET": os.path.join(shm_dir, "no-such.sock"), "TMPDIR": shm_dir}
    # asked for explicitly: the mount fails with one line that says what to do
    for fg in ([], ["-f"]):
        r = bg_mount(image, mnt, *fg, "-o", "log=syslog", env=env)
        assert r.returncode == 32, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("mount.pmfs: cannot log to "
                                                                  "syslog: "), r.stderr
        assert "log=PATH" in r.stderr and not fuse_mounted(mnt)
    # the background default falls back to $TMPDIR/pmfs-UID.log
    fallback = os.path.join(shm_dir, f"pmfs-{os.getuid()}.log")
    r = bg_mount(image, mnt, env=env)
    try:
        assert r.returncode == 0 and r.stderr == "", r.stderr
    finally:
        bg_unmount(mnt)
    assert wait_for(lambda: os.path.exists(fallback) and summaries(open(fallback).read()))
    assert f"mounted {image} on {mnt}" in open(fallback).read()


@pytest.mark.parametrize("fg", [False, True], ids=["background", "foreground"])
def test_log_file_that_cannot_be_opened(image, shm_dir, fg):
    mnt = os.path.join(shm_dir, "mnt")
    bad = os.path.join(shm_dir, "no", "such", "dir", "x.log")
    r = bg_mount(image, mnt, *(["-f"] if fg else []), "-o", f"log={bad}")
    assert r.returncode == 32
    # exactly one line, naming the file and the option (no second line from
    # logging's last-resort handler in the forked daemon)
    assert r.stderr == (f"mount.pmfs: cannot open the log file {bad}: No such file or "
                        f"directory (-o log=PATH)\n")
    assert not fuse_mounted(mnt)


def test_sigterm_unmounts_with_a_summary(image, shm_dir):
    m = PmfsMount(image, os.path.join(shm_dir, "mnt")).mount()
    try:
        with open(os.path.join(m.path, "t"), "w") as f:
            f.write("t")
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(timeout=30) == 0
        assert not fuse_mounted(m.path)  # the daemon unmounted on its way out
    finally:
        rc = m.unmount()
    assert rc == 0
    log = m.log_text()
    assert f"signal {int(signal.SIGTERM)}: unmounting" in log
    assert f"{image} cleanly unmounted" in log
    (served, errors, *_), = summaries(log)
    assert served > 0 and errors == 0
