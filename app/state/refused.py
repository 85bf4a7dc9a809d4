"""Why a guarded transition changed nothing."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal


class Refused(StrEnum):
    """The reason a transition was refused. Falsy, so `if store.fail(...):` reads "if it was
    written" while a caller that must tell reasons apart compares with `is`."""

    NOT_FOUND = "not_found"
    NOT_OWNER = "not_owner"  # another API key's task or batch
    STALE_ATTEMPT = "stale_attempt"  # the attempt (or poll step, or delivery attempt) is no longer current
    ALREADY_CLAIMED = "already_claimed"  # another delivery of the same message holds it
    CANCELLED = "cancelled"  # the client asked to cancel: no images, no retry
    ALREADY_ENDED = "already_ended"

    def __bool__(self) -> bool:
        return False


# What a transition returns: True when it was written, else why not.
Outcome = Literal[True] | Refused
