"""Errors a user can act on: each names the thing that is wrong and what to do."""

from __future__ import annotations


class MolochError(Exception):
    """Base class; ``str(err)`` is the whole message a user sees."""


class DataError(MolochError):
    """An input file is missing, corrupt or malformed."""


class ProfileError(MolochError):
    """A run profile is unknown or invalid."""


class ModelError(MolochError):
    """A model backend could not serve a request."""


class CacheMissError(ModelError):
    """Replay mode was asked for a completion the cache does not hold."""


class StageError(MolochError):
    """A pipeline stage cannot run (missing inputs, a concurrent run, ...)."""
