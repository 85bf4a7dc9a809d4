"""The models a key may use, as GET /v1/models shows them: OpenAI's model object with what intake
checks (app/families.py) and how the model is served under `imagegate`.

The web process never imports adapters (they need httpx), so what the built-in ones declare in
their `capabilities` is repeated here; tests/unit/test_model_catalog.py checks the two agree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from imagegate.app.families import constraints
from imagegate.app.providers import ModelConfig
from imagegate.app.read_schemas import ModelCapabilities, ModelView
from imagegate.app.schemas import MAX_N, MAX_PROMPT_CHARS


class AdapterTraits(NamedTuple):
    polling: bool  # the upstream is itself asynchronous
    max_images_per_call: int | None  # None: any n in one call


BUILT_IN_ADAPTERS = {
    "local": AdapterTraits(False, None),
    "openai": AdapterTraits(False, None),
    "geekai_async": AdapterTraits(True, None),
    "chat_image": AdapterTraits(False, 1),
}


def providers_file_time(path: Path | None) -> int:
    """`created` of every model: when the providers file was last changed (0 for the built-in model)."""
    if path is None:
        return 0
    try:
        return int(os.stat(path).st_mtime)
    except OSError:
        return 0


def model_view(config: ModelConfig, *, created: int, default: bool) -> ModelView:
    limits = constraints(config)
    traits = BUILT_IN_ADAPTERS.get(config.adapter)
    size_range = limits.get("size_range")
    return ModelView(
        id=config.name,
        created=created,
        owned_by=config.adapter,
        imagegate=ModelCapabilities(
            family=config.family,
            sizes=limits.get("sizes"),
            size_range=list(size_range) if size_range is not None else None,
            min_pixels=limits.get("min_pixels"),
            max_pixels=limits.get("max_pixels"),
            aspect_ratios=limits.get("aspect_ratios"),
            max_prompt_chars=limits.get("max_prompt_chars") or MAX_PROMPT_CHARS,
            max_n=limits.get("max_n") or MAX_N,
            max_images_per_call=limits.get("max_images_per_call") or (traits.max_images_per_call if traits else None),
            async_upstream=traits.polling if traits else None,
            fallbacks=list(config.fallbacks),
            max_retries=config.max_retries,
            default=default,
        ),
    )
