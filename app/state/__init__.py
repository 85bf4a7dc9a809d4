"""Every state machine of the gateway, declared: one module per machine (tasks, the worker's side of
tasks in attempts, batches, webhook events), each with the StrEnum of its statuses (the database
enforces the same values with a CHECK constraint) and each transition as one named, guarded Core
UPDATE. Nothing else writes a status. A transition the guard refuses returns a `Refused` reason.
"""
