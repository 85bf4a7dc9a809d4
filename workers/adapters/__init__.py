"""Adapters are found through the `imagegate.adapters` entry points, built-ins included."""

from __future__ import annotations

from importlib.metadata import entry_points

from app.providers import ADAPTER_ENTRY_POINTS


def load_adapters() -> dict[str, type]:
    return {ep.name: ep.load() for ep in entry_points(group=ADAPTER_ENTRY_POINTS)}
