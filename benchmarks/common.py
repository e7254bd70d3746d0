"""What every benchmark does first: logging, the space, its bound teacher and its latency backend."""
from __future__ import annotations

import logging


def load_bound_space(path: str):
    """(space, bound space, latency backend) of a search-space YAML, with the benchmarks' logging set up."""
    from eta import lut
    from eta.bound import bind, splits_for
    from eta.space import load_space

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    space = load_space(path)
    bound = bind(space, splits_for(space))
    return space, bound, lut.Backend.from_space(bound)
