"""The one version number of RingX (setup.py reads it from here)."""

__version__ = "0.3.0"
