"""The status guard of a transition that finds its rows by primary key.

Written so that no index on the status column can serve it: with statistics taken while no row
had that status, Postgres estimated such rows at none and planned the transition as a scan of all
of them instead of a lookup by id. After a burst of new tasks each claim read the whole backlog
(10-13 ms a statement with 50,000 pending, against 0.1 ms; docs/performance.md). Statements that
search by status keep the plain comparison, and their indexes.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, func


def status_is(column: ColumnElement[str], status: str) -> ColumnElement[bool]:
    return func.coalesce(column, "") == status
