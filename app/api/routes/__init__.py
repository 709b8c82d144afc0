"""One router per surface: the four calls, the usage queue, the entitlement, the probes,
and the AWS wire protocol."""
