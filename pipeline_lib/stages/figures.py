"""The summary's figures (matplotlib, Agg backend), written atomically."""

from __future__ import annotations

import numpy as np
import polars as pl

from pipeline_lib.io.atomic import atomic_file
from pipeline_lib.stages.common import PathLike


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bon_curves(bon: pl.DataFrame, path: PathLike) -> None:
    """Proxy and gold reward of BoN against KL(π_BoN‖π_ref), one line per objective."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for (obj,), part in bon.group_by(["objective"], maintain_order=True):
        style = "-" if obj in ("mean", "wco") or obj.startswith("uwo") else ":"
        for ax, col in zip(axes, ("proxy", "gold"), strict=True):
            ax.plot(part["kl_analytic"], part[col], style, marker="o", ms=3, label=obj)
    for ax, col in zip(axes, ("proxy", "gold"), strict=True):
        ax.set_xlabel("KL(BoN || ref) = log n - (n-1)/n  [nats]")
        ax.set_ylabel(f"E[{col} reward of best-of-n]")
        ax.set_title(f"BoN: {col} reward")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, title="selection by")
    fig.tight_layout()
    save_figure(fig, path)


def _sweep_lines(ax, points: pl.DataFrame, value: str) -> None:
    """Each sweep as a line through its points (seed-averaged, sorted by KL) with error bars."""
    for (sweep,), part in points.group_by(["sweep"], maintain_order=True):
        part = part.sort("kl")
        seeds = int(part["n_seeds"].max())
        label = f"{sweep} ({seeds} seeds)" if seeds > 1 else sweep
        ax.errorbar(part["kl"], part[value], xerr=part["kl_se"].fill_null(0.0),
                    yerr=part[f"{value}_se"].fill_null(0.0), fmt="o-", ms=5, capsize=2, lw=1.2,
                    label=label)


def plot_kl_gold(table: pl.DataFrame, points: pl.DataFrame, bon: pl.DataFrame,
                 path: PathLike) -> None:
    """Each method sweep as a line with error bars in the (KL, gold) plane (seed-averaged:
    summary.sweep_points_table), the BoN curve of the cache, and the Pareto frontier (with
    uncertainty) of the table's rows."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.plot(bon["kl_analytic"], bon["gold"], "o-", color="0.6", lw=2.5, ms=4,
            label="best-of-n (cache)")
    _sweep_lines(ax, points, "gold")
    front = table.filter(pl.col("pareto")).sort("kl")
    ax.plot(front["kl"], front["gold"], "k--", lw=1, label="Pareto frontier (1.96 SE)")
    ax.set_xlabel("KL(pi || pi_ref) [nats]  (k1 for policies, analytic for BoN)")
    ax.set_ylabel("mean gold reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def plot_kl_win_rate(table: pl.DataFrame, points: pl.DataFrame, path: PathLike) -> None:
    """Gold win rate against the held-out reference samples vs KL: each sweep as a line, the
    BoN points and their closed form n/(n+1) at KL log n - (n-1)/n (continuous rewards, proxy =
    gold) — the vBoN paper's main plot."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    bon = table.filter((pl.col("method") == "bon") & pl.col("win_rate_ref").is_not_null()).sort("n")
    if bon.height:
        ax.plot(bon["kl"], bon["win_rate_ref"], "o-", color="0.6", lw=2.5, ms=4,
                label="best-of-n (cache)")
        n = np.geomspace(1, max(float(bon["n"].max()), 1.0), 64)
        ax.plot(np.log(n) - (n - 1) / n, n / (n + 1), ":", color="0.4",
                label="BoN closed form n/(n+1)")
    _sweep_lines(ax, points.filter(pl.col("win_rate_ref").is_not_null()), "win_rate_ref")
    ax.axhline(0.5, color="k", lw=0.8)
    ax.set_xlabel("KL(pi || pi_ref) [nats]  (k1 for policies, analytic for BoN)")
    ax.set_ylabel("gold win rate vs held-out reference samples (ties = 1/2)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def plot_win_rates(table: pl.DataFrame, path: PathLike) -> None:
    """Gold win rates against the held-out reference samples (the judges): each policy's, also
    against the reference's BoN (bars), and the BoN points' with their closed form n/(n+1)
    (continuous rewards, proxy = gold). With no policy (an imported cache) the BoN panel alone."""
    plt = pyplot()
    pol = table.filter(pl.col("method") != "bon")
    bon = table.filter((pl.col("method") == "bon") & pl.col("win_rate_ref").is_not_null()).sort("n")
    judges = int(table["win_rate_judges"][0])
    width = max(6, 0.8 * pol.height + 2) if pol.height else 0
    fig, axes = plt.subplots(1, 2 if pol.height else 1, figsize=(width + 5, 4), squeeze=False,
                             width_ratios=[width, 5] if pol.height else None)
    if pol.height:
        ax = axes[0, 0]
        x = np.arange(pol.height)
        n = int(pol["win_rate_n"][0])
        ax.bar(x - 0.2, pol["win_rate_ref"], 0.4, label="vs reference sample")
        ax.bar(x + 0.2, pol["win_rate_bon"], 0.4, label=f"vs reference best-of-{n}")
        ax.axhline(0.5, color="k", lw=0.8)
        ax.axhline(n / (n + 1), color="0.5", ls=":", lw=0.8,
                   label=f"BoN-{n} vs reference: n/(n+1)")
        ax.set_xticks(x, pol["policy"].to_list(), rotation=30, ha="right")
        ax.set_ylabel("gold win rate (ties = 1/2)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    ax = axes[0, -1]
    if bon.height:
        ns = bon["n"].to_numpy()
        ax.plot(ns, bon["win_rate_ref"], "o-", label="best-of-n of the reference")
        grid = np.geomspace(1, ns.max(), 64) if ns.max() > 1 else np.ones(1)
        ax.plot(grid, grid / (grid + 1), ":", color="0.5", label="n/(n+1)")
        ax.set_xscale("log", base=2)
    ax.axhline(0.5, color="k", lw=0.8)
    ax.set_xlabel("n")
    ax.set_ylabel("gold win rate (ties = 1/2)")
    ax.set_ylim(0, 1)
    ax.set_title(f"vs {judges} held-out reference sample(s) per prompt", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: PathLike) -> None:
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_prs_compare(summary: pl.DataFrame, path: PathLike) -> None:
    """Best-of-N score of random sampling and PRS against N."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (strategy,), part in summary.group_by(["strategy"], maintain_order=True):
        part = part.sort("N")
        axes[0].errorbar(part["N"], part["best_of_n"], yerr=part["best_of_n_se"], marker="o",
                         capsize=2, label=strategy)
        axes[1].plot(part["tokens_per_prompt"], part["best_of_n"], marker="o", label=strategy)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("N (samples per prompt)")
    axes[1].set_xlabel("generated tokens per prompt (PRS includes feedback)")
    for ax in axes:
        ax.set_ylabel("mean best-of-N score")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Best-of-N: random sampling vs PRS (same prompts, preference and scorer)")
    fig.tight_layout()
    save_figure(fig, path)
