"""The worker's Redis transport: kombu's, with messages taken several at a time and early
acknowledgements that cost Redis nothing (workers/early_acks.py).

kombu's channel takes one message per `BRPOP` round trip. When a backlog starts draining (a batch,
a burst of synchronous requests), a worker with a thousand free slots spent ~12% of its first second
on those round trips. Here it asks with `BLMPOP … COUNT n` instead: the same keys in the same order,
the same blocking wait, but up to `RECEIVE_MAX` messages of the first non-empty list at once, never
more than the prefetch window has room for. The queues still take turns after each receive, so a
synchronous request waits behind at most `RECEIVE_MAX - 1` messages of a batch that were taken
together with the one ahead of it; each is only handed to a slot, none waits for another to end.
What faster intake does cost, measured: more of a backlog's tasks start at once, and a synchronous
request sent into a drain's first seconds shares the CPU with them (~0.3 s more on average with a
1 s upstream; docs/performance.md, the tenth session).

Redis before 7.0 has no `BLMPOP`: its error is taken as the answer, and the channel goes back to
kombu's `BRPOP` for good.
"""

from __future__ import annotations

import logging
from queue import Empty
from time import monotonic

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from imagegate.workers.early_acks import EarlyAckQoS

log = logging.getLogger(__name__)

RECEIVE_MAX = 16


class ManyAtOnceChannel(kombu_redis.Channel):
    QoS = EarlyAckQoS
    _server_has_blmpop = True  # until it answers otherwise (Redis < 7.0)
    _asked_for_many = False

    def _brpop_start(self, timeout=None):
        # kombu's key prefixing knows BRPOP's arguments, not BLMPOP's
        self._asked_for_many = self._server_has_blmpop and not self.global_keyprefix
        if not self._asked_for_many:
            return super()._brpop_start(timeout)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        room = self.qos.can_consume_max_estimate()
        count = RECEIVE_MAX if room is None else max(1, min(RECEIVE_MAX, room))
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        wait_s = self.brpop_timeout if timeout is None else timeout
        self.client.connection.send_command("BLMPOP", wait_s or 0, len(keys), *keys, "RIGHT", "COUNT", count)

    def _brpop_read(self, **options):
        if not self._asked_for_many:
            return super()._brpop_read(**options)
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BLMPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # as kombu does: the next turn reconnects
                raise
            except self.ResponseError as error:
                if "unknown command" not in str(error).lower():
                    raise
                log.info("this Redis has no BLMPOP (it needs 7.0): taking one message at a time")
                self._server_has_blmpop = False
                raise Empty() from None
            if not reply:
                raise Empty()
            key, items = reply
            queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            for item in items:
                self.connection._deliver(loads(bytes_to_str(item)), queue)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()


class WorkerRedisTransport(kombu_redis.Transport):
    Channel = ManyAtOnceChannel
