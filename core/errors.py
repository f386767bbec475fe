"""One error hierarchy for the whole project.

A :class:`DomainError` means "the input or the artifact is wrong": its message is written for the user as it
is, the CLI prints it as one line, and the service answers it with a 4xx. Every other exception is a bug: a
traceback on the CLI, a 500 with the request id (and the traceback in the log) from the service.

``InputError`` and ``ArtifactError`` are also ``ValueError``s, so code that validates arguments the Python
way keeps working; the reverse is not true: a plain ``ValueError`` is never taken for a domain error.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ArtifactError", "ConfigError", "DomainError", "InputError", "Overloaded", "UsageError"]


class DomainError(Exception):
    """Base of every error whose message is meant for the user (bad input, bad artifact, bad usage).

    ``code`` is an optional stable machine-readable name (the service puts it in its error body) and
    ``details`` optional JSON-able data for the client (valid options, limits...).
    """

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


class InputError(DomainError, ValueError):
    """The input (an image, a dataset, an option, a map handed to a metric) cannot be used as it is."""


class ArtifactError(DomainError, ValueError):
    """A model-pair folder is missing, incomplete, altered or inconsistent; the message names what."""


class ConfigError(DomainError, ValueError):
    """A configuration or setting is invalid or contradicts a saved one."""


class UsageError(DomainError):
    """A command was asked for something it cannot do as asked (paths, flags, combinations)."""


class Overloaded(DomainError):
    """The work cannot start now (every decode or inference slot busy, the queue full); try again later.

    ``retry_after`` is the number of seconds a client should wait; the service sends it as ``Retry-After``.
    """

    def __init__(self, message: str, *, retry_after: int = 1, code: str | None = None, details: Any = None) -> None:
        super().__init__(message, code=code or "overloaded", details=details)
        self.retry_after = max(1, int(retry_after))
