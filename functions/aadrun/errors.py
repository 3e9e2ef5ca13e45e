"""Errors of aadrun, each with a stable reason code.

    AadrunError
    ├── ConfigError            bad environment or settings (start-up)
    ├── PolicyError            a policy file is invalid (file, line, field); PolicyErrors: several
    ├── RequestError           a caller's request is unusable
    ├── TokenError             the token is rejected (reason: one of CONTRACT §4's 401 codes)
    ├── Unavailable            a dependency cannot answer
    │   └── Deferred           not now, by aadrun's choice: a later delivery settles it
    ├── UpstreamError          Graph / Cloud Run / Pub/Sub failed: raised on, so that Pub/Sub
    │   │                      redelivers or the next maintenance run tries again
    │   └── RateLimited        Graph's 429/503 outlasted the retry budget
    └── PlanError              an IAM plan cannot be applied (e.g. principal limit)

Each HTTP entry point maps reasons to its own statuses (CONTRACT.md §4, §5):
the same reason can mean a different answer to a different caller.
"""
from __future__ import annotations


class AadrunError(Exception):
    reason = "error"


class ConfigError(AadrunError):
    reason = "not_configured"


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


class TokenError(AadrunError):
    """The token is rejected; ``reason`` is one of CONTRACT §4's 401 codes."""


    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(detail or reason)


class Unavailable(AadrunError):
    reason = "unavailable"


class Deferred(Unavailable):
    """Not now, by aadrun's choice rather than a failure underneath (a batch whose
    changes Graph's read does not show yet, a read contested to its last try): a
    later delivery settles it."""


class UpstreamError(AadrunError):
    reason = "upstream_error"

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None):
        self.status_code, self.code = status_code, code
        super().__init__(message)


class RateLimited(UpstreamError):
    def __init__(self, message: str, *, retry_after: float, status_code: int = 429):
        self.retry_after = retry_after
        super().__init__(message, status_code=status_code)


class PlanError(AadrunError):
    reason = "plan_error"
