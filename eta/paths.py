"""Where eta writes and reads outside a run directory: the user's cache and the shipped reference data.

eta never writes into its own installation. Writable state (latency tables being measured, tuning
databases, compiled modules, decoded data sets) lives in the user cache directory
(``$ETA_CACHE_DIR``, else ``platformdirs.user_cache_dir("eta")``). Measured knowledge that ships
with eta (``predictors/`` in the repository: reference latency tables, portable tuned schedules)
is read-only and only ever copied from; ``$ETA_PREDICTORS_DIR`` names a folder of tables used in
place of the cache's.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

CACHE_ENV = "ETA_CACHE_DIR"
TABLES_ENV = "ETA_PREDICTORS_DIR"


def cache_dir() -> Path:
    """The root of eta's writable cache (created on first use)."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        import platformdirs

        root = platformdirs.user_cache_dir("eta", appauthor=False)
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_subdir(name: str) -> Path:
    """A named folder of the cache (``latency``, ``compiled``, ``schedules``, ``data``, ``locks``)."""
    path = cache_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def tables_overridden() -> bool:
    """Whether ``$ETA_PREDICTORS_DIR`` names the tables to use (then used as they are, without seeds)."""
    return bool(os.environ.get(TABLES_ENV))


def latency_tables_dir() -> Path:
    """Where latency tables are read and written: ``$ETA_PREDICTORS_DIR/latency`` or the cache's ``latency/``."""
    root = os.environ.get(TABLES_ENV)
    if root:
        path = Path(root).expanduser() / "latency"
        path.mkdir(parents=True, exist_ok=True)
        return path
    return cache_subdir("latency")


def schedules_dir() -> Path:
    """Where tuned-schedule databases live, one folder per target: beside the tables."""
    root = os.environ.get(TABLES_ENV)
    path = Path(root).expanduser() / "schedules" if root else cache_dir() / "schedules"
    path.mkdir(parents=True, exist_ok=True)
    return path


def reference_dir() -> Path | None:
    """The read-only reference data shipped with eta (the repository's ``predictors/``), if installed."""
    try:
        ref = resources.files("eta.reference")
    except ModuleNotFoundError:
        return None
    path = Path(str(ref))
    return path if path.is_dir() else None


def reference_spaces_dir() -> Path | None:
    """The search spaces shipped with eta (the repository's ``search_spaces/``), if installed."""
    try:
        ref = resources.files("eta.spaces")
    except ModuleNotFoundError:
        return None
    path = Path(str(ref))
    return path if path.is_dir() else None
