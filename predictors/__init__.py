"""Measured reference data shipped with eta (``predictors/`` in the repository), read-only package data:
latency tables to seed the cache with, and portable tuned schedules."""
