"""Claims grouped across the tasks a worker starts at once: each task's claim waits for a writer
that claims every task queued meanwhile in one transaction (app/stores/claim_groups.py)."""

from __future__ import annotations

import uuid

from imagegate.app.state.refused import Refused
from imagegate.app.stores.attempts import AdmitCalls, AttemptStore, Claim, ClaimAsk, PlanCalls, Waiting
from imagegate.app.stores.claim_groups import claim_many
from imagegate.workers.grouped import Grouped


class GroupedClaims:
    """`AttemptStore.claim`'s signature, its claims made in groups."""

    # One writer: claims asked while it writes wait for its next group. A second writer halved the
    # groups of a backlog's drain, and each group is two statements, each its own commit: 0.79-0.83
    # commits per task with two, 0.42-0.49 with one. A lone claim is still made at once.
    def __init__(self, store: AttemptStore, *, max_group: int = 100, writers: int = 1):
        self._grouped: Grouped[ClaimAsk, Claim | Waiting | Refused | Exception] = Grouped(
            lambda asks: claim_many(store, asks), name="claims", max_group=max_group, writers=writers
        )

    def claim(
        self,
        task_id: uuid.UUID,
        attempt: int,
        *,
        worker: str,
        lease_s: float,
        plan: PlanCalls,
        admit: AdmitCalls | None = None,
    ) -> Claim | Waiting | Refused:
        answer = self._grouped(ClaimAsk(task_id, attempt, worker, lease_s, plan, admit))
        if isinstance(answer, Exception):
            raise answer
        return answer
