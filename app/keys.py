"""API keys: random, recognisable by prefix, stored only as a SHA-256 hash.

A key carries 256 random bits, so a fast hash is enough (no password-style stretching): the
hash cannot be reversed and a lookup by hash is an index hit.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from imagegate.app.key_limits import NO_OWN_LIMITS, StoredLimits
from imagegate.app.models import ApiKey, utcnow
from imagegate.app.webhook_signing import new_secret

log = logging.getLogger(__name__)

KEY_PREFIX = "ig_"
# An API process records a key's last use at most this often: a write a minute per key, not per request.
LAST_USED_EVERY_S = 60.0


class KeyNameTaken(ValueError):
    """A live key already has this name."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    key: str
    webhook_secret: str


@dataclass(frozen=True)
class Caller:
    """Who is calling: the key's id, where its events go by default, and its own limits."""

    id: uuid.UUID
    callback_url: str | None
    limits: StoredLimits = NO_OWN_LIMITS
    # The models this key may use; None: every model served.
    models: frozenset[str] | None = None

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True)
class KeyListing:
    """What `imagegate keys list` shows of a key: never its hash or webhook secret."""

    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    limits: StoredLimits = NO_OWN_LIMITS


def create_key(
    sessions: sessionmaker[Session],
    name: str,
    callback_url: str | None = None,
    limits: StoredLimits = NO_OWN_LIMITS,
    models: list[str] | None = None,
) -> NewKey:
    """Store a new key and return it; this is the only time the key itself exists. A name is
    unique among live keys (KeyNameTaken). `models` limits the key to those models (None: all)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    secret = new_secret()
    try:
        with sessions.begin() as session:
            if session.scalar(select(ApiKey.id).where(ApiKey.name == name, ApiKey.revoked_at.is_(None))):
                raise KeyNameTaken(name)
            session.add(
                ApiKey(
                    id=uuid.uuid4(),
                    name=name,
                    prefix=key[:10],
                    key_hash=hash_key(key),
                    callback_url=callback_url,
                    webhook_secret=secret,
                    models=models,
                    rpm=limits.rpm,
                    images_per_day=limits.images_per_day,
                    max_pending=limits.max_pending,
                )
            )
    except IntegrityError:  # created at the same moment by someone else: the unique index decided
        raise KeyNameTaken(name) from None
    return NewKey(key, secret)


def list_keys(sessions: sessionmaker[Session]) -> list[KeyListing]:
    """Every key, live and revoked, oldest first."""
    with sessions() as session:
        rows = session.execute(
            select(
                ApiKey.name,
                ApiKey.prefix,
                ApiKey.created_at,
                ApiKey.last_used_at,
                ApiKey.revoked_at,
                ApiKey.rpm,
                ApiKey.images_per_day,
                ApiKey.max_pending,
            ).order_by(ApiKey.created_at, ApiKey.name)
        ).all()
    return [KeyListing(*row[:5], limits=StoredLimits(*row[5:])) for row in rows]


# A limit left out of an update stays as it is; None sets it back to the settings' default.
KEEP: object = object()


def update_key(
    sessions: sessionmaker[Session],
    name: str,
    *,
    rpm: int | None | object = KEEP,
    images_per_day: int | None | object = KEEP,
    max_pending: int | None | object = KEEP,
    models: list[str] | None | object = KEEP,
) -> bool:
    """Change the limits and the models (None: every model) of the live key named `name`; what is
    KEEP stays. False when there is no such key. API processes apply a change within
    IMAGEGATE_KEY_CACHE_TTL_S."""
    given = {"rpm": rpm, "images_per_day": images_per_day, "max_pending": max_pending, "models": models}
    changes = {column: value for column, value in given.items() if value is not KEEP}
    values = changes or {"name": ApiKey.name}  # nothing to change: still say whether the key exists
    with sessions.begin() as session:
        return (
            session.execute(
                update(ApiKey)
                .where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
                .values(**values)
                .execution_options(synchronize_session=False)
            ).rowcount
            > 0
        )


def revoke_key(sessions: sessionmaker[Session], name: str) -> bool:
    """Revoke the live key named `name`; False when there is none. API processes stop accepting it
    within IMAGEGATE_KEY_CACHE_TTL_S."""
    with sessions.begin() as session:
        return (
            session.execute(
                update(ApiKey)
                .where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
                .values(revoked_at=utcnow())
                .execution_options(synchronize_session=False)
            ).rowcount
            > 0
        )


def rotate_webhook_secret(sessions: sessionmaker[Session], name: str, overlap_s: float) -> str | None:
    """A new signing secret for the key named `name`; the old one still signs for overlap_s."""
    secret = new_secret()
    with sessions.begin() as session:
        rows = session.execute(
            update(ApiKey)
            .where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
            .values(
                webhook_secret_previous=ApiKey.webhook_secret,
                webhook_secret=secret,
                webhook_secret_previous_until=utcnow() + timedelta(seconds=overlap_s),
            )
            .execution_options(synchronize_session=False)
        ).rowcount
    return secret if rows else None


def set_callback_url(sessions: sessionmaker[Session], name: str, url: str | None) -> bool:
    with sessions.begin() as session:
        return (
            session.execute(
                update(ApiKey)
                .where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
                .values(callback_url=url)
                .execution_options(synchronize_session=False)
            ).rowcount
            > 0
        )


def authenticate(sessions: sessionmaker[Session], presented: str) -> Caller | None:
    """The live key whose hash matches, else None."""
    if not presented.startswith(KEY_PREFIX) or len(presented) > 200:
        return None
    digest = hash_key(presented)
    with sessions() as session:
        row = session.execute(
            select(
                ApiKey.id,
                ApiKey.key_hash,
                ApiKey.callback_url,
                ApiKey.models,
                ApiKey.rpm,
                ApiKey.images_per_day,
                ApiKey.max_pending,
            ).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
        ).one_or_none()
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    return Caller(
        row.id,
        row.callback_url,
        StoredLimits(row.rpm, row.images_per_day, row.max_pending),
        frozenset(row.models) if row.models is not None else None,
    )


class KeyCache:
    """Authenticated keys remembered in-process for ttl_s, keyed by the key's SHA-256 (the raw key is
    never kept), so a request costs no database round trip for its key. The price: a revoked key
    (or a changed default callback URL or limit) takes effect within ttl_s. Refused keys are not cached, so
    a key created a moment ago works at once. ttl_s = 0 looks every key up. A key's last_used_at is
    written at most every last_used_every_s from this process."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        ttl_s: float,
        max_entries: int = 10_000,
        last_used_every_s: float = LAST_USED_EVERY_S,
    ):
        self._sessions, self._ttl_s, self._max_entries = sessions, ttl_s, max_entries
        self._entries: dict[str, tuple[float, Caller]] = {}
        self._last_used_every_s = last_used_every_s
        self._last_written: dict[uuid.UUID, float] = {}  # key id -> when its last_used_at was written

    def authenticate(self, presented: str) -> Caller | None:
        if not presented.startswith(KEY_PREFIX) or len(presented) > 200:
            return None
        digest, now = hash_key(presented), time.monotonic()
        entry = self._entries.get(digest)
        if entry is not None and entry[0] > now:
            self._note_use(entry[1].id, now)
            return entry[1]
        caller = authenticate(self._sessions, presented)
        if caller is not None:
            self._note_use(caller.id, now)
        if caller is not None and self._ttl_s > 0:
            if len(self._entries) >= self._max_entries:
                self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
                if len(self._entries) >= self._max_entries:
                    self._entries.clear()
            self._entries[digest] = (now + self._ttl_s, caller)
        return caller

    def _note_use(self, key_id: uuid.UUID, now: float) -> None:
        if now - self._last_written.get(key_id, -math.inf) < self._last_used_every_s:
            return
        if len(self._last_written) >= self._max_entries:
            self._last_written.clear()
        self._last_written[key_id] = now
        try:
            with self._sessions.begin() as session:
                session.execute(
                    update(ApiKey)
                    .where(ApiKey.id == key_id)
                    .values(last_used_at=utcnow())
                    .execution_options(synchronize_session=False)
                )
        except Exception as exc:  # bookkeeping only: the request goes on, the next minute tries again
            log.warning("last use of key %s not recorded: %s", key_id, type(exc).__name__)
