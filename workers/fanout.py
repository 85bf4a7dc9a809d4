"""Fan-out: when n exceeds what one upstream call returns, the images come from several calls."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from imagegate.app.stores.attempts import Claim, NewImage
from imagegate.workers.adapters import Upstream
from imagegate.workers.adapters.base import UpstreamError


def slot_counts(n: int, per_call: int | None) -> list[int]:
    """How many images each call (slot) asks for: n=5, per_call=2 -> [2, 2, 1]."""
    per_call = per_call or n
    return [min(per_call, n - start) for start in range(0, n, per_call)]


def merge_usage(total: dict[str, Any] | None, more: dict[str, Any] | None) -> dict[str, Any] | None:
    """Add up the numbers of several calls' usage objects (nested ones too)."""
    if not total or not more:
        return total or more
    merged = dict(total)
    for key, value in more.items():
        current = merged.get(key)
        if isinstance(value, (int, float)) and isinstance(current, (int, float)) and not isinstance(value, bool):
            merged[key] = current + value
        elif isinstance(value, dict) and isinstance(current, dict):
            merged[key] = merge_usage(current, value)
        else:
            merged.setdefault(key, value)
    return merged


@dataclass(frozen=True)
class Call:
    """What one upstream call (one fan-out slot) gave."""

    slot: int
    images: list[NewImage] = dataclasses.field(default_factory=list)
    usage: dict | None = None
    upstream_status: int | None = None
    error: UpstreamError | None = None


def plan_calls(upstreams: dict[str, Upstream], claim: Claim, done: set[int]) -> list[int]:
    """The fan-out slots an attempt calls: those earlier attempts did not store; none when the model
    cannot be served (the attempt then fails without a call)."""
    upstream = upstreams.get(claim.route)
    if upstream is None or upstream.unavailable:
        return []
    if upstream.polling:
        return [0]
    n = claim.request.get("n", 1)
    counts = slot_counts(n if isinstance(n, int) else 1, upstream.max_images_per_call)
    return [slot for slot in range(len(counts)) if slot not in done]
