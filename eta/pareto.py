"""The Pareto front of measured latency versus accuracy, and its table."""
from __future__ import annotations

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
