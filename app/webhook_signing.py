"""Webhook signing secrets and signatures (Standard Webhooks, https://www.standardwebhooks.com/).

Shared by the API and the CLI (which make secrets) and the workers (which sign deliveries);
no HTTP here.
"""

from __future__ import annotations

import base64
import secrets as _secrets
from datetime import UTC, datetime

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A signing secret: whsec_ and 24 random bytes in base64, the form receivers' libraries read."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(24)).decode("ascii")


def signature_header(secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature value: one signature per secret, space-separated, so that while a
    secret is rotated receivers holding either the old or the new one can verify."""
    if not secrets:
        raise ValueError("at least one webhook secret is needed to sign")
    when = datetime.fromtimestamp(timestamp, UTC)
    payload = body.decode()  # the library signs text; the body is UTF-8 JSON
    return " ".join(Webhook(secret).sign(msg_id, when, payload) for secret in secrets)
