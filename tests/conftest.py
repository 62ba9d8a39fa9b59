"""Shared fixtures: in-memory file systems and real FUSE mounts.

A FUSE mount is always torn down: `fusermount3 -u`, then `-u -z` as a
fallback, and the daemon is reaped (SIGTERM, then SIGKILL) even when the
test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from mkfs import make_filesystem
from pmfs.fs import FileSystem, MountOptions
from pmfs.layout import compute_geometry
from pmfs.pmem import MemoryImage

BIN = os.path.dirname(os.path.abspath(sys.executable))
SHM = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def prog(name: str) -> str:
    p = os.path.join(BIN, name)
    if os.path.exists(p):
        return p
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed (pip install -e .)")
    return found


def fresh_image(size: int = 16 << 20, inodes: int | None = None) -> MemoryImage:
    img = MemoryImage(size)
    make_filesystem(img, compute_geometry(size, inodes))
    return img


@pytest.fixture
def memfs():
    """A freshly formatted FileSystem on an in-memory image."""
    img = fresh_image()
    fs = FileSystem(img, MountOptions())
    yield fs
    if not fs.closed:
        fs.close()


@pytest.fixture
def shm_dir():
    d = tempfile.mkdtemp(prefix="pmfs-test-", dir=SHM)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def fuse_mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[1] == real and parts[2].startswith("fuse"):
                return True
    return False


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


class PmfsMount:
    """A pmfs daemon in the foreground (-f) as a child process."""

    def __init__(self, image: str, mountpoint: str, options: str = "", env=None):
        self.image = image
        self.path = mountpoint
        self.options = options
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.log = image + ".log"

    def mount(self, timeout: float = 20.0) -> "PmfsMount":
        os.makedirs(self.path, exist_ok=True)
        opts = f"log={self.log}" + (f",{self.options}" if self.options else "")
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        self.proc = subprocess.Popen([prog("mount.pmfs"), self.image, self.path, "-f",
                                      "-o", opts],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if fuse_mounted(self.path):
                return self
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                self.proc = None
                raise RuntimeError(f"mount.pmfs exited with {self.proc_rc(out, err)}")
            time.sleep(0.02)
        self.unmount()
        raise RuntimeError("mount.pmfs did not mount in time")

    @staticmethod
    def proc_rc(out, err):
        return f"stdout={out!r} stderr={err!r}"

    def unmount(self, timeout: float = 20.0) -> int | None:
        """Unmount and reap; returns the daemon's exit code."""
        rc = None
        if fuse_mounted(self.path):
            r = subprocess.run(["fusermount3", "-u", self.path], capture_output=True)
            if r.returncode != 0:
                # busy or broken: lazy unmount so nothing stays behind
                subprocess.run(["fusermount3", "-u", "-z", self.path], capture_output=True)
        if self.proc is not None:
            try:
                rc = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    rc = self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    rc = self.proc.wait()
            self.stderr = self.proc.stderr.read().decode(errors="replace") \
                if self.proc.stderr else ""
            for s in (self.proc.stdout, self.proc.stderr):
                if s:
                    s.close()
            self.proc = None
        if fuse_mounted(self.path):
            subprocess.run(["fusermount3", "-u", "-z", self.path], capture_output=True)
        return rc

    def kill(self) -> None:
        """SIGKILL the daemon (a crash), then clean up the dead mount."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for s in (self.proc.stdout, self.proc.stderr):
                if s:
                    s.close()
            self.proc = None
        subprocess.run(["fusermount3", "-u", self.path], capture_output=True)
        if fuse_mounted(self.path):
            subprocess.run(["fusermount3", "-u", "-z", self.path], capture_output=True)

    def log_text(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except OSError:
            return ""

    def __enter__(self):
        return self.mount()

    def __exit__(self, *exc):
        self.unmount()


def mkfs(image: str, size: str = "64M", *args: str) -> None:
    r = subprocess.run([prog("mkfs.pmfs"), "-q", *args, image, size], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"mkfs.pmfs failed: {r.stderr}")


@pytest.fixture
def pmfs_mount(shm_dir):
    """A freshly formatted pmfs image mounted through FUSE (torn down always)."""
    if not fuse_available():
        pytest.fail("FUSE is not available (/dev/fuse, fusermount3)")
    image = os.path.join(shm_dir, "fs.img")
    mkfs(image, "128M")
    m = PmfsMount(image, os.path.join(shm_dir, "mnt"))
    m.mount()
    try:
        yield m
    finally:
        m.unmount()
        log = m.log_text()
        assert "Traceback" not in log, f"daemon logged a traceback:\n{log}"
