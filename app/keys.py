"""API keys: random, recognisable by prefix, stored only as a SHA-256 hash.

A key carries 256 random bits, so a fast hash is enough (no password-style stretching): the
hash cannot be reversed and a lookup by hash is an index hit.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.models import ApiKey

KEY_PREFIX = "ig_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(sessions: sessionmaker[Session], name: str) -> str:
    """Store a new key and return it; this is the only time the key itself exists."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with sessions.begin() as session:
        session.add(ApiKey(id=uuid.uuid4(), name=name, prefix=key[:10], key_hash=hash_key(key)))
    return key


def authenticate(sessions: sessionmaker[Session], presented: str) -> uuid.UUID | None:
    """The id of the live key whose hash matches, else None."""
    if not presented.startswith(KEY_PREFIX) or len(presented) > 200:
        return None
    digest = hash_key(presented)
    with sessions() as session:
        row = session.execute(
            select(ApiKey.id, ApiKey.key_hash).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
        ).one_or_none()
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    return row.id
