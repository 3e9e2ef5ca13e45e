"""A local Cloud Run Admin API v2 IAM server, for tests of ``aadrun.iam``.

Serves on 127.0.0.1 the three REST calls google-cloud-run's rest transport makes
(``google/cloud/run_v2/services/services/transports/rest_base.py``):

    GET  /v2/projects/*/locations/*/services/*:getIamPolicy
         ?options.requestedPolicyVersion=3&$alt=json;enum-encoding=int
    POST /v2/projects/*/locations/*/services/*:setIamPolicy        {"policy", "updateMask"?}
    POST /v2/projects/*/locations/*/services/*:testIamPermissions  {"permissions"}

Behaviour follows the IAM docs (cloud.google.com/iam/docs/policies):
  - every successful set gives a new etag; a set whose etag is not the current
    one fails with 409 ABORTED; a set without an etag overwrites;
  - the update mask defaults to ``bindings,etag`` (SetIamPolicyRequest docs), so
    ``auditConfigs`` change only when the mask names them;
  - bindings with a condition need policy version 3; a read asking for an older
    version gets them with ``_withcond_`` role names and no condition
    (cloud.google.com/iam/docs/policies#versions);
  - at most 1,500 member occurrences per policy; empty bindings are dropped;
  - a member IAM cannot resolve fails the whole set with 400 INVALID_ARGUMENT: one
    of no known kind, or a principal of a workforce pool that does not exist
    (``pools``, when set, names the pools that do); so does a predefined role that
    does not apply to a Cloud Run service (its own ``roles/run.*`` and the basic
    roles do; cloud.google.com/run/docs/reference/iam/roles);
  - a resource never written has the empty policy ``{"version": 1, "etag": "ACAB"}``.

Errors have the google.rpc.Status JSON shape ``{"error": {"code", "message", "status"}}``.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

BASIC_ROLES = frozenset({"roles/owner", "roles/editor", "roles/viewer"})
PATH = re.compile(r"^/v2/(projects/[^/]+/locations/[^/]+/services/[^/:]+):"
                  r"(getIamPolicy|setIamPolicy|testIamPermissions)$")
METHODS = {"getIamPolicy": "GET", "setIamPolicy": "POST", "testIamPermissions": "POST"}
EMPTY_ETAG = "ACAB"
MAX_MEMBERS = 1500
MEMBER = re.compile(r"^(?:allUsers|allAuthenticatedUsers|(?:user|group|serviceAccount|domain|deleted:[a-zA-Z]+):\S+"
                    r"|(?:principal|principalSet)://iam\.googleapis\.com/\S+)$")
POOL = re.compile(r"^principal(?:Set)?://iam\.googleapis\.com/(locations/global/workforcePools/[^/]+)/")
CONFLICT = "There were concurrent policy changes. Please retry the whole read-modify-write with exponential backoff."


class ApiError(Exception):
    def __init__(self, code: int, status: str, message: str):
        self.code, self.status, self.message = code, status, message
        super().__init__(message)


class CloudRunIamServer:
    """The server and its test hooks; use as a context manager or ``start()``/``stop()``.

    Hooks: ``set_policy`` / ``policy`` (stored state), ``calls`` (a Counter of
    ``(resource, method)``), ``requests`` (every request: method, path, query,
    body), ``inject_conflicts`` and ``inject_error`` (fail the next calls),
    ``granted`` (the permissions ``testIamPermissions`` reports as held),
    ``delete_service`` (its resource answers 404 from then on), ``pools`` (the
    workforce pools that exist; None: any), ``hold_next_set`` (a set that lands late).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deleted: set[str] = set()
        self._before_set: dict[str, dict] = {}
        self._held: dict[str, threading.Event] = {}
        self._policies: dict[str, dict] = {}
        self._generation = 0
        self._faults: dict[tuple[str, str], list[ApiError]] = {}
        self.calls: Counter[tuple[str, str]] = Counter()
        self.requests: list[dict] = []
        self.granted: set[str] = {"run.services.getIamPolicy", "run.services.setIamPolicy"}
        self.pools: set[str] | None = None
        # Object ids of workforce pool subjects deleted (undeletable for 30 days): IAM shows
        # their grants as deleted:principal://... (cloud.google.com/iam/docs/reference/rest/v1/Policy).
        self.deleted_subjects: set[str] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> "CloudRunIamServer":
        handler = type("Handler", (_Handler,), {"api": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        # A short poll interval keeps shutdown() (which waits for the next poll) fast.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="cloudrun-iam", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "CloudRunIamServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # --- test hooks ----------------------------------------------------------------

    def set_policy(self, resource: str, policy: dict) -> str:
        """Store ``policy`` (JSON form, ``etag`` ignored) as is; returns the new etag."""
        with self._lock:
            stored = copy.deepcopy(policy)
            stored.pop("etag", None)
            stored["etag"] = self._new_etag(resource)
            self._policies[resource] = stored
            return stored["etag"]

    def write_before_next_set(self, resource: str, policy: dict) -> None:
        """Someone else stores ``policy`` just before the next setIamPolicy on ``resource``
        is handled: that set carries a stale etag and gets 409, as on the real API."""
        with self._lock:
            self._before_set[resource] = policy

    def hold_next_set(self, resource: str) -> threading.Event:
        """The next setIamPolicy on ``resource`` waits, unhandled, until the returned
        event is set: a call whose caller times out, then lands (its etag checked then)."""
        release = threading.Event()
        with self._lock:
            self._held[resource] = release
        return release

    def delete_service(self, resource: str) -> None:
        """The service is deleted: its IAM calls answer 404 NOT_FOUND, as Cloud Run's do
        for a service that does not exist, and its policy is gone with it."""
        with self._lock:
            self._deleted.add(resource)
            self._policies.pop(resource, None)

    def policy(self, resource: str) -> dict:
        """A copy of the stored policy (the empty policy when never written)."""
        with self._lock:
            return copy.deepcopy(self._policies.get(resource) or {"version": 1, "etag": EMPTY_ETAG})

    def sets(self, resource: str) -> int:
        """How many setIamPolicy calls reached ``resource`` (failed ones included)."""
        return self.calls[(resource, "setIamPolicy")]

    def inject_conflicts(self, resource: str, n: int = 1) -> None:
        """The next ``n`` sets fail with 409 ABORTED, as if another writer had just
        changed the policy (its etag changes, its bindings do not)."""
        self.inject_error(resource, "setIamPolicy", 409, "ABORTED", CONFLICT, n)

    def inject_error(self, resource: str, method: str, code: int, status: str, message: str, n: int = 1) -> None:
        with self._lock:
            self._faults.setdefault((resource, method), []).extend(ApiError(code, status, message) for _ in range(n))

    # --- the API -------------------------------------------------------------------

    def _new_etag(self, resource: str) -> str:
        self._generation += 1
        digest = hashlib.sha256(f"{resource}/{self._generation}".encode()).digest()[:8]
        return base64.b64encode(digest).decode()

    def handle(self, method: str, resource: str, verb: str, query: dict, body: dict | None,
               authorization: str | None = None) -> dict:
        if verb == "setIamPolicy":
            with self._lock:
                held = self._held.pop(resource, None)
            if held is not None:
                held.wait(30)
        with self._lock:
            self.calls[(resource, verb)] += 1
            self.requests.append({"method": method, "resource": resource, "verb": verb,
                                  "query": query, "body": copy.deepcopy(body), "authorization": authorization})
            if METHODS[verb] != method:
                raise ApiError(405, "UNIMPLEMENTED", f"{method} is not allowed on :{verb}")
            if verb == "setIamPolicy" and resource in self._before_set:
                stored = copy.deepcopy(self._before_set.pop(resource))
                stored["etag"] = self._new_etag(resource)
                self._policies[resource] = stored
            if resource in self._deleted:
                raise ApiError(404, "NOT_FOUND", f"Resource '{resource.rsplit('/', 1)[-1]}' does not exist.")
            faults = self._faults.get((resource, verb))
            if faults:
                fault = faults.pop(0)
                if fault.code == 409 and resource in self._policies:
                    self._policies[resource]["etag"] = self._new_etag(resource)
                raise fault
            if verb == "getIamPolicy":
                version = query.get("options.requestedPolicyVersion") or query.get(
                    "options.requested_policy_version") or ["0"]
                return self._get(resource, int(version[0]))
            if verb == "setIamPolicy":
                return self._set(resource, body or {})
            asked = (body or {}).get("permissions") or []
            return {"permissions": [p for p in asked if p in self.granted]}

    def _shown(self, policy: dict) -> dict:
        """``policy`` as IAM shows it: the grants of deleted subjects marked so."""
        for b in policy.get("bindings", []):
            b["members"] = [f"deleted:{m}" if m.startswith("principal://") and m.rsplit("/", 1)[-1]
                            in self.deleted_subjects else m for m in b["members"]]
        return policy

    def _get(self, resource: str, version: int) -> dict:
        policy = self._shown(copy.deepcopy(self._policies.get(resource) or {"version": 1, "etag": EMPTY_ETAG}))
        conditional = [b for b in policy.get("bindings", []) if b.get("condition")]
        if conditional and version < 3:
            # Older readers see conditional bindings renamed and unconditioned.
            for b in conditional:
                tag = hashlib.sha256(json.dumps(b.pop("condition"), sort_keys=True).encode()).hexdigest()[:16]
                b["role"] = f"{b['role']}_withcond_{tag}"
            policy["version"] = 1
        return policy

    def _set(self, resource: str, body: dict) -> dict:
        new = body.get("policy")
        if not isinstance(new, dict):
            raise ApiError(400, "INVALID_ARGUMENT", "policy is required")
        mask = body.get("updateMask") or "bindings,etag"
        fields = {f.strip() for f in (mask.split(",") if isinstance(mask, str) else mask.get("paths", []))}
        current = self._policies.get(resource) or {"version": 1, "etag": EMPTY_ETAG}
        etag = new.get("etag")
        if etag and etag != current["etag"]:
            raise ApiError(409, "ABORTED", CONFLICT)
        bindings = [b for b in new.get("bindings", []) if b.get("members")]
        for b in bindings:   # a deleted subject's grant is kept as the subject's (an undelete revives it)
            b["members"] = list(dict.fromkeys(m.removeprefix("deleted:") if m.startswith("deleted:principal://")
                                              else m for m in b["members"]))
        if any(b.get("condition") for b in bindings) and int(new.get("version") or 0) < 3:
            raise ApiError(400, "INVALID_ARGUMENT", "Conditional bindings require policy version 3.")
        if any("_withcond_" in b.get("role", "") for b in bindings):
            raise ApiError(400, "INVALID_ARGUMENT", "Role names with _withcond_ cannot be set.")
        for role in (b.get("role", "") for b in bindings):
            if role.startswith("roles/") and not role.startswith("roles/run.") and role not in BASIC_ROLES:
                raise ApiError(400, "INVALID_ARGUMENT", f"Role {role} is not supported for this resource.")
        for member in (m for b in bindings for m in b["members"]):
            if not MEMBER.match(member):
                raise ApiError(400, "INVALID_ARGUMENT", f"Invalid member: {member}.")
            pool = POOL.match(member)
            if pool and self.pools is not None and pool.group(1).rsplit("/", 1)[1] not in self.pools:
                raise ApiError(400, "INVALID_ARGUMENT", f"Identity Pool does not exist ({pool.group(1)}).")
        count = sum(len(b["members"]) for b in bindings)
        if count > MAX_MEMBERS:
            raise ApiError(400, "INVALID_ARGUMENT", f"The number of members in the policy ({count:,}) "
                                                    f"is larger than the maximum allowed size {MAX_MEMBERS:,}.")
        stored = copy.deepcopy(current)
        if "bindings" in fields:
            stored["bindings"] = copy.deepcopy(bindings)
            if not bindings:
                stored.pop("bindings")
        if "auditConfigs" in fields or "audit_configs" in fields:
            stored["auditConfigs"] = copy.deepcopy(new.get("auditConfigs", []))
        stored["version"] = int(new.get("version") or 1)
        stored["etag"] = self._new_etag(resource)
        self._policies[resource] = stored
        return self._shown(copy.deepcopy(stored))


class _Handler(BaseHTTPRequestHandler):
    api: CloudRunIamServer
    protocol_version = "HTTP/1.1"  # keep-alive, as requests' session pool expects
    disable_nagle_algorithm = True  # headers and body go out in two writes: do not wait for an ACK
    timeout = 10

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        match = PATH.match(unquote(parts.path))
        try:
            if not match:
                raise ApiError(404, "NOT_FOUND", f"no such method: {parts.path}")
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                raise ApiError(400, "INVALID_ARGUMENT", "the body is not JSON") from None
            result = self.api.handle(method, match.group(1), match.group(2),
                                     parse_qs(parts.query, keep_blank_values=True), body,
                                     self.headers.get("Authorization"))
            self._reply(200, result)
        except ApiError as e:
            self._reply(e.code, {"error": {"code": e.code, "message": e.message, "status": e.status}})

    def _reply(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # quiet test output
        pass
