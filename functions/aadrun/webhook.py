"""graph_webhook's core: Microsoft Graph change and lifecycle notifications -> bus
(CONTRACT.md §5).

    request                                          status  reason
    ?validationToken=T on / or /lifecycle            200     (text/plain body: T, URL-decoded)
    ... T over 4,096 characters or not printable     400     bad_request (detail: bad_validation_token)
    path other than / and /lifecycle                 404     not_found
    method other than POST                           405     method_not_allowed
    no AADRUN_CLIENT_STATE                           503     not_configured
    body over 1 MiB                                  413     too_large
    not UTF-8 / not JSON / no value list / > 6,944   400     bad_request (detail: not_utf8,
                                                             not_json, no_value, too_many_items)
    policies cannot be loaded                        503     not_configured
    every accepted item published                    202     accepted
    a publish failed or was not confirmed in time    503     unavailable

Each item is checked on its own; one that fails is dropped and never published,
while the others go on. The drops of a request are one security event, with the
count of each reason (never a clientState or the raw body):

    not an object                                    not_an_object
    clientState matches no configured state          bad_client_state
    tenantId (or organizationId) missing, not a GUID bad_tenant
    tenantId not a tenant of the policies            unknown_tenant
    subscriptionId missing or not a GUID             bad_subscription
    resource not a printable string                  bad_resource
    changeType / lifecycleEvent not a string         bad_change_type / bad_lifecycle_event

Items about resources other than groups, or with a change type or lifecycle event
aadrun does not know, are ignored (logged): Graph must not retry them either.
"""
from __future__ import annotations

import collections
import datetime as dt
import hmac
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from . import audit
from .bus import Bus
from .config import Settings
from .errors import ConfigError, Deferred, PolicyError, RequestError, Unavailable
from .http import HttpRequest, HttpResponse
from .messages import (CHANGE_TYPES, LIFECYCLE_EVENTS, LifecycleEvent, MembershipChange, Message, group_of,
                       is_guid, lifecycle_from_graph, membership_from_graph, only_other_members, rfc3339)
from .policy import Policy

MAX_BODY = 1024 * 1024
_GUID = "00000000-0000-0000-0000-000000000000"
# The smallest item that can be accepted (a lifecycle event with no resource, in
# compact JSON, with its comma): no batch that fits in MAX_BODY has more accepted
# items than MAX_ITEMS, so the limit never refuses a batch Graph could deliver (a
# 400 is not retried: it would be lost). It bounds only the work and log lines of junk.
_SMALLEST_ITEM = len(json.dumps({"subscriptionId": _GUID, "clientState": "", "lifecycleEvent": "missed",
                                 "tenantId": _GUID}, separators=(",", ":"))) + 1
MAX_ITEMS = MAX_BODY // _SMALLEST_ITEM
MAX_RESOURCE = 2048
MAX_VALIDATION_TOKEN = 4096   # Graph documents none; its tokens are a short line
PATHS = ("/", "/lifecycle")

_STATUS = {
    "accepted": 202,
    "bad_request": 400,
    "not_found": 404,
    "method_not_allowed": 405,
    "too_large": 413,
    "not_configured": 503,
    "unavailable": 503,
}
# Most specific first: the first matching class decides the reason.
_ERROR_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (RequestError, "bad_request"),
    (ConfigError, "not_configured"),
    (PolicyError, "not_configured"),
    (Unavailable, "unavailable"),
)
_BAD_BODY = {
    "not_utf8": "the body is not UTF-8",
    "not_json": "the body is not JSON",
    "no_value": "the body is not an object with a 'value' list",
    "too_many_items": f"more than {MAX_ITEMS} items in 'value'",
    "incomplete_body": "the body ended before its declared length, or its chunks are malformed",
    "bad_validation_token": f"validationToken must be printable and at most {MAX_VALIDATION_TOKEN} characters",
}


def reply(reason: str, detail: str | None = None) -> HttpResponse:
    body: dict[str, str] = {"reason": reason}
    if detail:
        body.update(detail=detail, message=_BAD_BODY.get(detail, detail))
    return HttpResponse.json(_STATUS[reason], body)


class _Skip:
    """An item not turned into a message: dropped (security) or ignored."""

    def __init__(self, reason: str, security: bool, item: Any = None):
        self.reason, self.security = reason, security
        fields = item if isinstance(item, Mapping) else {}
        # Only values of a known, harmless shape reach the log.
        self.tenant = _tenant_of(fields)
        subscription = fields.get("subscriptionId")
        self.subscription = subscription.lower() if is_guid(subscription) else None
        resource = fields.get("resource")
        self.resource = resource[:200] if _well_formed_resource(resource) and not security else None


def _drop(reason: str, item: Any) -> _Skip:
    return _Skip(reason, True, item)


def _ignore(reason: str, item: Any) -> _Skip:
    return _Skip(reason, False, item)


def _served_path(req: HttpRequest) -> str:
    # What is logged is one of PATHS (a request reaching a log line passed that
    # check), never the sender's bytes: "/lifecycle" and a megabyte of slashes is one.
    return req.path.rstrip("/") or "/"


def _tenant_of(item: Mapping[str, Any]) -> str | None:
    # Change notifications carry tenantId; some lifecycle notifications carry
    # organizationId instead (msgraph-sdk-java#1551).
    tenant = item.get("tenantId", item.get("organizationId"))
    return tenant.lower() if is_guid(tenant) else None


def _well_formed_resource(resource: Any) -> bool:
    return isinstance(resource, str) and 0 < len(resource) <= MAX_RESOURCE and resource.isprintable()


def parse_body(body: bytes) -> list:
    """The ``value`` list of a notification POST; RequestError(detail code) if unusable."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("not_utf8") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # JSONDecodeError, huge ints, NaN, deep nesting
        raise RequestError("not_json") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("value"), list):
        raise RequestError("no_value")
    if len(doc["value"]) > MAX_ITEMS:
        raise RequestError("too_many_items")
    return doc["value"]


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _severity(error: Exception, reason: str) -> str:
    """A bad request is the sender's; a refusal aadrun chose (``Deferred``: with the
    in-process bus, a batch whose changes Graph does not show yet) is a warning, as
    policy_sync logs it; any failure underneath (Pub/Sub, the store, a bug) is an error."""
    if reason == "bad_request":
        return "INFO"
    return "WARNING" if isinstance(error, Deferred) else "ERROR"


class Webhook:
    """``handle`` answers one HTTP request; shared by every request thread."""

    def __init__(self, settings: Settings, policy_getter: Callable[[], Policy], bus_getter: Callable[[], Bus],
                 clock: Callable[[], dt.datetime] | None = None):
        self._settings = settings
        self._policy = policy_getter
        self._bus = bus_getter
        self._clock = clock or (lambda: dt.datetime.now(dt.timezone.utc))
        self._states = tuple(s.encode("utf-8") for s in settings.client_states)

    def handle(self, req: HttpRequest) -> HttpResponse:
        """Never raises: an unexpected failure is a 503 (Graph retries), never a 500."""
        started = req.received if req.received is not None else time.monotonic()
        try:
            return self._route(req, started)
        except Exception as e:
            reason = next((r for cls, r in _ERROR_REASONS if isinstance(e, cls)), "unavailable")
            known = reason != "unavailable" or isinstance(e, Unavailable)
            # aadrun's own errors carry no request content; anything else logs its class only.
            audit.entry("webhook_error", "graph_webhook request not accepted", severity=_severity(e, reason),
                        reason=reason,
                        detail=str(e) if known else None, error=e.__class__.__name__,
                        cause=e.__cause__.__class__.__name__ if e.__cause__ else None, path=_served_path(req),
                        elapsed_ms=round((time.monotonic() - started) * 1000))
            return reply(reason, str(e) if reason == "bad_request" else None)

    def _route(self, req: HttpRequest, started: float) -> HttpResponse:
        path = _served_path(req)
        if path not in PATHS:
            return reply("not_found")
        if req.method != "POST":
            response = reply("method_not_allowed")
            response.headers["Allow"] = "POST"
            return response
        token = req.query.get("validationToken")
        if token is not None:
            return self._handshake(token, path)
        if not self._states:
            # Logged with the variable's name (below); the caller gets only the code.
            raise ConfigError("AADRUN_CLIENT_STATE is not set")
        if req.body_too_large or len(req.body) > MAX_BODY:
            # Graph does not send a POST this large: whatever it held is not delivered.
            audit.entry("webhook_error", "graph_webhook request not accepted", severity="WARNING",
                        reason="too_large", path=path)
            return reply("too_large")
        if req.body_incomplete:
            raise RequestError("incomplete_body")
        return self._notifications(parse_body(req.body), started)

    @staticmethod
    def _handshake(token: str, path: str) -> HttpResponse:
        # Graph's validation: 200, text/plain, the URL-decoded token (the entry point
        # already decoded the query); the empty body is not read
        # (learn.microsoft.com/graph/change-notifications-delivery-webhooks).
        # Graph's tokens are one short printable line: anything else is not echoed, so
        # the public endpoint cannot be made to serve arbitrary content.
        if len(token) > MAX_VALIDATION_TOKEN or not token.isprintable():
            raise RequestError("bad_validation_token")
        response = HttpResponse.text(200, token)
        response.headers["X-Content-Type-Options"] = "nosniff"
        # The trace of a subscription's creation or renewal: Graph sends this first.
        audit.entry("webhook_validation", "subscription validation answered", path=path)
        return response

    def _notifications(self, items: list, started: float) -> HttpResponse:
        tenants = self._policy().tenants
        received_at = rfc3339(self._clock())
        verdicts = [self._verdict(item, tenants, received_at) for item in items]
        # One message per id, at its last place: a user removed, added and removed again
        # within one POST can give both removals one id (no id, sequence or time from
        # Graph), and the removal must stay after the addition.
        messages = list(reversed({m.id: m for m in reversed(verdicts) if not isinstance(m, _Skip)}.values()))
        _log_drops([v for v in verdicts if isinstance(v, _Skip) and v.security])
        for skip in (v for v in verdicts if isinstance(v, _Skip) and not v.security):
            _log_ignored(skip)
        if messages:
            # Confirmed within the publish timeout of the request's start, not of the
            # publish's: reading a large POST must not push the answer past Graph's 3 s.
            self._bus().publish_changes(messages, started=started)
        for message in messages:
            _log_accepted(message)
        return reply("accepted")

    def _verdict(self, item: Any, tenants: Mapping[str, Any], received_at: str) -> Message | _Skip:
        """The message an item makes, or why it makes none (checks in the module's order)."""
        if not isinstance(item, Mapping):
            return _drop("not_an_object", item)
        if not self._client_state_ok(item.get("clientState")):
            return _drop("bad_client_state", item)
        tenant = _tenant_of(item)
        if tenant is None:
            return _drop("bad_tenant", item)
        if tenant not in tenants:
            return _drop("unknown_tenant", item)
        if not is_guid(item.get("subscriptionId")):
            return _drop("bad_subscription", item)
        if "lifecycleEvent" in item:
            return _lifecycle(item, tenant, received_at)
        return _change(item, tenant, received_at)

    def _client_state_ok(self, value: Any) -> bool:
        if not isinstance(value, str):
            return False
        given = value.encode("utf-8", "surrogatepass")
        # Compare against every configured state (rotation), each in constant time.
        return any([hmac.compare_digest(given, state) for state in self._states])


def _lifecycle(item: Mapping[str, Any], tenant: str, received_at: str) -> Message | _Skip:
    event, resource = item.get("lifecycleEvent"), item.get("resource")
    if not isinstance(event, str):
        return _drop("bad_lifecycle_event", item)
    if resource not in (None, "") and not _well_formed_resource(resource):
        return _drop("bad_resource", item)
    if event not in LIFECYCLE_EVENTS:
        return _ignore("unknown_lifecycle_event", item)
    return lifecycle_from_graph(item, tenant, received_at)


def _change(item: Mapping[str, Any], tenant: str, received_at: str) -> Message | _Skip:
    resource, change_type = item.get("resource"), item.get("changeType")
    if not _well_formed_resource(resource):
        return _drop("bad_resource", item)
    if not isinstance(change_type, str):
        return _drop("bad_change_type", item)
    if group_of(resource) is None:
        return _ignore("not_a_group", item)
    if change_type not in CHANGE_TYPES:
        return _ignore("unknown_change_type", item)
    if only_other_members(item.get("resourceData")):
        return _ignore("no_user_member", item)   # a nested group, a device: never granted
    return membership_from_graph(item, tenant, received_at)


def _log_drops(drops: list[_Skip]) -> None:
    """One security line per request, however many items it dropped: anyone can POST
    thousands of junk items, and a line each would flood the log (and its bill). The
    first drop's reason, tenant and subscription stand for the rest; ``reasons`` counts all."""
    if not drops:
        return
    first, reasons = drops[0], collections.Counter(d.reason for d in drops)
    audit.security(f"{len(drops)} notification(s) dropped", reason=first.reason, tenant=first.tenant,
                   subscription=first.subscription, dropped=len(drops),
                   reasons=dict(reasons) if len(drops) > 1 else None)


def _log_ignored(skip: _Skip) -> None:
    audit.entry("notification_ignored", "notification ignored", reason=skip.reason, tenant=skip.tenant,
                subscription=skip.subscription, resource=skip.resource)


def _log_accepted(message: Message) -> None:
    if isinstance(message, MembershipChange):
        audit.entry("membership_notification", "group membership notification published",
                    message_id=message.id, tenant=message.tenant, group=message.group,
                    subscription=message.subscription, change_type=message.change_type,
                    added=list(message.added), removed=list(message.removed), reread=message.reread)
    elif isinstance(message, LifecycleEvent):
        audit.entry("lifecycle_notification", "subscription lifecycle notification published",
                    message_id=message.id, tenant=message.tenant, group=message.group,
                    subscription=message.subscription, lifecycle_event=message.event)
