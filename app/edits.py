"""Image edits: the input files of an edit task and what both processes need to know about them.

An edit task's request (the `request` column) is its form fields plus `edit`, a description of its
files (type, size, SHA-256); the bytes themselves live in `task_inputs`, written in the task's
intake transaction and read again by every attempt (app.stores.inputs). Imports stay light: the
API and the workers both use this module.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from imagegate.app.families import constraints
from imagegate.app.providers import ModelConfig

EDIT_KEY = "edit"  # where a stored request describes its input files
IMAGE, MASK = "image", "mask"

# Adapters whose class declares `Capabilities(edits=True)`, for the API, which never imports adapter
# code (tests/unit/test_edits.py checks the two agree). A plugin's model edits when its providers
# entry says `edits = true`.
ADAPTERS_THAT_EDIT = frozenset({"local", "openai", "geekai_async", "chat_image"})

# What an input file may be, recognised by its first bytes (a part's Content-Type is whatever the
# client's library guessed from the file name: the SDK sends application/octet-stream for a buffer).
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
)


def sniff_image_type(data: bytes) -> str | None:
    """image/png, image/jpeg or image/webp from the file's own bytes; None for anything else."""
    for signature, content_type in _SIGNATURES:
        if data.startswith(signature):
            return content_type
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


@dataclass(frozen=True)
class InputFile:
    """One input file of an edit: an image to edit (role `image`, in order) or the mask."""

    role: str
    index: int
    content_type: str
    data: bytes
    filename: str | None = None

    def describe(self) -> dict[str, Any]:
        described = {"content_type": self.content_type, "bytes": len(self.data)}
        described["sha256"] = hashlib.sha256(self.data).hexdigest()
        return described | ({"filename": self.filename} if self.filename else {})

    @property
    def extension(self) -> str:
        return self.content_type.rsplit("/", 1)[-1].replace("jpeg", "jpg")

    @property
    def upload_name(self) -> str:
        """A file name for the upstream's multipart part (some upstreams judge the type by it)."""
        return self.filename or f"{self.role}-{self.index}.{self.extension}"


@dataclass(frozen=True)
class EditInputs:
    """An edit task's files, as an attempt hands them to its adapter."""

    images: tuple[InputFile, ...]
    mask: InputFile | None = None
    # Fields only an edit endpoint knows (input_fidelity), forwarded as they were sent.
    params: dict[str, Any] | None = None

    @property
    def files(self) -> list[InputFile]:
        return [*self.images, *([self.mask] if self.mask else [])]


def describe_inputs(images: list[InputFile], mask: InputFile | None) -> dict[str, Any]:
    """What the task's stored request says of its files (their fingerprint, not their bytes)."""
    described: dict[str, Any] = {"images": [image.describe() for image in images]}
    return described | ({MASK: mask.describe()} if mask else {})


def split_stored(request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the fields, the `edit` description or None) of a stored request."""
    if EDIT_KEY not in request:
        return request, None
    fields = {name: value for name, value in request.items() if name != EDIT_KEY}
    return fields, request[EDIT_KEY]


def can_edit(config: ModelConfig) -> bool:
    """The model's (or its family's) `edits`, else what its adapter declares."""
    declared = constraints(config).get("edits")
    return declared if declared is not None else config.adapter in ADAPTERS_THAT_EDIT


def edit_refusal(config: ModelConfig, image_count: int) -> tuple[str, str] | None:
    """(param, message) when the model cannot take this edit; None when it can."""
    if not can_edit(config):
        return "model", f"Model '{config.name}' does not support image edits."
    most = constraints(config).get("max_input_images")
    if most is not None and image_count > most:
        return "image", f"Model '{config.name}' edits at most {most} input image(s); {image_count} were sent."
    return None
