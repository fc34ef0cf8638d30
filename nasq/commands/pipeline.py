"""`nasq pipeline` (implemented in nasq.pipeline)."""

from nasq.pipeline import register

__all__ = ["register"]
