"""The providers file: which models are served and which adapter speaks to each upstream.

Adapter names come from the `imagegate.adapters` entry points, so the web process can check a
name without importing adapter code (which needs httpx and lives in the workers).
"""

from __future__ import annotations

import tomllib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from imagegate.app.families import known_families

ADAPTER_ENTRY_POINTS = "imagegate.adapters"
LOCAL_MODEL = "local"
# The family a model of these adapters has when the providers file names none: the adapter's own
# limits, so that intake refuses what the adapter could only fail at (app/families.py).
ADAPTER_FAMILIES = {"local": "local"}


class ProvidersFileError(ValueError):
    """The providers file cannot be served; the message names the file, the model and the key."""


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    adapter: str
    base_url: str | None = None
    # Name of the environment variable holding the upstream key, never the key itself; a worker
    # reads it once, at start (workers.adapters.resolve_upstreams).
    api_key_env: str | None = None
    upstream_model: str | None = None
    # Total time allowed for one upstream call.
    timeout_s: float = Field(120.0, gt=0)
    # Ceiling for a request's `retries`.
    max_retries: int = Field(2, ge=0, le=10)
    # Image URLs elsewhere than base_url's own origin may point at private addresses (a test's 127.0.0.1).
    allow_private_downloads: bool = False

    # What a request may ask of this model, checked at intake (app/families.py). A family sets
    # them all at once; a key given here overrides the family's value.
    family: str | None = None
    sizes: list[str] | None = None  # allowed `size` values; [] means no `size` at all
    aspect_ratios: list[str] | None = None  # allowed `aspect_ratio` values
    size_range: tuple[int, int] | None = None  # WIDTHxHEIGHT with both sides in [min, max]
    min_pixels: int | None = Field(None, gt=0)
    max_pixels: int | None = Field(None, gt=0)
    max_prompt_chars: int | None = Field(None, gt=0)
    max_n: int | None = Field(None, ge=1, le=10)

    # How many images one upstream call returns; more are made by concurrent calls (fan-out).
    # Unset: the adapter's own capability.
    max_images_per_call: int | None = Field(None, ge=1)
    # POST /v1/images/edits: whether the model edits (unset: its family's say, else its adapter's
    # declared capability), how many input images it takes, and how its edits reach the upstream:
    # `multipart` to the upstream's /images/edits (the openai adapter's default) or `fields`, the
    # files as base64 data: URIs in the `image`/`mask` fields of /images/generations (GeekAI style).
    edits: bool | None = None
    max_input_images: int | None = Field(None, ge=1)
    edit_mode: Literal["multipart", "fields"] | None = None
    # Fields some relays want as `[null, value]` arrays (the grok relay's aspect_ratio, ...).
    wrap_params: list[str] = []
    # chat_image: an optional system prompt, and `image_generation: true` in the body.
    system_prompt: str | None = None
    image_generation: bool = False
    # Asynchronous upstreams: first poll after poll_interval_s, growing; give up after poll_deadline_s.
    poll_interval_s: float = Field(2.0, gt=0)
    poll_deadline_s: float = Field(600.0, gt=0)
    # Models to go on with, in order, once this one's retries are spent on retryable errors.
    fallbacks: list[str] = []
    # The upstream's own limits for this model, kept by every worker together (workers/model_limits.py):
    # upstream calls in flight at once, and calls started in any 60 s. Each fan-out call counts;
    # for an asynchronous upstream, the submit. Unset: no limit.
    max_concurrency: int | None = Field(None, ge=1)
    rpm: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _adapter_family(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("family") is None and data.get("adapter") in ADAPTER_FAMILIES:
            return {**data, "family": ADAPTER_FAMILIES[data["adapter"]]}
        return data

    @property
    def upstream_name(self) -> str:
        return self.upstream_model or self.name


def installed_adapters() -> set[str]:
    return {ep.name for ep in entry_points(group=ADAPTER_ENTRY_POINTS)}


def default_models() -> dict[str, ModelConfig]:
    return {LOCAL_MODEL: ModelConfig(name=LOCAL_MODEL, adapter="local", timeout_s=60, max_retries=2)}


def load_models(path: Path | None, adapters: set[str] | None = None) -> dict[str, ModelConfig]:
    """Read and check the providers file; without one, serve the built-in `local` model."""
    if path is None:
        return default_models()
    adapters = installed_adapters() if adapters is None else adapters
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProvidersFileError(f"{path}: cannot read providers file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProvidersFileError(f"{path}: not valid TOML: {exc}") from None

    unknown_tables = set(document) - {"models"}
    if unknown_tables:
        raise ProvidersFileError(
            f'{path}: unknown top-level key {sorted(unknown_tables)[0]!r}; expected [models."NAME"] tables'
        )
    tables = document.get("models")
    if not isinstance(tables, dict) or not tables:
        raise ProvidersFileError(f'{path}: no models; declare at least one [models."NAME"] table')

    models: dict[str, ModelConfig] = {}
    for name, table in tables.items():
        where = f"{path}: model {name!r}"
        if not isinstance(table, dict):
            raise ProvidersFileError(f"{where}: must be a table")
        try:
            config = ModelConfig(name=name, **table)
        except TypeError as exc:  # a key named "name" collides with the table name
            raise ProvidersFileError(f"{where}: {exc}") from None
        except ValidationError as exc:
            error = exc.errors()[0]
            key = ".".join(str(part) for part in error["loc"]) or "?"
            raise ProvidersFileError(f"{where}: key {key!r}: {error['msg']}") from None
        if config.adapter not in adapters:
            known = ", ".join(sorted(adapters)) or "none installed"
            raise ProvidersFileError(f"{where}: key 'adapter': unknown adapter {config.adapter!r} (known: {known})")
        if config.family is not None and config.family not in known_families():
            raise ProvidersFileError(
                f"{where}: key 'family': unknown family {config.family!r} "
                f"(known: {', '.join(sorted(known_families()))})"
            )
        if config.adapter != "local" and not config.base_url:
            raise ProvidersFileError(f"{where}: key 'base_url': required for adapter {config.adapter!r}")
        models[name] = config
    for name, config in models.items():
        for fallback in config.fallbacks:
            if fallback not in models or fallback == name:
                raise ProvidersFileError(
                    f"{path}: model {name!r}: key 'fallbacks': {fallback!r} is not another model of this file"
                )
    return models
