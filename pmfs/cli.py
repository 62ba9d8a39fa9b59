"""Shared plumbing of the command-line programs: errors, sizes, progress.

Every program reports a user error as one line, ``prog: what is wrong``,
and exits with its conventional code; a traceback is printed only with
``--debug`` (or PMFS_DEBUG=1).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import shutil
import sys
import time
import traceback

from .layout import FormatError
from .pmem import ImageError
from .superblock import SuperblockError


class QuietError(Exception):
    """An error to report as one line (no traceback) with an exit code."""

    def __init__(self, msg: str, code: int | None = None):
        super().__init__(msg)
        self.code = code


class UsageError(QuietError):
    """Wrong arguments: exits with the program's usage code."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting with 2."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b?)\s*$", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
          "e": 1 << 60}


def parse_size(text: str) -> int:
    """'4096', '64M', '8G', '1.5GiB', '512k' -> bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"invalid size {text!r} (use e.g. 4096, 64M, 8G)")
    num, unit, _suffix = m.groups()
    val = float(num) * _UNITS[unit.lower()]
    if val != int(val):
        raise UsageError(f"size {text!r} is not a whole number of bytes")
    return int(val)


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def debug_enabled(argv=None) -> bool:
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or os.environ.get("PMFS_DEBUG") == "1"


def run(prog: str, fn, argv=None, usage_code: int = 16, error_code: int = 8,
        interrupt_code: int = 130) -> int:
    """Run fn(argv) and turn exceptions into one-line messages + exit codes."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        rc = fn(argv)
        return 0 if rc is None else rc
    except UsageError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.code if e.code is not None else usage_code
    except QuietError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.code if e.code is not None else error_code
    except (ImageError, SuperblockError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return error_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return interrupt_code
    except FormatError as e:
        if debug_enabled(argv):
            traceback.print_exc()
        print(f"{prog}: damaged file system: {e}; run fsck.pmfs", file=sys.stderr)
        return error_code
    except OSError as e:
        if debug_enabled(argv):
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        msg = e.strerror or os.strerror(e.errno or errno.EIO)
        if e.errno == errno.ENOSPC:
            msg = "no space left on the file system"
        print(f"{prog}: {where}{msg}", file=sys.stderr)
        return error_code
    except Exception as e:  # a bug: one line, traceback on request
        if debug_enabled(argv):
            traceback.print_exc()
        print(f"{prog}: internal error: {type(e).__name__}: {e} "
              f"(run with --debug for details)", file=sys.stderr)
        return error_code


class Progress:
    """A live progress line on a terminal; silent otherwise (or when quiet).

    ``update(done, total, label)`` shows ``label:  45.0%``; ``status(text)``
    shows any text (``round 3/5: checking``).  Both rewrite one line in
    place (carriage return + erase), at most ten times a second, cut to
    the terminal's width.  ``clear()`` erases the line, so that a program
    can print a permanent line without garbling it; ``done(msg)`` erases
    it and prints `msg` in its place.  When the stream is not a terminal
    (a pipe, a file, a CI log) nothing at all is written.
    """

    def __init__(self, label: str = "", quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = not quiet and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.label = label
        self._last = 0.0
        self._shown = False

    def _show(self, text: str) -> None:
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r\033[K" + text[:max(width, 20)])
        self.stream.flush()
        self._shown = True

    def update(self, done: float, total: float, label: str | None = None,
               detail: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        if label is not None:
            self.label = label
        pct = 100.0 * done / total if total else 100.0
        self._show(f"{self.label}: {pct:5.1f}%" + (f" {detail}" if detail else ""))

    def status(self, text: str, force: bool = False) -> None:
        """Show `text` as the live line (rate-limited unless `force`)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        self._show(text)

    def clear(self) -> None:
        """Erase the live line (before printing something permanent)."""
        if self.enabled and self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
        self._shown = False

    def done(self, msg: str | None = None) -> None:
        if self.enabled and self._shown:
            self.stream.write("\r\033[K")
            if msg:
                self.stream.write(msg + "\n")
            self.stream.flush()
        self._shown = False


def setup_logging(debug: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if debug else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(name)s: %(levelname)s: %(message)s")
