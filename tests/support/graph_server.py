"""A local Microsoft Graph, Entra token authority and Google metadata server for tests.

One real HTTP(S) server on 127.0.0.1, following the documented APIs:

    /{tenant}/v2.0/.well-known/openid-configuration, /{tenant}/.well-known/openid-configuration
    /{tenant}/oauth2/v2.0/token     client_credentials: client secret or client assertion
                                    (a JWT from this server's metadata endpoint, as
                                    workload identity federation with Google does)
    /computeMetadata/v1/instance/service-accounts/default/identity?audience=...
    /v1.0/groups/delta              $select=members, $filter=id eq '...', paging, delta links
    /v1.0/subscriptions[/{id}[/reauthorize]]

Graph calls need a bearer token from the token endpoint (401 otherwise); the token's
tenant and app decide whose data a call sees. Tests drive the state (members, faults,
expiring links, ``delays`` per path) through methods and read ``log`` for what was asked.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import json
import re
import secrets
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.support.slow import head_and_body, write_slowly

GROUP_TYPE, USER_TYPE = "#microsoft.graph.group", "#microsoft.graph.user"
GOOGLE_ISSUER, FEDERATION_AUDIENCE = "https://accounts.google.com", "api://AzureADTokenExchange"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_GROUP_MINUTES = 41_760   # https://learn.microsoft.com/graph/api/resources/subscription
CHANGE_TYPES = frozenset({"created", "updated", "deleted"})   # a subscription's, comma-separated


_GONE = object()   # a delta item meaning "the group itself was removed"


@dataclasses.dataclass(frozen=True)
class Pki:
    """PEM files: the test CA (clients trust it) and the server's certificate and key."""

    ca_file: str
    cert_file: str
    key_file: str


@functools.cache
def signing_key() -> rsa.RSAPrivateKey:
    """The key behind the fake metadata server's ID tokens (one per test session)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_jwt(claims: dict, key: rsa.RSAPrivateKey, kid: str = "metadata") -> str:
    """RS256 JWS compact serialization (RFC 7515)."""
    head = _b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": kid}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{body}.{_b64(sig)}"


def verify_jwt(token: str, public_key) -> dict | None:
    """The claims of an RS256 token signed by ``public_key``, else None."""
    try:
        head, body, sig = token.split(".")
        if json.loads(_unb64(head)).get("alg") != "RS256":
            return None
        public_key.verify(_unb64(sig), f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
        claims = json.loads(_unb64(body))
    except (ValueError, InvalidSignature):
        return None
    return claims if isinstance(claims, dict) else None


class HttpError(Exception):
    """An error answer: Graph's {"error": {"code", "message"}}, or OAuth's
    {"error", "error_description", "error_codes"} for the authority (``oauth``)."""

    def __init__(self, status: int, code: str, message: str = "", headers: dict | None = None, oauth=False):
        self.status, self.code, self.message, self.headers, self.oauth = status, code, message, headers or {}, oauth


@dataclasses.dataclass(frozen=True)
class Logged:
    method: str
    path: str
    query: dict
    status: int


@dataclasses.dataclass
class _Tenant:
    groups: dict = dataclasses.field(default_factory=dict)    # group -> {member id: @odata.type}
    deleted: set = dataclasses.field(default_factory=set)
    bin: dict = dataclasses.field(default_factory=dict)       # deleted group -> its members, for a restore
    purged: set = dataclasses.field(default_factory=set)      # permanently deleted groups
    journal: list = dataclasses.field(default_factory=list)   # (seq, group, member id | None, type)
    seq: int = 0


class GraphServer:
    def __init__(self, pki: Pki | None = None, *, page_size: int = 100, validate_notifications: bool = False):
        self.pki = pki
        # Like Graph, POST notificationUrl?validationToken=... (and the lifecycle URL) on
        # create and refuse the subscription unless the token is echoed (off by default).
        self.validate_notifications = validate_notifications
        self.validations: list[tuple[str, bool]] = []   # (url, echoed correctly)
        self.page_size = page_size
        self.google_subject = "110000000000000000001"   # the service account's unique id
        self.require_https_notifications = True
        self.subscription_quota: int | None = None   # per app and tenant; None: unlimited
        self.removed_marker: object = {"reason": "deleted"}   # delta query's form of "@removed"
        self.log: list[Logged] = []
        self.token_requests = 0
        self._tenants: dict[str, _Tenant] = {}
        self._apps: dict[tuple[str, str], dict] = {}
        self._tokens: dict[str, tuple[str, str, str]] = {}      # access token -> (tenant, app, resource)
        self._issued: list[str] = []
        self._links: dict[str, dict] = {}                        # deltatoken -> state
        self._expired: dict[str, tuple[int, str]] = {}
        self._cursors: dict[str, dict] = {}                      # skiptoken -> remaining pages
        self._subs: dict[tuple[str, str], dict[str, dict]] = {}
        self._faults: list[tuple[int, str | None, str]] = []
        self._entra_down: dict[str, int] = {}   # tenant -> status its discovery and token endpoints answer
        self.delays: dict[str, float] = {}    # path -> seconds to wait before answering (slow Graph)
        self.trickles: dict[str, float] = {}  # path -> seconds between the bytes of its whole answer
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> "GraphServer":
        handler = type("Handler", (_Handler,), {"app": self})
        self._httpd = _QuietServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        scheme = "http"
        if self.pki:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.pki.cert_file, self.pki.key_file)
            self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
            scheme = "https"
        self.base_url = f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}"
        self.authority_url, self.graph_url = self.base_url, self.base_url + "/v1.0"
        self.metadata_url = self.base_url + "/computeMetadata/v1/instance/service-accounts/default/identity"
        self.ca_file = self.pki.ca_file if self.pki else None
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True, name="graph-server").start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    # -- directory state -------------------------------------------------------

    def add_app(self, tenant: str, client_id: str, *, secret: str | None = None,
                federated_subject: str | None = None) -> None:
        """Register an app in a tenant: a client secret and/or trust in Google ID tokens
        whose ``sub`` is ``federated_subject``."""
        with self._lock:
            self._tenant(tenant)
            self._apps[(tenant, client_id)] = {"secret": secret, "subject": federated_subject}

    def _tenant(self, tenant: str) -> _Tenant:
        return self._tenants.setdefault(tenant, _Tenant())

    def _touch(self, t: _Tenant, group: str, member: str | None, kind: str) -> None:
        t.seq += 1
        t.journal.append((t.seq, group, member, kind))

    def add_members(self, tenant: str, group: str, ids, kind: str = USER_TYPE) -> None:
        with self._lock:
            t = self._tenant(tenant)
            members = t.groups.setdefault(group, {})
            t.deleted.discard(group)
            for m in ids:
                if m not in members:
                    members[m] = kind
                    self._touch(t, group, m, kind)

    def remove_members(self, tenant: str, group: str, ids) -> None:
        with self._lock:
            t = self._tenant(tenant)
            members = t.groups.setdefault(group, {})
            for m in ids:
                if m in members:
                    self._touch(t, group, m, members.pop(m))

    def set_members(self, tenant: str, group: str, ids) -> None:
        """Make the group's user members exactly ``ids`` (journaling the difference)."""
        with self._lock:
            ids = set(ids)
            current = self._tenant(tenant).groups.get(group, {})
            self.remove_members(tenant, group, [m for m, k in current.items() if k == USER_TYPE and m not in ids])
            self.add_members(tenant, group, ids)

    def members(self, tenant: str, group: str) -> set[str]:
        with self._lock:
            return {m for m, k in self._tenant(tenant).groups.get(group, {}).items() if k == USER_TYPE}

    def delete_group(self, tenant: str, group: str, permanent: bool = False) -> None:
        """Delete a group: soft (restorable, as a Microsoft 365 group is) or permanent (as
        a security group is), which delta query marks ``{"reason": "deleted"}``."""
        with self._lock:
            t = self._tenant(tenant)
            members = t.groups.pop(group, {})
            if permanent:
                t.purged.add(group)
            else:
                t.bin[group] = members
            t.deleted.add(group)
            self._touch(t, group, None, GROUP_TYPE)

    def restore_group(self, tenant: str, group: str) -> None:
        """Restore a deleted group with the members it had (as Entra restores a
        soft-deleted group)."""
        with self._lock:
            t = self._tenant(tenant)
            t.groups[group] = t.bin.pop(group)
            t.deleted.discard(group)
            self._touch(t, group, None, "restored")

    # -- faults ----------------------------------------------------------------

    def fail_next(self, n: int = 1, *, status: int = 429, retry_after: float | str | None = 1,
                  code: str = "TooManyRequests", method: str | None = None, path: str = "",
                  message: str = "Injected failure.") -> None:
        """The next ``n`` authenticated Graph calls (those with ``method`` whose path
        starts with ``path``, when given) answer ``status`` (with Retry-After), with the
        error ``code`` and ``message`` ("{authorization}" in it: the call's header)."""
        with self._lock:
            fault = (status, None if retry_after is None else str(retry_after), code, method, path, message)
            self._faults.extend([fault] * n)

    def entra_outage(self, tenant: str, status: int | None = 503) -> None:
        """The tenant's discovery and token endpoints answer ``status`` (an Entra
        outage) until called again with None."""
        with self._lock:
            if status is None:
                self._entra_down.pop(tenant, None)
            else:
                self._entra_down[tenant] = status

    def _entra_fault(self, tenant: str) -> None:
        status = self._entra_down.get(tenant)
        if status is not None:
            raise HttpError(status, "temporarily_unavailable", "AADSTS90033: A transient error has occurred.",
                            oauth=True)

    def clear_faults(self) -> None:
        """Injected failures not yet served are dropped."""
        with self._lock:
            self._faults.clear()

    def expire_delta_links(self, status: int = 410, code: str = "resyncRequired") -> None:
        """Every delta and skip link issued so far stops working (410 Gone, or e.g.
        400 syncStateNotFound as identity resources answer after 7 days)."""
        with self._lock:
            for token in list(self._links) + list(self._cursors):
                self._expired[token] = (status, code)
            self._links.clear()
            self._cursors.clear()

    @property
    def issued_tokens(self) -> list[str]:
        with self._lock:
            return list(self._issued)

    def revoke_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    def subscriptions(self, tenant: str, client_id: str) -> dict[str, dict]:
        with self._lock:
            return {k: dict(v) for k, v in self._subs.get((tenant, client_id), {}).items()}

    def edit_subscription(self, tenant: str, client_id: str, subscription_id: str, **fields) -> None:
        """Change a subscription's fields behind the client's back (e.g. to what an
        earlier version of it made)."""
        with self._lock:
            self._subs[(tenant, client_id)][subscription_id].update(fields)

    def set_expiration(self, tenant: str, client_id: str, subscription_id: str, when: dt.datetime) -> None:
        """Move a subscription's expiry (e.g. close to now, to test renewal)."""
        with self._lock:
            sub = self._subs[(tenant, client_id)][subscription_id]
            sub["expirationDateTime"] = when.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")

    def reauthorizations(self, tenant: str, client_id: str, subscription_id: str) -> int:
        with self._lock:
            return self._subs[(tenant, client_id)][subscription_id]["reauthorizations"]

    def calls(self, method: str | None = None, prefix: str = "") -> list[Logged]:
        return [c for c in list(self.log) if (method is None or c.method == method) and c.path.startswith(prefix)]

    # -- Entra -------------------------------------------------------------------

    def _openid(self, tenant: str, v2: bool) -> dict:
        self._entra_fault(tenant)
        if tenant not in self._tenants:
            raise HttpError(400, "invalid_tenant", f"AADSTS90002: Tenant '{tenant}' not found.", oauth=True)
        base, v = f"{self.base_url}/{tenant}", "/v2.0" if v2 else ""
        return {"issuer": f"{base}/v2.0" if v2 else f"https://sts.windows.net/{tenant}/",
                "token_endpoint": f"{base}/oauth2{v}/token",
                "authorization_endpoint": f"{base}/oauth2{v}/authorize",
                "jwks_uri": f"{base}/discovery{v}/keys", "response_types_supported": ["code", "token"],
                "subject_types_supported": ["pairwise"], "id_token_signing_alg_values_supported": ["RS256"],
                "tenant_region_scope": "EU"}

    def _token(self, tenant: str, form: dict) -> dict:
        self.token_requests += 1
        self._entra_fault(tenant)
        if form.get("grant_type") != "client_credentials":
            raise HttpError(400, "unsupported_grant_type", "AADSTS70003", oauth=True)
        if not str(form.get("scope", "")).endswith("/.default"):
            raise HttpError(400, "invalid_scope", "AADSTS1002012: scope must end with /.default", oauth=True)
        app = self._apps.get((tenant, form.get("client_id", "")))
        if app is None:
            raise HttpError(400, "unauthorized_client", "AADSTS700016: Application not found", oauth=True)
        if "client_assertion" in form:
            self._check_assertion(app, form)
        elif not (app["secret"] and secrets.compare_digest(form.get("client_secret", ""), app["secret"])):
            raise HttpError(401, "invalid_client", "AADSTS7000215: Invalid client secret provided.", oauth=True)
        access = "srv." + secrets.token_urlsafe(24)
        # A token is for the one resource its scope names; Graph refuses one for another.
        self._tokens[access] = (tenant, form["client_id"], form["scope"][:-len("/.default")])
        self._issued.append(access)
        return {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": access}

    def _check_assertion(self, app: dict, form: dict) -> None:
        claims = verify_jwt(form["client_assertion"], signing_key().public_key()) \
            if form.get("client_assertion_type") == JWT_BEARER else None
        ok = (claims and app["subject"] and claims.get("iss") == GOOGLE_ISSUER and claims.get("sub") == app["subject"]
              and claims.get("aud") == FEDERATION_AUDIENCE and claims.get("exp", 0) > time.time())
        if not ok:
            raise HttpError(401, "invalid_client", "AADSTS70021: No matching federated identity record found.",
                            oauth=True)

    def _identity(self, query: dict, headers) -> str:
        # https://cloud.google.com/compute/docs/instances/verifying-instance-identity
        if headers.get("Metadata-Flavor") != "Google":
            raise HttpError(403, "Forbidden", "Missing Metadata-Flavor:Google header.")
        now = int(time.time())
        return sign_jwt({"iss": GOOGLE_ISSUER, "sub": self.google_subject, "aud": query.get("audience", ""),
                         "azp": self.google_subject, "iat": now, "exp": now + 3600}, signing_key())

    # -- Graph: delta (https://learn.microsoft.com/graph/api/group-delta) ----------

    def _delta(self, tenant: str, query: dict) -> dict:
        for key in ("$skiptoken", "$deltatoken"):
            if key in query and query[key] in self._expired:
                status, code = self._expired[query[key]]
                raise HttpError(status, code, "The delta token is expired and data must be synchronized again.")
        if "$skiptoken" in query:
            cursor = self._cursors.get(query["$skiptoken"])   # a page may be asked for again
            if cursor is None or cursor["tenant"] != tenant:
                raise HttpError(400, "BadRequest", "Invalid skip token.")
            return self._page(cursor)
        t = self._tenant(tenant)
        if "$deltatoken" in query:
            state = self._links.get(query["$deltatoken"])
            if state is None or state["tenant"] != tenant:
                raise HttpError(400, "syncStateNotFound", "The sync state generation is not found.")
            items = self._changes(t, state, self.removed_marker)
        else:
            if query.get("$select") != "members":   # all this server implements
                raise HttpError(400, "Request_UnsupportedQuery", "Use $select=members.")
            state = {"tenant": tenant, "groups": self._filter(query.get("$filter"))}
            groups = state["groups"] if state["groups"] is not None else sorted(t.groups)
            items = [(g, e) for g in groups if g in t.groups and g not in t.deleted
                     for e in ([{"@odata.type": k, "id": m} for m, k in t.groups[g].items()] or [None])]
        return self._page({"tenant": tenant, "items": items, "state": {**state, "seq": t.seq},
                           "purged": set(t.purged)})

    @staticmethod
    def _filter(text: str | None) -> list[str] | None:
        if not text:
            return None
        ids = re.findall(r"id eq '([0-9a-fA-F-]+)'", text)
        if not ids or re.sub(r"id eq '[0-9a-fA-F-]+'|\s+or\s+", "", text).strip():
            raise HttpError(400, "Request_UnsupportedQuery", "Unsupported filter.")
        return ids

    @staticmethod
    def _changes(t: _Tenant, state: dict, marker) -> list:
        touched: dict[str, dict[str, str]] = {}
        deleted: set[str] = set()    # groups deleted since the link
        restored: set[str] = set()   # ... and restored since the link
        for seq, g, m, kind in t.journal:
            if seq > state["seq"] and (state["groups"] is None or g in state["groups"]):
                touched.setdefault(g, {})
                if m is not None:
                    touched[g][m] = kind
                else:
                    (deleted if kind == GROUP_TYPE else restored).add(g)
        items = []
        for g, ms in touched.items():
            if g in deleted or g in t.deleted:
                items.append((g, _GONE))   # "changed": soft-deleted, restorable (delta-query-overview)
            if g in t.deleted:
                continue
            if g in deleted or g in restored:
                # Back: it appears (again, if it was deleted since the link: once per
                # change, delta-query-overview) with the members it has now.
                ms = {**t.groups.get(g, {}), **ms}
                if not ms:
                    items.append((g, None))
            for m, kind in ms.items():
                entry = {"@odata.type": kind, "id": m}
                if m not in t.groups.get(g, {}):
                    entry["@removed"] = marker
                items.append((g, entry))
        return items

    def _page(self, cursor: dict) -> dict:
        items, rest = cursor["items"][:self.page_size], cursor["items"][self.page_size:]
        objects: list[dict] = []
        for g, entry in items:   # consecutive entries of one group share one group object
            if entry is _GONE:
                reason = "deleted" if g in cursor["purged"] else "changed"
                objects.append({"@odata.type": GROUP_TYPE, "id": g, "@removed": {"reason": reason}})
                continue
            if not objects or objects[-1]["id"] != g or "@removed" in objects[-1]:
                objects.append({"@odata.type": GROUP_TYPE, "id": g, "members@delta": []})
            if entry is not None:
                objects[-1]["members@delta"].append(entry)
        body: dict = {"@odata.context": f"{self.graph_url}/$metadata#groups(members)", "value": objects}
        token = secrets.token_urlsafe(16)
        if rest:
            self._cursors[token] = {**cursor, "items": rest}
            body["@odata.nextLink"] = f"{self.graph_url}/groups/delta?" + urlencode({"$skiptoken": token}, safe="$")
        else:
            self._links[token] = cursor["state"]
            body["@odata.deltaLink"] = f"{self.graph_url}/groups/delta?" + urlencode({"$deltatoken": token}, safe="$")
        return body

    # -- Graph: subscriptions (https://learn.microsoft.com/graph/api/resources/subscription) --

    def _expiry(self, resource: str, raw) -> str:
        try:
            when = dt.datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
        except ValueError:
            raise HttpError(400, "InvalidRequest", "Invalid expirationDateTime.") from None
        now = dt.datetime.now(dt.timezone.utc)
        if when.tzinfo is None or when <= now:
            raise HttpError(400, "InvalidRequest", "Subscription expiration must be in the future.")
        if resource.lower().startswith(("/groups", "groups")) and when > now + dt.timedelta(minutes=MAX_GROUP_MINUTES):
            raise HttpError(400, "InvalidRequest",
                            f"Subscription expiration can only be {MAX_GROUP_MINUTES} minutes in the future.")
        return when.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")

    def _create(self, tenant: str, app: str, body: dict) -> dict:
        for field in ("changeType", "notificationUrl", "resource", "expirationDateTime"):
            if not body.get(field):
                raise HttpError(400, "InvalidRequest", f"{field} is required.")
        if not set(str(body["changeType"]).split(",")) <= CHANGE_TYPES:
            raise HttpError(400, "InvalidRequest", "changeType must be created, updated and/or deleted.")
        if self.require_https_notifications and not body["notificationUrl"].startswith("https://"):
            raise HttpError(400, "InvalidRequest", "notificationUrl must be https.")
        if len(body.get("clientState") or "") > 128:
            raise HttpError(400, "InvalidRequest", "clientState can be at most 128 characters.")
        subs = self._subs.setdefault((tenant, app), {})
        if self.subscription_quota is not None and len(subs) >= self.subscription_quota:
            raise HttpError(403, "ExtensionError", "The app's subscription quota for this tenant is used up.")
        resource = body["resource"]
        if any(s["resource"].lower().strip("/") == resource.lower().strip("/") for s in subs.values()):
            raise HttpError(409, "Conflict", "A subscription for this resource already exists for this app.")
        if self.validate_notifications:
            for url in dict.fromkeys(u for u in (body["notificationUrl"], body.get("lifecycleNotificationUrl")) if u):
                self._validate(url)
        sub = {"id": str(uuid.uuid4()), "resource": resource, "applicationId": app,
               "changeType": body["changeType"], "clientState": body.get("clientState"),
               "notificationUrl": body["notificationUrl"],
               "lifecycleNotificationUrl": body.get("lifecycleNotificationUrl"),
               "expirationDateTime": self._expiry(resource, body["expirationDateTime"]),
               "creatorId": app, "latestSupportedTlsVersion": body.get("latestSupportedTlsVersion", "v1_2"),
               "includeResourceData": False, "reauthorizations": 0}
        subs[sub["id"]] = sub
        return self._public(sub, created=True)

    def _validate(self, url: str) -> None:
        """The validation handshake of learn.microsoft.com/graph/change-notifications-delivery-webhooks:
        an empty text/plain POST with ``validationToken`` in the query; the endpoint must answer
        200 with the URL-decoded token as text/plain within 10 s."""
        token = f"Validation: Testing client application reachability for subscription Request-Id: " \
                f"{secrets.token_hex(8)}+&=/"
        sep = "&" if "?" in url else "?"
        request = urllib.request.Request(f"{url}{sep}{urlencode({'validationToken': token})}", data=b"",
                                         method="POST", headers={"Content-Type": "text/plain; charset=utf-8"})
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                ok = (resp.status == 200 and resp.headers.get_content_type() == "text/plain"
                      and resp.read().decode() == token)
        except (urllib.error.URLError, OSError, UnicodeDecodeError):
            ok = False
        self.validations.append((url, ok))
        if not ok:
            raise HttpError(400, "ValidationError", "Subscription validation request failed. Notification "
                            "endpoint must respond with 200 OK to validation request.")

    @staticmethod
    def _public(sub: dict, created: bool = False) -> dict:
        out = {k: v for k, v in sub.items() if k != "reauthorizations"}
        if not created:
            out["clientState"] = None   # "not returned for security purposes" (subscription-list)
        return out

    def _list(self, subs: dict, query: dict) -> dict:
        skip = int(query.get("$skiptoken", "0"))   # opaque to clients; an offset here
        out: dict = {"value": [self._public(s) for s in list(subs.values())[skip:skip + self.page_size]]}
        if skip + self.page_size < len(subs):
            out["@odata.nextLink"] = f"{self.graph_url}/subscriptions?$skiptoken={skip + self.page_size}"
        return out

    def _subscription(self, tenant: str, app: str, method: str, rest: list[str], query: dict, body: dict | None):
        subs = self._subs.setdefault((tenant, app), {})
        if not rest:
            if method == "POST":
                return 201, self._create(tenant, app, body or {})
            return 200, self._list(subs, query)
        sub = subs.get(rest[0])
        if sub is None:
            raise HttpError(404, "ResourceNotFound", "The object was not found.")
        if rest[1:] == ["reauthorize"] and method == "POST":
            sub["reauthorizations"] += 1
            return 204, None
        if rest[1:]:
            raise HttpError(404, "BadRequest", "Unsupported segment.")
        if method == "PATCH":
            sub["expirationDateTime"] = self._expiry(sub["resource"], (body or {}).get("expirationDateTime"))
        elif method == "DELETE":
            del subs[rest[0]]
            return 204, None
        return 200, self._public(sub)

    def _graph(self, method: str, parts: list[str], query: dict, headers, body):
        auth = headers.get("Authorization", "")
        principal = self._tokens.get(auth[7:]) if auth.startswith("Bearer ") else None
        if principal is None or principal[2] != self.base_url:
            raise HttpError(401, "InvalidAuthenticationToken", "Access token is empty or invalid."
                            if principal is None else "Invalid audience.",
                            {"WWW-Authenticate": 'Bearer realm="", error="invalid_token"'})
        route = "/v1.0/" + "/".join(parts)
        fault = next((f for f in self._faults if f[3] in (None, method) and route.startswith(f[4])), None)
        if fault is not None:
            self._faults.remove(fault)
            status, retry_after, code = fault[:3]
            message = fault[5].replace("{authorization}", auth)
            raise HttpError(status, code, message, {"Retry-After": retry_after} if retry_after else {})
        tenant, app, _ = principal
        if parts == ["groups", "delta"] and method == "GET":
            return 200, self._delta(tenant, query)
        if parts[:1] == ["subscriptions"]:
            return self._subscription(tenant, app, method, parts[1:], query, body)
        raise HttpError(404, "Request_ResourceNotFound", "Resource not found.")

    # -- dispatch ------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict, headers, raw: bytes):
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["v1.0"]:
            body = json.loads(raw) if raw.strip() else None
            with self._lock:
                return self._graph(method, parts[1:], query, headers, body)
        with self._lock:
            if path.startswith("/computeMetadata/v1/instance/service-accounts/default/identity"):
                return 200, self._identity(query, headers)
            if len(parts) >= 2 and parts[1:] in (["v2.0", ".well-known", "openid-configuration"],
                                                 [".well-known", "openid-configuration"]):
                return 200, self._openid(parts[0], parts[1] == "v2.0")
            if len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"] and method == "POST":
                return 200, self._token(parts[0], dict(parse_qsl(raw.decode())))
        raise HttpError(404, "not_found", path, oauth=True)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A client killed mid-request (the SIGKILL scenarios) is expected: no traceback.
        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    app: GraphServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True   # headers and body go out as separate writes

    def log_message(self, *args) -> None:
        pass

    def _serve(self) -> None:
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers: dict = {}
        try:
            status, body = self.app.handle(self.command, url.path, query, self.headers, raw)
        except HttpError as e:
            status, headers = e.status, e.headers
            codes = [int(c) for c in re.findall(r"AADSTS(\d+)", e.message)]
            body = ({"error": e.code, "error_description": e.message, "error_codes": codes} if e.oauth
                    else {"error": {"code": e.code, "message": e.message}})
        except (ValueError, KeyError) as e:
            status, body = 400, {"error": {"code": "BadRequest", "message": type(e).__name__}}
        self.app.log.append(Logged(self.command, url.path, query, status))
        # The answer reflects the directory as it was when asked; it arrives late.
        time.sleep(self.app.delays.get(url.path, 0.0))
        data = b"" if body is None else body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        gap = self.app.trickles.get(url.path)
        if gap is None:
            self.end_headers()
            self.wfile.write(data)
        else:
            write_slowly(self.wfile, head_and_body(self, data), gap)   # status line and headers too

    do_GET = do_POST = do_PATCH = do_DELETE = _serve


__all__ = ["GraphServer", "Logged", "Pki", "sign_jwt", "signing_key", "verify_jwt"]
