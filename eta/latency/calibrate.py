"""Calibrating the table's sum against whole networks (HAO: latency ≈ a·Σ table + b)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass
class Calibration:
    a: float = 1.0
    b: float = 0.0

    def __call__(self, table_sum):
        return self.a * np.asarray(table_sum) + self.b


def fit_calibration(predicted_sum, measured) -> Calibration:
    """Least-squares line from the table's sums to the measured whole-network latencies."""
    a, b = np.polyfit(np.asarray(predicted_sum, float), np.asarray(measured, float), 1)
    return Calibration(float(a), float(b))


def agreement(predicted, measured, worst: int = 3) -> dict:
    """Pearson r, mean absolute percentage error and the worst relative errors."""
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    rel = (p - m) / m
    order = np.argsort(-np.abs(rel))[:worst]
    r = float(stats.pearsonr(p, m)[0]) if len(p) > 1 and np.ptp(p) > 0 and np.ptp(m) > 0 else float("nan")
    return {
        "pearson_r": r,
        "mape": float(np.mean(np.abs(rel))),
        "worst": [{"index": int(i), "predicted": float(p[i]), "measured": float(m[i]), "rel_error": float(rel[i])} for i in order],
    }
