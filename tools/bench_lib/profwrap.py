"""Run a module (the pmfs daemon) with a cProfile window switched by SIGUSR1.

    python profwrap.py OUTPREFIX -m MODULE ARGS...

The first SIGUSR1 starts profiling, the next one stops it and writes
OUTPREFIX.<k>.prof (k = 1, 2, ...), then OUTPREFIX.<k>.done.  Only the
main thread is profiled; pmfs's request loop runs every handler there.
"""

import os
import sys

# this script's directory (tools/bench_lib) must not shadow standard modules
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import cProfile  # noqa: E402
import runpy  # noqa: E402
import signal  # noqa: E402


def main() -> None:
    prefix = sys.argv[1]
    if sys.argv[2] != "-m":
        raise SystemExit("usage: profwrap.py OUTPREFIX -m MODULE ARGS...")
    module = sys.argv[3]
    state = {"prof": None, "k": 0}

    def toggle(signum, frame):
        if state["prof"] is None:
            p = cProfile.Profile()
            state["prof"] = p
            p.enable()
        else:
            p = state["prof"]
            p.disable()
            state["prof"] = None
            state["k"] += 1
            out = f"{prefix}.{state['k']}"
            p.dump_stats(out + ".prof")
            with open(out + ".done", "w"):
                pass

    signal.signal(signal.SIGUSR1, toggle)
    sys.argv = [module] + sys.argv[4:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
