"""Units of work: each method one transaction around one transition of app.state and the records
that go with it (attempts, images, idempotency keys, webhook events)."""
