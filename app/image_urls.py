"""Signed, expiring image URLs: usable without an Authorization header, like OpenAI's."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
import uuid

# 1 to 12 ASCII digits: int() raises on "²" and past 4300 digits, as compare_digest does on
# non-ASCII text (so signatures are compared as bytes); a malformed URL is refused, never a 500.
EXPIRES = re.compile(r"[0-9]{1,12}")

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}


def _signature(secret: str, image_id: uuid.UUID, expires: int) -> str:
    mac = hmac.new(secret.encode(), f"image:{image_id}:{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def signed_image_url(
    public_url: str, secret: str, image_id: uuid.UUID, content_type: str, ttl_s: int, now: float | None = None
) -> str:
    expires = int((now or time.time()) + ttl_s)
    extension = EXTENSIONS.get(content_type, "bin")
    return (
        f"{public_url.rstrip('/')}/files/images/{image_id}.{extension}"
        f"?expires={expires}&signature={_signature(secret, image_id, expires)}"
    )


def verify(secret: str, image_id: uuid.UUID, expires: str, signature: str, now: float | None = None) -> bool:
    if not EXPIRES.fullmatch(expires) or int(expires) < (now or time.time()):
        return False
    return hmac.compare_digest(_signature(secret, image_id, int(expires)).encode(), signature.encode())
