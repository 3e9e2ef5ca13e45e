"""verify over HTTP (CONTRACT.md §4): API mode, forward-auth mode, /healthz.

API mode:          POST /verify, JSON {"service": NAME[, "token": T]}, token also
                   from ``Authorization: Bearer``.
Forward-auth mode: any method on /verify?service=NAME (what nginx auth_request
                   and Envoy ext_authz send, normally with an empty body; a
                   client's body passed on is ignored), token from the
                   Authorization header; an allow also sets X-Auth-* headers.
"""
from __future__ import annotations

import json
from collections.abc import Callable

from .errors import AadrunError
from .http import HttpRequest, HttpResponse
from .verify import Decision, Verifier, log_decision, new_decision_id

MAX_BODY = 64 * 1024
_CHALLENGE = 'Bearer realm="aadrun"'


class BadRequest(Exception):
    pass


def bearer_token(value: str | None) -> str | None:
    """The credentials of an ``Authorization: Bearer`` header (RFC 6750 §2.1), else None."""
    if not value:
        return None
    scheme, _, credentials = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip() or None


def _parse(req: HttpRequest) -> tuple[str, str | None, str]:
    """(service, token, mode) or BadRequest."""
    if req.body_incomplete:
        raise BadRequest("the request body ended before its declared length, or its chunks are malformed")
    header_token = bearer_token(req.header("authorization"))
    if "service" in req.query:
        # Forward-auth: the proxy names the service. A body is the client's (a proxy may
        # pass it on) and never chooses what is checked.
        service = req.query["service"]
        if not service:
            raise BadRequest("the service query parameter is empty")
        return service, header_token, "forward_auth"
    if req.method != "POST":
        raise BadRequest("use POST with a JSON body, or ?service=NAME with an empty body")
    if req.content_type != "application/json":
        raise BadRequest("the content type must be application/json")
    try:
        body = json.loads(req.body.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    service = body.get("service")
    if not isinstance(service, str) or not service:
        raise BadRequest("the field service (a non-empty string) is required")
    token = body.get("token")
    if token is not None and not isinstance(token, str):
        raise BadRequest("the field token must be a string")
    if token and header_token and token != header_token:
        raise BadRequest("give the token once: in the Authorization header or in the body")
    return service, token or header_token, "api"


class VerifyEndpoint:
    def __init__(self, verifier: Verifier, health: Callable[[], tuple[bool, dict]]):
        self._verifier, self._health = verifier, health

    def handle(self, req: HttpRequest) -> HttpResponse:
        # Exactly /healthz and nothing to decide: a proxy that passes the client's path on
        # (Envoy's path_prefix) must never turn /anything/healthz?service=S into a 200.
        if req.path.rstrip("/") == "/healthz" and "service" not in req.query and req.method in ("GET", "HEAD"):
            healthy, parts = self._health()
            return HttpResponse.json(200 if healthy else 503, {"status": "ok" if healthy else "unhealthy", **parts})
        # The mode of a request refused before it is read, for its audit line.
        asked = "forward_auth" if "service" in req.query else "api"
        if req.body_too_large or len(req.body) > MAX_BODY:
            log_decision(Decision(False, "too_large", None, new_decision_id()), None, asked)
            return HttpResponse(413, b"", "text/plain")
        try:
            service, token, mode = _parse(req)
        except BadRequest as e:
            decision = Decision(False, "bad_request", None, new_decision_id(), detail=str(e))
            log_decision(decision, None, asked)
            return HttpResponse.json(400, {**decision.body(), "message": str(e)})
        decision = self._verifier.decide(service, token)
        log_decision(decision, token, mode)
        return self.response(decision, mode)

    @staticmethod
    def response(decision: Decision, mode: str) -> HttpResponse:
        headers: dict[str, str] = {"Cache-Control": "no-store"}
        if decision.reason == "missing_token":
            headers["WWW-Authenticate"] = _CHALLENGE
        elif decision.status == 401:
            headers["WWW-Authenticate"] = f'Bearer error="invalid_token", error_description="{decision.reason}"'
        if decision.allow and mode == "forward_auth":
            headers.update({"X-Auth-Subject": decision.subject or "", "X-Auth-Tenant": decision.tenant or "",
                            "X-Auth-Decision-Id": decision.decision_id})
        return HttpResponse.json(decision.status, decision.body(), headers)


def health_check(policy: Callable[[], object], store, keys) -> Callable[[], tuple[bool, dict]]:
    """Healthy when policies load and the store answers; an identity provider
    outage alone is not unhealthy (cached keys still verify)."""

    def check() -> tuple[bool, dict]:
        parts: dict = {}
        healthy = True
        try:
            loaded = policy()
            parts["policy"] = {"status": "ok", "services": len(loaded.services), "tenants": len(loaded.tenants)}
        except AadrunError as e:
            healthy = False
            parts["policy"] = {"status": "error", "reason": e.reason}
        try:
            store().ping()
            parts["store"] = {"status": "ok"}
        except Exception:  # any backend failure means unhealthy, with no detail leaked
            healthy = False
            parts["store"] = {"status": "unavailable"}
        parts["keys"] = keys().status()
        return healthy, parts

    return check
