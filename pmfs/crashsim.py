"""Crash-state construction from a trace of stores, flushes and fences.

Given the image content when tracing began and the events a TracingImage
recorded, `CrashSimulator` builds the images a power failure could leave at
a crash point (just before a given event), under this persistence model:

* a store changes the CPU cache, not the media;
* the media can receive a cache line at any time (eviction), holding the
  line's content at that moment; stores to one line reach the media in
  program order, so a line on the media is always at one of its "prefix"
  states: its last durable content, or its content after any later store;
* an 8-byte aligned store is atomic (a line never holds half of one);
* flush + fence makes the line's content as of the flush durable.

For each crash point it yields, deduplicated:

1. ``durable``: every line at its durable content (all unflushed and
   unfenced stores lost);
2. ``inflight``: that plus every flushed-but-unfenced line at its flushed
   content;
3. ``subset``: the durable state plus every subset of 1..k of the dirty
   lines (flushed or not) at their latest content, and (for single lines)
   at each intermediate prefix state.  `max_states` caps how many subset
   states a point yields (a fixed-seed sample beyond the systematic
   single-line ones).

States are returned as patches against the durable image so that callers
can build the bytes only when they need them.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from .pmem import CACHELINE, EV_FENCE, EV_FLUSH, EV_MARK, EV_STORE

_L = CACHELINE


@dataclass
class CrashState:
    point: int  # index of the event the crash precedes
    kind: str  # "durable" | "inflight" | "subset"
    #: {line number: 64 bytes} that differ from the durable image
    patch: dict
    #: the lines (and prefix depth) chosen, for reproducers
    chosen: tuple = ()

    def key(self):
        return frozenset(self.patch.items())


class CrashSimulator:
    """Replays a trace once, producing crash states at the points asked for."""

    def __init__(self, initial: bytes, events: list):
        self.initial = initial
        self.events = events
        self.size = len(initial)

    def fence_points(self) -> list[int]:
        """Indices of every fence, plus the end of the trace."""
        pts = [i for i, e in enumerate(self.events) if e[0] == EV_FENCE]
        pts.append(len(self.events))
        return pts

    def store_points(self) -> list[int]:
        """Indices of every store and fence, plus the end of the trace."""
        pts = [i for i, e in enumerate(self.events) if e[0] in (EV_STORE, EV_FENCE)]
        pts.append(len(self.events))
        return pts

    def marks(self) -> list[tuple[int, str, dict]]:
        return [(i, e[1], e[2]) for i, e in enumerate(self.events) if e[0] == EV_MARK]

    def states(self, points=None, k: int = 2, max_states: int | None = None,
               seed: int = 0, inflight_only_subsets: bool = False):
        """Yield (point, durable image bytes, [CrashState]) for each point.

        The durable image is shared between the states of a point; apply a
        state's patch to a copy of it (see `apply`)."""
        pts = sorted(set(self.fence_points() if points is None else points))
        rng = random.Random(seed)
        durable = bytearray(self.initial)
        cache = {}  # line -> bytearray latest content (lines touched)
        hist = {}  # line -> [bytes after each store since durable]
        flushed = {}  # line -> index into hist captured by a flush, pending fence
        ev = self.events
        pi = 0
        for i in range(len(ev) + 1):
            while pi < len(pts) and pts[pi] == i:
                yield i, bytes(durable), self._point_states(
                    i, durable, hist, flushed, k, max_states, rng, inflight_only_subsets)
                pi += 1
            if pi >= len(pts) or i == len(ev):
                break
            e = ev[i]
            kind = e[0]
            if kind == EV_STORE:
                off, data = e[1], e[2]
                n = len(data)
                ln = off // _L
                last = (off + n - 1) // _L
                p = 0
                while ln <= last:
                    base = ln * _L
                    c = cache.get(ln)
                    if c is None:
                        c = cache[ln] = bytearray(durable[base:base + _L])
                    a = max(off, base) - base
                    b = min(off + n, base + _L) - base
                    c[a:b] = data[p:p + (b - a)]
                    p += b - a
                    hist.setdefault(ln, []).append(bytes(c))
                    ln += 1
            elif kind == EV_FLUSH:
                off, n = e[1], e[2]
                for ln in range(off // _L, (off + n - 1) // _L + 1):
                    h = hist.get(ln)
                    if h:
                        flushed[ln] = len(h) - 1
            elif kind == EV_FENCE:
                for ln, idx in flushed.items():
                    h = hist[ln]
                    content = h[idx]
                    durable[ln * _L:(ln + 1) * _L] = content
                    rest = h[idx + 1:]
                    if rest:
                        hist[ln] = rest
                    else:
                        del hist[ln]
                flushed.clear()

    def _point_states(self, point, durable, hist, flushed, k, max_states, rng,
                      inflight_only):
        out = []
        seen = set()

        def add(kind, patch, chosen=()):
            # drop lines equal to the durable content
            patch = {ln: c for ln, c in patch.items()
                     if durable[ln * _L:(ln + 1) * _L] != c}
            st = CrashState(point, kind, patch, chosen)
            key = st.key()
            if key in seen:
                return
            seen.add(key)
            out.append(st)

        add("durable", {})
        if flushed:
            add("inflight", {ln: hist[ln][idx] for ln, idx in flushed.items()},
                tuple(sorted(flushed)))
        dirty = sorted(flushed) if inflight_only else sorted(hist)
        if not dirty or k <= 0:
            return out
        singles = []
        for ln in dirty:
            h = hist[ln]
            for depth in range(len(h)):
                singles.append(({ln: h[depth]}, ((ln, depth),)))
        for patch, chosen in singles:
            add("subset", patch, chosen)
        combos = []
        for size in range(2, k + 1):
            if len(dirty) < size:
                break
            combos.append(itertools.combinations(dirty, size))
        sampled = 0
        budget = None if max_states is None else max(0, max_states - len(out))
        all_combos = itertools.chain(*combos)
        if budget is not None:
            # reservoir sample of the combinations, fixed seed
            pool = []
            for j, c in enumerate(all_combos):
                if len(pool) < budget:
                    pool.append(c)
                else:
                    r = rng.randint(0, j)
                    if r < budget:
                        pool[r] = c
            all_combos = iter(sorted(pool))
        for c in all_combos:
            add("subset", {ln: hist[ln][-1] for ln in c}, tuple((ln, -1) for ln in c))
            sampled += 1
        return out


def apply(durable: bytes, state: CrashState) -> bytearray:
    """The crash image of `state` (a new bytearray)."""
    img = bytearray(durable)
    for ln, content in state.patch.items():
        img[ln * _L:(ln + 1) * _L] = content
    return img


def final_durable(initial: bytes, events: list) -> bytes:
    """The image if the crash came after the last event (only fenced data)."""
    sim = CrashSimulator(initial, events)
    for _i, durable, _states in sim.states(points=[len(events)], k=0):
        return durable
    return initial
