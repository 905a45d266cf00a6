"""Errors shared by the configs (nothing of ours imported: every config module can use them)."""

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""


class ExportError(RuntimeError):
    """A model cannot be exported, or a package cannot serve a call; the message says why and what
    the package was built for."""


def reject_unknown(given: Iterable[str], known: list[str], prefix: str = "", where: str = "") -> None:
    """A ConfigError for the first of `given` not in `known`, with a did-you-mean; option names
    are shown with `prefix` (e.g. "cache_"), `where` says which config they were meant for."""
    for key in given:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {prefix + near[0]!r}?" if near else ""
            valid = ", ".join(prefix + k for k in known)
            raise ConfigError(f"unknown asymrnr option {prefix + key!r}{where}.{hint} Valid options: {valid}.")
