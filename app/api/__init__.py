"""HTTP surfaces: REST v1, operations (health, readiness, metrics)."""
