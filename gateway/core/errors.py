"""Errors as clients see them: OpenAI's error JSON with the right HTTP status."""
from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error for the client: status, OpenAI error type, the offending param, a code."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(APIError):
    status = 400


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"


class Forbidden(APIError):
    """Authenticated, but this key may not do that (OpenAI's PermissionDeniedError)."""

    status = 403
    type = "permission_error"


class NotFound(APIError):
    status = 404
    type = "not_found_error"


class MethodNotAllowed(APIError):
    status = 405


class PayloadTooLarge(APIError):
    status = 413


class RateLimited(APIError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: float = 1.0, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class Overloaded(APIError):
    status = 503
    type = "service_unavailable"

    def __init__(self, message: str, retry_after_s: float = 1.0, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class InternalError(APIError):
    status = 500
    type = "internal_error"
