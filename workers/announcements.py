"""Task ends announced in groups: the worker's ends arrive many at a time (successes are written in
groups), and a PUBLISH round trip per task was ~5% of its CPU. An end is queued and the call returns;
one announcer sends every end queued meanwhile in one pipeline. A lost announcement only delays a
waiting synchronous request, which also re-reads its task on a growing interval. An end a
synchronous request waits for carries that request's reply, made here with the images in hand."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping
from contextlib import AbstractContextManager

from imagegate.app.stores.attempts import Claim, NewImage
from imagegate.app.views import b64_reply_body
from imagegate.app.wakeups import Wakeup, Wakeups

log = logging.getLogger(__name__)

MAX_GROUP = 500
# Handed-over replies carry images: a group stops growing past this many bytes of them.
MAX_GROUP_BYTES = 16 * 1024 * 1024


class GroupedAnnouncements:
    """A Wakeups whose `announce` is sent grouped (the rest is the wrapped one's)."""

    def __init__(self, wakeups: Wakeups):
        self._wakeups = wakeups
        self._queue: queue.SimpleQueue[tuple[str, bytes | None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._sender: threading.Thread | None = None

    def announce(self, task_id: str, reply: bytes | None = None) -> None:
        self._queue.put((task_id, reply))
        with self._lock:
            if self._sender is None or not self._sender.is_alive():
                self._sender = threading.Thread(target=self._send_forever, name="announcements", daemon=True)
                self._sender.start()

    def announce_many(self, task_ids: list[str], replies: Mapping[str, bytes] | None = None) -> None:
        for task_id in task_ids:
            self.announce(task_id, (replies or {}).get(task_id))

    def take_reply(self, task_id: str) -> bytes | None:
        return self._wakeups.take_reply(task_id)

    def subscription(self, task_id: str) -> AbstractContextManager[Wakeup]:
        return self._wakeups.subscription(task_id)

    def close(self) -> None:
        self._wakeups.close()

    def _send_forever(self) -> None:
        while True:
            group = [self._queue.get()]
            size = len(group[0][1] or b"")
            while len(group) < MAX_GROUP and size < MAX_GROUP_BYTES:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
                size += len(group[-1][1] or b"")
            try:
                self._wakeups.announce_many(
                    [task_id for task_id, _ in group], {task_id: reply for task_id, reply in group if reply is not None}
                )
            except Exception as exc:
                log.warning("could not announce the end of %d task(s): %s", len(group), exc)


def handed_over_reply(claim: Claim, images: list[NewImage], usage: dict | None) -> bytes | None:
    """The body of the reply a synchronous request waiting for this attempt answers, made with the
    images in hand (app/wakeups.py): the API's reply from the stored task, the same JSON. None when
    no request waits for it. The API asks (`awaited`) only for a b64_json task: its reply is the
    images' bytes."""
    if not claim.awaited or claim.created_at is None:
        return None
    ordered = sorted(images, key=lambda image: image.slot)  # as stored: by slot, then in order within one
    return b64_reply_body(
        claim.task_id, claim.created_at, usage, [(image.data, image.revised_prompt) for image in ordered]
    )
