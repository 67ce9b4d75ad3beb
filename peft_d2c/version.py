"""The version of peft-d2c (one place: the package metadata, results and the CLI read it here)."""

__version__ = "0.1.0"
