"""Exact per-unit quantiles out of core: counting passes over ordered keys.

np.quantile(values, q, method="linear") needs, per unit of n values, the
order statistics at ranks floor((n-1)q) and the next one, then numpy's
``_lerp``. Each value maps to an unsigned key with the order of the values
(``to_values`` inverts it). Per unit and wanted rank a *slot* is a range of
keys known to hold that rank: a pass over the data either counts the
slot's keys in up to 2**D buckets of equal width (then the slot narrows to
the bucket holding the rank) or, once the slot holds few enough keys, collects
them (then a sort of that small buffer gives the key). The first pass is
the moments pass: where the keys allow it, it samples every unit and the
second pass is a *probe* (``probe``: bnstat.quantile_probe) that collects
the keys of the sample's intervals and counts the values below them;
otherwise (int64, uint64, and the Dask passes) it counts the top D1 bits of
every key of every unit.

Bounds (README "Exact quantiles"): counters and collected keys take at most
``COUNTER_BYTES`` (64 MiB; at least 256 buckets per slot), beside the chunk;
a pass divides a slot's key range by at least 2**8, so a unit is resolved
after at most 1 + ceil((w - D1) / D) + 1 passes for w-bit keys (w = 8, 16,
32 or 64; float16 data is widened to float32 keys), counted after the probe
where there is one. Typical float32 data: 2 passes (the moments pass with
its sample, the probe).
"""

from __future__ import annotations

import math

import numpy as np

COUNTER_BYTES = 64 * 1024**2
MIN_BITS, MAX_BITS = 8, 16
SIGN = 1 << 63


def key_width(dtype: np.dtype) -> int:
    """Bits of the keys of a kernel input dtype (float16 is read as float32)."""
    dtype = np.dtype(dtype)
    return 32 if dtype == np.float16 else dtype.itemsize * 8


def key_span(dtype: np.dtype) -> tuple[int, int]:
    """The (lowest, highest) unsigned key a value of ``dtype`` can have."""
    dtype = np.dtype(dtype)
    if dtype.kind == "u":
        return 0, (1 << (dtype.itemsize * 8)) - 1
    half = 1 << (key_width(dtype) - 1)
    return SIGN - half, SIGN + half - 1


def _finite_key_span(dtype: np.dtype) -> tuple[int, int]:
    """The keys of -inf and +inf of a float dtype (NaN keys lie outside)."""
    k = to_keys(np.array([-np.inf, np.inf]), dtype)
    return int(k[0]), int(k[1])


def to_keys(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The unsigned keys of float values of a float ``dtype`` (the inverse of ``to_values``)."""
    if key_width(dtype) == 32:
        i = np.asarray(values, np.float32).view(np.int32).astype(np.int64)
        k = i ^ ((i >> 31) & 0x7FFFFFFF)
    else:
        i = np.asarray(values, np.float64).view(np.int64)
        k = i ^ ((i >> 63) & np.int64(0x7FFFFFFFFFFFFFFF))
    return k.view(np.uint64) ^ np.uint64(SIGN)


def keys_of(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The unsigned keys of values of ``dtype`` (kernels.select._kat)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return to_keys(values, dtype)
    v = np.asarray(values)
    if dtype.kind == "u":
        return v.astype(np.uint64)
    return v.astype(np.int64).view(np.uint64) ^ np.uint64(SIGN)


def to_values(keys: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float64 values of unsigned keys of ``dtype`` (the inverse of kernels.select._kat)."""
    dtype = np.dtype(dtype)
    keys = np.asarray(keys, dtype=np.uint64)
    if dtype.kind == "u":
        return keys.astype(np.float64)
    signed = (keys ^ np.uint64(SIGN)).view(np.int64)
    if dtype.kind in "iu":
        return signed.astype(np.float64)
    if key_width(dtype) == 32:
        i = signed.astype(np.int32)
        bits = i ^ ((i >> 31) & np.int32(0x7FFFFFFF))
        return bits.view(np.float32).astype(np.float64)
    bits = signed ^ ((signed >> 63) & np.int64(0x7FFFFFFFFFFFFFFF))
    return bits.view(np.float64)


def ranks(n: np.ndarray, q: np.ndarray):
    """numpy's (previous, next) sorted indices and gamma for counts ``n`` (units,) and ``q``.

    _get_indexes and _get_gamma of numpy's _quantile, method "linear": virtual
    index (n - 1) * q; at or past the last index both neighbours are the last
    value (index -1, kept as n - 1 here) and gamma is computed from -1, as numpy does.
    """
    n = np.asarray(n, dtype=np.int64)
    virtual = (n[:, None] - 1).astype(np.float64) * q[None, :]
    prev = np.floor(virtual)
    above = virtual >= (n[:, None] - 1)
    prev[above] = -1
    prev_i = prev.astype(np.intp)
    gamma = virtual - prev_i
    nxt_i = prev_i + 1
    nxt_i[above] = -1
    last = np.broadcast_to(n[:, None] - 1, prev_i.shape)
    return np.where(prev_i < 0, last, prev_i), np.where(nxt_i < 0, last, nxt_i), gamma


def lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy's _lerp, operation for operation (so the result is bit-identical)."""
    diff = b - a
    out = np.add(a, diff * t)
    np.subtract(b, diff * (1 - t), out=out, where=t >= 0.5)
    return out


def bits_for(n_slots: int) -> int:
    """Bucket bits per slot for ``n_slots`` slots within COUNTER_BYTES."""
    per = COUNTER_BYTES // (8 * max(1, n_slots))
    return max(MIN_BITS, min(MAX_BITS, per.bit_length() - 1))


class Selector:
    """The exact quantile search of one array's units (see the module docstring).

    ``n_units`` units of keys of ``dtype``; ``first_pass()`` gives the tables of the
    pass that runs with the moments (every unit counts its top bits); after each pass
    ``advance(counts, keys)`` narrows the slots; ``done`` when every rank is known.
    """

    def __init__(self, n_units: int, dtype, q):
        self.n_units = n_units
        self.dtype = np.dtype(dtype)
        self.q = np.asarray(q, dtype=np.float64)
        self.width = key_width(self.dtype)
        lo, hi = key_span(self.dtype)
        d1 = min(self.width, bits_for(n_units))
        # per unit: a list of slots [lo, hi, shift, collect, [(rank, target index)...], count]
        self.slots = [[[lo, hi, self.width - d1, False, None, None]] for _ in range(n_units)]
        self.found: dict[tuple[int, int], int] = {}  # (unit, rank) -> key
        self.passes = 0
        self.wanted = None
        self.probing = False  # the next pass is a probe pass (``probe``)
        self.threads = 1  # for the sorts after a pass (numpy's release the GIL)
        self.zeros = None  # after a probe pass: every unit's zeros

    def tables(self):
        """Flat tables of the next pass: nslot (U,), slo/shi/shift/base/collect/pos (U, S),
        and the sizes of the counts and keys buffers."""
        S = max(1, max(len(s) for s in self.slots))
        U = self.n_units
        nslot = np.zeros(U, np.int64)
        slo = np.zeros((U, S), np.uint64)
        shi = np.zeros((U, S), np.uint64)
        shift = np.zeros((U, S), np.uint64)
        base = np.zeros((U, S), np.int64)
        collect = np.zeros((U, S), np.bool_)
        pos = np.zeros((U, S), np.int64)
        pend = np.zeros((U, S), np.int64)
        n_counts = n_keys = 0
        for u, slots in enumerate(self.slots):
            nslot[u] = len(slots)
            for j, (lo, hi, sh, coll, _, cnt) in enumerate(slots):
                slo[u, j], shi[u, j], shift[u, j], collect[u, j] = lo, hi, sh, coll
                if coll:  # room for its count (a probe slot's: its capacity)
                    pos[u, j] = n_keys
                    n_keys += cnt
                    pend[u, j] = n_keys
                else:
                    base[u, j] = n_counts
                    n_counts += ((hi - lo) >> sh) + 1
        self._layout = (base.copy(), pos.copy())
        t = dict(nslot=nslot, slo=slo, shi=shi, sshift=shift, sbase=base, scollect=collect, pos=pos,
                 pend=pend, n_counts=n_counts, n_keys=n_keys)
        if self.probing:
            t.update(self._probe_filter(S), below=np.zeros((U, S + 1), np.int64))  # + the zeros
        else:
            t.update(self._filter())
        return t

    def _probe_filter(self, S: int):
        """The intervals of a probe pass: one per slot, in order (the kernel counts the values
        below each, which are the keys below the slot: bnstat.quantile_probe)."""
        U = self.n_units
        nint = np.zeros(U, np.int64)
        ilo = np.zeros((U, S))
        ihi = np.zeros((U, S))
        for u, slots in enumerate(self.slots):
            if slots:
                ends = to_values(np.array([s[:2] for s in slots], dtype=np.uint64).ravel(),
                                 self.dtype).reshape(-1, 2)
                nint[u] = len(slots)
                ilo[u, :len(slots)] = ends[:, 0]
                ihi[u, :len(slots)] = ends[:, 1]
        return dict(nint=nint, ilo=ilo, ihi=ihi)

    def _filter(self):
        """The value intervals of the pass's search (kernels.select._select4): per unit, the
        union of its slots' ranges as float64 intervals (adjacent ones joined). NaN keys
        are left out (NaN is never counted); each end is the value of a key, so the
        float64 value of every key of a slot is inside (ties of -0.0 and +0.0 and of
        int64 values that round alike only widen an interval)."""
        U = self.n_units
        S = max(1, max(len(s) for s in self.slots))
        nint = np.zeros(U, np.int64)
        ilo = np.zeros((U, S))
        ihi = np.zeros((U, S))
        lo_ok, hi_ok = key_span(self.dtype) if self.dtype.kind in "iu" else _finite_key_span(self.dtype)
        for u, slots in enumerate(self.slots):
            runs = []
            for lo, hi, *_ in sorted(slots):
                lo, hi = max(lo, lo_ok), min(hi, hi_ok)
                if lo > hi:
                    continue
                if runs and lo <= runs[-1][1] + 1:
                    runs[-1][1] = max(runs[-1][1], hi)
                else:
                    runs.append([lo, hi])
            if runs:
                ends = to_values(np.array(runs, dtype=np.uint64).ravel(), self.dtype).reshape(-1, 2)
                nint[u] = len(runs)
                ilo[u, :len(runs)] = ends[:, 0]
                ihi[u, :len(runs)] = ends[:, 1]
        return dict(nint=nint, ilo=ilo, ihi=ihi)

    def set_counts(self, n: np.ndarray) -> None:
        """The non-NaN count of every unit (known after the first pass): the wanted ranks, the
        targets of each unit's first slot. Also the true counts after a probe pass planned on
        estimated ones (a sample read ahead of the first pass, bnstat.histrun): a probe pass's
        counts and keys do not depend on the ranks, and ``_advance_probe`` places the first
        slot's targets (the other slots' are cleared)."""
        prev, nxt, self.gamma = ranks(n, self.q)
        self.n = np.asarray(n, np.int64)
        self.prev, self.next = prev, nxt
        for u, slots in enumerate(self.slots):
            want = sorted(set(prev[u].tolist()) | set(nxt[u].tolist())) if self.n[u] > 0 else []
            if not (want and slots):
                self.slots[u] = []
                continue
            for sl in slots[1:]:
                sl[4] = []
            slots[0][4] = [(r, r) for r in want]

    @property
    def done(self) -> bool:
        return all(not s for s in self.slots)

    def advance(self, tables: dict) -> None:
        """Narrow every slot by the pass's ``tables`` (``pass_tables`` after the pass: its
        counts and collected keys; after a probe, its final positions and counts below)."""
        counts, keys = tables["counts"], tables["keys"]
        if self.probing:
            self._advance_probe(counts, keys, tables["pos"], tables["below"])
            return
        base, pos = self._layout
        self.passes += 1
        bits, limit = self._budget()
        for u, slots in enumerate(self.slots):
            new = []
            for j, (lo, hi, sh, coll, targets, cnt) in enumerate(slots):
                if coll:
                    got = np.sort(keys[pos[u, j]:pos[u, j] + cnt])
                    for rank, r in targets:
                        self.found[(u, rank)] = int(got[r])
                    continue
                nb = ((hi - lo) >> sh) + 1
                self._split(u, lo, sh, hi, counts[base[u, j]:base[u, j] + nb], targets, bits, limit, new)
            self._set(u, new)

    def _set(self, u: int, new: list) -> None:
        """Unit u's slots for the next pass, in ascending order (kernels.select._select_slots)."""
        self.slots[u] = sorted(new, key=lambda sl: sl[0])

    def _budget(self) -> tuple[int, int]:
        """(bucket bits, most keys collected) per slot of the next pass."""
        n_slots = sum(len(s) for s in self.slots)
        return bits_for(n_slots * 2), COUNTER_BYTES // (8 * max(1, 2 * n_slots))

    def _split(self, u, lo, sh, hi, c, targets, bits, limit, new) -> None:
        """The buckets ``c`` of the counting slot lo..hi (width 2**sh) holding ``targets``
        (rank, index among the slot's keys): the slots of the next pass, into ``new``."""
        cum = np.cumsum(c)
        by_bucket: dict[int, list] = {}
        for rank, r in targets:
            b = int(np.searchsorted(cum, r, side="right"))
            below = int(cum[b - 1]) if b else 0
            by_bucket.setdefault(b, []).append((rank, r - below))
        for b, tg in by_bucket.items():
            blo = lo + (b << sh)
            self._narrow(u, blo, min(hi, blo + (1 << sh) - 1), tg, int(c[b]), bits, limit, new)

    def _narrow(self, u, lo, hi, targets, m, bits, limit, new) -> None:
        """The key range lo..hi of ``m`` keys holding ``targets``: found (one key), collected
        by the next pass (few keys) or counted in buckets (many)."""
        if lo == hi:
            for rank, _ in targets:
                self.found[(u, rank)] = lo
        elif m <= limit:
            new.append([lo, hi, 0, True, targets, m])
        else:
            new.append([lo, hi, max(0, (hi - lo).bit_length() - bits), False, targets, m])

    def probe(self, samples: list) -> None:
        """Make the next pass a probe pass (bnstat.quantile_probe) from each unit's first-pass
        sample (its values in read order, without NaN); after ``set_counts``."""
        from bnstat.quantile_probe import intervals

        lowk, highk = key_span(self.dtype) if self.dtype.kind in "iu" else _finite_key_span(self.dtype)
        zero = int(to_keys(np.zeros(1), self.dtype)[0]) if self.dtype.kind == "f" else None
        bits, limit = self._budget()  # one slot a unit so far (``set_counts``)
        ranks = {u: [r for r, _ in slots[0][4]] for u, slots in enumerate(self.slots) if slots}
        todo = [u for u in ranks if samples[u].size >= 16]
        found = dict(zip(todo, _map(lambda u: intervals(samples[u], int(self.n[u]), ranks[u]), todo,
                                    self.threads)))
        for u in ranks:
            n = int(self.n[u])
            if u not in found:  # no sample to speak of: the whole range, placed exactly
                new = []
                self._narrow(u, lowk, highk, [(r, r) for r in ranks[u]], n, bits, limit, new)
                self._set(u, new)
                continue
            part, groups, deff = found.pop(u)
            m = part.size
            new = []
            for ilo_, ihi_, rs in groups:
                klo = int(keys_of(part[ilo_:ilo_ + 1], self.dtype)[0]) if ilo_ >= 0 else lowk
                khi = int(keys_of(part[ihi_:ihi_ + 1], self.dtype)[0]) if ihi_ < m else highk
                if zero is not None:  # -0.0 and +0.0 in one interval (the kernel compares values)
                    klo = zero - 1 if klo == zero else klo
                    khi = zero if khi == zero - 1 else khi
                expect = (min(ihi_, m - 1) - max(ilo_, 0) + 1) * n / m
                if new and klo <= new[-1][1] + 1:
                    new[-1][1] = max(new[-1][1], khi)
                    new[-1][4] += [(r, r) for r in rs]
                    new[-1][5] += expect
                else:
                    new.append([klo, khi, 0, True, [(r, r) for r in rs], expect])
            for sl in new:  # room: the keys between two sample values vary (n / m apart each)
                sl[5] = min(n, int(sl[5] + 6 * math.sqrt(sl[5] * deff * n / m)) + 128)
            self.slots[u] = new
        self._fit_probe()
        self.probing = True

    def _fit_probe(self) -> None:
        """Probe slots' room (their expected keys and a margin), within COUNTER_BYTES with the
        counters: the largest slots count in buckets instead while the keys would not fit."""
        live = [sl for slots in self.slots for sl in slots]
        bits = bits_for(max(1, 2 * len(live)))
        budget = COUNTER_BYTES // 8
        used = sum(sl[5] for sl in live if sl[3])
        for sl in sorted((sl for sl in live if sl[3]), key=lambda sl: -sl[5]):
            if used <= budget:
                break
            used -= sl[5] - (1 << bits)
            sl[2], sl[3] = max(0, (sl[1] - sl[0]).bit_length() - bits), False

    def _advance_probe(self, counts, keys, pos_after, below) -> None:
        """Place every wanted rank after a probe pass: by the values below each slot and the
        keys in it, inside a slot (read off, or narrowed further) or in a gap between two.

        A unit whose slots all collect has its keys in one run (kernels.select._select_task):
        their count is at ``pos_after[u, 0]``, and each slot's share is counted here."""
        base, pos = self._layout
        self.passes += 1
        self.probing = False
        self.zeros = below[:, -1].copy()  # the zeros of every unit (bnstat.histrun: one bin)
        picks = []  # (unit, collected keys, targets): partitioned at the targets, no sort
        lowk, highk = key_span(self.dtype)
        bits, limit = self._budget()
        runs = {}  # unit -> its run of keys, where they all fit in its slots' room
        for u, slots in enumerate(self.slots):
            if slots and all(sl[3] for sl in slots):
                got = int(pos_after[u, 0] - pos[u, 0])
                if got <= sum(sl[5] for sl in slots):
                    runs[u] = keys[pos[u, 0]:pos[u, 0] + got]
        shares = dict(zip(runs, _map(lambda u: _run_shares(runs[u], self.slots[u]), list(runs),
                                     self.threads)))
        for u, slots in enumerate(self.slots):
            if not slots:
                continue
            new = []
            wanted = sorted({r for sl in slots for r, _ in sl[4]})
            starts = [int(self.n[u] - below[u, j]) for j in range(len(slots))]  # counted: at or above
            if all(sl[3] for sl in slots) and u not in runs:
                # more keys than room in one run: each slot's share is not known, but every
                # rank lies in the keys from one slot's start to the next's, whose count is
                self._between_starts(u, slots, starts, wanted, bits, limit, new)
                self._set(u, new)
                continue
            placed = []  # per slot: (first rank, keys in it, its counts or keys; None: too many)
            for j, (lo, hi, sh, coll, targets, cnt) in enumerate(slots):
                b = starts[j]
                if u in runs:
                    placed.append((b, int(shares[u][j]), runs[u]))
                elif coll:
                    c = int(pos_after[u, j] - pos[u, j])
                    placed.append((b, c, keys[pos[u, j]:pos[u, j] + c] if c <= cnt else None))
                else:
                    nb = ((hi - lo) >> sh) + 1
                    cc = counts[base[u, j]:base[u, j] + nb]
                    placed.append((b, int(cc.sum()), cc))
            inside: dict[int, list] = {}
            gaps: dict[int, list] = {}
            for r in wanted:
                for j, (b, c, _) in enumerate(placed):
                    if b <= r < b + c:
                        inside.setdefault(j, []).append((r, r - b))
                        break
                else:  # in the gap before the first slot that starts after it
                    j = next((j for j, (b, _, _) in enumerate(placed) if r < b), len(placed))
                    gaps.setdefault(j, []).append(r)
            run_targets = []
            for j, tg in inside.items():
                lo, hi, sh, coll = slots[j][:4]
                b, c, got = placed[j]
                if u in runs:  # the slot's keys are the run's from the shares before it on
                    before = int(shares[u][:j].sum())
                    run_targets += [(rank, before + i) for rank, i in tg]
                elif coll and got is not None:  # the keys at the wanted places, below
                    picks.append((u, got, tg))
                elif coll:  # more keys than room: their count is known now
                    self._narrow(u, lo, hi, tg, c, bits, limit, new)
                else:
                    self._split(u, lo, sh, hi, got, tg, bits, limit, new)
            if run_targets:
                picks.append((u, runs[u], run_targets))
            for j, rs in gaps.items():
                start = placed[j - 1][0] + placed[j - 1][1] if j else 0
                end = placed[j][0] if j < len(placed) else int(self.n[u])
                glo = slots[j - 1][1] + 1 if j else lowk
                ghi = slots[j][0] - 1 if j < len(placed) else highk
                self._narrow(u, glo, ghi, [(r, r - start) for r in rs], end - start, bits, limit, new)
            self._set(u, new)
        parts = _map(lambda p: _pick(p[1], [i for _, i in p[2]]), picks, self.threads)
        for (u, _, tg), got in zip(picks, parts):
            for rank, i in tg:
                self.found[(u, rank)] = int(got[i])

    def _between_starts(self, u, slots, starts, wanted, bits, limit, new) -> None:
        """Unit u's ranks placed by its slots' starts alone: rank r lies in the keys from the
        start of the last slot starting at or below it to the next slot's start (or the
        keys' end), whose count the starts give; narrowed into ``new``."""
        lowk, highk = key_span(self.dtype)
        by: dict[int, list] = {}
        for r in wanted:
            by.setdefault(sum(b <= r for b in starts) - 1, []).append(r)
        for j, rs in by.items():
            first = starts[j] if j >= 0 else 0
            end = starts[j + 1] if j + 1 < len(starts) else int(self.n[u])
            lo = slots[j][0] if j >= 0 else lowk
            hi = slots[j + 1][0] - 1 if j + 1 < len(slots) else highk
            self._narrow(u, lo, hi, [(r, r - first) for r in rs], end - first, bits, limit, new)

    def values(self) -> np.ndarray:
        """(units, len(q)) float64: np.quantile's result per unit (NaN for an empty unit)."""
        U, nq = self.prev.shape
        kp = np.zeros((U, nq), np.uint64)
        kn = np.zeros((U, nq), np.uint64)
        for u in range(U):
            if self.n[u] == 0:
                continue
            for i in range(nq):
                kp[u, i] = self.found[(u, int(self.prev[u, i]))]
                kn[u, i] = self.found[(u, int(self.next[u, i]))]
        with np.errstate(invalid="ignore"):
            out = lerp(to_values(kp, self.dtype), to_values(kn, self.dtype), self.gamma)
        out[self.n == 0] = np.nan
        return out


def _pick(keys: np.ndarray, at: list) -> dict:
    """{i: the i-th smallest of ``keys``} for the indices ``at``, by partitioning a copy
    once per index, each time only the part above the last one found (the index after a
    found one is the least of that part). np.partition given every index at once took 4x
    as long on a probe's keys (bench/README.md, sixth session)."""
    a = keys.copy()
    out = {}
    lo = 0  # a[lo:] holds the keys ranked lo and up, in no order
    for i in sorted(set(at)):
        part = a[lo:]
        j = i - lo
        if j == 0:
            m = int(part.argmin())
            part[0], part[m] = part[m], part[0]
        else:
            part.partition(j)
        out[i] = part[j]
        lo = i + 1
    return out


def _run_shares(run: np.ndarray, slots: list) -> np.ndarray:
    """How many keys of a unit's run lie in each of its (ascending) slots."""
    le = [np.count_nonzero(run <= np.uint64(sl[1])) for sl in slots[:-1]] + [run.size]  # all in one
    return np.diff(np.array(le, np.int64), prepend=0)


def _map(f, items: list, threads: int) -> list:
    """[f(item) for item in items], on ``threads`` threads (numpy's sorts release the GIL)."""
    if threads <= 1 or len(items) < 2:
        return [f(i) for i in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(items))) as ex:
        return list(ex.map(f, items))


def check_quantiles(qs) -> list[float]:
    """Parse and check q values (each in [0, 1]). Raises ValueError."""
    if isinstance(qs, str):
        parts = [p for p in qs.replace(" ", "").split(",") if p]
        try:
            qs = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"{qs!r}: give numbers between 0 and 1 separated by commas, "
                             "e.g. 0.001,0.5,0.999") from None
    qs = [float(q) for q in np.atleast_1d(qs)]
    bad = [q for q in qs if not 0.0 <= q <= 1.0 or math.isnan(q)]
    if bad or not qs:
        raise ValueError(f"{bad[0] if bad else qs!r}: quantiles must be between 0 and 1 (0.5 is the median)")
    return qs
