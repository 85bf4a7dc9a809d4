"""The adapter registry: adapter classes come from the `imagegate.adapters` entry points, built-ins
included, and each configured model is bound once, at worker start, to its adapter and its key."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points

import httpx

from imagegate.app.families import constraints
from imagegate.app.providers import ADAPTER_ENTRY_POINTS, ModelConfig
from imagegate.workers.adapters.base import EDIT_METHODS, REQUIRED_METHODS, Adapter, Capabilities


def load_adapters() -> dict[str, type[Adapter]]:
    return {ep.name: checked(ep.name, ep.load()) for ep in entry_points(group=ADAPTER_ENTRY_POINTS)}


def checked(name: str, adapter: type) -> type[Adapter]:
    """The class, if it declares what the runner reads; a plugin that does not stops the worker here,
    not at its first task."""
    capabilities = getattr(adapter, "capabilities", None)
    if not isinstance(capabilities, Capabilities):
        raise TypeError(
            f"adapter {name!r} ({adapter.__qualname__}): `capabilities` must be a "
            f"imagegate.workers.adapters.base.Capabilities"
        )
    required = REQUIRED_METHODS[capabilities.polling] + (
        (EDIT_METHODS[capabilities.polling],) if capabilities.edits else ()
    )
    missing = [method for method in required if not callable(getattr(adapter, method, None))]
    if missing:
        kind = ("a polling adapter" if capabilities.polling else "an adapter") + (
            " that edits" if capabilities.edits else ""
        )
        raise TypeError(f"adapter {name!r} ({adapter.__qualname__}): {kind} needs {' and '.join(missing)}()")
    return adapter


@dataclass(frozen=True)
class Upstream:
    """A configured model as a worker serves it: its settings, its adapter and its upstream key."""

    config: ModelConfig
    adapter: type[Adapter]
    api_key: str | None
    # Images one call returns (the model's or its family's limit, else the adapter's); None: any n.
    max_images_per_call: int | None
    # Why the model cannot be served (its key's environment variable is unset); its tasks fail so.
    unavailable: str | None = None

    @property
    def polling(self) -> bool:
        return self.adapter.capabilities.polling

    def connect(self, http: httpx.Client) -> Adapter:
        return self.adapter(self.config, http, self.api_key)


def resolve_upstreams(
    models: Mapping[str, ModelConfig], adapters: Mapping[str, type[Adapter]], environ: Mapping[str, str] = os.environ
) -> dict[str, Upstream]:
    """Every model whose adapter is installed, with its key read from `api_key_env` once."""
    upstreams = {}
    for name, config in models.items():
        adapter = adapters.get(config.adapter)
        if adapter is None:
            continue
        api_key = environ.get(config.api_key_env) if config.api_key_env else None
        unavailable = (
            f"the environment variable {config.api_key_env} holding the upstream key is not set"
            if config.api_key_env and not api_key
            else None
        )
        per_call = constraints(config).get("max_images_per_call") or adapter.capabilities.max_images_per_call
        upstreams[name] = Upstream(config, adapter, api_key or None, per_call, unavailable)
    return upstreams
