"""The exception hierarchy; each class carries its exit code from docs/method.md."""

from __future__ import annotations


class CollabError(Exception):
    """Base class for errors a user can act on. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class BadInputError(CollabError):
    """Missing, unreadable, corrupt or inconsistent input, or a bad option value (exit 3)."""

    exit_code = 3


class UnsupportedArchitectureError(CollabError):
    """An architecture the collaborative re-parametrization cannot express (exit 4)."""

    exit_code = 4


class VerifyThresholdError(CollabError):
    """``verify --max-kl`` exceeded (exit 5)."""

    exit_code = 5


class MissingExtraError(CollabError):
    """An optional dependency (extra) is not installed (exit 3)."""

    exit_code = 3
