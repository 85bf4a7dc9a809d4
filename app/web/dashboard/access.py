"""Who is signed in to the dashboard, and the CSRF token of its forms.

The session is Flask's signed cookie (HttpOnly, SameSite=Lax). It holds a key's id, or for the admin
an HMAC of the admin token, never the key or the token: the cookie is signed, not encrypted. Every
request checks again that the key is not revoked and that the admin token has not changed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass

from flask import session

from imagegate.app.ids import parse_id
from imagegate.app.keys import KeyCache
from imagegate.app.settings import Settings
from imagegate.app.web.dashboard import reads

ADMIN, KEY_ID, CSRF = "admin", "key_id", "csrf"


@dataclass(frozen=True)
class Viewer:
    key_id: uuid.UUID | None  # None: the admin, who sees every key's tasks
    name: str

    @property
    def is_admin(self) -> bool:
        return self.key_id is None


def _admin_fingerprint(settings: Settings) -> str | None:
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if not token:
        return None
    return hmac.new(settings.secret_key.encode(), b"dashboard-admin:" + token.encode(), hashlib.sha256).hexdigest()


def _same_secret(presented: str, expected: str) -> bool:
    """Constant time, whatever the lengths: both sides are hashed first."""
    return hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), hashlib.sha256(expected.encode()).digest())


def viewer(settings: Settings, engine) -> Viewer | None:
    """Who this request's session belongs to, or None (signed out, revoked key, changed admin token)."""
    if ADMIN in session:
        expected = _admin_fingerprint(settings)
        return Viewer(None, "admin") if expected and _same_secret(session[ADMIN], expected) else None
    key_id = parse_id(session.get(KEY_ID))
    name = reads.live_key_name(engine, key_id) if key_id else None
    return Viewer(key_id, name) if name else None


def sign_in(presented: str, settings: Settings, keys: KeyCache) -> bool:
    """Start a session for an API key or the admin token; False if it is neither."""
    presented = presented.strip()
    admin = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if admin and _same_secret(presented, admin):
        _new_session({ADMIN: _admin_fingerprint(settings)})
        return True
    caller = keys.authenticate(presented)
    if caller is None:
        return False
    _new_session({KEY_ID: str(caller.id)})
    return True


def _new_session(values: dict) -> None:
    # A fresh session (and CSRF token) at sign-in: nothing set before it carries over.
    session.clear()
    session.update(values)
    session[CSRF] = secrets.token_urlsafe(32)
    session.permanent = True


def sign_out() -> None:
    session.clear()


def csrf_token() -> str:
    """The session's token for the hidden field of every form (sign-in too, so a session starts then)."""
    if CSRF not in session:
        session[CSRF] = secrets.token_urlsafe(32)
    return session[CSRF]


def csrf_ok(sent: str | None) -> bool:
    expected = session.get(CSRF)
    return bool(expected and sent) and _same_secret(sent, expected)
