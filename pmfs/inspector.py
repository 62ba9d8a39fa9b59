"""pmfs-inspect: read-only inspection of a pmfs image (not implemented yet)."""

import sys


def main(argv=None) -> None:
    print("pmfs-inspect: not implemented yet", file=sys.stderr)
    sys.exit(8)
