"""The programs' command-line contract: --help, one-line errors, progress, man pages.

* every program's --help exits 0 and mentions every option its parser
  accepts (read from the argparse parsers themselves), and mount's help
  mentions every -o option parse_options() accepts (read from its code);
* user errors are one line, ``prog: what is wrong``, with the program's
  conventional exit code, and no traceback unless --debug (or PMFS_DEBUG=1);
* long operations show a live progress line on a terminal and nothing when
  the output is not a terminal;
* the man pages in docs/man are what tools/gen-man makes of the parsers,
  and render without groff warnings;
* so is the bash completion in docs/completion, which completes every
  option, mount's -o options and pmfs-inspect's commands.
"""

from __future__ import annotations

import argparse
import ast
import importlib.machinery
import importlib.util
import inspect as pyinspect
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time

import pytest

import mkfs
import pmfs.fsck
import pmfs.inspector
import pmfs.mount
from conftest import fresh_image, prog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.timeout(120)

PARSERS = {
    "mkfs.pmfs": mkfs.build_parser,
    "mount.pmfs": lambda: pmfs.mount.build_parser("mount.pmfs"),
    "pmfs": lambda: pmfs.mount.build_parser("pmfs"),
    "fsck.pmfs": pmfs.fsck.build_parser,
    "pmfs-inspect": pmfs.inspector.build_parser,
}


def sh(*cmd, env=None, stdin=subprocess.DEVNULL, timeout=60):
    e = dict(os.environ)
    e.pop("PMFS_DEBUG", None)
    if env:
        e.update(env)
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=e,
                          stdin=stdin, timeout=timeout)


def word(text: str, w: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text) is not None


def options_of(parser: argparse.ArgumentParser):
    """(option strings, subcommand parsers) of a parser."""
    opts, subs = [], {}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            subs.update(a.choices)
        else:
            opts.extend(a.option_strings)
    return opts, subs


# --------------------------------------------------------------------------
# --help
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_mentions_every_option(name):
    parser = PARSERS[name]()
    assert parser.prog == name
    r = sh(prog(name), "--help")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith(f"usage: {name} ")
    opts, subs = options_of(parser)
    assert "--debug" in opts and "--version" in opts
    for o in opts:
        assert word(r.stdout, o), f"{name} --help does not mention {o}"
    for cmd, sub in subs.items():
        assert word(r.stdout, cmd), f"{name} --help does not mention the command {cmd}"
        sub_help = sub.format_help()
        for o in options_of(sub)[0]:
            assert word(sub_help, o), f"{name} IMAGE {cmd} --help does not mention {o}"
    if subs:  # and the subcommand help is reachable from the command line
        cmd = sorted(subs)[0]
        rs = sh(prog(name), "IMAGE", cmd, "--help")
        assert rs.returncode == 0, rs.stderr
        assert rs.stdout.startswith(f"usage: {name} IMAGE {cmd} [-h]")
        for o in options_of(subs[cmd])[0]:
            assert word(rs.stdout, o)
    # the exit codes are documented
    assert "Exit codes" in r.stdout
    rv = sh(prog(name), "--version")
    assert rv.returncode == 0 and rv.stdout.split()[-1] == pmfs.__version__


def mount_option_keys() -> set[str]:
    """Every -o key parse_options() accepts, read from its source."""
    tree = ast.parse(pyinspect.getsource(pmfs.mount.parse_options))
    keys: set[str] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name)
                and node.left.id == "key"):
            continue
        for op, comp in zip(node.ops, node.comparators):
            if isinstance(op, ast.Eq) and isinstance(comp, ast.Constant):
                keys.add(comp.value)
            elif isinstance(op, ast.In) and isinstance(comp, ast.Tuple):
                keys.update(e.value for e in comp.elts)
            elif isinstance(op, ast.In) and isinstance(comp, ast.Name) \
                    and comp.id != "_IGNORED":
                keys.update(getattr(pmfs.mount, comp.id))
    return keys


_VALUES = {"log": "/tmp/x.log", "fsname": "x", "subtype": "x", "backend": "msync",
           "attr_timeout": "2", "entry_timeout": "2", "readahead": "1024", "spin": "7",
           "reclaim_batch": "8", "eof_prealloc": "16"}
#: -o options the code accepts but mount.pmfs --help does not name
_UNDOCUMENTED: set = set()


@pytest.mark.parametrize("key", [
    pytest.param(k, marks=pytest.mark.xfail(strict=True, reason="not in mount.pmfs --help"))
    if k in _UNDOCUMENTED else k for k in sorted(mount_option_keys())])
def test_mount_help_mentions_every_o_option(key):
    # the key really is accepted ...
    text = f"{key}={_VALUES[key]}" if key in _VALUES else key
    cfg = pmfs.mount.parse_options([text])
    assert vars(cfg) != vars(pmfs.mount.Config()) or key in ("relatime", "atime")
    # ... and documented (the help text test_help_mentions_every_option runs)
    help_text = pmfs.mount.build_parser("mount.pmfs").format_help()
    assert word(help_text, key), f"mount.pmfs --help does not mention -o {key}"


def test_mount_ignores_generic_fstab_options():
    for key in sorted(pmfs.mount._IGNORED) + ["x-systemd.automount", "comment=x"]:
        assert vars(pmfs.mount.parse_options([key])) == vars(pmfs.mount.Config()), key
    help_text = " ".join(pmfs.mount.build_parser("mount.pmfs").format_help().split())
    assert "accepted and ignored" in help_text


# --------------------------------------------------------------------------
# one-line errors with conventional exit codes
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    junk = d / "junk.img"
    junk.write_bytes(os.urandom(1 << 20))
    good = d / "good.img"
    good.write_bytes(bytes(fresh_image(8 << 20).data))
    (d / "mnt").mkdir()
    return {"dir": d, "junk": junk, "good": good, "mnt": d / "mnt",
            "missing": d / "missing.img", "nodir": d / "no" / "such" / "x.img"}


ERROR_CASES = [
    # mkfs.pmfs: 8 operational, 16 usage
    ("mkfs.pmfs", [], 16, "the following arguments are required"),
    ("mkfs.pmfs", ["{dir}/new.img", "12Q"], 16, "invalid size '12Q'"),
    ("mkfs.pmfs", ["-b", "8192", "{dir}/new.img", "64M"], 16, "block size 8192"),
    ("mkfs.pmfs", ["-U", "nope", "{dir}/new.img", "64M"], 16, "invalid UUID"),
    ("mkfs.pmfs", ["{missing}"], 16, "does not exist: give a SIZE"),
    ("mkfs.pmfs", ["{nodir}", "64M"], 8, "cannot create"),
    ("mkfs.pmfs", ["{dir}/small.img", "100K"], 8, "too small"),
    ("mkfs.pmfs", ["{good}"], 8, "holds a pmfs file system; use -F"),
    ("mkfs.pmfs", ["{dir}", "64M"], 8, "is a directory"),
    ("mkfs.pmfs", ["-J", "1K", "{dir}/new.img", "64M"], 8,
     "-J 1K: the WAL needs at least 64 blocks (256.0 KiB)"),
    ("mkfs.pmfs", ["-J", "1G", "{dir}/new.img", "16M"], 8,
     "16.0 MiB is too small for a 1.0 GiB WAL (-J): give a smaller -J or a larger SIZE"),
    ("mkfs.pmfs", ["-N", "99999999", "{dir}/new.img", "16M"], 8,
     "16.0 MiB is too small for 99999999 inodes (-N): they need an image of at least "
     "23.9 GiB; give a smaller -N or a larger SIZE"),
    # mount.pmfs / pmfs: 1 usage, 32 mount failure
    ("mount.pmfs", [], 1, "the following arguments are required"),
    ("mount.pmfs", ["{good}", "{mnt}", "-o", "bogus"], 1, "unknown mount option 'bogus'"),
    ("mount.pmfs", ["{good}", "{mnt}", "-o", "attr_timeout=x"], 1, "invalid value"),
    ("mount.pmfs", ["{missing}", "{mnt}"], 32, "no such file"),
    ("mount.pmfs", ["{good}", "{dir}/nomnt"], 32, "does not exist"),
    ("mount.pmfs", ["{junk}", "{mnt}"], 32, "not a pmfs file system"),
    ("mount.pmfs", ["{junk}", "{mnt}", "-f"], 32, "not a pmfs file system"),
    ("pmfs", ["{good}", "{mnt}", "-o", "rw,bogus"], 1, "unknown mount option 'bogus'"),
    # fsck.pmfs: 8 operational, 16 usage
    ("fsck.pmfs", [], 16, "the following arguments are required"),
    ("fsck.pmfs", ["-n", "-y", "{good}"], 16, "mutually exclusive"),
    ("fsck.pmfs", ["-n", "{missing}"], 8, "no such file"),
    ("fsck.pmfs", ["-n", "{junk}"], 8, "not a pmfs file system"),
    ("fsck.pmfs", ["{good}"], 8, "need a terminal"),
    # pmfs-inspect: 8 operational, 16 usage
    ("pmfs-inspect", [], 16, "the following arguments are required"),
    ("pmfs-inspect", ["{good}", "inode", "x"], 16, "invalid inode number"),
    ("pmfs-inspect", ["{good}", "frob"], 16, "invalid choice"),
    ("pmfs-inspect", ["{missing}"], 8, "no such file"),
    ("pmfs-inspect", ["{junk}"], 8, "not a pmfs file system"),
    ("pmfs-inspect", ["{good}", "stat", "/nope"], 8, "no such file or directory"),
    ("pmfs-inspect", ["{good}", "inode", "999999"], 8, "out of range"),
]


@pytest.mark.parametrize("name,args,code,text", ERROR_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(ERROR_CASES)])
def test_errors_are_one_line(files, name, args, code, text):
    argv = [a.format(**files) for a in args]
    # debug mode too, for the first case of each program (time)
    first = next(c for c in ERROR_CASES if c[0] == name) == (name, args, code, text)
    for debug_env in (None, {"PMFS_DEBUG": "1"}) if first else (None,):
        r = sh(prog(name), *argv, env=debug_env)
        assert r.returncode == code, (r.returncode, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"{name}: "), r.stderr
        assert text in r.stderr
        # a user error is never a traceback, not even in debug mode
        assert "Traceback" not in r.stderr
    assert not os.path.exists(files["dir"] / "new.img")
    assert not os.path.exists(files["dir"] / "small.img")


def test_mkfs_dry_run_on_a_formatted_image(files):
    """-n writes nothing, so it shows the layout even over a file system,
    and says that formatting it would need -F."""
    before = files["good"].read_bytes()
    r = sh(prog("mkfs.pmfs"), "-n", files["good"])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith("pmfs file system: 8.0 MiB")
    assert r.stdout.rstrip().endswith(f"(dry run: nothing written; {files['good']} holds a "
                                      f"pmfs file system: formatting it would need -F)")
    assert files["good"].read_bytes() == before


def test_traceback_only_with_debug(files, tmp_path):
    """An unexpected failure (damaged metadata met on the way) is one line,
    and a traceback with --debug or PMFS_DEBUG=1."""
    img = fresh_image(8 << 20)
    from pmfs.fs import FileSystem, MountOptions
    fs = FileSystem(img, MountOptions())
    d = fs.mkdir(1, b"d", 0o755)
    fs.create(d.ino, b"f", 0o644)
    (_s, _n, p), = list(fs.tree(fs.iget(d.ino)).extents())
    fs.close()
    data = bytearray(img.data)
    data[p * 4096 + 16] ^= 0xFF  # the first record's name
    path = tmp_path / "dmg.img"
    path.write_bytes(bytes(data))
    r = sh(prog("pmfs-inspect"), path, "stat", "/d/f")
    assert r.returncode == 8 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("pmfs-inspect: damaged file system: directory ")
    assert r.stderr.rstrip().endswith("run fsck.pmfs")
    for extra, env in ((["--debug"], None), ([], {"PMFS_DEBUG": "1"})):
        r = sh(prog("pmfs-inspect"), path, "stat", "/d/f", *extra, env=env)
        assert r.returncode == 8
        assert "Traceback (most recent call last)" in r.stderr
        assert r.stderr.rstrip().splitlines()[-1].startswith("pmfs-inspect: damaged")


# --------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------


def run_on_pty(cmd, timeout=60) -> tuple[int, bytes]:
    """Run cmd with stdin/stdout/stderr on a pseudo-terminal."""
    master, slave = pty.openpty()
    p = subprocess.Popen([str(c) for c in cmd], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    break
                if not chunk:
                    break
                out += chunk
            elif p.poll() is not None:
                break
        return p.wait(timeout=10), out
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()


@pytest.fixture
def shm_tmp():
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    import tempfile
    d = tempfile.mkdtemp(prefix="pmfs-cli-", dir=base)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_mkfs_progress_on_a_terminal_only(shm_tmp):
    size = 2 * mkfs.PREALLOC_CHUNK + (1 << 20)
    big = os.path.join(shm_tmp, "big.img")
    rc, out = run_on_pty([prog("mkfs.pmfs"), big, str(size)])
    assert rc == 0, out
    text = out.decode()
    steps = re.findall(r"\r\x1b\[Kallocating the image: +([\d.]+)%", text)
    assert steps and steps[-1] == "100.0", text
    assert [float(s) for s in steps] == sorted(float(s) for s in steps)
    # the line is erased before the result is printed
    assert "\r\x1b[Kpmfs file system: " in text
    assert os.path.getsize(big) == size // 4096 * 4096
    assert os.stat(big).st_blocks * 512 >= size // 4096 * 4096  # really allocated
    os.unlink(big)
    # not a terminal: no progress at all
    r = sh(prog("mkfs.pmfs"), big, str(size))
    assert r.returncode == 0
    assert "\r" not in r.stdout + r.stderr and "\x1b" not in r.stdout + r.stderr
    assert r.stderr == "" and r.stdout.startswith("pmfs file system: ")
    os.unlink(big)
    # -q: quiet on a terminal too
    rc, out = run_on_pty([prog("mkfs.pmfs"), "-q", big, str(size)])
    assert rc == 0 and out == b""
    os.unlink(big)
    # --sparse: nothing to allocate, nothing to show
    rc, out = run_on_pty([prog("mkfs.pmfs"), "--sparse", big, str(size)])
    assert rc == 0 and b"allocating" not in out
    assert os.stat(big).st_blocks * 512 < size // 2


# --------------------------------------------------------------------------
# man pages
# --------------------------------------------------------------------------


def load_gen_man():
    loader = importlib.machinery.SourceFileLoader("gen_man",
                                                  os.path.join(ROOT, "tools", "gen-man"))
    spec = importlib.util.spec_from_loader("gen_man", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def test_man_pages_are_generated_from_the_parsers(capsys):
    assert load_gen_man().main(["--check"]) == 0, capsys.readouterr().err
    for name in ("mkfs.pmfs", "mount.pmfs", "fsck.pmfs", "pmfs-inspect"):
        path = os.path.join(ROOT, "docs", "man", f"{name}.8")
        text = open(path).read()
        opts, subs = options_of(PARSERS[name]())
        for o in opts:
            assert o.replace("-", "\\-") in text, f"{name}.8 lacks {o}"
        for cmd in subs:
            assert f"\\fB{cmd}\\fR" in text
        if shutil.which("groff"):
            g = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", path],
                               capture_output=True, text=True)
            assert g.returncode == 0 and g.stderr == "", g.stderr


def test_gen_man_check_detects_a_stale_page(tmp_path, capsys):
    gm = load_gen_man()
    assert gm.main([str(tmp_path)]) == 0 and len(os.listdir(tmp_path)) == 5
    assert gm.main(["--check", str(tmp_path)]) == 0
    page = tmp_path / "mkfs.pmfs.8"
    page.write_text(page.read_text().replace("volume label", "label"))
    assert gm.main(["--check", str(tmp_path)]) == 1
    assert "mkfs.pmfs.8" in capsys.readouterr().err
    # the script itself runs (shebang python, imports from the checkout)
    r = sh(sys.executable, os.path.join(ROOT, "tools", "gen-man"), "--check", tmp_path)
    assert r.returncode == 1 and "mkfs.pmfs.8" in r.stderr


# --------------------------------------------------------------------------
# bash completion
# --------------------------------------------------------------------------


def complete(words: list[str], cwd: str) -> list[str]:
    """What the generated completion offers for the last of `words`."""
    script = os.path.join(ROOT, "docs", "completion", "pmfs.bash")
    fn = {"mkfs.pmfs": "_pmfs_mkfs", "mount.pmfs": "_pmfs_mount", "pmfs": "_pmfs_mount",
          "fsck.pmfs": "_pmfs_fsck", "pmfs-inspect": "_pmfs_inspect"}[words[0]]
    arr = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    cmd = (f". {script}; COMP_WORDS=({arr}); COMP_CWORD={len(words) - 1}; {fn}; "
           f"printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", cmd], capture_output=True,
                       text=True, cwd=cwd, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return [w for w in r.stdout.split("\n") if w]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completion(tmp_path):
    assert load_gen_man().main(["--check"]) == 0  # docs/completion/pmfs.bash is current
    (tmp_path / "disk.img").write_bytes(b"")
    (tmp_path / "dir").mkdir()
    # every option of every program
    for name, build in PARSERS.items():
        opts, _subs = options_of(build())
        assert sorted(complete([name, "-"], tmp_path)) == sorted(opts), name
    assert complete(["mkfs.pmfs", "-L", "x"], tmp_path) == []  # a value, not a file
    assert sorted(complete(["mkfs.pmfs", "di"], tmp_path)) == ["dir", "disk.img"]
    # mount -o: every key parse_options accepts, comma after comma
    offered = complete(["mount.pmfs", "x.img", "/mnt", "-o", ""], tmp_path)
    keys = {w.rstrip("=") for w in offered}
    assert keys == mount_option_keys()
    assert "log=" in offered and "ro" in offered and "ro=" not in offered
    assert complete(["mount.pmfs", "x.img", "/mnt", "-o", "ro,sy"], tmp_path) == ["ro,sync"]
    assert complete(["pmfs", "x.img", "/mnt", "-o", "noatime,lo"], tmp_path) == \
        ["noatime,log="]
    # pmfs-inspect: the image, then its commands
    assert complete(["pmfs-inspect", "--json", "dis"], tmp_path) == ["disk.img"]
    assert complete(["pmfs-inspect", "disk.img", ""], tmp_path) == \
        ["summary", "inode", "stat", "ls", "orphans", "wal", "cat"]
    assert complete(["pmfs-inspect", "--json", "disk.img", "o"], tmp_path) == ["orphans"]
