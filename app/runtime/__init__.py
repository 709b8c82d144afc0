"""What every part of the sidecar shares at run time: logs, metrics, redaction, the
supervised background loops, and the one retry policy."""
