"""Errors that name the cause and the fix.

Every error a user can cause derives from `DisaggError`; the edges (CLI, gRPC, HTTP) map them to an
exit code or a status. Internal bugs are not `DisaggError` and surface as tracebacks on purpose.
"""


class DisaggError(Exception):
    """A problem the user can fix; the message says how."""


class ModelNotFoundError(DisaggError):
    """The model name is not known and is not a readable folder."""


class ModelLoadError(DisaggError):
    """The model's files exist but are unreadable, incomplete or of an unsupported architecture."""


class InvalidRequestError(DisaggError):
    """A request parameter is out of range (temperature < 0, max_tokens < 1, ...)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the model's context window (or the KV pool)."""


class BackendUnavailableError(DisaggError):
    """The serving backend cannot take or finish a request now (shutting down, a pod failed); retry later."""


class NoCapacityError(BackendUnavailableError):
    """Every slot is taken (concurrent request limit, no decode pod with room); retry later or scale out."""


class KvFullError(NoCapacityError):
    """Attention pods exist but lack free KV blocks now; the request fits once others finish (queue it)."""
