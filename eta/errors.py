"""The one exception users see: a problem with their input, printed as a single line."""


class EtaError(Exception):
    """A user-facing error: bad input, missing data, infeasible request.

    The CLI prints ``str(err)`` on one line and exits with code 2; nothing on disk is overwritten.
    """
