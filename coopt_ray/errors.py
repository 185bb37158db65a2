"""The errors a user sees as one line and exit status 2: ConfigError (a bad config key or value)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config problem; the message names the offending key."""
