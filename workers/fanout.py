"""Fan-out: when n exceeds what one upstream call returns, the images come from several calls."""

from __future__ import annotations

from typing import Any


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
