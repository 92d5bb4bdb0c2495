"""The model library's version, recorded in every artifact it writes."""

__version__ = "0.1.0"
