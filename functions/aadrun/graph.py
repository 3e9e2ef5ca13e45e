"""Microsoft Graph client: group membership by delta query, and change-notification
subscriptions (CONTRACT.md §6).

    GraphClient(settings, tenant)
      .group_delta(group, delta_link)        GET /groups/delta  -> DeltaResult
      .create_subscription(...)              POST   /subscriptions
      .list_subscriptions()                  GET    /subscriptions
      .renew_subscription(id, expiration)    PATCH  /subscriptions/{id}
      .reauthorize_subscription(id)          POST   /subscriptions/{id}/reauthorize
      .delete_subscription(id)               DELETE /subscriptions/{id}

Errors (under ``aadrun.errors``)::

    UpstreamError            any other Graph or token failure (status_code, Graph error code)
    ├── RateLimited          429/503 still answered after the retry budget; retry_after = Graph's hint
    ├── DeltaExpired         the delta link is no longer valid: start again with a full delta
    └── SubscriptionExists   409 on create: this app already subscribes to the resource

Tokens come from MSAL (client credentials), with the app's client secret or, without
one, workload identity federation: a Google-signed ID token from the metadata server
is the client assertion. MSAL caches the access token. No message of this module ever
contains an access token, a client secret or an assertion.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import quote, urlencode, urlsplit

import msal
import requests
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from .config import Settings
from .errors import ConfigError, RateLimited, UpstreamError
from .messages import USER_TYPE, is_guid
from .outbound import client_session, deadline

_RETRY_AFTER = Retry()   # only its Retry-After parser is used: the waits are this client's own

# MSAL logs a token endpoint's raw answer on some failures (one that is not JSON,
# for instance), and that answer can hold an access token. Its failures reach us as
# results or exceptions, which this module reports without secrets: its own log
# lines are not written at all.
logging.getLogger("msal").setLevel(logging.CRITICAL + 1)

__all__ = ["GraphClient", "DeltaResult", "DeltaExpired", "SubscriptionExists", "max_expiration",
           "graph_scope", "FEDERATION_AUDIENCE", "METADATA_IDENTITY_URL", "MAX_GROUP_SUBSCRIPTION_MINUTES"]


def graph_scope(graph_url: str) -> str:
    """The app-only token scope for the Graph at ``graph_url``: its own origin, so a
    national cloud's Graph (graph.microsoft.us, microsoftgraph.chinacloudapi.cn) gets
    a token it accepts (learn.microsoft.com/graph/deployments)."""
    scheme, host = urlsplit(graph_url)[:2]
    return f"{scheme}://{host}/.default"


# https://cloud.google.com/compute/docs/instances/verifying-instance-identity
METADATA_IDENTITY_URL = ("http://metadata.google.internal/computeMetadata/v1/"
                         "instance/service-accounts/default/identity")
# https://learn.microsoft.com/entra/workload-id/workload-identity-federation-create-trust
FEDERATION_AUDIENCE = "api://AzureADTokenExchange"
# https://learn.microsoft.com/graph/api/resources/subscription (maximum length of subscription per resource type)
MAX_GROUP_SUBSCRIPTION_MINUTES = 41_760
# What a group subscription asks to be told of. "updated" covers membership changes,
# creation and soft deletion; a permanent deletion (a security group's, for one) is
# "deleted" alone, and without it the group's members would keep their access until
# the scheduled resync.
SUBSCRIBED_CHANGES = "updated,deleted"
SUBSCRIPTION_MARGIN = dt.timedelta(minutes=10)   # clock skew and request time
# https://learn.microsoft.com/graph/delta-query-overview (synchronization reset):
# an expired state token answers 410 Gone or a 4xx with one of these codes.
EXPIRED_DELTA_CODES = frozenset({"syncstatenotfound", "resyncrequired"})
RETRY_STATUSES = frozenset({429, 503})    # https://learn.microsoft.com/graph/throttling
# The longest a client fails fast after giving up on a Retry-After (seconds).
MAX_FAIL_FAST = 300.0
# How many request timeouts one Graph call may take in all: the timeout bounds each read
# only, and a connection that trickles its answer would otherwise hold a sync for ever.
CALL_DEADLINE_TIMEOUTS = 4


class DeltaExpired(UpstreamError):
    """The delta (or skip) link is no longer valid: the caller restarts with a full delta."""

    reason = "delta_expired"


class SubscriptionExists(UpstreamError):
    """409 on create: a subscription of this app for the resource already exists."""

    reason = "subscription_exists"


class _Links:
    """The page links one listing follows: a link seen before, or more pages than any
    real listing has, would loop for ever."""

    MAX_PAGES = 100_000

    def __init__(self, what: str):
        self._what, self._seen = what, set()

    def follow(self, url: str) -> None:
        if url in self._seen:
            raise UpstreamError(f"{self._what}: a page link repeats")
        if len(self._seen) >= self.MAX_PAGES:
            raise UpstreamError(f"{self._what}: more than {self.MAX_PAGES} pages")
        self._seen.add(url)


@dataclasses.dataclass(frozen=True)
class DeltaResult:
    """What one delta round told about one group.

    ``full``: the round started without a delta link, so ``added`` is the complete
    user membership (and ``removed`` is empty). ``group_deleted``: the group itself came
    back with ``@removed`` (its last occurrence in the round: a group deleted and
    restored within one is read again in full). ``delta_link``: where the next round
    starts. ``not_users``: (type, id) of members seen that are not users (nested
    groups, service principals, devices), which aadrun does not grant.
    """

    full: bool
    added: frozenset[str]
    removed: frozenset[str]
    delta_link: str
    group_deleted: bool = False
    not_users: frozenset[tuple[str, str]] = frozenset()


def max_expiration(now: dt.datetime | None = None) -> dt.datetime:
    """The latest expiration Graph accepts for a group subscription, less a safety margin."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return now + dt.timedelta(minutes=MAX_GROUP_SUBSCRIPTION_MINUTES) - SUBSCRIPTION_MARGIN


def _iso(value: dt.datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("expiration must be timezone-aware")
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _retry_after(resp: requests.Response, attempt: int) -> float:
    """Seconds to wait: Retry-After (delta-seconds or HTTP-date, RFC 9110 §10.2.3),
    else, and for a value that is neither, exponential backoff."""
    raw = resp.headers.get("Retry-After")
    if raw:
        try:
            return _RETRY_AFTER.parse_retry_after(raw)
        except InvalidHeader:
            pass
    return float(2 ** attempt)


# An upstream's error code is an identifier; anything else in its place is not passed on.
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# What an upstream's message could echo of a request: a bearer token, a JWT or a piece of one.
_SECRET_LIKE = re.compile(r"(?i:bearer)\s+\S+|eyJ[\w\-]*(?:\.[\w\-]*)*")


def _error_code(value) -> str | None:
    return value if isinstance(value, str) and _ERROR_CODE.fullmatch(value) else None


def _graph_error(resp: requests.Response) -> tuple[str | None, str]:
    """(code, message) of a Graph error body {"error": {"code", "message"}}: what an
    error may say of it (logs, maintenance's report), so an unexpected code is left out
    and anything token-like in the message is blanked."""
    try:
        err = resp.json().get("error") or {}
    except (ValueError, AttributeError):
        return None, ""
    if not isinstance(err, dict):
        return None, ""
    return _error_code(err.get("code")), _SECRET_LIKE.sub("[redacted]", str(err.get("message") or "")[:200])


_MSAL_HTTP_ERROR = re.compile(r"HTTP Error: (\d{3})")


def _failure(error: Exception) -> str:
    """The error's type, and the status of MSAL's "HTTP Error: 503" (what it raises
    for an answer it does not parse): other texts may quote an answer."""
    match = _MSAL_HTTP_ERROR.fullmatch(str(error)) if isinstance(error, msal.exceptions.MsalError) else None
    return f"{type(error).__name__} (HTTP {match.group(1)})" if match else type(error).__name__


class _MsalHttp:
    """The shared session as MSAL's http_client, with our timeout and deadline on every
    call (MSAL asks for a token under the client's lock)."""

    def __init__(self, session: requests.Session, timeout: float, call_deadline: float):
        self._session, self._timeout, self._deadline = session, timeout, call_deadline

    def post(self, url, params=None, data=None, headers=None, **kwargs):
        kwargs.setdefault("timeout", self._timeout)
        with deadline(self._deadline, "token endpoint"):
            return self._session.post(url, params=params, data=data, headers=headers, **kwargs)

    def get(self, url, params=None, headers=None, **kwargs):
        kwargs.setdefault("timeout", self._timeout)
        with deadline(self._deadline, "authority metadata"):
            return self._session.get(url, params=params, headers=headers, **kwargs)

    def close(self):
        pass  # the session belongs to GraphClient


class GraphClient:
    """Microsoft Graph for one tenant, as the app registration of ``settings``.

    ``sleep`` and ``metadata_url`` are injectable for tests. ``retries`` and
    ``max_wait`` bound the time spent honouring Retry-After: a wait that would
    exceed the budget is not shortened (Graph would throttle again) but raised
    as ``RateLimited``, and later calls fail at once until it ends; the work is
    tried again by Pub/Sub's redelivery or the next maintenance run. Thread-safe.
    """

    def __init__(self, settings: Settings, tenant: str, *, session: requests.Session | None = None,
                 metadata_url: str = METADATA_IDENTITY_URL, sleep: Callable[[float], None] = time.sleep,
                 retries: int = 3, max_wait: float = 30.0):
        if not settings.client_id:
            raise ConfigError("AADRUN_CLIENT_ID is required to call Microsoft Graph")
        self.tenant = tenant
        self._settings = settings
        self._graph = settings.graph_url.rstrip("/")
        self._origin = urlsplit(self._graph)[:2]
        self._timeout = settings.http_timeout_seconds
        # A whole answer, however it trickles in: a delta page of 999 members is a few
        # hundred KB, and a subscription's POST waits for Graph to validate our URL.
        self._deadline = CALL_DEADLINE_TIMEOUTS * self._timeout
        self._session = session or client_session(settings)
        self._metadata_url = metadata_url
        self._sleep, self._retries, self._max_wait = sleep, retries, max_wait
        self._throttled_until = 0.0   # monotonic time Graph's last Retry-After we gave up on ends
        self._hold_until = 0.0        # monotonic time the last Retry-After (waited out or not) ends
        self._msal: msal.ConfidentialClientApplication | None = None
        self._lock = threading.Lock()

    # -- tokens --------------------------------------------------------------

    def _app(self) -> msal.ConfidentialClientApplication:
        # Built on first use: MSAL's constructor already fetches the authority's
        # OpenID configuration, which must not happen at import or start-up.
        with self._lock:
            if self._msal is None:
                secret = self._settings.client_secret
                credential = secret if secret else {"client_assertion": self._google_id_token}
                authority = f"{self._settings.authority_url.rstrip('/')}/{self.tenant}"
                if not authority.startswith("https://"):
                    raise ConfigError(f"AADRUN_AUTHORITY_URL is {self._settings.authority_url}: MSAL, which gets "
                                      "the Graph tokens, takes only https (an http loopback URL serves verify alone)")
                try:
                    self._msal = msal.ConfidentialClientApplication(
                        self._settings.client_id, client_credential=credential,
                        authority=authority,
                        http_client=_MsalHttp(self._session, self._timeout, self._deadline),
                        # Skip the login.microsoftonline.com instance check: the
                        # authority comes from validated configuration (https).
                        instance_discovery=False)
                except ValueError as e:   # MSAL's word for a 4xx or a non-JSON discovery answer
                    raise UpstreamError(f"authority discovery failed for tenant {self.tenant}: {authority} "
                                        "has no OpenID configuration (is the tenant id right?)") from e
                except (requests.RequestException, msal.exceptions.MsalError) as e:
                    raise UpstreamError(f"authority discovery failed for tenant {self.tenant}: "
                                        f"{_failure(e)}") from e
            return self._msal

    def _google_id_token(self) -> str:
        """Client assertion for workload identity federation: the service account's
        Google ID token for audience api://AzureADTokenExchange. Fetched with our own
        session, never MSAL's (MSAL caches successful GETs for 24 h)."""
        try:
            resp = self._session.get(self._metadata_url, params={"audience": FEDERATION_AUDIENCE},
                                     headers={"Metadata-Flavor": "Google"}, timeout=self._timeout)
        except requests.RequestException as e:
            raise UpstreamError(f"metadata server unreachable: {type(e).__name__}") from e
        if resp.status_code != 200 or not resp.text.strip():
            raise UpstreamError(f"metadata server answered HTTP {resp.status_code}",
                                status_code=resp.status_code)
        return resp.text.strip()

    def _token(self) -> str:
        try:
            result = self._app().acquire_token_for_client(scopes=[graph_scope(self._graph)])
        except (requests.RequestException, msal.exceptions.MsalError, TimeoutError) as e:
            # MSAL raises its own error for an HTTP error it does not parse (a 5xx).
            # (No status_code: a caller reads a 404 as "the Graph resource is gone".)
            raise UpstreamError(f"token request failed for tenant {self.tenant}: {_failure(e)}") from e
        except ValueError as e:
            # An answer that is not JSON; the exception holds the answer, token included.
            raise UpstreamError(f"token request failed for tenant {self.tenant}: {type(e).__name__}") from None
        if "access_token" not in result:
            codes = result.get("error_codes")
            detail = f" (AADSTS{codes[0]})" if isinstance(codes, list) and codes and type(codes[0]) is int else ""
            code = _error_code(result.get("error"))
            raise UpstreamError(f"token request refused for tenant {self.tenant}: {code}{detail}", code=code)
        return result["access_token"]

    # -- requests ------------------------------------------------------------

    def _check_link(self, url: str) -> None:
        # Links from responses or storage must stay on the Graph host: the bearer
        # token is sent to wherever they point.
        if urlsplit(url)[:2] != self._origin:
            raise UpstreamError(f"refusing a link outside {self._graph}")

    def _request(self, method: str, url: str, what: str, body: dict | None = None) -> requests.Response:
        """One Graph call: bearer token, timeout, Retry-After on 429/503, one token
        refresh on 401. Returns any other response for the caller to judge."""
        self._check_link(url)
        pause = self._throttled_until - time.monotonic()
        if pause > 0:
            # Graph throttles the app in this tenant, not one call: until its Retry-After
            # ends, every call fails at once instead of spending its own wait budget
            # (a run over many groups would otherwise wait for each in turn).
            raise RateLimited(f"{what}: throttled by Microsoft Graph for another {pause:.0f} s",
                              retry_after=pause, status_code=429)
        waited, attempt, refreshed = 0.0, 0, False
        hold = self._hold_until - time.monotonic()
        if hold > 0:
            # Another call was told to wait and is waiting: a call sent now would count
            # against the app's limits and prolong the throttling (Graph's guidance).
            # (A wait past the budget made that call give up: the check above refused.)
            waited = min(hold, self._max_wait)
            self._sleep(waited)
        while True:
            token = self._token()
            try:
                with deadline(self._deadline, what):
                    resp = self._session.request(
                        method, url, json=body, timeout=self._timeout,
                        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
            except (requests.RequestException, TimeoutError) as e:
                raise UpstreamError(f"{what}: {type(e).__name__}") from None
            if resp.status_code in RETRY_STATUSES:
                wait = _retry_after(resp, attempt)
                if math.isfinite(wait):
                    self._hold_until = max(self._hold_until, time.monotonic() + min(wait, MAX_FAIL_FAST))
                if attempt >= self._retries or waited + wait > self._max_wait:
                    # At most a few minutes: one absurd Retry-After must not silence the tenant.
                    pause = min(wait, MAX_FAIL_FAST) if math.isfinite(wait) else MAX_FAIL_FAST
                    self._throttled_until = max(self._throttled_until, time.monotonic() + pause)
                    raise RateLimited(f"{what}: HTTP {resp.status_code} after {attempt} retries",
                                      retry_after=wait, status_code=resp.status_code)
                self._sleep(wait)
                waited, attempt = waited + wait, attempt + 1
                continue
            if resp.status_code == 401 and not refreshed:
                # A revoked or rotated token: drop MSAL's cached one and try once more.
                self._app().remove_tokens_for_client()
                refreshed = True
                continue
            return resp

    @staticmethod
    def _fail(resp: requests.Response, what: str, cls: type[UpstreamError] = UpstreamError) -> UpstreamError:
        code, message = _graph_error(resp)
        text = f"{what}: HTTP {resp.status_code}" + (f" {code}" if code else "") + (f": {message}" if message else "")
        return cls(text, status_code=resp.status_code, code=code)

    def _json(self, resp: requests.Response, what: str, ok: tuple[int, ...] = (200,)) -> dict:
        if resp.status_code not in ok:
            raise self._fail(resp, what)
        try:
            data = resp.json()
        except ValueError:
            raise UpstreamError(f"{what}: response is not JSON", status_code=resp.status_code) from None
        if not isinstance(data, dict):
            raise UpstreamError(f"{what}: response is not a JSON object", status_code=resp.status_code)
        return data

    def _pages(self, url: str, what: str) -> Iterator[dict]:
        """Every page of a collection, following @odata.nextLink (https://learn.microsoft.com/graph/paging)."""
        links = _Links(what)
        while url:
            links.follow(url)
            page = self._json(self._request("GET", url, what), what)
            yield page
            url = page.get("@odata.nextLink")

    # -- delta ---------------------------------------------------------------

    def group_delta(self, group_id: str, delta_link: str | None = None, *,
                    restart_on_expiry: bool = False) -> DeltaResult:
        """One delta round for one group: the full user membership (no delta link) or the
        user additions and removals since ``delta_link``.

        An expired link raises ``DeltaExpired``; with ``restart_on_expiry`` the round
        instead starts over without a link and returns ``full=True``.
        """
        try:
            return self._delta(group_id, delta_link)
        except DeltaExpired:
            if not (restart_on_expiry and delta_link):
                raise
            return self._delta(group_id, None)

    def _delta(self, group_id: str, delta_link: str | None) -> DeltaResult:
        if str(uuid.UUID(group_id)) != group_id.lower():   # also keeps quotes out of $filter
            raise ValueError(f"not a group object id: {group_id!r}")
        if delta_link and urlsplit(delta_link)[:2] != self._origin:
            # Stored under an earlier AADRUN_GRAPH_URL: never sent there, and as good as expired.
            raise DeltaExpired(f"group delta: the stored delta link is not on {self._graph}")
        # https://learn.microsoft.com/graph/api/group-delta
        url = delta_link or f"{self._graph}/groups/delta?" + urlencode(
            {"$select": "members", "$filter": f"id eq '{group_id}'"}, quote_via=quote)
        added: set[str] = set()
        removed: set[str] = set()
        not_users: set[tuple[str, str]] = set()
        deleted = ever_deleted = False
        links = _Links("group delta")
        while True:
            links.follow(url)
            page = self._delta_page(url)
            for obj in page.get("value") or []:
                if not isinstance(obj, dict) or str(obj.get("id", "")).lower() != group_id.lower():
                    continue
                # An object changed several times appears once per change: the last
                # occurrence of the group says whether it exists now.
                deleted = "@removed" in obj
                ever_deleted |= deleted
                # A large group's members span pages; the group object repeats on each.
                for member in obj.get("members@delta") or []:
                    uid = member.get("id") if isinstance(member, dict) else None
                    # An object id, or nothing: it becomes an IAM principal and a cell of exports.
                    if not is_guid(uid):
                        continue
                    kind = member.get("@odata.type", USER_TYPE)
                    if kind != USER_TYPE:
                        if "@removed" not in member and isinstance(kind, str):
                            not_users.add((kind[:100], uid.lower()))
                        continue
                    # "@removed" is {"reason": "deleted"} in delta query, "deleted" in webhooks.
                    uid = uid.lower()   # as notifications' ids are: one spelling per user
                    into, other = (removed, added) if "@removed" in member else (added, removed)
                    into.add(uid)
                    other.discard(uid)
            if page.get("@odata.nextLink"):
                url = page["@odata.nextLink"]
                continue
            if not page.get("@odata.deltaLink"):
                raise UpstreamError("group delta: last page has no @odata.deltaLink")
            self._check_link(page["@odata.deltaLink"])
            if ever_deleted and not deleted and delta_link:
                # Deleted and restored within the round: what its membership became is
                # not in the changes (a restore may bring members back unannounced).
                return self._delta(group_id, None)
            return DeltaResult(full=delta_link is None, added=frozenset(added), removed=frozenset(removed),
                               delta_link=page["@odata.deltaLink"], group_deleted=deleted,
                               not_users=frozenset(not_users))

    def _delta_page(self, url: str) -> dict:
        resp = self._request("GET", url, "group delta")
        if resp.status_code == 410:
            raise self._fail(resp, "group delta", DeltaExpired)
        if 400 <= resp.status_code < 500:
            code, _ = _graph_error(resp)
            if code and code.lower() in EXPIRED_DELTA_CODES:
                raise self._fail(resp, "group delta", DeltaExpired)
        return self._json(resp, "group delta")

    # -- subscriptions (https://learn.microsoft.com/graph/api/resources/subscription) --

    def create_subscription(self, resource: str, notification_url: str, lifecycle_url: str | None,
                            client_state: str, expiration: dt.datetime) -> dict:
        """POST /subscriptions for ``SUBSCRIBED_CHANGES``; the created subscription.
        A 409 (this app already subscribes to ``resource``) raises ``SubscriptionExists``."""
        body = {"changeType": SUBSCRIBED_CHANGES, "notificationUrl": notification_url, "resource": resource,
                "expirationDateTime": _iso(expiration), "clientState": client_state,
                "latestSupportedTlsVersion": "v1_2"}
        if lifecycle_url:
            body["lifecycleNotificationUrl"] = lifecycle_url
        resp = self._request("POST", f"{self._graph}/subscriptions", "create subscription", body)
        if resp.status_code == 409:
            raise self._fail(resp, "create subscription", SubscriptionExists)
        return self._json(resp, "create subscription", ok=(200, 201))

    def list_subscriptions(self) -> list[dict]:
        """Every subscription of this app in the tenant (clientState comes back null)."""
        return [sub for page in self._pages(f"{self._graph}/subscriptions", "list subscriptions")
                for sub in page.get("value") or []]

    def renew_subscription(self, subscription_id: str, expiration: dt.datetime) -> dict:
        """PATCH the expiration; the updated subscription."""
        resp = self._request("PATCH", self._sub_url(subscription_id), "renew subscription",
                             {"expirationDateTime": _iso(expiration)})
        return self._json(resp, "renew subscription")

    def reauthorize_subscription(self, subscription_id: str) -> None:
        """Answer a reauthorizationRequired lifecycle event (204 No Content)."""
        resp = self._request("POST", self._sub_url(subscription_id) + "/reauthorize", "reauthorize subscription")
        if resp.status_code not in (200, 202, 204):
            raise self._fail(resp, "reauthorize subscription")

    def delete_subscription(self, subscription_id: str) -> None:
        """DELETE; a subscription already gone (404) is fine."""
        resp = self._request("DELETE", self._sub_url(subscription_id), "delete subscription")
        if resp.status_code not in (200, 204, 404):
            raise self._fail(resp, "delete subscription")

    def _sub_url(self, subscription_id: str) -> str:
        return f"{self._graph}/subscriptions/{quote(subscription_id, safe='')}"

    def close(self) -> None:
        self._session.close()
