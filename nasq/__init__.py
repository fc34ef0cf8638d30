"""nasq: search how many bits each part of a BERT deserves, prune the rest, ship a small integer model."""

__version__ = "0.1.0"
