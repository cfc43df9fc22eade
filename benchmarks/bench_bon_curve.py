"""Benchmark: the vectorised BoN curve against a straightforward per-prompt loop.

Computes the BoN curve (expected proxy and gold reward of the proxy-best of n) for P prompts x M
cached samples and ALL n = 1..M with :func:`pipeline_lib.math.bon.bon_curve`, and times a
straightforward implementation of the same estimator (per-prompt Python loop: sort, average gold
over proxy ties, then for each n a loop over ranks i computing C(i-1, n-1)/C(M, n) with
``math.lgamma``).  The straightforward version needs ``P · M (M + 1) / 2`` inner iterations (about
4·10^10 at the default size, i.e. hours), so it is timed on a subset of prompts and n values and
extrapolated linearly in its inner-loop iteration count (setup extrapolated per prompt); the output
says so.  The maximum absolute difference is measured on that subset.

Usage::

    python benchmarks/bench_bon_curve.py [--prompts 512] [--samples 12600] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

try:
    import pipeline_lib  # noqa: F401
except ImportError:  # not pip-installed: run from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline_lib.math.bon import bon_curve


def naive_setup(proxy_row: np.ndarray, gold_row: np.ndarray) -> tuple[list[float], list[float]]:
    """Sort one prompt by proxy; replace gold by its mean over each block of tied proxy values."""
    order = sorted(range(len(proxy_row)), key=lambda j: proxy_row[j])
    sp = [float(proxy_row[j]) for j in order]
    sg = [float(gold_row[j]) for j in order]
    gm = list(sg)
    i = 0
    while i < len(sp):
        j = i
        while j + 1 < len(sp) and sp[j + 1] == sp[i]:
            j += 1
        mean = sum(sg[i : j + 1]) / (j + 1 - i)
        gm[i : j + 1] = [mean] * (j + 1 - i)
        i = j + 1
    return sp, gm


def naive_expectations(sp: list[float], gm: list[float], n: int) -> tuple[float, float]:
    """Σ_{i=n}^{M} C(i-1, n-1)/C(M, n) · s_(i) with lgamma-based weights, one term at a time."""
    m = len(sp)
    log_c_mn = math.lgamma(m + 1) - math.lgamma(n + 1) - math.lgamma(m - n + 1)
    ep = eg = 0.0
    for i in range(n, m + 1):
        w = math.exp(math.lgamma(i) - math.lgamma(n) - math.lgamma(i - n + 1) - log_c_mn)
        ep += w * sp[i - 1]
        eg += w * gm[i - 1]
    return ep, eg


def exact_weights(m: int, n: int) -> np.ndarray:
    """C(i-1, n-1) / C(M, n) for i = n..M, exact integers, each ratio correctly rounded."""
    denom = math.comb(m, n)
    c = 1  # C(n-1, n-1)
    out = np.empty(m - n + 1)
    for i in range(n, m + 1):
        out[i - n] = c / denom
        c = c * i // (i - n + 1)  # C(i, n-1)
    return out


def make_pool(
    prompts: int, samples: int, decimals: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Proxy ~ N(0, 1) rounded to ``decimals`` (ties, as with low-precision reward models);
    gold = 0.6 proxy + 0.8 noise."""
    rng = np.random.default_rng(seed)
    proxy = rng.standard_normal((prompts, samples))
    gold = 0.6 * proxy + 0.8 * rng.standard_normal((prompts, samples))
    if decimals >= 0:
        proxy = np.round(proxy, decimals)
    return proxy, gold


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--samples", type=int, default=12600)
    parser.add_argument("--quick", action="store_true", help="64 prompts x 2000 samples")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the fast version")
    parser.add_argument("--naive-prompts", type=int, default=4, help="prompts timed for naive")
    parser.add_argument("--naive-ns", type=int, default=24, help="n values timed for naive")
    parser.add_argument("--decimals", type=int, default=3, help="round proxy (-1: no rounding)")
    parser.add_argument("--no-full", action="store_true", help="skip the tail_tol=0 run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.samples = 64, 2000
    p, m = args.prompts, args.samples
    proxy, gold = make_pool(p, m, args.decimals, args.seed)
    ns = np.arange(1, m + 1)
    n_ties = int((np.diff(np.sort(proxy, axis=1), axis=1) == 0).sum())

    # --- vectorised ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    fast_p, fast_g = bon_curve(proxy, gold, ns)
    t_cold = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        bon_curve(proxy, gold, ns)
        times.append(time.perf_counter() - t0)
    t_fast = min(times) if times else t_cold

    t_full = diff_full = None
    if not args.no_full:
        t0 = time.perf_counter()
        full_p, full_g = bon_curve(proxy, gold, ns, tail_tol=0.0)
        t_full = time.perf_counter() - t0
        diff_full = max(np.abs(full_p - fast_p).max(), np.abs(full_g - fast_g).max())

    # --- straightforward loop, on a subset -----------------------------------------------------
    sub_p = min(args.naive_prompts, p)
    sub_ns = np.unique(np.linspace(1, m, min(args.naive_ns, m)).round().astype(int))
    t_setup = t_inner = 0.0
    naive = np.zeros((2, sub_ns.size))
    setups = []
    for row in range(sub_p):
        t0 = time.perf_counter()
        sp, gm = naive_setup(proxy[row], gold[row])
        t1 = time.perf_counter()
        for a, n in enumerate(sub_ns):
            ep, eg = naive_expectations(sp, gm, int(n))
            naive[0, a] += ep / sub_p
            naive[1, a] += eg / sub_p
        t_setup += t1 - t0
        t_inner += time.perf_counter() - t1
        setups.append((sp, gm))
    iters_sub = sub_p * int((m - sub_ns + 1).sum())
    iters_full = p * m * (m + 1) // 2
    t_naive = t_setup * p / sub_p + t_inner * iters_full / iters_sub

    # --- accuracy on the subset, against exact rational weights --------------------------------
    exact = np.zeros((2, sub_ns.size))
    for a, n in enumerate(sub_ns):
        w = exact_weights(m, int(n))
        for sp, gm in setups:
            exact[0, a] += math.fsum(w * np.asarray(sp[n - 1 :])) / sub_p
            exact[1, a] += math.fsum(w * np.asarray(gm[n - 1 :])) / sub_p

    def err(res: tuple[np.ndarray, np.ndarray] | np.ndarray) -> float:
        return float(max(np.abs(res[0] - exact[0]).max(), np.abs(res[1] - exact[1]).max()))

    sub_fast = bon_curve(proxy[:sub_p], gold[:sub_p], sub_ns)
    err_fast = err(sub_fast)
    err_full = err(bon_curve(proxy[:sub_p], gold[:sub_p], sub_ns, tail_tol=0.0))
    err_naive = err(naive)
    diff_naive = float(np.abs(np.stack(sub_fast) - naive).max())

    # --- report --------------------------------------------------------------------------------
    print(f"BoN curve, P = {p} prompts x M = {m} samples, all n = 1..{m} ({m} values of n)")
    print(
        f"proxy rounded to {args.decimals} decimals ({n_ties:,} tied adjacent pairs); "
        f"{os.cpu_count()} CPUs; numpy {np.__version__}"
    )
    print()
    header = f"{'implementation':<44}{'time [s]':>11}{'ratio':>10}{'max|err| (a)':>14}"
    print(header)
    print("-" * len(header))
    rows = [(f"vectorised bon_curve (best of {len(times)})", t_fast, err_fast)]
    rows.append(("vectorised bon_curve (first call)", t_cold, err_fast))
    if t_full is not None:
        rows.append(("vectorised, tail_tol=0 (no truncation)", t_full, err_full))
    rows.append(("straightforward loop (EXTRAPOLATED, b)", t_naive, err_naive))
    for name, t, e in rows:
        print(f"{name:<44}{t:>11.3f}{t / t_fast:>9.1f}x{e:>14.1e}")
    print()
    print(
        f"ratio = time / time of the first row; straightforward / fast = {t_naive / t_fast:,.0f}x"
    )
    print(f"max |fast - straightforward| on the subset: {diff_naive:.1e}")
    if diff_full is not None:
        print(f"max |fast - tail_tol=0| over all {p} prompts and all n: {diff_full:.1e}")
    print(
        f"(a) max abs error of the prompt-averaged proxy and gold curves against exact rational "
        f"weights C(i-1,n-1)/C(M,n)\n    (math.comb, correctly rounded, fsum), on the subset "
        f"below: {sub_p} prompts x {sub_ns.size} values of n."
    )
    print(
        f"(b) EXTRAPOLATED, not run in full: the straightforward loop was timed on {sub_p} "
        f"prompts x {sub_ns.size} values of n\n    (n evenly spaced in 1..{m}; "
        f"{iters_sub:,} inner iterations in {t_inner:.2f} s, setup {t_setup:.3f} s) and scaled "
        f"linearly\n    to P M (M+1)/2 = {iters_full:,} inner iterations and {p} prompts of setup."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
