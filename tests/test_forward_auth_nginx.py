"""verify's forward-auth mode behind a real nginx (``auth_request``).

nginx runs in the foreground on a free loopback port with its own prefix, in
front of a recording upstream; verify runs in the real functions-framework with
the local identity provider and a seeded SQLite store. The nginx configuration
is the one shown in docs/forward-auth.md.
"""
from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from aadrun.store import GroupUpdate, SyncState, open_store, utcnow
from tests.support.emulators import free_port
from tests.support.serve import FunctionServer
from tests.support.world import ALICE, BOB, G_ENG, TENANT_A, env_for, write_policy

NGINX = shutil.which("nginx")
DOC = Path(__file__).resolve().parents[1] / "docs" / "forward-auth.md"

# Placeholders: {prefix} {port} {verify_port} {app_port}. Only the http block's
# server part is the documented example; the rest keeps this nginx self-contained.
NGINX_CONF = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}

http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    upstream aadrun_verify {{ server 127.0.0.1:{verify_port}; keepalive 8; }}
    upstream app {{ server 127.0.0.1:{app_port}; }}

    server {{
        listen 127.0.0.1:{port};

        # A protected application: every request is first sent to verify.
        location / {{
            set $aadrun_service billing;            # the service name in the policy
            auth_request /_aadrun/verify;
            # verify answers 200 and sets X-Auth-* on allow; copy them into variables...
            auth_request_set $aadrun_subject  $upstream_http_x_auth_subject;
            auth_request_set $aadrun_tenant   $upstream_http_x_auth_tenant;
            auth_request_set $aadrun_decision $upstream_http_x_auth_decision_id;
            # ...and pass them on. proxy_set_header replaces whatever the client sent
            # under these names, so a client cannot forge its identity.
            proxy_set_header X-Auth-Subject     $aadrun_subject;
            proxy_set_header X-Auth-Tenant      $aadrun_tenant;
            proxy_set_header X-Auth-Decision-Id $aadrun_decision;
            proxy_pass http://app;
        }}

        # A location naming a service the policy does not know: verify answers 404.
        location /misconfigured/ {{
            set $aadrun_service no-such-service;
            auth_request /_aadrun/verify;
            proxy_pass http://app;
        }}

        # The check itself. auth_request allows on any 2xx and denies with the same
        # status on 401 or 403 (a 401 keeps verify's WWW-Authenticate); ANY OTHER
        # status from verify (400, 404 unknown_service, 413, 503 unavailable) makes
        # nginx answer 500 to the client: it fails closed, the upstream is not called.
        location = /_aadrun/verify {{
            internal;
            # Forward-auth mode: ?service=NAME and an empty body. The client's headers
            # (Authorization) are passed on; the method is not: an auth_request
            # subrequest is always a GET, so the original one goes in a header.
            proxy_pass http://aadrun_verify/verify?service=$aadrun_service;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header X-Original-URI $request_uri;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


class Upstream:
    """The protected application: answers 200 and records what reached it."""

    def __init__(self):
        self.seen: list[dict] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                upstream.seen.append({"method": self.command, "path": self.path,
                                      "headers": {k.lower(): v for k, v in self.headers.items()},
                                      "body": self.rfile.read(length) if length else b""})
                data = b"upstream"
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _record  # noqa: N815 - http.server naming

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Nginx:
    def __init__(self, prefix: Path, verify_port: int, app_port: int):
        self.prefix, self.port = prefix, free_port()
        (prefix / "tmp").mkdir(parents=True)
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(NGINX_CONF.format(prefix=prefix, port=self.port, verify_port=verify_port,
                                               app_port=app_port))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "Nginx":
        args = [NGINX, "-p", str(self.prefix), "-e", str(self.prefix / "error.log"), "-c", str(self.conf),
                "-g", "daemon off;"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited:\n{self.error_log()}")
            try:
                http.client.HTTPConnection("127.0.0.1", self.port, timeout=0.5).connect()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx not listening after {timeout}s:\n{self.error_log()}")

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: fast shutdown of master and workers
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, idp):
    if NGINX is None:
        pytest.skip("nginx is not on PATH (scripts/test installs Debian's nginx)")
    tmp = tmp_path_factory.mktemp("forward-auth")
    policy = write_policy(tmp)
    store_url = f"sqlite:///{tmp}/state.db"
    open_store(store_url).apply(GroupUpdate(TENANT_A, G_ENG, replace=frozenset({ALICE}),
                                            sync=SyncState(None, utcnow()), source="test"))
    upstream = Upstream()
    with FunctionServer("verify", env_for(idp.url, policy, store_url)) as verify:
        nginx = Nginx(tmp / "nginx", verify.port, upstream.port).start()
        try:
            yield nginx, upstream, verify
        finally:
            nginx.stop()
            upstream.stop()


def call(nginx: Nginx, path: str = "/orders/42", method: str = "GET", token: str | None = None,
         headers: dict | None = None, body: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=10)
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=sent)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def reached(upstream: Upstream, marker: str) -> list[dict]:
    return [r for r in upstream.seen if marker in r["path"]]


def test_allowed_token_reaches_the_upstream_with_the_identity_headers(stack, idp):
    nginx, upstream, _ = stack
    token = idp.mint(TENANT_A, oid=ALICE, aud="api://billing")
    status, _, body = call(nginx, "/orders/allowed", token=token)
    assert (status, body) == (200, b"upstream")
    [request] = reached(upstream, "/orders/allowed")
    assert request["headers"]["x-auth-subject"] == ALICE
    assert request["headers"]["x-auth-tenant"] == TENANT_A
    assert request["headers"]["x-auth-decision-id"]


def test_forged_identity_headers_from_the_client_are_replaced(stack, idp):
    nginx, upstream, _ = stack
    token = idp.mint(TENANT_A, oid=ALICE, aud="api://billing")
    forged = {"X-Auth-Subject": BOB, "X-Auth-Tenant": "evil", "X-Auth-Decision-Id": "forged"}
    status, _, _ = call(nginx, "/orders/forged-headers", token=token, headers=forged)
    assert status == 200
    [request] = reached(upstream, "/orders/forged-headers")
    assert request["headers"]["x-auth-subject"] == ALICE
    assert request["headers"]["x-auth-tenant"] == TENANT_A
    assert request["headers"]["x-auth-decision-id"] != "forged"


def test_a_post_with_a_body_is_checked_without_its_body_and_then_passed_on(stack, idp):
    nginx, upstream, _ = stack
    token = idp.mint(TENANT_A, oid=ALICE, aud="api://billing")
    payload = json.dumps({"amount": 12}).encode()
    status, _, _ = call(nginx, "/orders/post", method="POST", token=token, body=payload,
                        headers={"Content-Type": "application/json"})
    assert status == 200
    [request] = reached(upstream, "/orders/post")
    assert (request["method"], request["body"]) == ("POST", payload)
    assert request["headers"]["x-auth-subject"] == ALICE


@pytest.mark.parametrize("case", ["garbage", "expired", "wrong_audience"])
def test_an_invalid_token_gets_401_with_the_challenge_and_never_reaches_the_upstream(stack, idp, case):
    nginx, upstream, _ = stack
    token = {
        "garbage": "not-a-token",
        "expired": idp.mint(TENANT_A, oid=ALICE, aud="api://billing", now=time.time() - 7200, lifetime=60),
        "wrong_audience": idp.mint(TENANT_A, oid=ALICE, aud="api://someone-else"),
    }[case]
    status, headers, _ = call(nginx, f"/orders/invalid-{case}", token=token)
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer ")
    assert 'error="invalid_token"' in headers["www-authenticate"]
    assert reached(upstream, f"/orders/invalid-{case}") == []


def test_a_request_without_a_token_gets_401_with_the_plain_challenge(stack):
    nginx, upstream, _ = stack
    status, headers, _ = call(nginx, "/orders/no-token")
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="aadrun"'
    assert reached(upstream, "/orders/no-token") == []


def test_a_valid_token_of_a_non_member_gets_403_and_never_reaches_the_upstream(stack, idp):
    nginx, upstream, _ = stack
    token = idp.mint(TENANT_A, oid=BOB, aud="api://billing")
    status, headers, _ = call(nginx, "/orders/not-member", method="DELETE", token=token)
    assert status == 403
    assert "www-authenticate" not in headers
    assert reached(upstream, "/orders/not-member") == []


def test_a_status_other_than_2xx_401_403_from_verify_becomes_500(stack, idp):
    """unknown_service is 404 from verify; nginx turns it into 500 and fails closed."""
    nginx, upstream, _ = stack
    token = idp.mint(TENANT_A, oid=ALICE, aud="api://billing")
    status, _, _ = call(nginx, "/misconfigured/x", token=token)
    assert status == 500
    assert reached(upstream, "/misconfigured/") == []


def test_verify_decides_in_forward_auth_mode_and_its_decision_id_reaches_the_upstream(stack, idp):
    nginx, upstream, verify = stack
    token = idp.mint(TENANT_A, oid=ALICE, aud="api://billing")
    assert call(nginx, "/orders/decision-id", method="POST", token=token, body=b"x")[0] == 200
    [request] = reached(upstream, "/orders/decision-id")
    decision_id = request["headers"]["x-auth-decision-id"]
    def mine(entries):
        return [e for e in entries if e.get("event") == "decision" and e.get("decision_id") == decision_id]

    [entry] = mine(verify.log_entries(until=mine))
    assert (entry["mode"], entry["reason"], entry["subject"]) == ("forward_auth", "ok", ALICE)


def test_the_first_service_parameter_decides_as_envoy_path_prefix_needs(stack, idp):
    """Envoy's ext_authz appends the client's path to path_prefix: with the prefix
    ``/verify?service=billing&path=`` a client's own ``service=`` comes second."""
    _, _, verify = stack
    token = idp.mint(TENANT_A, oid=ALICE, aud="api://billing")
    conn = http.client.HTTPConnection("127.0.0.1", verify.port, timeout=10)
    conn.request("DELETE", "/verify?service=billing&path=/orders?x=1&service=unsynced",
                 headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert (response.status, body["service"], body["reason"]) == (200, "billing", "ok")
    assert response.getheader("X-Auth-Subject") == ALICE


def test_the_documented_nginx_example_is_the_tested_configuration():
    doc = DOC.read_text()
    example = doc.split("```nginx\n", 1)[1].split("```", 1)[0]
    tested = {line.strip() for line in NGINX_CONF.format(prefix="P", port=80, verify_port=8081, app_port=9000)
              .splitlines()}
    tested.add("listen 80;")
    missing = [line.strip() for line in example.splitlines() if line.strip() and line.strip() not in tested]
    assert not missing, f"docs/forward-auth.md has lines the test does not run: {missing}"
