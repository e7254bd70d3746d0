"""Calibrating the table's sum against whole networks (HAO: latency ≈ a·Σ table + b).

A block measured alone pays costs a whole network pays once or not at all: the call into the
compiled module, reading its input from and writing its output to memory, layout changes at its
edges. With the same number of blocks in every student a constant ``b`` absorbs that; here an
identity block removes one boundary, so the line may also carry ``c`` ms per non-identity block.
That boundary term is kept only when it predicts held-out students better (cross-validation).

In a mixed-precision space integer and float blocks differ in what they pay inside a network
(requantization at their edges, int8 layouts): measured on digits, integer entries needed a scale
of 1.21 against 1.06 for float ones. ``a_int`` is that separate scale, kept, like the boundary
term, only when cross-validation says it predicts new students better.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass
class Calibration:
    a: float = 1.0
    b: float = 0.0
    c: float = 0.0  # ms per non-identity block (the boundary term; 0 for HAO's plain line)
    a_int: float | None = None  # scale of the integer entries' share of the sum; None: the same ``a``

    def __call__(self, table_sum, n_ops=0, int_sum=0):
        t, i = np.asarray(table_sum, float), np.asarray(int_sum, float)
        a_int = self.a if self.a_int is None else self.a_int
        return self.a * (t - i) + a_int * i + self.c * np.asarray(n_ops, float) + self.b


def fit_calibration(predicted_sum, measured, n_ops=None, int_sum=None) -> Calibration:
    """Least squares from the table's sums (and, when given, the operator counts and the integer
    entries' share of each sum) to measured latencies."""
    p, m = np.asarray(predicted_sum, float), np.asarray(measured, float)
    if n_ops is None and int_sum is None:
        a, b = np.polyfit(p, m, 1)
        return Calibration(float(a), float(b))
    i = np.zeros_like(p) if int_sum is None else np.asarray(int_sum, float)
    cols = [p - i] + ([i] if int_sum is not None else []) + ([np.asarray(n_ops, float)] if n_ops is not None else [])
    coef, *_ = np.linalg.lstsq(np.column_stack(cols + [np.ones_like(p)]), m, rcond=None)
    coef = list(map(float, coef))
    a, b = coef[0], coef[-1]
    a_int = coef[1] if int_sum is not None else None
    c = coef[-2] if n_ops is not None else 0.0
    return Calibration(a, b, c, a_int)


def cross_validated_mape(predicted_sum, measured, n_ops=None, folds: int = 5, seed: int = 0, int_sum=None) -> float:
    """MAPE of the calibration on students it was not fitted to (k-fold): what a new student will see."""
    p, m = np.asarray(predicted_sum, float), np.asarray(measured, float)
    k = np.asarray(n_ops, float) if n_ops is not None else None
    i = np.asarray(int_sum, float) if int_sum is not None else None
    order = np.random.default_rng(seed).permutation(len(p))
    errors = np.empty(len(p))
    for fold in np.array_split(order, min(folds, len(p))):
        train = np.setdiff1d(order, fold)
        cal = fit_calibration(p[train], m[train], None if k is None else k[train], None if i is None else i[train])
        errors[fold] = np.abs(cal(p[fold], 0 if k is None else k[fold], 0 if i is None else i[fold]) - m[fold]) / m[fold]
    return float(errors.mean())


def agreement(predicted, measured, worst: int = 3) -> dict:
    """Pearson r, mean absolute percentage error and the worst relative errors."""
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    rel = (p - m) / m
    order = np.argsort(-np.abs(rel))[:worst]
    r = float(stats.pearsonr(p, m)[0]) if len(p) > 1 and np.ptp(p) > 0 and np.ptp(m) > 0 else float("nan")
    return {
        "pearson_r": r,
        "mape": float(np.mean(np.abs(rel))),
        "max_abs_rel_error": float(np.max(np.abs(rel))) if len(rel) else float("nan"),
        "worst": [{"index": int(i), "predicted": float(p[i]), "measured": float(m[i]), "rel_error": float(rel[i])} for i in order],
    }
