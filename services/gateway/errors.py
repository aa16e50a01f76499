"""Gateway errors, and the one table that maps every error to an HTTP status and OpenAI's error JSON.

Business code raises typed errors (these, and `services.core.errors`); only `describe` turns them
into `{"error": {"message", "type", "param", "code"}}` with a status. Errors that are not ours are
internal: the client gets a 500 with a short message and an id, the traceback goes to the log.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.core.errors import (
    BackendUnavailableError,
    DisaggError,
    InvalidRequestError,
    NoCapacityError,
    PromptTooLongError,
)
from services.core.tenants import BudgetExceededError, RateLimitedError
from services.gateway.auth import AuthUnavailableError, InvalidApiKeyError
from services.gateway.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
TIMEOUT_ERROR = "timeout_error"
INSUFFICIENT_QUOTA = "insufficient_quota"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away; nobody reads it


class ModelNotServedError(DisaggError):
    """The request names a model this gateway does not serve."""

    def __init__(self, model: str, served: list[str]) -> None:
        super().__init__(
            f"The model `{model}` does not exist or is not served here; served models: {', '.join(served)} "
            "(GET /v1/models lists them)"
        )


class UnsupportedParameterError(InvalidRequestError):
    """A known OpenAI parameter this server does not implement (logprobs, n > 1, tools, ...)."""


class DeadlineExceededError(DisaggError):
    """The request ran past the gateway's per-request deadline and was cancelled."""


class ShuttingDownError(BackendUnavailableError):
    """The server is shutting down: not accepting requests, or the grace period for in-flight ones ended."""


class ClientDisconnectedError(DisaggError):
    """The client closed the connection; the request was cancelled."""


class RequestAbortedError(BackendUnavailableError):
    """The backend aborted the request (operator action or a failure) before it finished."""


@dataclass(slots=True, frozen=True)
class HttpError:
    status: int
    body: ErrorResponse
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. Retry-After on a 429


def describe(exc: BaseException) -> HttpError:
    """The status and OpenAI error body for `exc`; logs internal errors with an id the client sees."""
    match exc:
        case InvalidApiKeyError():
            return _error(401, exc, INVALID_REQUEST, None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        case RateLimitedError():
            retry = {} if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
            return _error(429, exc, exc.kind.value, None, "rate_limit_exceeded", retry)
        case BudgetExceededError():
            return _error(402, exc, INSUFFICIENT_QUOTA, None, "insufficient_quota")
        case AuthUnavailableError():
            return _error(503, exc, SERVER_ERROR, None, "auth_unavailable")
        case PromptTooLongError():
            return _error(400, exc, INVALID_REQUEST, exc.param, "context_length_exceeded")
        case InvalidRequestError():
            return _error(400, exc, INVALID_REQUEST, exc.param, None)
        case ModelNotServedError():
            return _error(404, exc, INVALID_REQUEST, "model", "model_not_found")
        case ShuttingDownError():
            return _error(503, exc, SERVER_ERROR, None, "shutting_down")
        case NoCapacityError():
            return _error(503, exc, SERVER_ERROR, None, "no_capacity")
        case BackendUnavailableError():
            return _error(503, exc, SERVER_ERROR, None, "backend_unavailable")
        case DeadlineExceededError():
            return _error(504, exc, TIMEOUT_ERROR, None, "deadline_exceeded")
        case ClientDisconnectedError():
            return _error(CLIENT_CLOSED_REQUEST, exc, INVALID_REQUEST, None, "client_disconnected")
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s", error_id, exc_info=exc)
    message = f"internal server error (id {error_id}); the server log has the details"
    return HttpError(500, ErrorResponse(error=ErrorInfo(message=message, type=SERVER_ERROR, code="internal")))


def invalid_request(message: str, param: str | None = None) -> HttpError:
    return HttpError(400, ErrorResponse(error=ErrorInfo(message=message, type=INVALID_REQUEST, param=param)))


def _error(
    status: int,
    exc: BaseException,
    kind: str,
    param: str | None,
    code: str | None,
    headers: Mapping[str, str] | None = None,
) -> HttpError:
    body = ErrorResponse(error=ErrorInfo(message=str(exc), type=kind, param=param, code=code))
    return HttpError(status, body, headers or {})
