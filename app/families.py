"""What each model family accepts, declared as data and checked at intake.

A refused request is answered 400 before any task is stored, instead of costing an upstream call
that fails. A model's `family` picks a row of FAMILIES; any of the same keys set on the model in the
providers file overrides that row's value. A model with neither has nothing checked.

Values come from GeekAI's size table and the OpenAI/grok relay docs. Imports stay light (no Flask,
no httpx, no workers) so both processes can use this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # type hints only, so app/providers.py can import this module without a cycle
    from imagegate.app.providers import ModelConfig
    from imagegate.app.schemas import GenerationRequest

# The ModelConfig fields a family may set.
CONSTRAINT_KEYS = (
    "sizes",
    "aspect_ratios",
    "size_range",
    "min_pixels",
    "max_pixels",
    "max_prompt_chars",
    "max_n",
    "max_images_per_call",
    "edits",
    "max_input_images",
)

FAMILIES: dict[str, dict[str, Any]] = {
    # The built-in `local` adapter draws any WIDTHxHEIGHT up to 4096 a side (workers/adapters/local.py
    # MAX_SIDE), or a named size; a larger one used to be accepted here and fail in the worker.
    "local": {"sizes": ["auto", "1k", "2k", "4k"], "size_range": (1, 4096)},
    # OpenAI's edits take up to 16 input images for gpt-image, one for dall-e-2; dall-e-3 has none.
    "gpt-image": {
        "sizes": ["1024x1024", "1024x1536", "1536x1024", "auto"],
        "max_prompt_chars": 32000,
        "max_input_images": 16,
    },
    # The seed only says "any size in a range" for GPT-Image-2; (256, 4096) is our choice, plus "auto".
    "gpt-image-2": {"sizes": ["auto"], "size_range": (256, 4096), "max_prompt_chars": 32000, "max_input_images": 16},
    "dall-e-2": {
        "sizes": ["256x256", "512x512", "1024x1024"],
        "max_n": 10,
        "max_prompt_chars": 1000,
        "max_input_images": 1,
    },
    # dall-e-3 makes one image per call: n=1 only, and one image per upstream call.
    "dall-e-3": {
        "sizes": ["1024x1024", "1792x1024", "1024x1792"],
        "max_n": 1,
        "max_images_per_call": 1,
        "max_prompt_chars": 4000,
        "edits": False,
    },
    # No size at all: the shape is chosen by aspect_ratio.
    "imagen": {"sizes": [], "aspect_ratios": ["1:1", "3:4", "4:3", "9:16", "16:9"]},
    # `size` carries a resolution here, not WIDTHxHEIGHT; compared case-insensitively ("1K" is fine).
    "banana": {
        "sizes": ["1k", "2k", "4k"],
        "aspect_ratios": ["1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"],
    },
    "cogview": {"sizes": ["1024x1024", "768x1344", "864x1152", "1344x768", "1152x864", "1440x720", "720x1440"]},
    "wanx": {"size_range": (768, 1440), "max_pixels": 2_000_000},
    "kling": {"sizes": [], "aspect_ratios": ["16:9", "9:16", "1:1", "4:3", "3:4", "3:2", "2:3"]},
    "jimeng": {"sizes": ["512x512", "512x384", "384x512", "512x341", "341x512", "512x288", "288x512"]},
    "stability": {"size_range": (64, 16384), "min_pixels": 4096},
    "grok": {
        "sizes": ["960x960", "720x1280", "1280x720", "1168x784", "784x1168"],
        "aspect_ratios": [
            "1:1",
            "3:4",
            "4:3",
            "9:16",
            "16:9",
            "2:3",
            "3:2",
            "9:19.5",
            "19.5:9",
            "9:20",
            "20:9",
            "1:2",
            "2:1",
            "auto",
        ],
        "max_prompt_chars": 1000,
        "max_n": 10,
    },
}


class RequestRefused(ValueError):
    """The request asks for something its model cannot do; `param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param, self.message = param, message


def known_families() -> set[str]:
    return set(FAMILIES)


def constraints(config: ModelConfig) -> dict[str, Any]:
    """The model's family values, overlaid by the keys set on the model. KeyError for an unknown family."""
    values: dict[str, Any] = {}
    if config.family is not None:
        if config.family not in FAMILIES:
            raise KeyError(f"unknown model family {config.family!r} (known: {', '.join(sorted(FAMILIES))})")
        values.update(FAMILIES[config.family])
    for key in CONSTRAINT_KEYS:
        value = getattr(config, key)
        if value is not None:  # None means "not set here", so the family's value stands
            values[key] = value
    return values


def check_request(request: GenerationRequest, config: ModelConfig) -> None:
    """Raise RequestRefused for the first thing the model would refuse: prompt, n, size, aspect_ratio."""
    limits = constraints(config)
    model = config.name

    max_chars = limits.get("max_prompt_chars")
    if max_chars is not None and len(request.prompt) > max_chars:
        raise RequestRefused(
            "prompt",
            f"Invalid value for 'prompt': it is {len(request.prompt)} characters; "
            f"model '{model}' takes at most {max_chars}.",
        )

    max_n = limits.get("max_n")
    if max_n is not None and request.n > max_n:
        raise RequestRefused("n", f"Invalid value for 'n': model '{model}' makes at most {max_n} image(s) per request.")

    if request.size is not None and not _size_allowed(request.size, limits):
        ratios = limits.get("aspect_ratios")
        if limits.get("sizes") == [] and limits.get("size_range") is None:
            allowed = f"allowed aspect_ratio values: {', '.join(ratios)}" if ratios else "omit size"
            raise RequestRefused(
                "size", f"Invalid value for 'size': model '{model}' takes aspect_ratio, not size; {allowed}."
            )
        raise RequestRefused(
            "size",
            f"Invalid value for 'size': '{request.size}' is not supported by model "
            f"'{model}'; allowed: {_describe_sizes(limits)}.",
        )

    ratios = limits.get("aspect_ratios")
    if request.aspect_ratio is not None and ratios is not None and request.aspect_ratio not in ratios:
        raise RequestRefused(
            "aspect_ratio",
            f"Invalid value for 'aspect_ratio': '{request.aspect_ratio}' is not "
            f"supported by model '{model}'; allowed: {', '.join(ratios) or 'none'}.",
        )


def _parse_size(size: str) -> tuple[int, int] | None:
    """(width, height) of a "WxH" size, None for anything else ("auto", "1k", or a malformed value)."""
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        return None
    return int(width), int(height)


def _size_allowed(size: str, limits: dict[str, Any]) -> bool:
    sizes, size_range = limits.get("sizes"), limits.get("size_range")
    min_pixels, max_pixels = limits.get("min_pixels"), limits.get("max_pixels")
    if sizes and size.casefold() in {allowed.casefold() for allowed in sizes}:
        return True
    if sizes is not None and size_range is None:
        return False  # a list alone is the whole choice
    dims = _parse_size(size)
    if dims is None:
        # Without a list or a range, sizes are not restricted: only a WxH size's pixels can be judged.
        return sizes is None and size_range is None
    width, height = dims
    if size_range is not None and not all(size_range[0] <= side <= size_range[1] for side in dims):
        return False
    pixels = width * height
    return (min_pixels is None or pixels >= min_pixels) and (max_pixels is None or pixels <= max_pixels)


def _describe_sizes(limits: dict[str, Any]) -> str:
    parts = list(limits.get("sizes") or [])
    size_range = limits.get("size_range")
    pixel_limits = []
    if limits.get("min_pixels") is not None:
        pixel_limits.append(f"at least {limits['min_pixels']} pixels")
    if limits.get("max_pixels") is not None:
        pixel_limits.append(f"at most {limits['max_pixels']} pixels")
    if size_range is not None or pixel_limits:
        free = "WIDTHxHEIGHT"
        if size_range is not None:
            free += f" with sides in [{size_range[0]}, {size_range[1]}]"
        if pixel_limits:
            free += (" and " if size_range is not None else " with ") + " and ".join(pixel_limits)
        parts.append(free)
    if len(parts) > 1:
        return ", ".join(parts[:-1]) + f" or {parts[-1]}"
    return parts[0] if parts else "no size"
