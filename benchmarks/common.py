"""What every benchmark does first: logging, then a space (bound, with its latency backend) or a solved run."""
from __future__ import annotations

import logging
from pathlib import Path


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def load_bound_space(path: str):
    """(space, bound space, latency backend) of a search-space YAML, with the benchmarks' logging set up."""
    from eta import lut
    from eta.bound import bind, splits_for
    from eta.space import load_space

    setup_logging()
    space = load_space(path)
    bound = bind(space, splits_for(space))
    return space, bound, lut.Backend.from_space(bound)


def load_solved_run(run_dir: Path):
    """(search, latency info, operator bank, search problem with the run's predictor) of a run past phase 2."""
    from eta.errors import EtaError
    from eta.pipeline import Search
    from eta.predictor import MLPPredictor
    from eta.selection import search_problem
    from eta.student import OperatorBank

    search = Search.from_run(run_dir, progress=False)
    for phase in ("latency", "pretrain", "solve"):
        if not search.done(phase):
            raise EtaError(f"{run_dir}: phase {phase} has not finished; run 'eta search' (or 'eta solve') first")
    search._ensure_teacher()
    info = search.phase_latency()
    bank = OperatorBank(search.bound, search.run.root / "phase1")
    predictor = MLPPredictor.load(search.run.root / "phase2" / "predictor.pt")
    return search, info, bank, search_problem(search.bound, info, predictor)
