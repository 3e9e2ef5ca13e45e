"""Errors of aadrun, each with a stable reason code and an HTTP status.

    AadrunError
    ├── ConfigError            bad environment or settings (start-up)
    ├── PolicyError            a policy file is invalid (file, line, field); PolicyErrors: several
    ├── RequestError           a caller's request is unusable       400 bad_request
    ├── TokenError             the token is rejected                 401 <reason>
    ├── Unavailable            a dependency cannot answer            503 unavailable
    ├── UpstreamError          Graph / Cloud Run / Pub/Sub failed    (retried by callers)
    │   └── RateLimited        429/503 with Retry-After
    └── PlanError              an IAM plan cannot be applied (e.g. principal limit)

Reason codes and statuses are part of the contract (CONTRACT.md §4); callers map
them with ``http_status`` rather than by class name.
"""
from __future__ import annotations


class AadrunError(Exception):
    reason = "error"
    status = 500


class ConfigError(AadrunError):
    reason = "not_configured"
    status = 503


class PolicyError(AadrunError):
    """A policy problem, located so an operator can fix it."""

    reason = "policy_error"

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.file, self.line, self.field = file, line, field
        where = ":".join(str(p) for p in (file, line) if p is not None)
        prefix = f"{where}: " if where else ""
        suffix = f" (field {field})" if field else ""
        super().__init__(f"{prefix}{message}{suffix}")
        self.message = message
        self.errors: list[PolicyError] = [self]


class PolicyErrors(PolicyError):
    """Several policy problems: located as the first, each in ``errors``."""

    def __init__(self, errors: list[PolicyError]):
        first = errors[0]
        super().__init__(f"{first.message} (and {len(errors) - 1} more)", file=first.file, line=first.line,
                         field=first.field)
        self.errors = list(errors)


class RequestError(AadrunError):
    reason = "bad_request"
    status = 400


class TokenError(AadrunError):
    """The token is rejected; ``reason`` is one of CONTRACT §4's 401 codes."""

    status = 401

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(detail or reason)


class Unavailable(AadrunError):
    reason = "unavailable"
    status = 503


class UpstreamError(AadrunError):
    reason = "upstream_error"
    status = 502

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None):
        self.status_code, self.code = status_code, code
        super().__init__(message)


class RateLimited(UpstreamError):
    def __init__(self, message: str, *, retry_after: float, status_code: int = 429):
        self.retry_after = retry_after
        super().__init__(message, status_code=status_code)


class PlanError(AadrunError):
    reason = "plan_error"
    status = 409
