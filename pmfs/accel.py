"""The optional C versions of a commit's hot loops (pmfs/_accel.c).

`ACCEL` is the compiled module, or None when it is not built or when
``PMFS_NO_ACCEL=1`` is set (then pure Python does the same work: the
callers in pmem.py, layout.py and wal.py keep their Python loops, and
tests/test_accel.py checks that both give the same bytes).  It imports
nothing else of pmfs, so every layer may use it.
"""

from __future__ import annotations

import os

ACCEL = None
_why = "PMFS_NO_ACCEL is set"
if not os.environ.get("PMFS_NO_ACCEL"):
    try:
        from . import _accel as ACCEL  # noqa: N812
    except ImportError as e:  # not built: a source tree without `pip install`
        _why = f"not built ({e})"


def describe() -> str:
    """One line for logs and reports: which commit path this process uses."""
    if ACCEL is not None:
        return "C (pmfs._accel)"
    return f"pure Python ({_why})"
