"""Cloud Functions entry points (CONTRACT.md §1).

Each function turns a Flask request or a CloudEvent into a framework-free value,
calls one core object of ``aadrun.app.App`` and maps the result to a response.
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable

import functions_framework
import flask
from werkzeug.exceptions import HTTPException

from aadrun import audit
from aadrun.app import get_app
from aadrun.errors import AadrunError, ConfigError, Unavailable
from aadrun.http import HttpRequest, HttpResponse

# Bad configuration stops the instance at start-up with the variable named, rather
# than failing every request later.
try:
    get_app()
except ConfigError as error:
    raise SystemExit(f"aadrun: configuration error: {error}") from None
# What start-up built lives as long as the process: out of the garbage collector's
# scans, which otherwise walk it again and again under load.
gc.freeze()

# Largest body any HTTP entry point reads; each core applies its own, smaller limit.
# (functions-framework then reads what is left of every body before it answers, so a
# request's memory is bounded by the platform's request size limit, 32 MiB on Cloud Run.)
_READ_LIMIT = 1024 * 1024


def _request(request: flask.Request, limit: int = _READ_LIMIT) -> HttpRequest:
    received = time.monotonic()   # before the body: a slow one counts against Graph's 3 s too
    # Read at most limit+1 bytes so an oversized body is detected without buffering it all.
    length = request.content_length   # parsed from the header on each access
    try:
        body = request.stream.read(limit + 1) if length or request.headers.get("Transfer-Encoding") else b""
        incomplete = length is not None and len(body) < min(length, limit + 1)
    except Exception:  # noqa: BLE001 - a broken chunked encoding, a client gone mid-body: the
        # server's and Werkzeug's errors alike mean there is no body to act on (a 400, not a 500)
        body, incomplete = b"", True
    return HttpRequest(
        method=request.method,
        path=request.path,
        query=request.args,         # a mapping: a repeated parameter gives its first value
        headers=request.headers,    # a mapping that ignores case
        body=body[:limit],
        body_too_large=len(body) > limit or (length or 0) > limit,
        body_incomplete=incomplete,
        received=received,
    )


def _response(result: HttpResponse) -> flask.Response:
    return flask.Response(result.body, status=result.status, headers=result.headers,
                          content_type=result.content_type)


def _serve(handle: Callable[[HttpRequest], HttpResponse], request: flask.Request) -> flask.Response:
    flask.g.aadrun_called = True
    req = _request(request)
    # Every log line written while serving joins the request's trace (CONTRACT.md §9).
    with audit.request_trace(req.trace(get_app().settings.project)):
        return _response(handle(req))


@functions_framework.http
def verify(request: flask.Request) -> flask.Response:
    return _serve(get_app().verifier_http.handle, request)


@functions_framework.http
def graph_webhook(request: flask.Request) -> flask.Response:
    return _serve(get_app().webhook.handle, request)


_REASONS = {400: "bad_request", 405: "method_not_allowed", 503: "unavailable"}


@functions_framework.errorhandler(Exception)
def _unanswered(error: Exception) -> flask.Response:
    """What reaches the framework unanswered: an HTTP error (a request it could not
    make a CloudEvent of, a method a function does not take, policy_sync's 503) or an
    exception. A short JSON body and one log line, never the framework's answers: its
    400 quotes the request's headers (the Authorization) and body, its 500 writes a
    traceback across many lines. An exception before aadrun's code ran is the
    framework refusing what it was sent (a CloudEvent it cannot parse): 400."""
    called = flask.g.get("aadrun_called", False)
    if isinstance(error, HTTPException):
        status = error.code or 500
    else:
        status = 500 if called else 400
    reason = _REASONS.get(status, "error")
    if not (called and isinstance(error, HTTPException)):   # aadrun logged its own
        failed = HttpRequest(flask.request.method, flask.request.path, {}, flask.request.headers, b"")
        with audit.request_trace(failed.trace(get_app().settings.project)):
            audit.entry("request_failed", f"request failed: {reason}", severity="ERROR" if status >= 500 else "WARNING",
                        status=status, reason=reason, error=type(error).__name__)
    allowed = getattr(error, "valid_methods", None)   # a 405 names what is allowed (RFC 9110)
    return _response(HttpResponse.json(status, {"error": reason}, {"Allow": ", ".join(allowed)} if allowed else {}))


@functions_framework.cloud_event
def policy_sync(event) -> None:
    flask.g.aadrun_called = True
    # Eventarc's delivery is an HTTP request too: its lines join the delivery's trace.
    delivery = HttpRequest("POST", "/", {}, flask.request.headers if flask.has_request_context() else {}, b"")
    with audit.request_trace(delivery.trace(get_app().settings.project)):
        try:
            get_app().sync.handle_cloud_event(event.data)
        except Exception as e:
            # A failed delivery answers 503, so Pub/Sub redelivers (redelivery is
            # idempotent). One line, no traceback: the framework would print the whole
            # exception chain, with the causes aadrun's own messages leave out.
            audit.entry("sync_delivery_failed", "policy_sync delivery failed: Pub/Sub redelivers it",
                        severity="WARNING" if isinstance(e, Unavailable) else "ERROR", error=type(e).__name__,
                        detail=str(e) if isinstance(e, AadrunError) else None)
            flask.abort(503)


@functions_framework.http
def maintenance(request: flask.Request) -> flask.Response:
    return _serve(get_app().maintenance.handle, request)
