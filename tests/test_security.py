"""Security through a real mount: permissions, ownership, set-id bits, sticky
directories, allow_other, no stale data, image mode and symlinks.

The oracle for permissions is the kernel itself: the same tree is built on a
pmfs mount and in a tmpfs directory (/dev/shm), the same operations are run
on both as an unprivileged user (setpriv), and every result (return value or
errno) and the final state of both trees (modes, owners, sizes, contents)
must be identical.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import subprocess
import sys
import time

import pytest

from conftest import PmfsMount, fuse_available, fuse_mounted, mkfs, prog

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(300)]

NOBODY = 65534
NOGROUP = 65534
OTHER_UID = 4321  # a second unprivileged user (no passwd entry needed)
OTHER_GID = 4321
GROUP_X = 1000  # a group nobody is not a member of (unless given explicitly)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

#: runs a list of operations (JSON in argv[1]) relative to argv[2] and prints
#: one result per operation: ["ok", value] or ["err", "EACCES"]
PROBE = r'''
import errno, json, os, stat, sys
ops = json.loads(sys.argv[1])
base = sys.argv[2]
os.chdir(base)
def st(p, follow=True):
    s = os.stat(p) if follow else os.lstat(p)
    return [oct(s.st_mode), s.st_uid, s.st_gid, s.st_size if not stat.S_ISDIR(s.st_mode) else 0]
def run(op, a):
    if op == "stat": return st(a[0])
    if op == "lstat": return st(a[0], False)
    if op == "read":
        with open(a[0], "rb") as f: return f.read().decode("latin-1")
    if op == "open":
        fd = os.open(a[0], a[1], a[2] if len(a) > 2 else 0o666); os.close(fd); return None
    if op == "write":
        fd = os.open(a[0], os.O_WRONLY | a[2], 0o666)
        try: return os.write(fd, a[1].encode())
        finally: os.close(fd)
    if op == "pwrite":
        fd = os.open(a[0], os.O_WRONLY)
        try: return os.pwrite(fd, a[1].encode(), a[2])
        finally: os.close(fd)
    if op == "truncate": os.truncate(a[0], a[1]); return None
    if op == "ftruncate":
        fd = os.open(a[0], os.O_WRONLY)
        try: os.ftruncate(fd, a[1])
        finally: os.close(fd)
        return None
    if op == "listdir": return sorted(os.listdir(a[0]))
    if op == "mkdir": os.mkdir(a[0], a[1]); return None
    if op == "rmdir": os.rmdir(a[0]); return None
    if op == "unlink": os.unlink(a[0]); return None
    if op == "rename": os.rename(a[0], a[1]); return None
    if op == "link": os.link(a[0], a[1]); return None
    if op == "symlink": os.symlink(a[0], a[1]); return None
    if op == "readlink": return os.readlink(a[0])
    if op == "chmod": os.chmod(a[0], a[1]); return None
    if op == "chown": os.chown(a[0], a[1], a[2]); return None
    if op == "lchown": os.lchown(a[0], a[1], a[2]); return None
    if op == "utime_now": os.utime(a[0], None); return None
    if op == "utime_set": os.utime(a[0], ns=(10**18, 10**18)); return None
    if op == "mkfifo": os.mkfifo(a[0], a[1]); return None
    if op == "mknod_chr": os.mknod(a[0], stat.S_IFCHR | 0o600, os.makedev(1, 3)); return None
    if op == "setxattr": os.setxattr(a[0], a[1], a[2].encode()); return None
    if op == "getxattr": return os.getxattr(a[0], a[1]).decode("latin-1")
    if op == "listxattr": return sorted(os.listxattr(a[0]))
    if op == "removexattr": os.removexattr(a[0], a[1]); return None
    if op == "access": return os.access(a[0], a[1])
    if op == "exec_search": return os.path.exists(a[0])
    raise ValueError(op)
out = []
for op, *a in ops:
    try:
        out.append(["ok", run(op, a)])
    except OSError as e:
        out.append(["err", errno.errorcode.get(e.errno, str(e.errno))])
print(json.dumps(out))
'''


def probe(base: str, ops, uid: int = NOBODY, gid: int = NOGROUP, groups=None) -> list:
    """Run `ops` in `base` as uid:gid (root when uid == 0) in a new process."""
    cmd = [sys.executable, "-c", PROBE, json.dumps(ops), base]
    if uid != 0 or gid != 0:
        g = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid}", *g, *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, f"probe failed: {r.stderr}"
    return json.loads(r.stdout)


def tree_state(base: str) -> dict:
    """{relative path: (type+mode, uid, gid, size, content)} of a whole tree."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            s = os.lstat(p)
            rel = os.path.relpath(p, base)
            content = None
            if stat.S_ISREG(s.st_mode):
                with open(p, "rb") as f:
                    content = f.read()
            elif stat.S_ISLNK(s.st_mode):
                content = os.readlink(p)
            out[rel] = (oct(s.st_mode), s.st_uid, s.st_gid,
                        None if stat.S_ISDIR(s.st_mode) else s.st_size, content)
    return out


def _mk(base, rel, mode, uid=0, gid=0, data=b"", kind="file"):
    p = os.path.join(base, rel)
    if kind == "dir":
        os.mkdir(p)
    else:
        with open(p, "wb") as f:
            f.write(data)
    os.chown(p, uid, gid)
    os.chmod(p, mode)  # after chown: chown clears set-id bits


def build_tree(base: str) -> None:
    """The same tree, made by root, on pmfs and on tmpfs."""
    d = lambda rel, mode, uid=0, gid=0: _mk(base, rel, mode, uid, gid, kind="dir")  # noqa
    f = lambda rel, mode, uid=0, gid=0, data=b"data\n": _mk(base, rel, mode, uid, gid, data)  # noqa
    d("pub", 0o777)
    d("sticky", 0o1777)
    f("sticky/root_f", 0o666)
    f("sticky/other_f", 0o666, OTHER_UID, OTHER_GID)
    d("sticky/other_d", 0o777, OTHER_UID, OTHER_GID)
    d("priv", 0o700)
    f("priv/f", 0o644)
    d("xonly", 0o711)
    f("xonly/f", 0o644)
    d("ronly", 0o744)
    f("ronly/f", 0o644)
    d("wx", 0o733)
    f("wx/f", 0o666)
    d("ro", 0o755)
    f("ro/f644", 0o644)
    f("ro/f600", 0o600)
    f("ro/f666", 0o666)
    f("ro/f604", 0o604)
    f("ro/f060g", 0o060, 0, NOGROUP)   # group class applies to nobody
    f("ro/f606g", 0o606, 0, NOGROUP)   # group class (no access) wins over other
    f("ro/f000", 0o000)
    f("ro/f755", 0o755, data=b"#!/bin/sh\n")
    d("ro/sub", 0o755)
    d("ro/empty", 0o777)
    d("nob", 0o755, NOBODY, NOGROUP)
    f("nob/mine000", 0o000, NOBODY, NOGROUP)
    f("nob/mine644", 0o644, NOBODY, NOGROUP)
    f("nob/mine_rootgrp", 0o644, NOBODY, 0)
    f("nob/rootfile", 0o666)
    d("nob/d", 0o755, NOBODY, NOGROUP)
    d("suid", 0o777)
    for name in ("w", "pw", "tr", "ftr", "otr", "app"):
        f(f"suid/s6777_{name}", 0o6777)
        f(f"suid/s4777_{name}", 0o4777)
        f(f"suid/s2777_{name}", 0o2777)
        f(f"suid/s2767_{name}", 0o2767)  # setgid without group exec
    f("suid/n6755_chgrp", 0o6755, NOBODY, NOGROUP)
    f("suid/n6755_chown0", 0o6755, NOBODY, NOGROUP)
    f("suid/n_rootgrp_chmod", 0o755, NOBODY, 0)
    f("suid/n_chmod_own", 0o755, NOBODY, NOGROUP)
    f("suid/r6755_chown", 0o6755)
    f("suid/r6755_rootwrite", 0o6777)
    d("sgid", 0o2777, 0, GROUP_X)
    d("plaingx", 0o777, 0, GROUP_X)


NOBODY_OPS = [
    # reading and listing
    ["read", "ro/f644"], ["read", "ro/f600"], ["read", "ro/f604"], ["read", "ro/f060g"],
    ["read", "ro/f606g"], ["read", "ro/f000"], ["read", "priv/f"], ["stat", "priv/f"],
    ["listdir", "priv"], ["stat", "priv"], ["listdir", "xonly"], ["stat", "xonly/f"],
    ["read", "xonly/f"], ["listdir", "ronly"], ["stat", "ronly/f"], ["read", "ronly/f"],
    ["listdir", "wx"], ["read", "wx/f"], ["listdir", "ro"],
    ["access", "ro/f644", os.R_OK], ["access", "ro/f644", os.W_OK],
    ["access", "ro/f755", os.X_OK], ["access", "ro/f600", os.R_OK],
    ["access", "priv/f", os.F_OK], ["access", "ro", os.W_OK],
    # writing
    ["open", "ro/f644", os.O_WRONLY], ["open", "ro/f644", os.O_RDWR],
    ["open", "ro/f666", os.O_RDWR], ["write", "ro/f666", "nobody was here", os.O_APPEND],
    ["write", "ro/f060g", "group write", os.O_APPEND], ["open", "ro/f606g", os.O_WRONLY],
    ["open", "ro/f644", os.O_WRONLY | os.O_TRUNC], ["truncate", "ro/f644", 0],
    ["truncate", "ro/f666", 2], ["open", "ro/new", os.O_CREAT | os.O_WRONLY, 0o644],
    ["open", "priv/new", os.O_CREAT | os.O_WRONLY, 0o644],
    ["open", "wx/new", os.O_CREAT | os.O_WRONLY, 0o640], ["stat", "wx/new"],
    ["open", "pub/new", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o640],
    ["stat", "pub/new"], ["mkdir", "pub/newdir", 0o750], ["stat", "pub/newdir"],
    ["symlink", "target", "pub/newlink"], ["lstat", "pub/newlink"],
    ["mkfifo", "pub/fifo", 0o640], ["stat", "pub/fifo"], ["mknod_chr", "pub/null"],
    ["mkdir", "ro/newdir", 0o755], ["symlink", "x", "ro/newlink"],
    # removing and renaming
    ["unlink", "ro/f666"], ["rmdir", "ro/empty"], ["unlink", "priv/f"],
    ["rename", "ro/f644", "pub/stolen"], ["rename", "pub/new", "ro/new2"],
    ["rename", "pub/new", "pub/new2"], ["unlink", "pub/new2"],
    ["link", "ro/f644", "pub/hardlink"], ["link", "ro/f666", "pub/hardlink666"],
    ["unlink", "nob/rootfile"], ["rename", "nob/rootfile", "nob/rootfile2"],
    # metadata
    ["chmod", "ro/f666", 0o777], ["chown", "ro/f666", NOBODY, NOGROUP],
    ["chown", "nob/mine644", 0, 0], ["chown", "nob/mine644", -1, 0],
    ["chown", "nob/mine644", -1, NOGROUP], ["utime_set", "ro/f666"],
    ["utime_now", "ro/f666"], ["utime_now", "ro/f644"], ["utime_set", "nob/mine644"],
    ["chmod", "nob/mine000", 0o600], ["read", "nob/mine000"],
    ["chmod", "nob/mine000", 0o000], ["read", "nob/mine000"],
    ["chmod", "nob/d", 0o500], ["open", "nob/d/x", os.O_CREAT | os.O_WRONLY, 0o600],
    ["chmod", "nob/d", 0o755],
    ["chmod", "nob/mine_rootgrp", 0o2755], ["stat", "nob/mine_rootgrp"],
    # extended attributes
    ["setxattr", "ro/f644", "user.a", "x"], ["setxattr", "ro/f666", "user.a", "x"],
    ["setxattr", "nob/mine644", "user.a", "v"], ["getxattr", "nob/mine644", "user.a"],
    ["listxattr", "nob/mine644"], ["setxattr", "nob/mine644", "trusted.a", "v"],
    ["getxattr", "priv/f", "user.a"], ["setxattr", "pub", "user.d", "v"],
    ["removexattr", "nob/mine644", "user.a"],
    # sticky directory: nobody may not remove others' entries
    ["unlink", "sticky/root_f"], ["unlink", "sticky/other_f"],
    ["rename", "sticky/other_f", "sticky/mine"], ["rmdir", "sticky/other_d"],
    ["open", "sticky/mine_f", os.O_CREAT | os.O_WRONLY, 0o644],
    ["rename", "sticky/mine_f", "sticky/other_f"], ["write", "sticky/root_f", "w", os.O_APPEND],
    ["open", "sticky/nob_f", os.O_CREAT | os.O_WRONLY, 0o666],
    ["mkdir", "sticky/nob_d", 0o777],
    # set-id bits: cleared by an unprivileged writer / truncater / chown
    ["write", "suid/s6777_w", "x", 0], ["write", "suid/s4777_w", "x", 0],
    ["write", "suid/s2777_w", "x", 0],
    ["pwrite", "suid/s6777_pw", "x", 3], ["pwrite", "suid/s4777_pw", "x", 3],
    ["pwrite", "suid/s2777_pw", "x", 3],
    ["truncate", "suid/s6777_tr", 1], ["truncate", "suid/s4777_tr", 1],
    ["truncate", "suid/s2777_tr", 1],
    ["ftruncate", "suid/s6777_ftr", 0], ["ftruncate", "suid/s4777_ftr", 0],
    ["ftruncate", "suid/s2777_ftr", 0],
    ["write", "suid/s6777_app", "x", os.O_APPEND], ["write", "suid/s4777_app", "x", os.O_APPEND],
    ["write", "suid/s2777_app", "x", os.O_APPEND],
    ["chown", "suid/n6755_chgrp", -1, NOGROUP], ["chown", "suid/n6755_chown0", 0, -1],
    ["chmod", "suid/n_rootgrp_chmod", 0o2755], ["chmod", "suid/n_chmod_own", 0o6755],
    ["chown", "suid/r6755_chown", NOBODY, -1],
    # a setgid directory: BSD group, inherited setgid on subdirectories
    ["open", "sgid/f", os.O_CREAT | os.O_WRONLY, 0o644], ["stat", "sgid/f"],
    ["open", "sgid/fx", os.O_CREAT | os.O_WRONLY, 0o2775], ["stat", "sgid/fx"],
    ["mkdir", "sgid/d", 0o755], ["stat", "sgid/d"], ["mkdir", "sgid/d/e", 0o700],
    ["stat", "sgid/d/e"], ["symlink", "t", "sgid/l"], ["lstat", "sgid/l"],
    ["open", "pub/sg", os.O_CREAT | os.O_WRONLY, 0o2755], ["stat", "pub/sg"],
]


#: set-id operations that have to be compared one by one in the final state
SETID_FILES = sorted({op[1] for op in NOBODY_OPS if op[1].startswith("suid/")})


def _opstr(op) -> str:
    return " ".join(str(x) for x in op)


def _diff_results(ops, got, want) -> list[str]:
    return [f"{_opstr(op)}: pmfs {g} tmpfs {w}" for op, g, w in zip(ops, got, want) if g != w]


def _diff_trees(a: dict, b: dict) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            out.append(f"{k}: pmfs {a.get(k)} tmpfs {b.get(k)}")
    return out


@pytest.fixture
def allow_other_mount(shm_dir):
    if not fuse_available():
        pytest.fail("FUSE is not available")
    os.chmod(shm_dir, 0o755)  # mkdtemp made it 0700: others must traverse it
    image = os.path.join(shm_dir, "fs.img")
    mkfs(image, "64M")
    m = PmfsMount(image, os.path.join(shm_dir, "mnt"), "allow_other")
    m.mount()
    os.chmod(m.path, 0o755)
    try:
        yield m
    finally:
        m.unmount()
        log = m.log_text()
        assert "Traceback" not in log, f"daemon logged a traceback:\n{log}"


def _pair(shm_dir, mount):
    """(pmfs dir, tmpfs dir) with the same tree inside."""
    pm = os.path.join(mount.path, "t")
    ref = os.path.join(shm_dir, "ref")
    for b in (pm, ref):
        os.mkdir(b)
        os.chmod(b, 0o755)
        build_tree(b)
    return pm, ref


def fsck_clean(image: str) -> None:
    r = subprocess.run([prog("fsck.pmfs"), "-f", "-n", image], capture_output=True, text=True)
    assert r.returncode == 0, f"fsck.pmfs -f -n: rc {r.returncode}\n{r.stdout}\n{r.stderr}"


# ---------------------------------------------------------------------------
# permissions, ownership, set-id bits, sticky directories (differential)
# ---------------------------------------------------------------------------

def test_tree_built_identically(allow_other_mount, shm_dir):
    pm, ref = _pair(shm_dir, allow_other_mount)
    assert _diff_trees(tree_state(pm), tree_state(ref)) == []


def test_unprivileged_operations_match_the_kernel(allow_other_mount, shm_dir):
    """Every operation an unprivileged user makes gets the same result on
    pmfs as on tmpfs (permission checks, errnos), and the trees end equal."""
    pm, ref = _pair(shm_dir, allow_other_mount)
    got = probe(pm, NOBODY_OPS)
    want = probe(ref, NOBODY_OPS)
    # sanity: the oracle really denies things (the test could not pass on a
    # file system that allowed everything)
    denied = [op for op, w in zip(NOBODY_OPS, want) if w[0] == "err"]
    assert len(denied) > 30
    diffs = _diff_results(NOBODY_OPS, got, want)
    tdiffs = _diff_trees(tree_state(pm), tree_state(ref))
    assert diffs == [] and tdiffs == [], "\n".join(diffs + ["-- final trees:"] + tdiffs)


def test_new_files_get_the_callers_ids(allow_other_mount, shm_dir):
    pm, _ref = _pair(shm_dir, allow_other_mount)
    ops = [["open", "pub/a", os.O_CREAT | os.O_WRONLY, 0o644], ["mkdir", "pub/b", 0o755],
           ["symlink", "a", "pub/c"], ["mkfifo", "pub/d", 0o644]]
    for uid, gid in ((NOBODY, NOGROUP), (OTHER_UID, OTHER_GID)):
        sub = f"pub/u{uid}"
        os.mkdir(os.path.join(pm, sub))
        os.chmod(os.path.join(pm, sub), 0o777)
        res = probe(pm, [[o[0], *[x.replace("pub/", sub + "/") if isinstance(x, str) else x
                                  for x in o[1:]]] for o in ops], uid, gid)
        assert all(r[0] == "ok" for r in res), res
        for n in "abcd":
            s = os.lstat(os.path.join(pm, sub, n))
            assert (s.st_uid, s.st_gid) == (uid, gid), (n, s)
    # the same after a remount (the ids are on the media, not only cached)
    m = allow_other_mount
    m.unmount()
    m.mount()
    for uid, gid in ((NOBODY, NOGROUP), (OTHER_UID, OTHER_GID)):
        for n in "abcd":
            s = os.lstat(os.path.join(m.path, "t", "pub", f"u{uid}", n))
            assert (s.st_uid, s.st_gid) == (uid, gid)


def test_setgid_directory_with_supplementary_group(allow_other_mount, shm_dir):
    """A member of the directory's group (through a supplementary group)
    keeps S_ISGID on a group-executable file it creates there (the kernel
    strips it only for non-members: mode_strip_sgid/in_group_p)."""
    pm, ref = _pair(shm_dir, allow_other_mount)
    ops = [["open", "sgid/member_fx", os.O_CREAT | os.O_WRONLY, 0o2775],
           ["stat", "sgid/member_fx"],
           ["mkdir", "sgid/member_d", 0o2775], ["stat", "sgid/member_d"],
           ["open", "plaingx/member_fx", os.O_CREAT | os.O_WRONLY, 0o2775],
           ["stat", "plaingx/member_fx"],
           ["chmod", "plaingx/member_fx", 0o2775], ["stat", "plaingx/member_fx"]]
    got = probe(pm, ops, groups=[NOGROUP, GROUP_X])
    want = probe(ref, ops, groups=[NOGROUP, GROUP_X])
    assert want[1][1][0] == oct(stat.S_IFREG | 0o2755)  # umask 022 applies, S_ISGID kept
    assert _diff_results(ops, got, want) == []


def test_setid_bits_cleared_like_the_kernel(allow_other_mount, shm_dir):
    """Set-id bits after unprivileged writes, truncations, chown/chgrp and
    chmod, and after root's chown, compared one file at a time."""
    pm, ref = _pair(shm_dir, allow_other_mount)
    setid_ops = [op for op in NOBODY_OPS if op[1].startswith("suid/")]
    probe(pm, setid_ops)
    probe(ref, setid_ops)
    root_ops = [["chown", "suid/r6755_chown", 0, 0], ["write", "suid/r6755_rootwrite", "r", 0]]
    assert probe(pm, root_ops, 0, 0) == probe(ref, root_ops, 0, 0)
    bad = []
    for rel in SETID_FILES:
        a = os.stat(os.path.join(pm, rel))
        b = os.stat(os.path.join(ref, rel))
        if (oct(a.st_mode), a.st_uid, a.st_gid) != (oct(b.st_mode), b.st_uid, b.st_gid):
            bad.append(f"{rel}: pmfs {oct(a.st_mode)} {a.st_uid}:{a.st_gid}, "
                       f"tmpfs {oct(b.st_mode)} {b.st_uid}:{b.st_gid}")
    assert bad == [], "\n".join(bad)
    # and the oracle shows that something was cleared
    assert not os.stat(os.path.join(ref, "suid/s6777_w")).st_mode & stat.S_ISUID


def test_setid_cleared_on_open_o_trunc(allow_other_mount, shm_dir):
    """open(O_TRUNC) by an unprivileged writer clears S_ISUID/S_ISGID, as
    truncate(2) does.  (FUSE's atomic_o_trunc leaves this to the daemon.)"""
    pm, ref = _pair(shm_dir, allow_other_mount)
    ops = [["open", "suid/s6777_otr", os.O_WRONLY | os.O_TRUNC], ["stat", "suid/s6777_otr"],
           ["open", "suid/s4777_otr", os.O_WRONLY | os.O_TRUNC], ["stat", "suid/s4777_otr"],
           ["open", "suid/s2777_otr", os.O_WRONLY | os.O_TRUNC], ["stat", "suid/s2777_otr"]]
    want = probe(ref, ops)
    got = probe(pm, ops)
    assert want[1][1][0] == oct(stat.S_IFREG | 0o777)
    assert _diff_results(ops, got, want) == []


def test_file_capabilities_dropped_like_the_kernel(allow_other_mount, shm_dir):
    """security.capability goes when an unprivileged user writes or
    truncates the file (the kernel's killpriv), on pmfs as on tmpfs."""
    import struct
    pm, ref = _pair(shm_dir, allow_other_mount)
    cap = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # v2, cap_net_bind_service
    names = ["w", "app", "tr", "ftr", "otr", "keep"]
    for base in (pm, ref):
        for n in names:
            _mk(base, f"pub/cap_{n}", 0o777)
            os.setxattr(os.path.join(base, f"pub/cap_{n}"), "security.capability", cap)
    ops = [["write", "pub/cap_w", "x", 0], ["write", "pub/cap_app", "x", os.O_APPEND],
           ["truncate", "pub/cap_tr", 1], ["ftruncate", "pub/cap_ftr", 0],
           ["open", "pub/cap_otr", os.O_WRONLY | os.O_TRUNC], ["read", "pub/cap_keep"]]
    assert probe(pm, ops) == probe(ref, ops)
    got = {n: os.listxattr(os.path.join(pm, f"pub/cap_{n}")) for n in names}
    want = {n: os.listxattr(os.path.join(ref, f"pub/cap_{n}")) for n in names}
    assert want["keep"] == ["security.capability"] and want["w"] == []
    assert got == want


def test_setgid_without_group_exec_on_unprivileged_write(allow_other_mount, shm_dir):
    """A 02767 file (S_ISGID without S_IXGRP) written or truncated by a user
    outside its group: a kernel file system (Linux >= 6.2,
    setattr_should_drop_sgid) drops S_ISGID; through FUSE the kernel kills
    S_ISGID only together with S_IXGRP and leaves the rest to daemons that
    negotiate FUSE_HANDLE_KILLPRIV_V2, which pyfuse3 cannot.  A known,
    harmless deviation (exec honours S_ISGID only with S_IXGRP): everything
    but that one bit must match the kernel.  When pmfs gets killpriv_v2,
    the expected mode becomes the kernel's."""
    pm, ref = _pair(shm_dir, allow_other_mount)
    ops = [["write", "suid/s2767_w", "x", 0], ["stat", "suid/s2767_w"],
           ["pwrite", "suid/s2767_pw", "x", 3], ["stat", "suid/s2767_pw"],
           ["truncate", "suid/s2767_tr", 1], ["stat", "suid/s2767_tr"],
           ["ftruncate", "suid/s2767_ftr", 0], ["stat", "suid/s2767_ftr"],
           ["write", "suid/s2767_app", "x", os.O_APPEND], ["stat", "suid/s2767_app"]]
    want = probe(ref, ops)
    got = probe(pm, ops)
    assert want[1][1][0] == oct(stat.S_IFREG | 0o767)
    for op, g, w in zip(ops, got, want):
        if op[0] == "stat":
            assert g[1][1:] == w[1][1:], op  # owner, group, size
            assert int(g[1][0], 8) == int(w[1][0], 8) | stat.S_ISGID, (op, g, w)
        else:
            assert g == w, op
    for n in ("w", "pw", "tr", "ftr", "app"):
        with open(os.path.join(pm, f"suid/s2767_{n}"), "rb") as f, \
                open(os.path.join(ref, f"suid/s2767_{n}"), "rb") as g:
            assert f.read() == g.read()


def test_sticky_directory_between_two_users(allow_other_mount, shm_dir):
    """In a 1777 directory user A cannot delete or rename user B's file, but
    may delete its own; the directory's owner and root may delete anything."""
    m = allow_other_mount
    for base in (os.path.join(m.path, "s"), os.path.join(shm_dir, "sref")):
        os.mkdir(base)
        os.chmod(base, 0o755)
        _mk(base, "tmp", 0o1777, kind="dir")
        _mk(base, "owned", 0o1777, OTHER_UID, OTHER_GID, kind="dir")
    pm, ref = os.path.join(m.path, "s"), os.path.join(shm_dir, "sref")
    res = {}
    for base in (pm, ref):
        r = []
        r += probe(base, [["open", "tmp/a", os.O_CREAT | os.O_WRONLY, 0o666],
                          ["mkdir", "tmp/adir", 0o777],
                          ["open", "owned/a", os.O_CREAT | os.O_WRONLY, 0o666]],
                   NOBODY, NOGROUP)
        r += probe(base, [["open", "tmp/b", os.O_CREAT | os.O_WRONLY, 0o666],
                          ["unlink", "tmp/a"], ["rename", "tmp/a", "tmp/b2"],
                          ["rename", "tmp/b", "tmp/a"], ["rmdir", "tmp/adir"],
                          ["write", "tmp/a", "b", os.O_APPEND],
                          ["unlink", "owned/a"], ["unlink", "tmp/b"]],
                   OTHER_UID, OTHER_GID)
        r += probe(base, [["unlink", "tmp/a"], ["rmdir", "tmp/adir"]], NOBODY, NOGROUP)
        r += probe(base, [["listdir", "tmp"], ["listdir", "owned"]], 0, 0)
        res[base] = r
    assert res[pm] == res[ref]
    # the oracle's verdicts, spelled out
    assert res[ref][4] == ["err", "EPERM"]     # B unlinks A's file
    assert res[ref][5] == ["err", "EPERM"]     # B renames A's file
    assert res[ref][7] == ["err", "EPERM"]     # B removes A's directory
    assert res[ref][9] == ["ok", None]         # the directory's owner removes A's file
    assert res[ref][-2] == ["ok", []] and res[ref][-1] == ["ok", []]


def test_without_allow_other_nobody_else_gets_in(shm_dir):
    os.chmod(shm_dir, 0o755)
    image = os.path.join(shm_dir, "fs.img")
    mkfs(image, "32M")
    m = PmfsMount(image, os.path.join(shm_dir, "mnt"))
    m.mount()
    try:
        os.chmod(m.path, 0o777)
        with open(os.path.join(m.path, "f"), "w") as f:
            f.write("secret")
        os.chmod(os.path.join(m.path, "f"), 0o666)
        res = probe(os.path.dirname(m.path), [["stat", "mnt"], ["listdir", "mnt"], ["stat", "mnt/f"],
                                     ["read", "mnt/f"], ["write", "mnt/f", "x", 0],
                                     ["open", "mnt/g", os.O_CREAT | os.O_WRONLY, 0o666],
                                     ["access", "mnt/f", os.R_OK]])
        assert res[:6] == [["err", "EACCES"]] * 6, res
        assert res[6] == ["ok", False]
        # root (the mounting user) still works
        with open(os.path.join(m.path, "f")) as f:
            assert f.read() == "secret"
    finally:
        m.unmount()
    assert "Traceback" not in m.log_text()


# ---------------------------------------------------------------------------
# no stale data
# ---------------------------------------------------------------------------

MARK = 0xEE  # the deleted file's byte; never written by the reusers
ALLOWED = frozenset(b"\0abcdefghijklmnopqrstuvwxyz")


def _fill_marker(mnt: str, name: str = "marker") -> int:
    """Fill most of the free space with a file of MARK bytes, fsync, delete it,
    and wait until the space is back; returns the number of free blocks."""
    s = os.statvfs(mnt)
    nbytes = (s.f_bfree - 256) * 4096 * 9 // 10
    p = os.path.join(mnt, name)
    chunk = bytes([MARK]) * (1 << 20)
    with open(p, "wb") as f:
        left = nbytes
        while left > 0:
            left -= f.write(chunk[:min(left, len(chunk))])
        f.flush()
        os.fsync(f.fileno())
    # also leave marker bytes in directory, symlink and xattr blocks
    os.mkdir(os.path.join(mnt, "mdir"))
    for i in range(300):
        open(os.path.join(mnt, "mdir", "%s%04d" % ("\u00ee" * 60, i)), "w").close()
    os.symlink("\u00ee" * 2000, os.path.join(mnt, "mlink"))
    os.setxattr(p, "user.m", bytes([MARK]) * 3000)
    free_full = os.statvfs(mnt).f_bfree
    for i in range(300):
        os.unlink(os.path.join(mnt, "mdir", "%s%04d" % ("\u00ee" * 60, i)))
    os.rmdir(os.path.join(mnt, "mdir"))
    os.unlink(os.path.join(mnt, "mlink"))
    os.unlink(p)
    # the inode is freed at the kernel's FORGET, which follows the unlink
    deadline = time.monotonic() + 20
    while os.statvfs(mnt).f_bfree < free_full + nbytes // 4096 and time.monotonic() < deadline:
        time.sleep(0.05)
    free = os.statvfs(mnt).f_bfree
    assert free >= free_full + nbytes // 4096, "the deleted file's blocks never came back"
    return free


def _letters(rng: random.Random, n: int) -> bytes:
    c = rng.choice(b"abcdefghijklmnopqrstuvwxyz")
    return bytes([c]) * n


class Reuser:
    """Creates files that reuse freed blocks in every way that could expose
    old bytes, keeping an exact model of their content."""

    def __init__(self, mnt: str, seed: int):
        self.mnt = mnt
        self.rng = random.Random(seed)
        self.model: dict[str, bytearray] = {}
        self.n = 0

    def _new(self) -> tuple[str, int]:
        self.n += 1
        name = os.path.join(self.mnt, "r%05d" % self.n)
        fd = os.open(name, os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o644)
        self.model[name] = bytearray()
        return name, fd

    def _pwrite(self, name, fd, data, off):
        n = os.pwrite(fd, data, off)
        m = self.model[name]
        end = off + n
        if end > len(m):
            m.extend(bytes(end - len(m)))
        m[off:end] = data[:n]

    def _truncate(self, name, fd, size):
        os.ftruncate(fd, size)
        m = self.model[name]
        if size < len(m):
            del m[size:]
        else:
            m.extend(bytes(size - len(m)))

    def step(self) -> None:
        rng = self.rng
        kind = rng.randrange(7)
        name, fd = self._new()
        try:
            if kind == 0:    # scattered small writes: holes between them
                for _ in range(rng.randint(1, 8)):
                    self._pwrite(name, fd, _letters(rng, rng.randint(1, 300)),
                                 rng.randrange(0, 600_000))
            elif kind == 1:  # a partial block at the start
                self._pwrite(name, fd, _letters(rng, rng.randint(1, 4000)),
                             rng.randrange(0, 96))
            elif kind == 2:  # truncate-extend, then a write in the middle
                self._truncate(name, fd, rng.randint(1, 400_000))
                self._pwrite(name, fd, _letters(rng, 10), rng.randrange(0, 400_000))
            elif kind == 3:  # write, shrink into a block, extend again
                self._pwrite(name, fd, _letters(rng, rng.randint(5000, 40000)), 0)
                self._truncate(name, fd, rng.randint(1, 4095))
                self._truncate(name, fd, rng.randint(4096, 60000))
            elif kind == 4:  # write past EOF leaving a gap in the last block
                self._pwrite(name, fd, _letters(rng, rng.randint(1, 100)), 0)
                self._pwrite(name, fd, _letters(rng, rng.randint(1, 100)),
                             rng.randint(200, 70_000))
            elif kind == 5:  # posix_fallocate (FUSE_FALLOCATE, pmfs/fuseext.py)
                size = rng.randint(1, 200_000)
                os.posix_fallocate(fd, 0, size)
                m = self.model[name]
                m.extend(bytes(max(0, size - len(m))))
                self._pwrite(name, fd, _letters(rng, 7), rng.randrange(0, size))
            else:            # a big sequential file with a partial tail
                self._pwrite(name, fd, _letters(rng, rng.randint(100_000, 900_000)), 0)
        finally:
            os.close(fd)

    def verify(self) -> list[str]:
        bad = []
        for name, want in self.model.items():
            with open(name, "rb") as f:
                got = f.read()
            if got != bytes(want):
                stale = got.count(bytes([MARK]))
                bad.append(f"{name}: {len(got)} bytes (model {len(want)}), "
                           f"{stale} stale 0x{MARK:02x} bytes")
        return bad


def _no_marker_anywhere(mnt: str) -> list[str]:
    bad = []
    for dirpath, dirnames, filenames in os.walk(mnt):
        for n in dirnames + filenames:
            if "\u00ee" in n:
                bad.append(f"stale name {os.path.join(dirpath, n)!r}")
        for n in filenames:
            p = os.path.join(dirpath, n)
            if os.path.islink(p):
                if "\u00ee" in os.readlink(p):
                    bad.append(f"{p}: stale symlink target")
                continue
            with open(p, "rb") as f:
                data = f.read()
            if not set(data) <= ALLOWED:
                bad.append(f"{p}: {data.count(bytes([MARK]))} stale bytes")
            for x in os.listxattr(p):
                if MARK in os.getxattr(p, x):
                    bad.append(f"{p}: stale xattr {x}")
    return bad


def test_no_stale_data_in_reused_blocks(shm_dir):
    image = os.path.join(shm_dir, "fs.img")
    mkfs(image, "28M")
    m = PmfsMount(image, os.path.join(shm_dir, "mnt"))
    m.mount()
    try:
        _fill_marker(m.path)
        r = Reuser(m.path, seed=7)
        # reuse the freed space until it is (almost) all used again
        while os.statvfs(m.path).f_bfree > 600:
            try:
                r.step()
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
        # directories, symlinks, xattrs in recycled blocks
        os.mkdir(os.path.join(m.path, "d"))
        for i in range(200):
            open(os.path.join(m.path, "d", "n%d" % i), "w").close()
        os.symlink("a" * 3000, os.path.join(m.path, "longlink"))
        os.setxattr(os.path.join(m.path, "d", "n0"), "user.x", b"b" * 100)
        assert r.n > 20
        assert r.verify() == []
        assert sorted(os.listdir(os.path.join(m.path, "d"))) == \
            sorted("n%d" % i for i in range(200))
        assert os.readlink(os.path.join(m.path, "longlink")) == "a" * 3000
        assert _no_marker_anywhere(m.path) == []
        m.unmount()
        m.mount()
        assert r.verify() == []
        assert _no_marker_anywhere(m.path) == []
    finally:
        m.unmount()
    assert "Traceback" not in m.log_text()
    fsck_clean(image)


REUSE_CHILD = r'''
import os, random, sys
sys.path.insert(0, sys.argv[3])
from test_security import Reuser
r = Reuser(sys.argv[1], int(sys.argv[2]))
open(os.path.join(sys.argv[1], "started"), "w").close()
while True:
    try:
        r.step()
    except OSError as e:
        import errno
        if e.errno == errno.ENOSPC:
            for n in list(r.model)[:len(r.model) // 2]:
                os.unlink(n)
                del r.model[n]
            continue
        raise
'''


def test_no_stale_data_after_crash(shm_dir):
    """Kill the daemon while another process keeps reusing freed marker blocks
    (sparse writes, truncate-extend, writes past EOF); after recovery no file
    shows a byte that was never written to it."""
    image = os.path.join(shm_dir, "fs.img")
    mkfs(image, "28M")
    m = PmfsMount(image, os.path.join(shm_dir, "mnt"))
    here = os.path.dirname(os.path.abspath(__file__))
    for cycle in range(2):
        m.mount()
        try:
            for n in os.listdir(m.path):
                if n.startswith("r") or n == "started":
                    os.unlink(os.path.join(m.path, n))
            _fill_marker(m.path, f"marker{cycle}")
            child = subprocess.Popen([sys.executable, "-c", REUSE_CHILD, m.path,
                                      str(100 + cycle), here],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                deadline = time.monotonic() + 30
                while not os.path.exists(os.path.join(m.path, "started")):
                    assert child.poll() is None, child.stderr.read()
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                time.sleep(0.3 + 0.4 * cycle)  # let it get going: the crash lands mid-work
                assert child.poll() is None, child.stderr.read().decode()
            finally:
                m.kill()
                child.wait(timeout=30)
                child.stderr.close()
        finally:
            m.kill()
        m.mount()
        try:
            bad = _no_marker_anywhere(m.path)
            assert bad == [], bad[:20]
        finally:
            m.unmount()
        fsck_clean(image)
    assert "Traceback" not in m.log_text()


# ---------------------------------------------------------------------------
# the image file and symlinks
# ---------------------------------------------------------------------------

def test_mkfs_creates_the_image_mode_0600(shm_dir):
    for sparse in ([], ["--sparse"]):
        image = os.path.join(shm_dir, f"img{len(sparse)}")
        r = subprocess.run(["sh", "-c", 'umask 000 && exec "$@"', "sh", prog("mkfs.pmfs"),
                            "-q", *sparse, image, "32M"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert stat.S_IMODE(os.stat(image).st_mode) == 0o600


def test_symlink_to_outside_is_only_a_symlink(allow_other_mount, shm_dir):
    """A symlink on pmfs naming /etc/passwd or a root-only file is resolved by
    the kernel with the caller's rights, never opened by the daemon."""
    m = allow_other_mount
    secret = os.path.join(shm_dir, "secret")
    with open(secret, "w") as f:
        f.write("root only")
    os.chmod(secret, 0o600)
    os.symlink("/etc/passwd", os.path.join(m.path, "pw"))
    os.symlink(secret, os.path.join(m.path, "sec"))
    os.symlink("../../../../../../../etc/passwd", os.path.join(m.path, "rel"))
    assert os.readlink(os.path.join(m.path, "pw")) == "/etc/passwd"
    assert os.readlink(os.path.join(m.path, "rel")) == "../../../../../../../etc/passwd"
    assert stat.S_ISLNK(os.lstat(os.path.join(m.path, "pw")).st_mode)
    assert os.lstat(os.path.join(m.path, "pw")).st_size == len("/etc/passwd")
    with open("/etc/passwd") as f:
        passwd = f.read()
    with open(os.path.join(m.path, "pw")) as f:
        assert f.read() == passwd
    res = probe(m.path, [["read", "sec"], ["readlink", "sec"], ["read", "pw"], ["read", "rel"],
                         ["write", "pw", "x", os.O_APPEND], ["lchown", "pw", NOBODY, NOGROUP]])
    assert res[0] == ["err", "EACCES"]
    assert res[1] == ["ok", secret]
    assert res[2] == ["ok", passwd] and res[3][0] == "ok"
    assert res[4] == ["err", "EACCES"]
    assert res[5] == ["err", "EPERM"]
    with open("/etc/passwd") as f:
        assert f.read() == passwd
    # the symlinks' own sizes on the media: nothing of the targets was copied
    assert os.lstat(os.path.join(m.path, "sec")).st_size == len(secret)


def test_open_image_never_follows_a_symlink(shm_dir):
    """The image is opened with O_NOFOLLOW: open_image refuses a symlink with
    a one-line reason (the programs resolve a symlinked path first, once, as
    mount.pmfs and mkfs.pmfs do; see the next tests)."""
    from pmfs.pmem import ImageError, open_image
    image = os.path.join(shm_dir, "fs.img")
    mkfs(image, "32M")
    link = os.path.join(shm_dir, "link.img")
    os.symlink(image, link)
    with pytest.raises(ImageError) as e:
        open_image(link)
    assert e.value.errno == errno.ELOOP
    assert "symbolic link" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ImageError):
        open_image(link, readonly=True)


def test_fallback_log_never_follows_a_planted_name(shm_dir, monkeypatch):
    """Without syslog and without -o log=, the daemon logs to
    $TMPDIR/pmfs-UID.log: a name anyone may have made first in a
    world-writable directory.  A symlink there (to a file root could
    write), a FIFO or a file of another user is never written to; a file
    it makes is mode 0600."""
    import tempfile

    from pmfs import mount
    monkeypatch.setenv("TMPDIR", shm_dir)
    monkeypatch.setattr(tempfile, "tempdir", None)
    name = os.path.join(shm_dir, f"pmfs-{os.getuid()}.log")
    victim = os.path.join(shm_dir, "victim")
    with open(victim, "w") as f:
        f.write("secret\n")
    os.symlink(victim, name)
    for planted in ("symlink", "fifo", "foreign"):
        f = mount._private_log()
        try:
            assert f.name == os.devnull, planted
            f.write("log line\n")
        finally:
            f.close()
        os.unlink(name)
        if planted == "symlink":
            os.mkfifo(name)
        elif planted == "fifo":
            with open(name, "w"):
                pass
            os.chown(name, 65534, 65534)
    with open(victim) as f:
        assert f.read() == "secret\n"
    f = mount._private_log()
    try:
        f.write("log line\n")
    finally:
        f.close()
    st = os.lstat(name)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    with open(name) as f:
        assert f.read() == "log line\n"


def _daemon_files(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def test_mount_through_a_symlinked_image_path(shm_dir):
    """mount.pmfs resolves a symlinked IMAGE once (like /dev/disk/by-id/...):
    the daemon holds the real file, /proc/mounts names it, and it never
    opens anything but the image, /dev/fuse and its log."""
    image = os.path.join(shm_dir, "fs.img")
    mkfs(image, "32M")
    link = os.path.join(shm_dir, "link.img")
    os.symlink(image, link)
    m = PmfsMount(link, os.path.join(shm_dir, "mnt"))
    m.log = image + ".log"
    m.mount()
    try:
        os.symlink("/etc/passwd", os.path.join(m.path, "pw"))
        with open(os.path.join(m.path, "pw")) as f, open("/etc/passwd") as g:
            assert f.read() == g.read()
        with open("/proc/self/mounts") as f:
            line = next(x for x in f if x.split()[1] == os.path.realpath(m.path))
        assert line.split()[0] == os.path.realpath(image)
        files = _daemon_files(m.proc.pid)
        assert os.path.realpath(image) in files
        strays = {f for f in files if f.startswith("/") and f not in
                  (os.path.realpath(image), "/dev/fuse", "/dev/null", m.log)}
        assert strays == set(), strays
    finally:
        m.unmount()
    assert "Traceback" not in m.log_text()


def test_mount_refuses_bad_image_paths_in_one_line(shm_dir):
    """A FIFO (never opened: it would block), a dangling symlink, a file that
    is not pmfs and a too-small file: exit 32 and one line on stderr, in
    the foreground and in the background, and no traceback in the log."""
    mnt = os.path.join(shm_dir, "mnt")
    os.mkdir(mnt)
    fifo = os.path.join(shm_dir, "fifo")
    os.mkfifo(fifo)
    dangling = os.path.join(shm_dir, "dangling")
    os.symlink(os.path.join(shm_dir, "nowhere"), dangling)
    junk = os.path.join(shm_dir, "junk")
    with open(junk, "wb") as f:
        f.write(os.urandom(1 << 20))
    tiny = os.path.join(shm_dir, "tiny")
    with open(tiny, "wb") as f:
        f.write(b"x")
    bad = []
    for path in (fifo, dangling, junk, tiny):
        for fg in ([], ["-f"]):
            log = os.path.join(shm_dir, f"log{len(bad)}")
            r = subprocess.run([prog("mount.pmfs"), path, mnt, *fg, "-o", f"log={log}"],
                               capture_output=True, text=True, timeout=60)
            try:
                logtext = open(log).read() if os.path.exists(log) else ""
            finally:
                if fuse_mounted(mnt):
                    subprocess.run(["fusermount3", "-u", "-z", mnt])
            ok = (r.returncode == 32 and r.stderr.count("\n") == 1
                  and "Traceback" not in r.stderr + logtext)
            if not ok:
                bad.append(f"{os.path.basename(path)} {' '.join(fg) or '(background)'}: "
                           f"rc {r.returncode}, stderr {r.stderr!r}, log "
                           f"{logtext[-400:]!r}")
    assert bad == [], "\n".join(bad)


def test_symlinked_image_path_treated_alike_by_all_programs(shm_dir):
    """mkfs.pmfs and mount.pmfs accept a symlinked image path (it names the
    file it points to); fsck.pmfs and pmfs-inspect must too, or an fstab
    line naming /dev/disk/by-id/... mounts but fails its boot-time fsck."""
    image = os.path.join(shm_dir, "fs.img")
    link = os.path.join(shm_dir, "link.img")
    with open(image, "wb"):
        pass
    os.symlink(image, link)
    r = subprocess.run([prog("mkfs.pmfs"), "-q", "-F", link, "32M"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert os.path.islink(link) and os.path.getsize(image) == 32 << 20
    results = {}
    for name, args in (("fsck.pmfs", ["-f", "-n"]), ("pmfs-inspect", [])):
        r = subprocess.run([prog(name), *args, link], capture_output=True, text=True)
        results[name] = (r.returncode, r.stderr.strip())
    assert results == {"fsck.pmfs": (0, ""), "pmfs-inspect": (0, "")}, results
