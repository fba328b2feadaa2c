"""speaker-sim: same speaker or not, at scale."""

__version__ = "0.1.0"
