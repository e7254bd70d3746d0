"""Measured latency: TVM and PyTorch backends, a cached lookup table, and HAO-style calibration."""
