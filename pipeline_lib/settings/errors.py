"""The error every config check raises; its message names the config key."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""
