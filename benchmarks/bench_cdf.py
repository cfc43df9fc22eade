"""Benchmark: building per-prompt reward CDFs from a long-format reward cache.

Times the vectorised build (group → sorted (P, M) matrix, then F̂ at every cached reward) for
5,000 prompts × 512 rewards against a straightforward per-prompt Python loop computing the same
thing, in one run, and prints both times, the ratio and the max difference.

    python benchmarks/bench_cdf.py [--prompts 5000 --samples 512]

Targets (issue #2): vectorised build ≤ 2 s and ≥ 20× faster than the loop.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

try:
    import pipeline_lib  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline_lib.math.cdf import group_sorted_matrix, self_cdf_matrix


def vectorised(codes: np.ndarray, rewards: np.ndarray, p: int, m: int):
    sorted_m = group_sorted_matrix(codes, rewards, p, m)
    return sorted_m, self_cdf_matrix(sorted_m)


def straightforward(codes: np.ndarray, rewards: np.ndarray, p: int, m: int):
    """What one writes first: group with a dict, sort each list, count with a Python loop."""
    groups: dict[int, list[float]] = {}
    for c, r in zip(codes.tolist(), rewards.tolist(), strict=True):
        groups.setdefault(c, []).append(r)
    sorted_rows, cdf_rows = [], []
    for c in range(p):
        row = sorted(groups[c])
        below, cdf = 0, []
        for i, r in enumerate(row):  # count of strictly smaller cached rewards
            if i > 0 and row[i - 1] < r:
                below = i
            cdf.append((1 + below) / (m + 1))
        sorted_rows.append(row)
        cdf_rows.append(cdf)
    return np.array(sorted_rows), np.array(cdf_rows)


def per_prompt_numpy(codes: np.ndarray, rewards: np.ndarray, p: int, m: int):
    """A per-prompt loop that uses numpy inside: boolean mask, np.sort, np.searchsorted."""
    sorted_rows, cdf_rows = [], []
    for c in range(p):
        row = np.sort(rewards[codes == c])
        sorted_rows.append(row)
        cdf_rows.append((1 + np.searchsorted(row, row, side="left")) / (m + 1))
    return np.array(sorted_rows), np.array(cdf_rows)


def best_of(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=5000)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    p, m = args.prompts, args.samples
    rng = np.random.default_rng(0)
    # a shuffled long-format cache, rewards rounded so that ties occur as with real scorers
    codes = np.repeat(np.arange(p), m)
    rewards = np.round(rng.normal(size=p * m), 3)
    perm = rng.permutation(p * m)
    codes, rewards = codes[perm], rewards[perm]

    t_fast, (s_fast, f_fast) = best_of(lambda: vectorised(codes, rewards, p, m), args.repeats)
    t_slow, (s_slow, f_slow) = best_of(lambda: straightforward(codes, rewards, p, m), 1)
    t_np, (s_np, f_np) = best_of(lambda: per_prompt_numpy(codes, rewards, p, m), 1)
    diff = max(np.abs(s_fast - s_slow).max(), np.abs(f_fast - f_slow).max(),
               np.abs(s_fast - s_np).max(), np.abs(f_fast - f_np).max())

    print(f"CDF build, P = {p} prompts x M = {m} rewards ({p * m:,} rows, with ties); "
          f"{os.cpu_count()} CPUs; numpy {np.__version__}")
    print(f"{'implementation':<40}{'time [s]':>10}{'ratio':>10}")
    print("-" * 60)
    label = f"vectorised (best of {args.repeats})"
    print(f"{label:<40}{t_fast:>10.3f}{1.0:>9.1f}x")
    print(f"{'straightforward per-prompt loop':<40}{t_slow:>10.3f}{t_slow / t_fast:>9.1f}x")
    print(f"{'per-prompt loop with numpy inside':<40}{t_np:>10.3f}{t_np / t_fast:>9.1f}x")
    print(f"speed-up: {t_slow / t_fast:.1f}x   max |difference|: {diff:.1e}   "
          f"target: <= 2 s and >= 20x -> {'met' if t_fast <= 2 and t_slow / t_fast >= 20 else 'NOT met'}")


if __name__ == "__main__":
    main()
