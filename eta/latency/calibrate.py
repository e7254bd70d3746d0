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

import logging
from dataclasses import dataclass

import numpy as np
from scipy import stats

log = logging.getLogger(__name__)


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

    @classmethod
    def from_dict(cls, stored: dict) -> "Calibration":
        """The calibration a stored fit (``latency.json``'s or a table's) describes."""
        a_int = stored.get("a_int")
        return cls(float(stored["a"]), float(stored["b"]), float(stored.get("c", 0.0)), None if a_int is None else float(a_int))

    def additive(self, base: float, per_block: list, identity: list, integer: list | None = None) -> tuple[float, list[np.ndarray]]:
        """(calibrated constant ms, calibrated ms of every option) whose sum over a student's options is its
        calibrated latency: the solver's additive model, with the scales and the boundary term folded in.

        a·(base + Σ option·s) + c·operators + b with s = a_int/a for integer options equals
        (a·base + b) + Σ (a·s·option + c·[not identity]).
        """
        a_int = self.a if self.a_int is None else self.a_int
        out = []
        for b, row in enumerate(per_block):
            row = np.asarray(row, float)
            scale = np.where(np.asarray(integer[b], bool), a_int, self.a) if integer is not None else self.a
            out.append(scale * row + self.c * (~np.asarray(identity[b], bool)))
        return self.a * float(base) + self.b, out


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


def calibration_terms(rows: list[dict]) -> dict[str, dict]:
    """The calibrations worth trying on these whole-network rows: name -> extra terms of the fit.

    A term needs 8 networks and some variation to be estimated at all.
    """
    n_ops = np.array([r["operators"] for r in rows])
    int_sum = np.array([r.get("int_table_ms", 0.0) for r in rows])
    terms = {"line": {}}
    if len(rows) >= 8 and np.ptp(n_ops) > 0:
        terms["line+boundary"] = {"n_ops": n_ops}
    if len(rows) >= 8 and np.ptp(int_sum) > 0:
        terms["line+precision"] = {"int_sum": int_sum}
        if "line+boundary" in terms:
            terms["line+precision+boundary"] = {"n_ops": n_ops, "int_sum": int_sum}
    return terms


def fit_rows(rows: list[dict], base: float, per_block: list[np.ndarray], identity: list[np.ndarray],
             integer: list[np.ndarray] | None = None) -> dict:
    """Choose and fit the calibration: HAO's line, the line with a boundary term and/or a separate
    scale for integer entries, or a plain ratio.

    An extra term is kept only when it lowers the cross-validated error by a tenth against the
    line (the lowest such error wins); a line is kept only when the table agrees with whole
    networks (r >= 0.9) and it predicts a positive latency for the fastest student of the space.
    """
    pred = np.array([r["table_sum_ms"] for r in rows])
    meas = np.array([r["measured_ms"] for r in rows])
    n_ops = np.array([r["operators"] for r in rows])
    int_sum = np.array([r.get("int_table_ms", 0.0) for r in rows])
    cal = Calibration(float(np.median(meas / np.maximum(pred, 1e-9))), 0.0)  # a ratio when too few points for a line
    kind, cv = "ratio", {}
    if len(rows) >= 5 and np.ptp(pred) > 0:
        cv["line"] = cross_validated_mape(pred, meas)
        terms = calibration_terms(rows)
        for name, kw in terms.items():
            if name != "line":
                cv[name] = cross_validated_mape(pred, meas, **kw)
        better = sorted((n for n in terms if n != "line" and cv[n] < 0.9 * cv["line"]), key=cv.get)
        candidates = [(n, fit_calibration(pred, meas, **terms[n])) for n in better + ["line"]]
        r = agreement(pred, meas)["pearson_r"]
        if r < 0.9:
            log.warning("latency table agrees poorly with whole networks (Pearson r %.2f); using a ratio, not a line. "
                        "Was the machine busy while measuring? Re-measure on a quiet machine.", r)
        else:
            for name, fit in candidates:
                const, options = fit.additive(base, per_block, identity, integer)
                fastest = const + sum(float(np.min(row)) for row in options)
                if fit.a > 0 and (fit.a_int is None or fit.a_int > 0) and fastest > 0:
                    kind, cal = name, fit
                    break
                log.warning("the calibration %s (a=%.3f, b=%.3f ms, c=%.3f ms) would predict a non-positive latency "
                            "for the fastest student; trying a simpler one", name, fit.a, fit.b, fit.c)
    before = agreement(pred, meas) if len(rows) >= 3 else {}
    after = agreement(cal(pred, n_ops, int_sum), meas) if len(rows) >= 3 else {}
    return {"kind": kind, "a": cal.a, "b": cal.b, "c": cal.c, "a_int": cal.a_int, "students": rows, "before": jsonable(before),
            "after": jsonable(after), "cross_validated_mape": cv}


def jsonable(d):
    if isinstance(d, dict):
        return {k: jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [jsonable(v) for v in d]
    if isinstance(d, np.generic):
        return d.item()
    if isinstance(d, np.ndarray):
        return d.tolist()
    return d
