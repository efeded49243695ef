"""Figures people would rather look at than read: ROC, risk-coverage, CMC, Recall@K, sparsity, FLOPs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sparse_embed.fileio import atomic_path  # noqa: E402
from sparse_embed.metrics.uncertainty import aurcc, risk_coverage_curve  # noqa: E402
from sparse_embed.metrics.verification import roc_curve  # noqa: E402


def _save(fig: plt.Figure, path: str | os.PathLike) -> None:
    """Lays the figure out, writes it to `path` as PNG atomically and frees it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _rate_axes(ax: plt.Axes, xlabel: str, ylabel: str, title: str) -> None:
    """A rate (0 to 1) against a log-scale x axis, with grid, legend and title."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)


def plot_roc(runs: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike,
             title: str = "Verification ROC") -> None:
    """Plots TAR against FAR (log scale) for several runs on the same pairs, atomically to PNG.

    Args:
        runs: Run name -> (pair scores, issame) on one pairs protocol.
        path: Output PNG file.
        title: Figure title.
    """
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for name, (scores, issame) in runs.items():
        far, tar, _ = roc_curve(scores, issame)
        keep = far > 0  # log axis: the (0, 0) corner has no position
        ax.plot(far[keep], tar[keep], label=name, linewidth=1.6)
    _rate_axes(ax, "false accept rate", "true accept rate", title)
    _save(fig, path)


def plot_risk_coverage(runs: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike,
                       title: str = "Verification risk against coverage") -> None:
    """Plots the error rate of the most confident pairs against the fraction kept, atomically to PNG.

    Each curve is `risk_coverage_curve` (pairs by confidence, highest first);
    the legend gives its area (AURCC, lower is better). A confidence that
    knows nothing draws a flat line at the overall error rate, drawn dashed
    for reference.

    Args:
        runs: Run name -> (loss [P], 1 where a pair is misclassified, pair confidences [P]).
        path: Output PNG file.
        title: Figure title.
    """
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for name, (loss, confidences) in runs.items():
        risk, coverage, _ = risk_coverage_curve(loss, confidences)
        lines = ax.plot(coverage[1:], risk[1:], linewidth=1.6,
                        label=f"{name} (AURCC {aurcc(loss, confidences):.4f})")
        ax.axhline(float(np.mean(loss)), color=lines[0].get_color(), linestyle="--", linewidth=0.8)
    ax.set_xlabel("coverage (fraction of pairs kept, most confident first)")
    ax.set_ylabel("risk (error rate of the kept pairs)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(title)
    _save(fig, path)


def plot_recall_at_k(runs: dict[str, dict[int, float]], path: str | os.PathLike,
                     title: str = "Retrieval Recall@K") -> None:
    """Draws Recall@K as grouped bars, one group per K and one bar per run, atomically to PNG.

    Args:
        runs: Run name -> K -> Recall@K in [0, 1].
        path: Output PNG file.
        title: Figure title.
    """
    ks = sorted({k for recalls in runs.values() for k in recalls})
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(ks) * max(len(runs), 1) + 2), 4.5), dpi=120)
    for i, (name, recalls) in enumerate(runs.items()):
        positions = [j + (i - (len(runs) - 1) / 2) * width for j, k in enumerate(ks) if k in recalls]
        values = [recalls[k] for k in ks if k in recalls]
        bars = ax.bar(positions, values, width=width, label=name)
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(ks)), [f"R@{k}" for k in ks])
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1.08)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    _save(fig, path)


def plot_sparsity(runs: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike,
                  title: str = "Sparsity") -> None:
    """Draws where the non-zeros are, one colour per run, atomically to PNG.

    Left: histogram of the non-zeros per embedding (shared bins). Right: p_j,
    the fraction of embeddings non-zero in dimension j, sorted descending on a
    log axis; an even spread is a flat line, and FLOPs per pair is sum_j p_j^2.
    Dimensions that are never non-zero have no place on the log axis; the
    legend counts them.

    Args:
        runs: Run name -> (non-zeros per embedding int [N], p_j per dimension float [d]).
        path: Output PNG file.
        title: Figure title.
    """
    fig, (hist, dims) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    largest = max((int(np.max(nnz)) for nnz, _ in runs.values() if len(nnz)), default=0)
    bins = np.linspace(0, max(largest, 1), min(max(largest, 1), 60) + 1)
    for name, (nnz, p) in runs.items():
        hist.hist(nnz, bins=bins, histtype="step", linewidth=1.6, label=name)
        ordered = np.sort(np.asarray(p, np.float64))[::-1]
        shown = ordered[ordered > 0]
        never = len(ordered) - len(shown)
        label = name if not never else f"{name} ({never} of {len(ordered)} dims never non-zero)"
        dims.plot(np.arange(1, len(shown) + 1), shown, linewidth=1.6, label=label)
    hist.set_xlabel("non-zeros per embedding")
    hist.set_ylabel("embeddings")
    hist.grid(True, alpha=0.3)
    hist.legend(loc="upper right")
    dims.set_yscale("log")
    dims.set_xlabel("dimension, by p_j descending")
    dims.set_ylabel("p_j (fraction of embeddings non-zero)")
    dims.grid(True, which="both", alpha=0.3)
    dims.legend(loc="lower left")
    fig.suptitle(title)
    _save(fig, path)


def plot_flops_tradeoff(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                        title: str = "Recall@1 against FLOPs per pair") -> None:
    """Plots identification Recall@1 against FLOPs per pair (log x), one curve per regularizer.

    Solid lines are the sparse search alone, dashed lines the same candidates
    re-ranked with dense embeddings; the dense baseline (`regularizer` `none`)
    is a single point of each kind. Every point is labelled with its weight.

    Args:
        rows: One mapping per model with `regularizer`, `weight`, `flops_per_pair`,
            `recall@1` and `recall@1_rerank`.
        path: Output PNG file.
        title: Figure title.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    colors = {"flops": "tab:blue", "l1": "tab:orange", "none": "black"}
    for regularizer in dict.fromkeys(r["regularizer"] for r in rows):
        group = sorted((r for r in rows if r["regularizer"] == regularizer),
                       key=lambda r: r["flops_per_pair"])
        x = [r["flops_per_pair"] for r in group]
        color = colors.get(regularizer)
        name = "dense" if regularizer == "none" else regularizer.upper() if regularizer == "l1" \
            else "FLOPs"
        marker = "*" if regularizer == "none" else "o"
        ax.plot(x, [r["recall@1"] for r in group], marker=marker, color=color, linewidth=1.6,
                markersize=9 if marker == "*" else 5, label=name)
        ax.plot(x, [r["recall@1_rerank"] for r in group], marker=marker, color=color,
                linestyle="--", linewidth=1.2, markerfacecolor="none",
                markersize=9 if marker == "*" else 5, label=f"{name} + dense re-rank")
        if regularizer != "none":
            for r in group:
                ax.annotate(f"{r['weight']:g}", (r["flops_per_pair"], r["recall@1"]),
                            textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs per pair (sum of p_j squared)")
    ax.set_ylabel("identification Recall@1")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    _save(fig, path)


def plot_dimension_probability(curves: Mapping[str, np.ndarray], path: str | os.PathLike,
                               title: str = "Non-zero probability per dimension") -> None:
    """Plots each embedding's per-dimension non-zero probability p_j, sorted descending.

    A dotted line at nnz / d marks each curve's evenly spread ideal (the same
    mean nnz over every dimension, R_sub = 1): the further a curve leaves it,
    the more its FLOPs per pair exceed the minimum nnz^2 / d.

    Args:
        curves: Legend label -> p_j [d].
        path: Output PNG file.
        title: Figure title.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    for (label, p), color in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"],
                                 strict=False):
        p = np.sort(np.asarray(p, dtype=np.float64))[::-1]
        ax.plot(np.arange(1, p.size + 1), p, color=color, linewidth=1.6, label=label)
        ax.axhline(p.mean(), color=color, linestyle=":", linewidth=1.0)
    ax.set_xlabel("dimension, sorted by p_j")
    ax.set_ylabel("p_j = P(dimension j is non-zero)")
    # Sparse curves sit far below 1: a fixed [0, 1] axis would flatten the difference.
    ax.set_ylim(0, 1.05 * max((float(np.max(p)) for p in curves.values()), default=1.0) or 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, title="dotted: nnz / d (evenly spread)",
              title_fontsize=7)
    ax.set_title(title)
    _save(fig, path)


def plot_cmc(curves: Mapping[str, Sequence[float]], path: str | os.PathLike,
             title: str = "Cumulative match characteristic") -> None:
    """Plots identification rate against rank (log x), one curve per method, atomically to PNG.

    Args:
        curves: Method -> identification rate at ranks 1, 2, ... (the `cmc` of
            `sparse_embed.metrics.identification.evaluate_identification`).
        path: Output PNG file.
        title: Figure title.
    """
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for name, rates in curves.items():
        rates = np.asarray(rates, np.float64)
        ax.plot(np.arange(1, len(rates) + 1), rates, linewidth=1.6,
                label=f"{name} (rank-1 {rates[0]:.3f})" if len(rates) else name)
    _rate_axes(ax, "rank", "identification rate", title)
    _save(fig, path)
