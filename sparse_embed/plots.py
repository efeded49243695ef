"""Figures people would rather look at than read: verification ROC curves."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sparse_embed.fileio import atomic_path  # noqa: E402
from sparse_embed.metrics.verification import roc_curve  # noqa: E402


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
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
