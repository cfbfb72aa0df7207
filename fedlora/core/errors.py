"""The one exception type for user errors in an experiment, shared by every configuration module."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user error in an experiment file or override; the message is one line."""
