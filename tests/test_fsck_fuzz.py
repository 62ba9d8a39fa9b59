"""fsck.pmfs under random damage (a short fixed-seed run of tools/fsck-fuzz).

40 cases on 4 and 8 MiB images holding a populated tree (some starting
from a crash state with log records to replay and an orphan): random bit
flips and zeroed ranges, mostly in live metadata.  For each case: the
check never raises and never hangs (a per-case alarm and the pytest
timeout), check-only changes no byte and predicts exactly what the repair
does, the repair succeeds, the repaired image mounts, every file reads
back, and a second check is clean.  The only accepted failure to repair is
an image whose two superblock replicas were both destroyed (exit 8).

`tools/fsck-fuzz --cases 5000` runs the long version.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os

import pytest

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                    "fsck-fuzz")


def load_tool():
    loader = importlib.machinery.SourceFileLoader("fsck_fuzz", TOOL)
    spec = importlib.util.spec_from_loader("fsck_fuzz", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed,damage", [(1000, 10), (2000, 40)])
def test_fsck_survives_random_damage(seed, damage):
    tool = load_tool()
    lines = []
    counts, failures = tool.run_cases(seed, 20, [4, 8], nmax=damage, timeout=60,
                                      out=lines.append)
    assert not failures, "\n".join(lines)
    assert sum(counts.values()) == 20
    # the damage is real: nearly every case needed repairs
    assert counts["repaired"] >= 15, counts


def test_fuzz_tool_reports_a_failure(monkeypatch):
    """The harness itself can fail: a check that changes the image is caught."""
    tool = load_tool()
    real_check = tool.check

    def bad_check(img, repair=False, **kw):
        r = real_check(img, repair=repair, **kw)
        if not repair:
            img.write(0, b"X")
        return r
    monkeypatch.setattr(tool, "check", bad_check)
    lines = []
    counts, failures = tool.run_cases(7, 2, [4], out=lines.append, timeout=0)
    assert counts["modified-by-check"] == 2 and len(failures) == 2


def test_fuzz_tool_command_line(capsys):
    tool = load_tool()
    assert tool.main(["--cases", "3", "--seed", "5", "--size", "4"]) == 0
    out = capsys.readouterr().out
    assert "3 cases" in out and "all cases passed" in out
