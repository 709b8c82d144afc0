"""metering-sidecar: AWS Marketplace Metering as plain HTTP on localhost."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
