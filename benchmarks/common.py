"""What every benchmark does first: logging, then a space (bound, with its latency measurer) or a solved run; and how it ends."""
from __future__ import annotations

import logging
import sys
from pathlib import Path


def run_command(main) -> None:
    """A benchmark's command line: an :class:`eta.errors.EtaError` (bad input, a run not ready, a run in use) ends in
    one line on stderr and exit code 2, as ``eta`` does, not a traceback."""
    from eta.errors import EtaError

    try:
        code = main()
    except EtaError as err:
        print(f"{Path(sys.argv[0]).stem}: error: {err}", file=sys.stderr)
        code = 2
    raise SystemExit(code)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def load_bound_space(path: str):
    """(space, bound space, latency measurer) of a search-space YAML, with the benchmarks' logging set up.

    The measurer (:func:`eta.phases.latency.measurer`) carries the space's ``protocol``, ``target``,
    ``device`` and ``backend`` name.
    """
    from eta.bound import bind, splits_for
    from eta.phases.latency import measurer
    from eta.space import load_space

    setup_logging()
    space = load_space(path)
    bound = bind(space, splits_for(space))
    return space, bound, measurer(space)


def load_solved_run(run_dir: Path):
    """(search, latency info, operator bank, search problem with the run's predictor) of a run past the solve phase.

    ``info`` is the run's :class:`eta.records.LatencyInfo`; the problem's option latencies are calibrated.
    """
    from eta.accuracy_predictor import MLPPredictor
    from eta.errors import EtaError
    from eta.phases.pretrain import load_block_states
    from eta.phases.solve import predictor_problem
    from eta.pipeline import Search
    from eta.student import OperatorBank

    search = Search.from_run(run_dir, progress=False)
    for phase in ("latency", "pretrain", "solve"):
        if not search.done(phase):
            raise EtaError(f"{run_dir}: phase {phase} has not finished; run 'eta search' (or 'eta solve') first")
    search.phase("teacher")  # loads the teacher's weights (or trains it, if that phase never ran)
    info = search.phase("latency")
    bank = OperatorBank(search.bound, load_block_states(search.run, search.bound), where=search.run.pretrain_dir)
    predictor = MLPPredictor.load(search.run.predictor_weights)
    return search, info, bank, predictor_problem(search.bound, info, predictor)
