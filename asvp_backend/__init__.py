"""asvp-backend: a Label Studio ML backend that makes the labelling queue prioritise itself (ASVP)."""

__version__ = "0.1.0"
