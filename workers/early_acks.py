"""The QoS of the worker's Redis transport (workers/redis_transport.py): messages acknowledged soon
after delivery cost no Redis writes for their acknowledgement.

kombu's Redis transport records every delivered message in its `unacked` hash (a MULTI/EXEC round
trip) so that a worker's death hands it back after the visibility timeout, and deletes the record
at the acknowledgement (another). The worker acknowledges `run_task` as it starts (workers/celery_app.py:
from its claim on the attempt's lease in Postgres recovers it), so for nearly every message both
writes were spent on a record that lived a few milliseconds: ~9% of the worker's CPU under load.
Here the record is held back `HOLD_S`: an acknowledgement within it cancels it, and a message still
unacknowledged then (waiting for a slot, or a countdown held in memory) is recorded as before, in
one pipeline with the others due. A worker that dies holding an unrecorded message leaves its task
pending with no message, as a death between delivery and claim always did; the sweeper republishes
it (it counts what the broker holds, see app/sweeper.py). So it stays at-least-once, nothing lost.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

HOLD_S = 1.0


class EarlyAckQoS(kombu_redis.QoS):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # delivery tag -> (message, time.time() and time.monotonic() of its delivery), oldest first
        self._held: OrderedDict[str, tuple[object, float, float]] = OrderedDict()

    def append(self, message, delivery_tag):
        virtual.QoS.append(self, message, delivery_tag)  # in memory only, for the prefetch count
        self._held[delivery_tag] = (message, time.time(), time.monotonic())
        self.record_held(older_than_s=HOLD_S)

    def can_consume(self):
        # Asked on every turn of the consumer's loop: records what has been held long enough.
        self.record_held(older_than_s=HOLD_S)
        return super().can_consume()

    def ack(self, delivery_tag):
        if self._held.pop(delivery_tag, None) is not None:
            virtual.QoS.ack(self, delivery_tag)  # never recorded: nothing to delete in Redis
            return
        super().ack(delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        self.record_held(older_than_s=0)  # kombu restores a requeued message from its record
        super().reject(delivery_tag, requeue=requeue)

    def restore_unacked(self, client=None):
        self.record_held(older_than_s=0)  # a stopping worker hands back what it holds, as before
        return super().restore_unacked(client)

    def restore_unacked_once(self, stderr=None):
        self.record_held(older_than_s=0)
        return super().restore_unacked_once(stderr)

    def record_held(self, *, older_than_s: float) -> None:
        """Write the kombu record of every held message delivered at least `older_than_s` ago."""
        if not self._held:
            return
        now = time.monotonic()
        due = []
        for tag, (message, delivered_at, delivered_mono) in self._held.items():
            if now - delivered_mono < older_than_s:
                break  # oldest first: the rest are younger
            due.append((tag, message, delivered_at))
        if not due:
            return
        for tag, _, _ in due:  # taken out first: an ack arriving meanwhile deletes the record itself
            self._held.pop(tag, None)
        with self.pipe_or_acquire() as pipe:
            for tag, message, delivered_at in due:
                delivery = message.delivery_info
                pipe.zadd(self.unacked_index_key, {tag: delivered_at})
                pipe.hset(self.unacked_key, tag, dumps([message._raw, delivery["exchange"], delivery["routing_key"]]))
            pipe.execute()
