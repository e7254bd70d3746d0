"""The one exception users see: a problem with their input, printed as a single line."""


class EtaError(Exception):
    """A user-facing error: bad input, missing data, infeasible request.

    The CLI prints ``str(err)`` on one line and exits with code 2; nothing on disk is overwritten.
    """


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type when it has none): what a one-line error quotes."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]
