"""Errors a user can cause. The CLI prints their message and exits 2, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Base class of every error caused by the user's input (config, files, command line)."""


class ConfigError(UserError):
    """A run config that cannot be used. The message names the key and what would be valid."""

    def __init__(self, key: str | None, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class BackendUnavailableError(ConfigError):
    """The attention kernel a config asks for cannot run on this machine (and no fallback may)."""
