"""Exceptions raised by distrib.

Every error a user can meet derives from :class:`DistribError`, so one ``except`` catches them all.
"""


class DistribError(RuntimeError):
    """Base class of every distrib error."""


class CommTimeout(DistribError):
    """A peer did not arrive within the deadline.

    ``missing`` lists the ranks that were not in the collective (or did not answer) when the
    deadline passed; ``op`` names the collective that was waiting.
    """

    def __init__(self, message, missing=(), op=None):
        super().__init__(message)
        self.missing = list(missing)
        self.op = op


class CollectiveMismatch(DistribError):
    """Ranks called different collectives (op, shape, dtype or reduce op) at the same point."""


class WireError(DistribError):
    """A message on the wire failed validation (malformed, unknown dtype, oversized...)."""


class PeerFailed(DistribError):
    """A peer reported an error and aborted the collective it was in."""
