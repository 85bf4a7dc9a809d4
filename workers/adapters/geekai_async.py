"""`geekai_async`: an upstream that is itself asynchronous (GeekAI style: submit, then poll).

Submit with `async: true` and read the upstream's `task_id`; then `GET /images/{task_id}` until
`task_status` is `succeed` or `failed`. The runner records the task id and polls by rescheduling,
so a new attempt resumes polling instead of submitting again."""

from __future__ import annotations

from typing import ClassVar

from imagegate.app.edits import EditInputs
from imagegate.app.failures import ErrorCode
from imagegate.app.schemas import GenerationRequest
from imagegate.workers.adapters.base import (
    Capabilities,
    Generation,
    HttpAdapter,
    UpstreamError,
    with_input_fields,
)
from imagegate.workers.adapters.openai import call, images_body, images_of

REFUSAL_WORDS = ("policy", "sensitive", "moderation", "safety")


class GeekAIAsyncAdapter(HttpAdapter):
    name: ClassVar[str] = "geekai_async"
    capabilities: ClassVar[Capabilities] = Capabilities(polling=True, edits=True)

    def submit(self, request: GenerationRequest) -> str:
        body = images_body(request, self.config) | {"async": True}
        reply, document = call(self.http, self.config, self.api_key, "POST", "/images/generations", json=body)
        task_id = document.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise UpstreamError(
                ErrorCode.UPSTREAM_BAD_RESPONSE,
                "asynchronous upstream gave no task_id",
                retryable=True,
                upstream_status=reply.status,
            )
        return task_id

    def submit_edit(self, request: GenerationRequest, inputs: EditInputs) -> str:
        """GeekAI takes the images to edit in the `image` (and `mask`) fields of a generation."""
        return self.submit(with_input_fields(request, inputs))

    def poll(self, upstream_task_id: str) -> Generation | None:
        reply, document = call(self.http, self.config, self.api_key, "GET", f"/images/{upstream_task_id}")
        status = document.get("task_status")
        if status in ("pending", "running"):
            return None
        if status == "succeed":
            return images_of(reply, document)
        error = document.get("error") if isinstance(document.get("error"), dict) else {}
        code = str(error.get("code") or "")
        refused = any(word in code.lower() for word in REFUSAL_WORDS)
        raise UpstreamError(
            ErrorCode.CONTENT_POLICY if refused else ErrorCode.UPSTREAM_ERROR,
            str(error.get("message") or f"upstream task {status or 'unknown'}"),
            retryable=not refused and status == "failed",
            upstream_status=reply.status,
            details={"upstream_task_id": upstream_task_id, "upstream_code": code},
        )
