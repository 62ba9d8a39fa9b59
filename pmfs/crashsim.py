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
4. ``stores``: the durable state plus every subset of 1..k of the pending
   *stores* (the write calls since the last fence whose lines are not all
   durable yet), each persisted whole: every line it wrote at its content
   right after that store (so with every earlier store to that line, in
   program order).  This is Chipmunk's unit: it is what makes a whole
   multi-line log record durable while the data it depends on is not.
   Pairs beyond `max_states` are a fixed-seed sample.

States are returned as patches against the durable image so that callers
can build the bytes only when they need them.

Two extensions used by the crash explorer (pmfs/crashtest.py):

* ``torn=True`` models the 8-byte store as the unit of atomicity: a store
  of more than one aligned 8-byte word to a line is split into its words,
  so the single-line states include every word-prefix of it (a 64-byte
  memcpy torn by an eviction).  The extra word-prefix states are sampled
  to at most `max_torn` per point.
* every image has a 128-bit *key*: the sum, over the lines where it differs
  from a reference image, of a hash of (line number, content).  Keys are
  maintained incrementally at fences, so the key of a state costs only its
  patch (`key_of`), and equal images at different crash points (e.g. the
  in-flight state of one fence and the durable state of the next) get equal
  keys.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import xxhash

from .pmem import CACHELINE, EV_FENCE, EV_FLUSH, EV_MARK, EV_STORE

_L = CACHELINE
_MASK128 = (1 << 128) - 1
_h128 = xxhash.xxh3_128_intdigest


def line_hash(ln: int, content) -> int:
    """The hash of one line of an image at line number `ln`."""
    return _h128(content, ln)


def diff_key(reference: bytes, image) -> int:
    """The key of `image` relative to `reference` (same length)."""
    key = 0
    bs = 4096
    mv_r = memoryview(reference)
    mv_i = memoryview(image)
    for b in range(0, len(reference), bs):
        if mv_r[b:b + bs] == mv_i[b:b + bs]:
            continue
        for o in range(b, min(b + bs, len(reference)), _L):
            c = mv_i[o:o + _L]
            if c != mv_r[o:o + _L]:
                key += line_hash(o // _L, c)
    return key & _MASK128


@dataclass
class CrashState:
    point: int  # index of the event the crash precedes
    kind: str  # "durable" | "inflight" | "subset" | "torn"
    #: {line number: 64 bytes} that differ from the durable image
    patch: dict
    #: the lines (and prefix depth) chosen, for reproducers
    chosen: tuple = ()

    def key(self):
        return frozenset(self.patch.items())


class CrashSimulator:
    """Replays a trace once, producing crash states at the points asked for.

    `reference`: the image keys are relative to (default: `initial`); give
    the same reference to simulators whose keys must be comparable.
    `torn`/`max_torn`: see the module docstring.
    """

    def __init__(self, initial: bytes, events: list, reference: bytes | None = None,
                 torn: bool = False, max_torn: int | None = 64):
        self.initial = initial
        self.events = events
        self.size = len(initial)
        self.reference = initial if reference is None else reference
        self.base_key = 0 if reference is None else diff_key(reference, initial)
        #: the key of the durable image at the point being yielded
        self.durable_key = self.base_key
        self.torn = torn
        self.max_torn = max_torn

    def key_of(self, durable, patch: dict) -> int:
        """The key of the durable image (of the point being yielded) with `patch`."""
        key = self.durable_key
        ref = self.reference
        for ln, c in patch.items():
            o = ln * _L
            old = durable[o:o + _L]
            r = ref[o:o + _L]
            if old != r:
                key -= line_hash(ln, old)
            if c != r:
                key += line_hash(ln, c)
        return key & _MASK128

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
        self.durable_key = self.base_key
        ref = self.reference
        torn = self.torn
        #: line -> number of entries of hist[line] that are word-level
        #: intermediates (torn mode), as a set of indices
        self._torn_idx = torn_idx = {}
        #: line -> absolute store count of hist[line][0]
        hist_base: dict = {}
        #: [(event index, [(line, absolute index into its history)])]
        stores: list = []
        for i in range(len(ev) + 1):
            while pi < len(pts) and pts[pi] == i:
                yield i, bytes(durable), self._point_states(
                    i, durable, hist, flushed, k, max_states, rng, inflight_only_subsets,
                    stores, hist_base)
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
                rec = []
                while ln <= last:
                    base = ln * _L
                    c = cache.get(ln)
                    if c is None:
                        c = cache[ln] = bytearray(durable[base:base + _L])
                    a = max(off, base) - base
                    b = min(off + n, base + _L) - base
                    h = hist.setdefault(ln, [])
                    if torn and b - a > 8:
                        # word by word (8-byte aligned words are atomic)
                        w = a
                        while w < b:
                            we = min(b, (w // 8 + 1) * 8)
                            c[w:we] = data[p + (w - a):p + (we - a)]
                            w = we
                            if w < b:
                                torn_idx.setdefault(ln, set()).add(len(h))
                            h.append(bytes(c))
                    else:
                        c[a:b] = data[p:p + (b - a)]
                        h.append(bytes(c))
                    rec.append((ln, hist_base.get(ln, 0) + len(h) - 1))
                    p += b - a
                    ln += 1
                stores.append((i, rec))
            elif kind == EV_FLUSH:
                off, n = e[1], e[2]
                for ln in range(off // _L, (off + n - 1) // _L + 1):
                    h = hist.get(ln)
                    if h:
                        flushed[ln] = len(h) - 1
            elif kind == EV_FENCE:
                key = self.durable_key
                for ln, idx in flushed.items():
                    h = hist[ln]
                    content = h[idx]
                    o = ln * _L
                    old = durable[o:o + _L]
                    if old != content:
                        r = ref[o:o + _L]
                        if old != r:
                            key -= line_hash(ln, old)
                        if content != r:
                            key += line_hash(ln, content)
                        durable[o:o + _L] = content
                    rest = h[idx + 1:]
                    hist_base[ln] = hist_base.get(ln, 0) + idx + 1
                    if rest:
                        hist[ln] = rest
                    else:
                        del hist[ln]
                    ti = torn_idx.get(ln)
                    if ti:
                        ti = {j - idx - 1 for j in ti if j > idx}
                        if ti and rest:
                            torn_idx[ln] = ti
                        else:
                            del torn_idx[ln]
                self.durable_key = key & _MASK128
                flushed.clear()
                stores[:] = [(j, rec) for j, rec in stores
                             if any(a >= hist_base.get(ln, 0) for ln, a in rec)]

    def _point_states(self, point, durable, hist, flushed, k, max_states, rng,
                      inflight_only, stores=(), hist_base=None):
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
        torn_singles = []
        torn_idx = getattr(self, "_torn_idx", {})
        for ln in dirty:
            h = hist[ln]
            ti = torn_idx.get(ln, ())
            for depth in range(len(h)):
                (torn_singles if depth in ti else singles).append(
                    ({ln: h[depth]}, ((ln, depth),)))
        for patch, chosen in singles:
            add("subset", patch, chosen)
        if torn_singles:
            if self.max_torn is not None and len(torn_singles) > self.max_torn:
                torn_singles = rng.sample(torn_singles, self.max_torn)
            for patch, chosen in torn_singles:
                add("torn", patch, chosen)
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
        if not inflight_only and stores:
            self._store_states(add, hist, stores, hist_base or {}, k, max_states, rng)
        return out

    @staticmethod
    def _store_states(add, hist, stores, hist_base, k, max_states, rng) -> None:
        pend = []
        for evi, rec in stores:
            lines = {}
            for ln, a in rec:
                rel = a - hist_base.get(ln, 0)
                if rel >= 0 and rel > lines.get(ln, -1):
                    lines[ln] = rel
            if lines:
                pend.append((evi, lines))
        for evi, lines in pend:
            add("stores", {ln: hist[ln][r] for ln, r in lines.items()}, (("store", evi),))
        combos = []
        for size in range(2, k + 1):
            if len(pend) < size:
                break
            combos.append(itertools.combinations(range(len(pend)), size))
        all_combos = list(itertools.chain(*combos))
        if max_states is not None and len(all_combos) > max_states:
            all_combos = sorted(rng.sample(all_combos, max_states))
        for c in all_combos:
            lines: dict = {}
            for j in c:
                for ln, r in pend[j][1].items():
                    if r > lines.get(ln, -1):
                        lines[ln] = r
            add("stores", {ln: hist[ln][r] for ln, r in lines.items()},
                tuple(("store", pend[j][0]) for j in c))


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
