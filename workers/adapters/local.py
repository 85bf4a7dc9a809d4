"""`local`: renders real images with Pillow, no network. Serves the embedded default and load tests."""

from __future__ import annotations

import hashlib
import io
import textwrap
from typing import ClassVar

import httpx
from PIL import Image, ImageDraw, ImageFont, ImageOps

from imagegate.app.edits import EditInputs
from imagegate.app.failures import ErrorCode
from imagegate.app.providers import ModelConfig
from imagegate.app.schemas import GenerationRequest
from imagegate.workers.adapters.base import Capabilities, Generation, UpstreamError, UpstreamImage

MAX_SIDE = 4096
NAMED_SIZES = {"auto": (1024, 1024), "1k": (1024, 1024), "2k": (2048, 2048), "4k": (4096, 4096)}


def parse_size(size: str | None) -> tuple[int, int]:
    """(width, height); ValueError for a size this adapter cannot draw (intake lets `8k` through)."""
    size = (size or "auto").lower()
    if size in NAMED_SIZES:
        return NAMED_SIZES[size]
    width, _, height = size.partition("x")
    return int(width), int(height)


def render(prompt: str, index: int, width: int, height: int, image_format: str) -> bytes:
    """A deterministic picture for (prompt, index): a colour from their hash, the prompt drawn in."""
    digest = hashlib.sha256(f"{index}:{prompt}".encode()).digest()
    background = (digest[0], digest[1], digest[2])
    ink = tuple(255 - channel for channel in background)
    mode = "RGBA" if image_format in ("png", "webp") else "RGB"
    image = Image.new(mode, (width, height), background)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, min(width, height) // 16))
    lines = textwrap.wrap(prompt, width=max(8, width // max(6, min(width, height) // 28)))[:12]
    draw.multiline_text((width // 20, height // 20), "\n".join(lines + [f"#{index + 1}"]), fill=ink, font=font)
    out = io.BytesIO()
    image.save(out, format=image_format.upper())
    return out.getvalue()


class LocalAdapter:
    name: ClassVar[str] = "local"
    capabilities: ClassVar[Capabilities] = Capabilities(edits=True)

    def __init__(self, config: ModelConfig, http: httpx.Client, api_key: str | None) -> None:
        self.config = config

    def generate(self, request: GenerationRequest) -> Generation:
        width, height = _checked_size(request.size)
        images = [
            UpstreamImage(data=render(request.prompt, index, width, height, request.image_format))
            for index in range(request.n)
        ]
        return Generation(images=images, usage={"generated_images": len(images)})

    def edit(self, request: GenerationRequest, inputs: EditInputs) -> Generation:
        """The first input image (at the requested size, else its own) with the prompt's picture
        drawn in where the mask is transparent, or blended over all of it without a mask."""
        with Image.open(io.BytesIO(inputs.images[0].data)) as opened:
            base = opened.convert("RGBA")
        width, height = _checked_size(request.size) if request.size not in (None, "auto") else base.size
        base = base.resize((width, height))
        where = None
        if inputs.mask is not None:
            with Image.open(io.BytesIO(inputs.mask.data)) as opened:
                where = ImageOps.invert(opened.convert("RGBA").getchannel("A").resize((width, height)))
        images = []
        for index in range(request.n):
            with Image.open(io.BytesIO(render(request.prompt, index, width, height, "png"))) as drawn:
                drawn = drawn.convert("RGBA")
                edited = Image.composite(drawn, base, where) if where else Image.blend(base, drawn, 0.5)
            out = io.BytesIO()
            mode = "RGBA" if request.image_format in ("png", "webp") else "RGB"
            edited.convert(mode).save(out, format=request.image_format.upper())
            images.append(UpstreamImage(data=out.getvalue()))
        return Generation(images=images, usage={"generated_images": len(images)})


def _checked_size(size: str | None) -> tuple[int, int]:
    try:
        width, height = parse_size(size)
    except ValueError:
        width = height = 0  # refused just below, in the same words
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise UpstreamError(ErrorCode.UPSTREAM_REJECTED, f"size must be at most {MAX_SIDE}x{MAX_SIDE}", retryable=False)
    return width, height
