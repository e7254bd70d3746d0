"""Measured latency: TVM and PyTorch backends, a cached lookup table, and HAO-style calibration.

Latency is always measured on the target, never derived from FLOPs. The backends are imported
on demand (TVM is slow to import and optional for PyTorch-only tables).
"""
from .calibrate import Calibration, agreement, fit_calibration
from .protocol import Measurement, Protocol
from .table import LatencyTable, default_table_path

__all__ = ["Calibration", "LatencyTable", "Measurement", "Protocol", "agreement", "default_table_path", "fit_calibration"]
