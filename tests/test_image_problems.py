"""Bad images given to mount.pmfs, fsck.pmfs and mkfs.pmfs.

Each program meets: a missing image, a directory, a read-only image (an
immutable file, and a file an unprivileged user may read but not write), an
image too small (a pmfs image cut to 100 KiB), foreign files (random bytes,
an ext4-looking file), a pmfs image of a newer format version, an image cut
in half after mkfs, and an image still marked mounted by a daemon killed
with SIGKILL.  Every failure must be one line on stderr (no traceback) with
the program's conventional exit code:

* mount.pmfs: 32 failure, 1 usage;
* fsck.pmfs: 8 operational error (4 uncorrectable errors), 16 usage;
* mkfs.pmfs: 8 operational error, 16 usage.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import subprocess
import time

import pytest

from conftest import PmfsMount, fuse_available, fuse_mounted, mkfs, prog
from pmfs.layout import SB_CLEAN, Superblock
from pmfs.pmem import open_image
from pmfs.superblock import SuperblockManager, read_replicas, write_replica

pytestmark = pytest.mark.fuse

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def slurp(path: str) -> bytes:
    """The content of a file (closed at once: an open file on the mount
    would keep an unmount busy)."""
    with open(path, "rb") as f:
        return f.read()


def run(*cmd, user=None) -> subprocess.CompletedProcess:
    argv = [*(NOBODY if user == "nobody" else []), *cmd]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def mount_pmfs(image, mnt, *args, user=None):
    return run(prog("mount.pmfs"), image, mnt, *args, user=user)


def fsck_pmfs(*args, user=None):
    return run(prog("fsck.pmfs"), *args, user=user)


def mkfs_pmfs(*args, user=None):
    return run(prog("mkfs.pmfs"), "-q", *args, user=user)


def failed(r: subprocess.CompletedProcess, code: int, first_line: str) -> None:
    """Exit `code`, stderr exactly one line matching the regex `first_line`."""
    err = r.stderr
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert r.returncode == code, f"exit {r.returncode}, expected {code}; stderr: {err!r}"
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert re.fullmatch(first_line, lines[0]), f"{lines[0]!r} !~ {first_line!r}"


def daemons_of(image: str) -> list[int]:
    """Pids of mount.pmfs processes serving `image`."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"mount.pmfs") for a in argv) and image.encode() in argv:
            out.append(int(pid))
    return out


def wait_released(image: str, timeout: float = 20.0) -> None:
    """Wait until no process holds the image's flock."""
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(image, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{image} is still locked")
        finally:
            os.close(fd)
        time.sleep(0.05)


def unmount_bg(mnt: str, image: str) -> None:
    """Unmount a background mount.pmfs and wait for its daemon to go."""
    if fuse_mounted(mnt):
        if subprocess.run(["fusermount3", "-u", mnt], capture_output=True).returncode:
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    wait_released(image)
    deadline = time.monotonic() + 10
    while daemons_of(image) and time.monotonic() < deadline:
        time.sleep(0.05)


def set_superblock(image: str, **changes) -> None:
    """Rewrite both superblock replicas with `changes` (valid checksums).
    Works on images pmfs refuses (a newer format), so it decodes the
    replicas itself."""
    img = open_image(image)
    try:
        sb = max((s for s, _err in read_replicas(img) if s is not None),
                 key=lambda s: s.version)
        d = {k: getattr(sb, k) for k in Superblock.__dataclass_fields__}
        d.update(changes)
        new = Superblock(**d)
        write_replica(img, 0, new)
        write_replica(img, 1, new)
    finally:
        img.close()


def superblock(image: str):
    img = open_image(image, readonly=True)
    try:
        return SuperblockManager(img).load()
    finally:
        img.close()


def chattr(flag: str, path: str) -> None:
    r = subprocess.run(["chattr", flag, path], capture_output=True, text=True)
    assert r.returncode == 0, f"chattr {flag} {path}: {r.stderr}"


@pytest.fixture
def work(shm_dir):
    """(directory, mount point); nothing stays mounted or immutable."""
    if not fuse_available():
        pytest.fail("FUSE is not available (/dev/fuse, fusermount3)")
    mnt = os.path.join(shm_dir, "mnt")
    os.mkdir(mnt)
    os.chmod(shm_dir, 0o755)
    try:
        yield shm_dir, mnt
    finally:
        images = [os.path.join(shm_dir, f) for f in os.listdir(shm_dir)
                  if f.endswith(".img")]
        for image in images:
            subprocess.run(["chattr", "-i", image], capture_output=True)
        for p in (mnt, os.path.join(shm_dir, "mnt2")):
            if fuse_mounted(p):
                subprocess.run(["fusermount3", "-u", "-z", p], capture_output=True)
        for image in images:
            for pid in daemons_of(image):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass


def image_16m(d: str, name: str = "fs.img") -> str:
    image = os.path.join(d, name)
    mkfs(image, "16M")
    return image


# --------------------------------------------------------------------------
# a missing image, a directory
# --------------------------------------------------------------------------


def test_missing_image(work):
    d, mnt = work
    image = os.path.join(d, "missing.img")
    failed(mount_pmfs(image, mnt), 32,
           re.escape(f"mount.pmfs: {image}: no such file (create it with mkfs.pmfs)"))
    for mode in ("-n", "-y", "-p"):
        failed(fsck_pmfs(mode, image), 8, re.escape(f"fsck.pmfs: {image}: no such file"))
    failed(mkfs_pmfs(image), 16,
           re.escape(f"mkfs.pmfs: {image} does not exist: give a SIZE to create it"))
    bad = os.path.join(d, "no-such-dir", "x.img")
    failed(mkfs_pmfs(bad, "16M"), 8,
           re.escape(f"mkfs.pmfs: {bad}: cannot create: No such file or directory"))
    assert not os.path.exists(image) and not fuse_mounted(mnt)


def test_directory_instead_of_image(work):
    d, mnt = work
    image = os.path.join(d, "adir")
    os.mkdir(image)
    failed(mount_pmfs(image, mnt), 32,
           re.escape(f"mount.pmfs: {image}: is a directory, not an image file"))
    for mode in ("-n", "-y"):
        failed(fsck_pmfs(mode, image), 8,
               re.escape(f"fsck.pmfs: {image}: is a directory, not an image file"))
    failed(mkfs_pmfs(image, "16M"), 8, re.escape(f"mkfs.pmfs: {image}: is a directory"))
    assert os.path.isdir(image) and not os.listdir(image)


def test_usage_errors(work):
    d, mnt = work
    image = image_16m(d)
    failed(mount_pmfs(image, mnt, "-o", "bogus"), 1,
           re.escape("mount.pmfs: unknown mount option 'bogus'"))
    failed(run(prog("mount.pmfs"), image), 1, r"mount\.pmfs: .*\(see --help\)")
    failed(fsck_pmfs("-n", "-y", image), 16,
           re.escape("fsck.pmfs: -n and -y are mutually exclusive"))
    failed(run(prog("mkfs.pmfs"), "-b", "1024", image), 16,
           re.escape("mkfs.pmfs: block size 1024 is not supported (only 4096)"))
    failed(mkfs_pmfs(image, "12potatoes"), 16, r"mkfs\.pmfs: invalid size .*")


def test_bad_option_values_and_mount_points(work):
    """Values out of range, a log file that cannot be opened, a mount point
    that is missing or a file: one line each, nothing mounted."""
    d, mnt = work
    image = image_16m(d)
    for opt in ("attr_timeout=nan", "attr_timeout=-1", "entry_timeout=inf",
                "entry_timeout=x", "readahead=-4", "spin=-1", "spin=1.5"):
        key, _eq, val = opt.partition("=")
        failed(mount_pmfs(image, mnt, "-o", opt), 1,
               re.escape(f"mount.pmfs: invalid value for {key}: {val!r}"))
    failed(mount_pmfs(image, mnt, "-o", "backend=foo"), 1,
           re.escape("mount.pmfs: invalid value for backend: 'foo' (auto, libpmem or msync)"))
    for fg in ([], ["-f"]):
        failed(mount_pmfs(image, mnt, *fg, "-o", f"log={d}/no-such-dir/log"), 32,
               re.escape(f"mount.pmfs: cannot open the log file {d}/no-such-dir/log: "
                         f"No such file or directory (-o log=PATH)"))
        failed(mount_pmfs(image, mnt, *fg, "-o", f"log={d}"), 32,
               re.escape(f"mount.pmfs: cannot open the log file {d}: Is a directory "
                         f"(-o log=PATH)"))
    failed(mount_pmfs(image, os.path.join(d, "nowhere")), 32,
           re.escape(f"mount.pmfs: mount point {d}/nowhere does not exist"))
    failed(mount_pmfs(image, image), 32,
           re.escape(f"mount.pmfs: mount point {image} is not a directory"))
    assert not fuse_mounted(mnt) and not daemons_of(image)


def test_files_that_are_no_image(work):
    """A procfs file (no size, no mmap) and /dev/zero (a character device
    without a size): every program says what it is, in one line."""
    _d, mnt = work
    status = "/proc/self/status"
    r = mount_pmfs(status, mnt)
    failed(r, 32, r"mount\.pmfs: /proc/\d+/status: not an image \(cannot tell its size: "
                  r"Invalid argument\)")
    failed(fsck_pmfs("-n", status), 8,
           r"fsck\.pmfs: /proc/self/status: not an image \(cannot tell its size: "
           r"Invalid argument\)")
    failed(run(prog("pmfs-inspect"), status), 8,
           r"pmfs-inspect: /proc/self/status: not an image .*")
    failed(mount_pmfs("/dev/zero", mnt), 32,
           re.escape("mount.pmfs: /dev/zero: not an image (a character device without a "
                     "size)"))
    failed(fsck_pmfs("-n", "/dev/zero"), 8,
           re.escape("fsck.pmfs: /dev/zero: not an image (a character device without a "
                     "size)"))
    assert not fuse_mounted(mnt)


def test_image_readable_by_others(work):
    """mkfs.pmfs makes an existing image file private (0600) as it formats
    it; mount.pmfs warns the owner of an image others may read or write
    (they would bypass every permission in it), and mounts it."""
    d, mnt = work
    image = os.path.join(d, "shared.img")
    with open(image, "wb"):
        pass
    os.chmod(image, 0o644)
    r = run(prog("mkfs.pmfs"), image, "16M")
    assert r.returncode == 0, r.stderr
    assert r.stderr == f"mkfs.pmfs: {image}: mode 0644 changed to 0600 (other users could " \
                       f"have read or changed every file in it)\n"
    assert os.stat(image).st_mode & 0o777 == 0o600
    os.chmod(image, 0o666)
    r = mkfs_pmfs("-F", image, "16M")  # -q: silent
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert os.stat(image).st_mode & 0o777 == 0o600
    for mode, can in ((0o640, "read"), (0o606, "change")):
        os.chmod(image, mode)
        r = mount_pmfs(image, mnt)
        try:
            assert r.returncode == 0, r.stderr
            assert fuse_mounted(mnt)
            assert r.stderr == f"mount.pmfs: warning: {image} is mode {mode:04o}: other " \
                               f"users can {can} every file in it, whatever its " \
                               f"permissions (chmod 600 {image})\n"
        finally:
            unmount_bg(mnt, image)
    os.chmod(image, 0o600)
    r = mount_pmfs(image, mnt)
    try:
        assert r.returncode == 0 and r.stderr == "", r.stderr
    finally:
        unmount_bg(mnt, image)


# --------------------------------------------------------------------------
# read-only images
# --------------------------------------------------------------------------


def test_immutable_image_fsck_and_mkfs(work):
    """root can open a 0400 file for writing, not an immutable one."""
    d, mnt = work
    image = image_16m(d)
    before = slurp(image)
    chattr("+i", image)
    r = fsck_pmfs("-n", "-f", image)
    assert r.returncode == 0 and "0 errors found" in r.stdout, r.stdout + r.stderr
    for mode in ("-y", "-p"):
        failed(fsck_pmfs(mode, image), 8,
               re.escape(f"fsck.pmfs: {image}: cannot open for writing "
                         f"(Operation not permitted)"))
    failed(mkfs_pmfs("-F", image), 8, re.escape(f"mkfs.pmfs: {image}: ") + ".*not permitted")
    chattr("-i", image)
    assert slurp(image) == before


def test_unwritable_image_as_unprivileged_user(work):
    d, mnt = work
    image = image_16m(d)
    os.chmod(image, 0o644)  # nobody may read, not write
    before = slurp(image)
    r = fsck_pmfs("-n", "-f", image, user="nobody")
    assert r.returncode == 0 and "0 errors found" in r.stdout, r.stdout + r.stderr
    for mode in ("-y", "-p"):
        failed(fsck_pmfs(mode, image, user="nobody"), 8,
               re.escape(f"fsck.pmfs: {image}: cannot open for writing (Permission denied)"))
    failed(mkfs_pmfs("-F", image, user="nobody"), 8,
           re.escape(f"mkfs.pmfs: {image}: cannot open for writing: Permission denied"))
    new = os.path.join(d, "new.img")
    failed(mkfs_pmfs(new, "16M", user="nobody"), 8,
           re.escape(f"mkfs.pmfs: {new}: cannot create: Permission denied"))
    assert slurp(image) == before


def test_immutable_image_mounts_read_only_with_a_warning(work):
    d, mnt = work
    image = image_16m(d)
    log = image + ".log"
    chattr("+i", image)
    r = mount_pmfs(image, mnt, "-o", f"log={log}")
    try:
        assert r.returncode == 0, r.stderr
        assert fuse_mounted(mnt)
        with open("/proc/self/mounts") as f:
            opts = [ln.split()[3] for ln in f if ln.split()[1] == os.path.realpath(mnt)]
        assert opts and "ro" in opts[0].split(","), opts
        assert os.listdir(mnt) == ["lost+found"]
        with pytest.raises(OSError) as e:
            open(os.path.join(mnt, "x"), "wb")
        assert e.value.errno == 30  # EROFS
        assert "write-protected: mounted read-only" in slurp(log).decode()
        # the user who ran mount.pmfs is told, not only the daemon log
        assert "Traceback" not in r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and "read-only" in lines[0], \
            f"no read-only warning on stderr: {r.stderr!r}"
    finally:
        unmount_bg(mnt, image)
    chattr("-i", image)
    r = fsck_pmfs("-n", "-f", image)
    assert r.returncode == 0, r.stdout + r.stderr


def test_immutable_image_needing_recovery_is_refused(work):
    """A read-only mount cannot replay the log: a clear refusal."""
    d, mnt = work
    image = image_16m(d)
    m = PmfsMount(image, mnt)
    m.mount()
    with open(os.path.join(mnt, "f"), "wb") as f:
        f.write(b"data")
    m.kill()
    chattr("+i", image)
    failed(mount_pmfs(image, mnt), 32,
           re.escape(f"mount.pmfs: {image}: the log holds ") + r"\d+" +
           re.escape(" committed transaction(s) to replay; mount read-write once (or run "
                     "fsck.pmfs) to recover it"))
    assert not fuse_mounted(mnt)
    r = fsck_pmfs("-n", image)
    assert r.returncode == 0 and "to replay" in r.stdout, r.stdout + r.stderr
    chattr("-i", image)
    m.mount()
    assert slurp(os.path.join(mnt, "f")) == b"data"
    assert m.unmount() == 0


# --------------------------------------------------------------------------
# too small, cut in half, foreign, newer
# --------------------------------------------------------------------------


def test_image_too_small(work):
    d, mnt = work
    image = image_16m(d)
    os.truncate(image, 100 << 10)
    msg = f"{image}: image is 102400 bytes but the file system needs 16777216 (truncated image?)"
    failed(mount_pmfs(image, mnt), 32, re.escape(f"mount.pmfs: {msg}"))
    for mode in ("-n", "-y", "-p"):
        failed(fsck_pmfs(mode, image), 8, re.escape(f"fsck.pmfs: {msg}"))
    failed(mkfs_pmfs(image), 8,
           re.escape(f"mkfs.pmfs: {image} holds a pmfs file system; use -F to overwrite it"))
    failed(mkfs_pmfs("-F", image), 8,
           re.escape("mkfs.pmfs: SIZE 102400 is too small: a pmfs image needs at least ")
           + r"\d+ bytes \(.*\)")
    assert os.path.getsize(image) == 100 << 10
    # an empty file
    empty = os.path.join(d, "empty.img")
    open(empty, "wb").close()
    failed(mount_pmfs(empty, mnt), 32, re.escape(f"mount.pmfs: {empty}: ") + ".*")
    failed(fsck_pmfs("-n", empty), 8, re.escape(f"fsck.pmfs: {empty}: ") + ".*")
    failed(mkfs_pmfs(empty), 16, re.escape(f"mkfs.pmfs: {empty} is empty: give a SIZE"))


def test_image_cut_in_half(work):
    d, mnt = work
    image = image_16m(d)
    os.truncate(image, 8 << 20)
    msg = f"{image}: image is 8388608 bytes but the file system needs 16777216 (truncated image?)"
    failed(mount_pmfs(image, mnt), 32, re.escape(f"mount.pmfs: {msg}"))
    for mode in ("-n", "-y", "-p"):
        failed(fsck_pmfs(mode, image), 8, re.escape(f"fsck.pmfs: {msg}"))
    failed(mkfs_pmfs(image), 8,
           re.escape(f"mkfs.pmfs: {image} holds a pmfs file system; use -F to overwrite it"))
    assert os.path.getsize(image) == 8 << 20
    # -F makes a new file system of the size the file has now
    r = mkfs_pmfs("-F", image)
    assert r.returncode == 0, r.stderr
    r = fsck_pmfs("-n", "-f", image)
    assert r.returncode == 0, r.stdout + r.stderr


def test_image_cut_under_a_running_daemon(work):
    """The image file truncated while mounted is a pulled disk: the daemon
    dies at its next access past the new end (SIGBUS on the mapping) and
    says so in its log; the dead mount answers an error until it is
    unmounted, and the image is then refused as truncated."""
    d, mnt = work
    image = image_16m(d)
    log = image + ".log"
    opts = f"log={log},attr_timeout=0,entry_timeout=0"
    r = mount_pmfs(image, mnt, "-o", opts)
    assert r.returncode == 0, r.stderr
    try:
        os.mkdir(os.path.join(mnt, "d"))
        with open(os.path.join(mnt, "d", "f"), "wb") as f:
            f.write(b"x")
    finally:
        unmount_bg(mnt, image)
    r = mount_pmfs(image, mnt, "-o", opts)  # cold caches
    assert r.returncode == 0, r.stderr
    try:
        os.truncate(image, 16 << 10)  # the inode table is gone
        with pytest.raises(OSError) as e:
            os.listdir(os.path.join(mnt, "d"))
        assert e.value.errno in (errno.ECONNABORTED, errno.ENOTCONN), e.value
        deadline = time.monotonic() + 10
        while daemons_of(image) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not daemons_of(image)
        text = slurp(log).decode()
        assert "Fatal Python error: Bus error" in text, text
    finally:
        unmount_bg(mnt, image)
    assert not fuse_mounted(mnt)
    msg = f"{image}: image is 16384 bytes but the file system needs 16777216 (truncated image?)"
    failed(mount_pmfs(image, mnt), 32, re.escape(f"mount.pmfs: {msg}"))
    failed(fsck_pmfs("-n", image), 8, re.escape(f"fsck.pmfs: {msg}"))


def test_random_bytes(work):
    d, mnt = work
    image = os.path.join(d, "random.img")
    with open(image, "wb") as f:
        f.write(os.urandom(16 << 20))
    msg = f"{image}: not a pmfs file system (no pmfs superblock)"
    failed(mount_pmfs(image, mnt), 32, re.escape(f"mount.pmfs: {msg}"))
    for mode in ("-n", "-y", "-p"):
        failed(fsck_pmfs(mode, image), 8, re.escape(f"fsck.pmfs: {msg}"))
    # random bytes are no file system: mkfs formats them without -F
    r = mkfs_pmfs(image)
    assert r.returncode == 0 and not r.stderr, r.stderr
    r = fsck_pmfs("-n", "-f", image)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ext4_looking_file(work):
    d, mnt = work
    image = os.path.join(d, "ext4.img")
    with open(image, "wb") as f:
        f.truncate(16 << 20)
        f.seek(1080)
        f.write(b"\x53\xef")
    before = slurp(image)
    msg = f"{image}: not a pmfs file system (no pmfs superblock)"
    failed(mount_pmfs(image, mnt), 32, re.escape(f"mount.pmfs: {msg}"))
    for mode in ("-n", "-y", "-p"):
        failed(fsck_pmfs(mode, image), 8, re.escape(f"fsck.pmfs: {msg}"))
    failed(mkfs_pmfs(image), 8,
           re.escape(f"mkfs.pmfs: {image} holds an ext2/3/4 file system; "
                     f"use -F to overwrite it"))
    assert slurp(image) == before


def test_newer_format_version(work):
    d, mnt = work
    image = image_16m(d)
    set_superblock(image, format_version=2)
    before = slurp(image)
    failed(mount_pmfs(image, mnt), 32,
           re.escape(f"mount.pmfs: {image}: format version 2 (features 0x0) is newer than "
                     f"this pmfs supports (version 1); upgrade pmfs"))
    for mode in ("-n", "-y", "-p"):
        failed(fsck_pmfs(mode, image), 8,
               re.escape(f"fsck.pmfs: {image}: format version 2 (features 0x0) is newer "
                         f"than this fsck.pmfs supports (version 1); upgrade pmfs"))
    failed(mkfs_pmfs(image), 8,
           re.escape(f"mkfs.pmfs: {image} holds a pmfs file system; use -F to overwrite it"))
    assert slurp(image) == before, "a newer image was changed"
    # unknown incompatible features are refused the same way
    set_superblock(image, format_version=1, incompat=0x10)
    failed(mount_pmfs(image, mnt), 32,
           re.escape(f"mount.pmfs: {image}: format version 1 (features 0x10) is newer than "
                     f"this pmfs supports (version 1); upgrade pmfs"))
    failed(fsck_pmfs("-y", image), 8, re.escape(f"fsck.pmfs: {image}: format version 1 "
                                                f"(features 0x10) is newer") + ".*")


# --------------------------------------------------------------------------
# mounted, and marked mounted by a dead daemon
# --------------------------------------------------------------------------


def fill(mnt: str) -> None:
    with open(os.path.join(mnt, "f"), "wb") as f:
        f.write(b"hello" * 1000)
        f.flush()
        os.fsync(f.fileno())
    os.mkdir(os.path.join(mnt, "d"))
    os.symlink("f", os.path.join(mnt, "d", "s"))


def check_filled(mnt: str) -> None:
    assert slurp(os.path.join(mnt, "f")) == b"hello" * 1000
    assert os.readlink(os.path.join(mnt, "d", "s")) == "f"


def test_image_in_use(work):
    """A mounted image: fsck and mkfs refuse it and leave it alone."""
    d, mnt = work
    image = image_16m(d)
    m = PmfsMount(image, mnt)
    m.mount()
    try:
        fill(mnt)
        mnt2 = os.path.join(d, "mnt2")
        os.mkdir(mnt2)
        failed(mount_pmfs(image, mnt2), 32,
               re.escape(f"mount.pmfs: {image} is already mounted (or being checked by "
                         f"fsck.pmfs, or read by pmfs-inspect)"))
        failed(mount_pmfs(image, mnt), 32,
               re.escape(f"mount.pmfs: {mnt} is already a FUSE mount point"))
        for mode in ("-n", "-y", "-p"):
            failed(fsck_pmfs(mode, image), 8,
                   re.escape(f"fsck.pmfs: {image} is in use (mounted?): refusing to check it; "
                             f"unmount it first (pmfs-inspect shows a mounted image)"))
        failed(mkfs_pmfs("-F", image, "16M"), 8,
               re.escape(f"mkfs.pmfs: {image} is in use (mounted, being checked by "
                         f"fsck.pmfs or read by pmfs-inspect); unmount it first"))
        # ... and the mounted file system is intact
        assert os.path.getsize(image) == 16 << 20
        check_filled(mnt)
        assert sorted(os.listdir(mnt)) == ["d", "f", "lost+found"]
    finally:
        assert m.unmount() == 0
    log = m.log_text()
    assert "corrupted metadata" not in log and "ERROR" not in log, log
    r = fsck_pmfs("-n", "-f", image)
    assert r.returncode == 0 and "0 errors found" in r.stdout, r.stdout + r.stderr


def test_dead_daemon_then_mount(work):
    d, mnt = work
    image = image_16m(d)
    m = PmfsMount(image, mnt)
    m.mount()
    fill(mnt)
    m.kill()
    assert not fuse_mounted(mnt)
    sb = superblock(image)
    assert not sb.state & SB_CLEAN and sb.owner_pid
    # fsck -n handles it: recovery is not an error
    r = fsck_pmfs("-n", image)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "to replay" in r.stdout and "0 errors found" in r.stdout, r.stdout
    # mount recovers it
    m.mount()
    check_filled(mnt)
    assert m.unmount() == 0
    log = m.log_text()
    assert "was not cleanly unmounted: replayed" in log, log
    assert "Traceback" not in log
    assert superblock(image).state & SB_CLEAN
    r = fsck_pmfs("-n", "-f", image)
    assert r.returncode == 0 and "0 errors found" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("mode,code", [("-y", 1), ("-p", 1)])
def test_dead_daemon_then_fsck_repair(work, mode, code):
    d, mnt = work
    image = image_16m(d)
    m = PmfsMount(image, mnt)
    m.mount()
    fill(mnt)
    m.kill()
    r = fsck_pmfs(mode, image)
    assert r.returncode == code, f"fsck {mode} exit {r.returncode}\n{r.stdout}{r.stderr}"
    assert not r.stderr, r.stderr
    sb = superblock(image)
    assert sb.state & SB_CLEAN and not sb.owner_pid
    r = fsck_pmfs("-n", "-f", image)
    assert r.returncode == 0 and "0 errors found" in r.stdout, r.stdout + r.stderr
    m.mount()
    check_filled(mnt)
    assert m.unmount() == 0


def test_dead_daemon_foreground_mount_point_not_cleaned(work):
    """The daemon died and nobody ran fusermount3 -u: the image mounts
    elsewhere, and mounting on the dead mount point says what is wrong."""
    d, mnt = work
    image = image_16m(d)
    m = PmfsMount(image, mnt)
    m.mount()
    fill(mnt)
    m.proc.kill()
    m.proc.wait()
    for s in (m.proc.stdout, m.proc.stderr):
        s.close()
    m.proc = None
    assert fuse_mounted(mnt)  # a dead FUSE mount: ENOTCONN
    try:
        mnt2 = os.path.join(d, "mnt2")
        m2 = PmfsMount(image, mnt2)
        m2.mount()
        check_filled(mnt2)
        assert m2.unmount() == 0
        # the kernel may still answer stat() of the dead root from its cache
        r = mount_pmfs(image, mnt)
        assert r.returncode == 32, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
        assert "does not exist" not in r.stderr, \
            f"a dead FUSE mount point reported as missing: {r.stderr!r}"
        assert re.search(r"not connected|fusermount3 -u", r.stderr), r.stderr
    finally:
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    assert not fuse_mounted(mnt)


def test_dead_background_daemon(work):
    """mount.pmfs in the background, its daemon SIGKILLed: mount again."""
    d, mnt = work
    image = image_16m(d)
    r = mount_pmfs(image, mnt)
    assert r.returncode == 0 and not r.stderr, r.stderr
    try:
        fill(mnt)
        pids = daemons_of(image)
        assert len(pids) == 1, pids
        os.kill(pids[0], 9)
    finally:
        unmount_bg(mnt, image)
    r = fsck_pmfs("-n", image)
    assert r.returncode == 0, r.stdout + r.stderr
    r = mount_pmfs(image, mnt)
    assert r.returncode == 0 and not r.stderr, r.stderr
    try:
        check_filled(mnt)
    finally:
        unmount_bg(mnt, image)
    r = fsck_pmfs("-n", "-f", image)
    assert r.returncode == 0 and "0 errors found" in r.stdout, r.stdout + r.stderr


def test_marked_mounted_on_another_host(work):
    """An image left mounted by a daemon on another host (shared storage):
    mount refuses with a hint, force_recovery mounts it, fsck accepts it."""
    d, mnt = work
    image = image_16m(d)
    set_superblock(image, state=0, owner_host="otherhost", owner_pid=4242)
    failed(mount_pmfs(image, mnt), 32,
           re.escape(f"mount.pmfs: {image} is marked as mounted on host 'otherhost'; if that "
                     f"host is down, mount with -o force_recovery"))
    assert not fuse_mounted(mnt)
    r = fsck_pmfs("-n", image)
    assert r.returncode == 0 and "0 errors found" in r.stdout, r.stdout + r.stderr
    r = mount_pmfs(image, mnt, "-o", "force_recovery")
    try:
        assert r.returncode == 0 and not r.stderr, r.stderr
        assert os.listdir(mnt) == ["lost+found"]
    finally:
        unmount_bg(mnt, image)
    sb = superblock(image)
    assert sb.state & SB_CLEAN and sb.owner_host == ""


def test_unwritable_image_mount_as_unprivileged_user(work):
    """mount.pmfs run by a user who may read the image but not write it:
    it mounts read-only with a warning, or (where that user may not mount
    FUSE file systems at all) refuses with one clear line."""
    d, mnt = work
    image = image_16m(d)
    os.chmod(image, 0o644)
    os.chown(mnt, 65534, 65534)
    r = mount_pmfs(image, mnt, user="nobody")
    try:
        assert "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.splitlines()
        if r.returncode == 0:
            assert fuse_mounted(mnt)
            assert len(lines) == 1 and "read-only" in lines[0], r.stderr
        else:
            assert r.returncode == 32, r.stderr
            assert len(lines) == 1, f"expected one line on stderr, got: {r.stderr!r}"
            assert lines[0].startswith("mount.pmfs: "), r.stderr
    finally:
        unmount_bg(mnt, image)
    r = fsck_pmfs("-n", "-f", image)
    assert r.returncode == 0, r.stdout + r.stderr
