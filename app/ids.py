"""Every id imagegate hands out (task, batch, image, webhook delivery) is a UUID."""

from __future__ import annotations

import uuid


def parse_id(text: str) -> uuid.UUID | None:
    """The id a client sent, or None: a text that is not a UUID names nothing we have."""
    try:
        return uuid.UUID(text)
    except (ValueError, TypeError, AttributeError):
        return None
