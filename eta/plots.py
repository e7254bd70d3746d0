"""Plots a user looks at: the Pareto front against the teacher, and a latency table against whole networks."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .latency.calibrate import Calibration


def pyplot():
    """matplotlib's pyplot on a non-interactive backend (plots are written to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_front(points: list[dict], front: list[dict], teacher: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if points:
        ax.scatter([p["latency_ms"] for p in points], [p["test_acc"] for p in points], s=14, c="0.7", label="finetuned students × resolution")
    if front:
        ax.plot([p["latency_ms"] for p in front], [p["test_acc"] for p in front], "o-", c="tab:blue", label="eta Pareto front")
        for p in front:
            ax.annotate(f"{p['resolution']}px", (p["latency_ms"], p["test_acc"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    if teacher:
        ax.plot([t["latency_ms"] for t in teacher], [t["test_acc"] for t in teacher], "s--", c="tab:red", label="teacher × resolution")
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_calibration(cal: dict, path: Path, title: str) -> None:
    """Measured against predicted latency, before and after calibration (HAO fig. 13.5's view)."""
    plt = pyplot()
    rows = cal["students"]
    pred = np.array([r["table_sum_ms"] for r in rows])
    meas = np.array([r["measured_ms"] for r in rows])
    after = Calibration.from_dict(cal)(pred, [r["operators"] for r in rows], [r.get("int_table_ms", 0.0) for r in rows])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(pred, meas, s=14, alpha=0.6, label=f"Σ table (r={cal['before']['pearson_r']:.4f}, MAPE {100 * cal['before']['mape']:.1f}%)")
    ax.scatter(after, meas, s=14, alpha=0.6, label=f"calibrated {cal['kind']} (r={cal['after']['pearson_r']:.4f}, MAPE {100 * cal['after']['mape']:.1f}%)")
    lo, hi = float(min(pred.min(), after.min(), meas.min())), float(max(pred.max(), after.max(), meas.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel("measured whole-network latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
