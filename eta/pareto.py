"""The Pareto front of measured latency versus accuracy, its table and its plot."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def pareto_front(points: list[dict], *, latency: str = "latency_ms", accuracy: str = "test_acc") -> list[dict]:
    """Points no other point beats on both axes (lower latency and higher accuracy), by latency."""
    ordered = sorted(points, key=lambda p: (p[latency], -p[accuracy]))
    front, best = [], -np.inf
    for p in ordered:
        if p[accuracy] > best:
            front.append(p)
            best = p[accuracy]
    return front


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` = (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([(f"{{:{fmt}}}".format(r[k]) if r.get(k) is not None else "-") for k, _, fmt in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


FRONT_COLUMNS = [
    ("arch", "architecture", "s"),
    ("resolution", "res", "d"),
    ("latency_ms", "latency ms", ".3f"),
    ("predicted_latency_ms", "table ms", ".3f"),
    ("test_acc", "test acc", ".4f"),
    ("params", "params", ",d"),
    ("size_mb", "MB", ".3f"),
    ("bops_g", "GBOPs", ".3f"),
]


def plot_front(points: list[dict], front: list[dict], teacher: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
