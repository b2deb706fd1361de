"""Exact quantiles with the one-walk kernel (kernels.fused) and with the two kernels apart, in one process.

    python bench/bench_quantile_walk.py FILE.npy [--rounds 7] [--layout NCHW]

``bnstat.hist(FILE, bins=1, quantiles=[0.001, 0.5, 0.999, 0.9999])`` (one pass: the
read-ahead sample, then the moments and the probe) with the moments and the probe's
selection done in one walk over each block of rows, then with them apart
(``histrun._moments_select`` returning None, as where the one walk does not apply), then
``bnstat.moments(FILE)``, round after round; per round each quantile run's ratio to that
round's moments. Prints the median time and the median (min..max) ratio of each, and the
time each kernel, the read-ahead sample with the probe's plan (``presample``) and the placing
of the ranks after the pass (``end_carried``) took in the last round of each. The results of
both are checked equal.
"""

from __future__ import annotations

import time

import numpy as np
from _args import file_args

Q = [0.001, 0.5, 0.999, 0.9999]


def main() -> None:
    args = file_args(7)

    import bnstat
    import bnstat.histrun as hr
    from bnstat.kernels import fused, hist, moments

    spent: dict[str, float] = {}

    def timed(mod, name):
        f = getattr(mod, name)

        def g(*a):
            t = time.perf_counter()
            f(*a)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        setattr(mod, name, g)

    for mod, name in ((fused, "moments_select4"), (hist, "select4"), (moments, "moments4_units")):
        timed(mod, name)
    for name in ("presample", "end_carried"):  # the read-ahead sample and probe plan; the ranks placed
        method = getattr(hr._Array, name)

        def g(self, *a, method=method, name=name, **k):
            t = time.perf_counter()
            method(self, *a, **k)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        setattr(hr._Array, name, g)
    one_walk = hr._moments_select
    ways = {"one walk": one_walk, "apart": lambda *a: None}
    times: dict[str, list] = {k: [] for k in (*ways, "moments")}
    kernels: dict[str, dict] = {}
    results = {}
    bnstat.hist(args.path, layout=args.layout, bins=1, quantiles=Q)  # load every kernel
    for _ in range(args.rounds):
        for way, fn in ways.items():
            hr._moments_select = fn
            spent.clear()
            t = time.perf_counter()
            (h,) = bnstat.hist(args.path, layout=args.layout, bins=1, quantiles=Q).values()
            times[way].append(time.perf_counter() - t)
            kernels[way] = dict(spent)
            results[way] = h.quantile(Q)
        hr._moments_select = one_walk
        t = time.perf_counter()
        bnstat.moments(args.path, layout=args.layout)
        times["moments"].append(time.perf_counter() - t)
    assert np.array_equal(results["one walk"], results["apart"], equal_nan=True)
    m = np.array(times["moments"])
    print(f"{args.path}: {args.rounds} rounds; moments {np.median(m):.3f} s (median)")
    for way in ways:
        t = np.array(times[way])
        r = m / t
        ks = ", ".join(f"{k} {v:.3f} s" for k, v in kernels[way].items())  # noqa: E501
        print(f"{way}: {np.median(t):.3f} s, ratio to moments {np.median(r):.3f} "
              f"({r.min():.3f}..{r.max():.3f}); kernels in the last round: {ks}")


if __name__ == "__main__":
    main()
