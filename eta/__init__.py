"""eta: faster students from a trained teacher, chosen on measured latency for your hardware."""
__version__ = "0.1.0"


def load_student(run, max_latency_ms=None, resolution=None):
    """The most accurate student of a finished run's Pareto front within ``max_latency_ms``.

    Returns a plain ``torch.nn.Module`` in eval mode; its ``eta_info`` attribute holds the
    front entry (architecture, resolution, measured latency, accuracy).
    """
    from .export import load_student as _load

    return _load(run, max_latency_ms=max_latency_ms, resolution=resolution)


__all__ = ["__version__", "load_student"]
