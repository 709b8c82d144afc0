"""The durable usage queue: intake, the stores (SQLite, PostgreSQL), the dispatcher that
sends each grain once, and the interface the API uses (``usage_queue``, ``records``)."""
