"""Errors shared by the configs (no imports: every config module can use them)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""
