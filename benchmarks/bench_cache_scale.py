"""Benchmark: the cache stages on a synthetic reward cache of a paper's size.

Writes a synthetic reference cache in the project's own schemas (``samples`` with response text
and token ids, split into sampling shards; ``rewards`` in the long format, one row per prompt x
sample x scorer: five proxy seeds and the gold scorer), then runs the real stage functions on it,
each in a fresh process, and prints a table of wall time and peak resident memory per stage, and
the bytes on disk per reward.

Stages: ``gather`` (concatenating the test shards), ``score`` (its reading of the gathered texts
and writing of the long table, around six scorers that cost nothing: the models' own time is not
the stage's bookkeeping), ``cdf`` (the train cache, M = --train-samples,
vBoN's cap 300 by default), ``pairs`` (best/worst of n on the train cache, for each --pairs-n),
``bon_curve`` (all objectives, n = powers of two up to 8,192 plus M, ties, KLs, win rates).
The ensembles paper's test cache is 1,000 prompts x 12,600 samples x 6 scorers (75.6 M rewards):

    python benchmarks/bench_cache_scale.py --prompts 100
    python benchmarks/bench_cache_scale.py --prompts 1000 --mem-limit-gb 20

A stage whose resident memory passes --mem-limit-gb is killed and reported as such (the machine
stays usable). Not covered yet: the summary.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

try:
    import pipeline_lib  # noqa: F401
except ImportError:  # not pip-installed: run from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline_lib.io.schemas import SCHEMAS
from pipeline_lib.settings.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [1, 2, 3, 4, 5]
CHUNK_PROMPTS = 10  # prompts per written row group


def bon_ns(m: int) -> list[int]:
    return sorted({2 ** k for k in range(14) if 2 ** k <= min(m, 8192)} | {m})


def bench_config(m_train: int, m_test: int, shards: int) -> dict:
    """The default config with the cache's sizes, five proxy seeds and the n grid."""
    return load_config(ROOT / "config" / "config.yaml", {
        "sampling": {"M": {"train": m_train, "test": m_test}, "shards": shards},
        "reward_models": {"seeds": SEEDS},
        "evaluation": {"bon_ns": bon_ns(m_test)},
    })


def _prompt_ids(p: int) -> list[str]:
    return [f"p{i:06d}" for i in range(p)]


def write_cache(out: Path, prompts: list[str], m: int, shards: int, tokens: int,
                seed: int) -> tuple[list[Path], Path]:
    """Sample shards (``samples`` schema) and the long rewards table, written CHUNK_PROMPTS
    prompts per row group so that writing never holds the whole cache. Rewards are drawn with
    ties (rounded to 1e-3), proxies correlated with gold. Returns (shard paths, rewards path)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    shard_paths = [out / f"samples-{k}.parquet" for k in range(shards)]
    writers = [pq.ParquetWriter(p, SCHEMAS["samples"]) for p in shard_paths]
    rewards_path = out / "rewards.parquet"
    rw = pq.ParquetWriter(rewards_path, SCHEMAS["rewards"])
    scorers = [f"rm-seed{s}" for s in SEEDS] + ["gold"]
    for start in range(0, len(prompts), CHUNK_PROMPTS):
        chunk = prompts[start:start + CHUNK_PROMPTS]
        gold = np.round(rng.normal(size=(len(chunk), m)), 3)
        values = [np.round(0.7 * gold + 0.7 * rng.normal(size=gold.shape), 3) for _ in SEEDS]
        values.append(gold)
        pid = np.repeat(np.array(chunk, dtype=object), m)
        idx = np.tile(np.arange(m, dtype=np.int32), len(chunk))
        rw.write_table(pa.table({
            "prompt_id": np.tile(pid, len(scorers)),
            "sample_idx": np.tile(idx, len(scorers)),
            "scorer": np.repeat(np.array(scorers, dtype=object), pid.size),
            "kind": np.repeat(np.array(["proxy"] * len(SEEDS) + ["gold"], dtype=object), pid.size),
            "reward": np.concatenate([v.ravel() for v in values]),
        }, schema=SCHEMAS["rewards"]))
        # shards hold contiguous prompt groups, M samples each, as the sample stage writes them
        writer = writers[start * shards // len(prompts)]
        rows = len(chunk) * m
        ids = rng.integers(3, 50000, size=(rows, tokens), dtype=np.int32)
        ids[:, -1] = 0  # EOS
        writer.write_table(pa.table({
            "prompt_id": pid,
            "sample_idx": idx,
            "prompt": np.repeat(np.array([f"prompt {c}" for c in chunk], dtype=object), m),
            "response": np.array([f"response {r}" for r in range(rows)], dtype=object),
            "response_token_ids": pa.array(list(ids), type=pa.list_(pa.int32())),
            "n_tokens": np.full(rows, tokens, dtype=np.int32),
            "finished": np.ones(rows, dtype=bool),
            "ref_logprob": -rng.gamma(20.0, size=rows),
            "strategy": np.full(rows, "random", dtype=object),
            "layer": np.zeros(rows, dtype=np.int8),
            "parent_idx": np.full(rows, -1, dtype=np.int32),
        }, schema=SCHEMAS["samples"]))
    for w in [*writers, rw]:
        w.close()
    return shard_paths, rewards_path


def write_prompts(path: Path, prompts: list[str]) -> Path:
    from pipeline_lib.io.tables import write_table

    schema = SCHEMAS["prompts"]
    n = len(prompts)
    cols = {"prompt_id": prompts, "split": ["test"] * n, "prompt": [f"prompt {p}" for p in prompts],
            "text_id": prompts, "group": prompts, "n_words": [2] * n, "preference": [None] * n}
    write_table(pa.table(cols, schema=schema), path, "prompts")
    return path


# ------------------------------------------------------------------------------ stage runs


def _stage(name: str, config: dict, paths: dict, out: str, arg) -> None:
    """Run one stage; write its own wall time (without process start and imports) next to out."""
    t0 = time.perf_counter()
    _run(name, config, paths, out, arg)
    Path(out + ".seconds").write_text(f"{time.perf_counter() - t0:.6f}")


def _run(name: str, config: dict, paths: dict, out: str, arg) -> None:
    if name == "gather":
        from pipeline_lib.stages.gather import run_gather
        run_gather(config, "test", paths["test_shards"], paths["prompts"], out)
    elif name == "cdf":
        from pipeline_lib.stages.cdf import run_cdf
        run_cdf(config, "train", paths["train_rewards"], paths["train_samples"], out)
    elif name == "pairs":
        from pipeline_lib.stages.pairs import run_pairs
        run_pairs(config, arg, paths["train_samples"], paths["train_rewards"], out)
    elif name == "score":
        from pipeline_lib.stages import score as score_mod
        score_mod._scorers = _instant_scorers  # the stage's bookkeeping alone
        score_mod.run_score(config, "test", paths["gathered"], {}, out)
    elif name == "bon_curve":
        from pipeline_lib.stages.bon_curve import run_bon_curve
        run_bon_curve(config, paths["test_rewards"], paths["train_rewards"], out)
    else:
        raise ValueError(name)


class _InstantScorer:
    """A scorer that costs nothing, so the score stage's own reading and writing is measured."""

    def __init__(self, name: str, kind: str) -> None:
        self.name, self.kind, self.batch_size = name, kind, 256

    def score(self, prompts, responses) -> np.ndarray:
        return np.linspace(0.0, 1.0, len(prompts))


def _instant_scorers(s, members, device):
    yield _InstantScorer("gold", "gold")
    for seed in SEEDS:
        yield _InstantScorer(f"rm-seed{seed}", "proxy")


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_stage(name: str, config: dict, paths: dict, out: Path, arg, limit: float
              ) -> tuple[float, float, str]:
    """(the stage's own wall s, peak RSS bytes of its process, status) of one stage in a fresh
    process, killed past ``limit`` bytes."""
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_stage, args=(name, config, paths, str(out), arg))
    peak = [0]
    t0 = time.perf_counter()
    Path(str(out) + ".seconds").unlink(missing_ok=True)
    proc.start()
    killed = threading.Event()

    def watch() -> None:
        while proc.is_alive():
            peak[0] = max(peak[0], _rss_bytes(proc.pid))
            if peak[0] > limit:
                killed.set()
                proc.kill()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    proc.join()
    watcher.join()
    timing = Path(str(out) + ".seconds")
    wall = float(timing.read_text()) if timing.exists() else time.perf_counter() - t0
    status = ("killed: memory limit" if killed.is_set()
              else "ok" if proc.exitcode == 0 else f"failed (exit {proc.exitcode})")
    return wall, float(peak[0]), status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--samples", type=int, default=12600, help="M of the test cache")
    ap.add_argument("--train-samples", type=int, default=300, help="M of the train cache")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64, help="response length in tokens")
    ap.add_argument("--pairs-n", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--stages", nargs="+",
                    default=["gather", "score", "cdf", "pairs", "bon_curve"])
    ap.add_argument("--mem-limit-gb", type=float, default=20.0)
    ap.add_argument("--workdir", type=Path, default=None, help="kept when given")
    args = ap.parse_args(argv)
    if "score" in args.stages and "gather" not in args.stages[:args.stages.index("score")]:
        ap.error("--stages: score reads what gather writes; list gather before it")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        prompts = _prompt_ids(args.prompts)
        config = bench_config(args.train_samples, args.samples, args.shards)
        t0 = time.perf_counter()
        test_shards, test_rewards = write_cache(work / "test", prompts, args.samples,
                                                args.shards, args.tokens, seed=0)
        train_shards, train_rewards = write_cache(work / "train", prompts, args.train_samples,
                                                  1, args.tokens, seed=1)
        paths = {"test_shards": [str(p) for p in test_shards], "test_rewards": str(test_rewards),
                 "train_samples": str(train_shards[0]), "train_rewards": str(train_rewards),
                 "prompts": str(write_prompts(work / "prompts.parquet", prompts))}
        n_rewards = args.prompts * args.samples * (len(SEEDS) + 1)
        print(f"synthetic cache: {args.prompts} prompts x {args.samples} samples x "
              f"{len(SEEDS) + 1} scorers = {n_rewards:,} rewards, written in "
              f"{time.perf_counter() - t0:.0f} s; rewards on disk "
              f"{test_rewards.stat().st_size / n_rewards:.2f} bytes per reward; samples "
              f"{sum(p.stat().st_size for p in test_shards) / 2**20:,.0f} MiB "
              f"({args.tokens} tokens per response)")
        limit = args.mem_limit_gb * 2**30
        print("\n| stage | input | wall s | peak RSS GiB | status |\n| --- | --- | --- | --- | --- |")
        for name in args.stages:
            for arg in (args.pairs_n if name == "pairs" else [None]):
                wall, peak, status = run_stage(name, config, paths, work / f"{name}.parquet",
                                               arg, limit)
                if name == "gather":
                    paths["gathered"] = str(work / "gather.parquet")
                label = f"pairs n={arg}" if name == "pairs" else name
                size = (f"{args.prompts} x {args.train_samples}" if name in ("cdf", "pairs")
                        else f"{args.prompts} x {args.samples}")
                print(f"| {label} | {size} | {wall:.1f} | {peak / 2**30:.2f} | {status} |",
                      flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
