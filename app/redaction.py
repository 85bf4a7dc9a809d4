"""Secrets are cut out of text before it is kept anywhere.

An upstream's error text ends up in the task's stored error, GET responses, webhooks and logs; an
upstream that echoes the request's headers would put the operator's upstream key in all of them.
The worker's runner passes every upstream error through one Redactor before storing or logging it,
and every process's log lines pass through one too (app/logs.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

REDACTED = "[redacted]"

# One credential token: up to a quote, a separator or a bracket (JSON, reprs, header dumps); never
# one already redacted.
_TOKEN = r"""[^\s"',;&{}\[\]]+"""
PATTERNS = (
    # An echoed header, in any shape: `Authorization: Bearer x`, `"authorization": "Basic x"`, `x-api-key=x`.
    re.compile(
        rf"""((?:authorization|api[-_]?key|access[-_]?token)["']?\s*[:=]\s*["']?)(?:[A-Za-z-]+\s+)?{_TOKEN}""",
        re.IGNORECASE,
    ),
    # A bearer token wherever it appears.
    re.compile(rf"(bearer\s+){_TOKEN}", re.IGNORECASE),
    # Strings that look like API keys: OpenAI-style `sk-...`, this gateway's own `ig_...`.
    re.compile(r"()\b(?:sk|ig)[-_][A-Za-z0-9_-]{8,}"),
    # Webhook signing secrets (base64 after the prefix).
    re.compile(r"()\bwhsec_[A-Za-z0-9+/=]{8,}"),
    # The signature of a signed URL (ours, or an upstream's presigned download link).
    re.compile(rf"(signature=){_TOKEN}", re.IGNORECASE),
)
# Whatever any of PATTERNS matches contains one of these: most text (every log line passes here)
# has none, and is let through after one search instead of a substitution per pattern.
_SUSPECT_WORDS = r"authorization|api[-_]?key|access[-_]?token|bearer|\b(?:sk|ig)[-_]|whsec_|signature="
_SUSPECT = re.compile(_SUSPECT_WORDS, re.IGNORECASE)
_SUSPECT_LOWER = re.compile(_SUSPECT_WORDS)


def _suspect(text: str) -> bool:
    # re's IGNORECASE search is ~3x slower than a plain one; lowering ASCII text matches the same.
    # Other text keeps IGNORECASE (re folds a few non-ASCII letters, such as U+017F, to ASCII ones).
    if text.isascii():
        return _SUSPECT_LOWER.search(text.lower()) is not None
    return _SUSPECT.search(text) is not None


class Redactor:
    """Replaces the given secrets (the configured upstream keys) and anything credential-shaped."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        # Longest first, so a key that contains another is replaced whole.
        literal = sorted({secret for secret in secrets if secret}, key=len, reverse=True)
        self._secrets = re.compile("|".join(map(re.escape, literal))) if literal else None

    def text(self, text: str) -> str:
        if self._secrets is not None:
            text = self._secrets.sub(REDACTED, text)
        if not _suspect(text):
            return text
        for pattern in PATTERNS:
            text = pattern.sub(lambda match: match.group(1) + REDACTED, text)
        return text

    def clean(self, texts: Iterable[str]) -> bool:
        """True when none of `texts` holds anything to redact: one search of each kind over them all,
        joined by newlines (no pattern matches across one, so any match within a text is found)."""
        joined = "\n".join(texts)
        return not (self._secrets is not None and self._secrets.search(joined)) and not _suspect(joined)

    def value(self, value: Any) -> Any:
        """Strings redacted inside dicts and lists too (an error's `details`)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {key: self.value(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        return value
