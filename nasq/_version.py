"""The package version (one home: ``pyproject.toml`` repeats it for the installer)."""

__version__ = "0.1.0"
