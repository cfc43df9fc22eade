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


def plot_kl_gold(table: pl.DataFrame, bon: pl.DataFrame, path: PathLike) -> None:
    """Every policy in the (KL, gold) plane with the BoN curve and the Pareto frontier."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    ax.plot(bon["kl_analytic"], bon["gold"], "-", color="0.6", label="best-of-n (cache)")
    pol = table.filter(pl.col("method") != "bon")
    for row in pol.iter_rows(named=True):
        ax.errorbar(row["kl"], row["gold"], xerr=row["kl_se"], yerr=row["gold_se"], fmt="o",
                    ms=6, capsize=2, label=row["policy"])
    front = table.filter(pl.col("pareto")).sort("kl")
    ax.plot(front["kl"], front["gold"], "k--", lw=1, label="Pareto frontier")
    ax.set_xlabel("KL(pi || pi_ref) [nats]  (k1 for policies, analytic for BoN)")
    ax.set_ylabel("mean gold reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def plot_win_rates(table: pl.DataFrame, path: PathLike) -> None:
    """Gold win rate of each policy against reference samples and the reference's BoN."""
    plt = pyplot()
    pol = table.filter(pl.col("method") != "bon")
    x = np.arange(pol.height)
    n = int(pol["win_rate_n"][0])
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * pol.height + 2), 4))
    ax.bar(x - 0.2, pol["win_rate_ref"], 0.4, label="vs reference sample")
    ax.bar(x + 0.2, pol["win_rate_bon"], 0.4, label=f"vs reference best-of-{n}")
    ax.axhline(0.5, color="k", lw=0.8)
    ax.axhline(n / (n + 1), color="0.5", ls=":", lw=0.8, label=f"BoN-{n} vs reference: n/(n+1)")
    ax.set_xticks(x, pol["policy"].to_list(), rotation=30, ha="right")
    ax.set_ylabel("gold win rate (ties = 1/2)")
    ax.set_ylim(0, 1)
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
