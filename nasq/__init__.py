"""nasq: search how many bits each part of a BERT deserves, prune the rest, ship a small integer model."""

from nasq._version import __version__

__all__ = ["__version__"]
