"""verify through the real functions-framework, every status and reason of
CONTRACT.md §4 from one table, plus forward-auth mode, /healthz and revocation."""
from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request

import pytest

from tests.support.devidp import SigningKey
from aadrun.store import GroupUpdate, SyncState, open_store, utcnow
from tests.support.serve import FunctionServer
from tests.support.world import ALICE, BOB, G_ENG, TENANT_A, TENANT_OTHER, env_for, write_policy


@pytest.fixture(scope="module")
def stack(tmp_path_factory, idp):
    folder = tmp_path_factory.mktemp("verify")
    policy = write_policy(folder)
    store_url = f"sqlite:///{folder}/state.db"
    store = open_store(store_url)
    store.apply(GroupUpdate(TENANT_A, G_ENG, replace=frozenset({ALICE}), sync=SyncState(None, utcnow())))
    with FunctionServer("verify", env_for(idp.url, policy, store_url)) as server:
        yield server, store


def call(server, *, method="POST", path="/verify", body=None, headers=None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    req = urllib.request.Request(server.url + path, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def token(idp, tenant=TENANT_A, **kw):
    kw.setdefault("aud", "api://billing")
    return idp.mint(tenant, oid=kw.pop("oid", ALICE), **kw)


# (case, request builder(idp) -> kwargs for call, status, reason)
CASES = [
    ("over 64 KiB", lambda idp: {"raw": b"{" + b" " * 65537 + b"}", "headers": {"Content-Type": "application/json"}},
     413, None),
    ("not JSON", lambda idp: {"raw": b"{nope", "headers": {"Content-Type": "application/json"}}, 400, "bad_request"),
    ("JSON nested too deep to parse", lambda idp: {"raw": b'{"service":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
                                                   "headers": {"Content-Type": "application/json"}}, 400, "bad_request"),
    ("wrong content type", lambda idp: {"raw": b'{"service":"billing"}', "headers": {"Content-Type": "text/plain"}},
     400, "bad_request"),
    ("no service", lambda idp: {"body": {"token": "x"}}, 400, "bad_request"),
    ("service not a string", lambda idp: {"body": {"service": 7}}, 400, "bad_request"),
    ("JSON array", lambda idp: {"body": ["billing"]}, 400, "bad_request"),
    ("GET without service", lambda idp: {"method": "GET"}, 400, "bad_request"),
    ("unknown service", lambda idp: {"body": {"service": "nope"}, "headers": bearer(token(idp))}, 404,
     "unknown_service"),
    ("no token", lambda idp: {"body": {"service": "billing"}}, 401, "missing_token"),
    ("basic auth is no bearer token", lambda idp: {"body": {"service": "billing"},
                                                   "headers": {"Authorization": "Basic dXNlcjpwYXNz"}},
     401, "missing_token"),
    ("malformed", lambda idp: {"body": {"service": "billing"}, "headers": bearer("abc.def")}, 401,
     "malformed_token"),
    ("alg none", lambda idp: {"body": {"service": "billing", "token": "eyJhbGciOiJub25lIn0.e30."}}, 401,
     "disallowed_alg"),
    ("unknown tenant", lambda idp: {"body": {"service": "billing"}, "headers": bearer(token(idp, TENANT_OTHER))},
     401, "unknown_tenant"),
    ("unknown key", lambda idp: {"body": {"service": "billing"},
                                 "headers": bearer(token(idp, key=SigningKey()))}, 401, "unknown_key"),
    ("bad signature", lambda idp: {"body": {"service": "billing"},
                                   "headers": bearer(token(idp, key=SigningKey(kid=idp.current.kid)))},
     401, "bad_signature"),
    ("wrong issuer (v1 where v2 only)", lambda idp: {"body": {"service": "billing"},
                                                     "headers": bearer(token(idp, version=1))}, 401, "wrong_issuer"),
    ("expired", lambda idp: {"body": {"service": "billing"}, "headers": bearer(token(idp, now=time.time() - 7200))},
     401, "expired"),
    ("not yet valid", lambda idp: {"body": {"service": "billing"},
                                   "headers": bearer(token(idp, now=time.time() + 600))}, 401, "not_yet_valid"),
    ("wrong audience", lambda idp: {"body": {"service": "billing"}, "headers": bearer(token(idp, aud="api://x"))},
     401, "wrong_audience"),
    ("wrong tenant", lambda idp: {"body": {"service": "tenant-b-app"},
                                  "headers": bearer(token(idp, aud="api://tenant-b"))}, 401, "wrong_tenant"),
    ("not member", lambda idp: {"body": {"service": "billing"}, "headers": bearer(token(idp, oid=BOB))}, 403,
     "not_member"),
    ("membership unknown", lambda idp: {"body": {"service": "unsynced"},
                                        "headers": bearer(token(idp, aud="api://aadrun-test"))},
     403, "membership_unknown"),
    ("no matching rule", lambda idp: {"body": {"service": "roles-only"},
                                      "headers": bearer(token(idp, aud="api://aadrun-test"))},
     403, "no_matching_rule"),
    ("ok by group", lambda idp: {"body": {"service": "billing"}, "headers": bearer(token(idp))}, 200, "ok"),
    ("ok by app role", lambda idp: {"body": {"service": "billing"},
                                    "headers": bearer(token(idp, oid=BOB, roles=["Billing.Admin"]))}, 200, "ok"),
    ("ok, token in the body", lambda idp: {"body": {"service": "billing", "token": token(idp)}}, 200, "ok"),
    ("token given twice, differently", lambda idp: {"body": {"service": "billing", "token": token(idp)},
                                                    "headers": bearer(token(idp, oid=BOB))}, 400, "bad_request"),
]


@pytest.mark.parametrize("case,build,status,reason", CASES, ids=[c[0] for c in CASES])
def test_reason_table(stack, idp, case, build, status, reason):
    server, _ = stack
    got_status, headers, body = call(server, **build(idp))
    assert got_status == status
    if status == 413:
        return
    payload = json.loads(body)
    assert payload["reason"] == reason
    assert payload["allow"] is (status == 200)
    assert set(payload) >= {"allow", "reason", "subject", "tenant", "service", "decision_id"}
    assert payload["decision_id"]
    if status in (200, 403):
        assert payload["tenant"] == TENANT_A and payload["subject"] in (ALICE, BOB)
    if reason == "missing_token":
        assert headers["WWW-Authenticate"] == 'Bearer realm="aadrun"'
    elif status == 401:
        assert headers["WWW-Authenticate"] == f'Bearer error="invalid_token", error_description="{reason}"'
    else:
        assert "WWW-Authenticate" not in headers


def test_error_bodies_carry_no_internal_detail(stack, idp):
    server, _ = stack
    for _, build, status, _ in CASES:
        _, _, body = call(server, **build(idp))
        text = body.decode(errors="replace")
        assert "Traceback" not in text and "File \"" not in text and "/work/" not in text


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH"])
def test_forward_auth_mode_allows_with_headers(stack, idp, method):
    server, _ = stack
    status, headers, body = call(server, method=method, path="/verify?service=billing", headers=bearer(token(idp)))
    assert status == 200
    assert headers["X-Auth-Subject"] == ALICE and headers["X-Auth-Tenant"] == TENANT_A
    assert headers["X-Auth-Decision-Id"] == json.loads(body)["decision_id"]
    assert headers["Cache-Control"] == "no-store"   # a proxy must never serve an allow again


@pytest.mark.parametrize("authorization", ["bearer {}", "BEARER {}", "Bearer   {}  "])
def test_the_bearer_scheme_is_matched_without_regard_to_case(stack, idp, authorization):
    # RFC 7235 §2.1: auth schemes are case-insensitive.
    status, _, _ = call(stack[0], path="/verify?service=billing",
                        headers={"Authorization": authorization.format(token(idp))})
    assert status == 200


def test_an_api_request_whose_content_type_differs_in_case_is_json_still(stack, idp):
    status, _, body = call(stack[0], raw=json.dumps({"service": "billing"}).encode(),
                           headers={"Content-Type": "Application/JSON; charset=UTF-8", **bearer(token(idp))})
    assert (status, json.loads(body)["reason"]) == (200, "ok")


def test_an_empty_service_parameter_is_a_bad_request(stack, idp):
    status, _, body = call(stack[0], method="GET", path="/verify?service=", headers=bearer(token(idp)))
    assert (status, json.loads(body)["reason"]) == (400, "bad_request")


def test_forward_auth_mode_denies_without_auth_headers(stack, idp):
    server, _ = stack
    status, headers, _ = call(server, method="GET", path="/verify?service=billing", headers=bearer(token(idp, oid=BOB)))
    assert status == 403 and "X-Auth-Subject" not in headers
    status, headers, _ = call(server, method="GET", path="/verify?service=billing")
    assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="aadrun"'


def test_in_forward_auth_mode_a_body_passed_on_never_chooses_the_service(stack, idp):
    # A proxy may pass the client's body on: the service the proxy names is the one decided.
    reports_reader = token(idp, oid=BOB, roles=["Reports.Read"], aud="api://aadrun-test")
    allowed_elsewhere = call(stack[0], body={"service": "roles-only"}, headers=bearer(reports_reader))
    assert allowed_elsewhere[0] == 200
    status, _, body = call(stack[0], path="/verify?service=billing", body={"service": "roles-only"},
                           headers=bearer(reports_reader))
    assert status == 401 and json.loads(body)["service"] == "billing"   # billing's audience, not this token's


def test_api_mode_sets_no_forward_auth_headers(stack, idp):
    status, headers, _ = call(stack[0], body={"service": "billing"}, headers=bearer(token(idp)))
    assert status == 200 and "X-Auth-Subject" not in headers


def test_large_token_in_the_body(stack, idp):
    # Above ~8 KB the header would hit the serving stack's limit; the body carries it.
    big = token(idp, padding="p" * 9000)
    status, _, body = call(stack[0], body={"service": "billing", "token": big})
    assert (status, json.loads(body)["reason"]) == (200, "ok")


def test_healthz(stack):
    status, _, body = call(stack[0], method="GET", path="/healthz")
    payload = json.loads(body)
    assert status == 200 and payload["status"] == "ok"
    assert payload["store"]["status"] == "ok" and payload["policy"]["services"] == 4


def test_health_is_served_at_healthz_only(stack):
    status, _, body = call(stack[0], method="GET", path="/app/healthz")
    assert (status, json.loads(body)["reason"]) == (400, "bad_request")


@pytest.mark.parametrize("method, path", [
    ("GET", "/verify/healthz?service=billing"), ("GET", "/verify%2Fhealthz?service=billing"),
    ("HEAD", "/orders/42/healthz/?service=billing"), ("GET", "/healthz?service=billing")])
def test_a_path_ending_in_healthz_is_decided_like_any_other_never_a_health_200(stack, method, path):
    # Forward-auth proxies that pass the client's path on: 200 would mean "allow".
    status, headers, _ = call(stack[0], method=method, path=path)
    assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="aadrun"'


def test_an_identity_provider_outage_alone_is_not_unhealthy(tmp_path, idp):
    store_url = f"sqlite:///{tmp_path}/s.db"
    open_store(store_url)
    idp.down = True   # the module's identity provider: back up at the end
    try:
        with FunctionServer("verify", env_for(idp.url, write_policy(tmp_path), store_url)) as server:
            status, _, body = call(server, body={"service": "billing"}, headers=bearer(token(idp)))
            assert (status, json.loads(body)["reason"]) == (503, "unavailable")   # no keys: cannot decide
            status, _, body = call(server, method="GET", path="/healthz")
            payload = json.loads(body)
            assert status == 200 and payload["keys"] == {TENANT_A: "never_fetched"}
    finally:
        idp.down = False


def test_healthz_unhealthy_when_policies_do_not_load(tmp_path, idp):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants: [")
    env = env_for(idp.url, bad, f"sqlite:///{tmp_path}/s.db")
    with FunctionServer("verify", env) as server:
        status, _, body = call(server, method="GET", path="/healthz")
        assert status == 503 and json.loads(body)["policy"]["status"] == "error"
        status, _, body = call(server, body={"service": "billing"}, headers=bearer(token(idp)))
        assert (status, json.loads(body)["reason"]) == (503, "unavailable")
        # The operator reads why in the log: once, not once per request.
        def errors(entries):
            return [e for e in entries if e.get("event") == "policy_error"]

        [logged] = errors(server.log_entries(until=errors))
        assert logged["severity"] == "ERROR" and logged["file"] == str(bad) and str(bad) in logged["message"]
        # With no policy to check it against, a service name is only what the caller
        # sent (up to the body's 64 KiB, any characters): it is not echoed.
        status, _, body = call(server, body={"service": "x" * 60_000}, headers=bearer(token(idp)))
        assert status == 503 and "x" * 100 not in body.decode()

        def decisions(entries):
            return [e for e in entries if e.get("event") == "decision" and e["reason"] == "unavailable"]

        logged = decisions(server.log_entries(until=lambda e: len(decisions(e)) >= 2))
        assert len(logged) == 2 and all("service" not in e for e in logged)


def test_a_store_that_cannot_be_opened_is_503_and_unhealthy_never_a_500(tmp_path, idp):
    # The folder of the SQLite file cannot be created: the store never opens.
    env = env_for(idp.url, write_policy(tmp_path), "sqlite:////proc/aadrun-no-such-folder/state.db")
    with FunctionServer("verify", env) as server:
        for _ in range(2):   # the first request and a later one, after the failure was seen
            status, _, body = call(server, body={"service": "billing"}, headers=bearer(token(idp)))
            assert (status, json.loads(body)["reason"]) == (503, "unavailable")
        status, _, body = call(server, method="GET", path="/healthz")
        assert status == 503 and json.loads(body)["store"] == {"status": "unavailable"}
        # An app role needs no store read: it still decides.
        status, _, body = call(server, body={"service": "billing"},
                               headers=bearer(token(idp, oid=BOB, roles=["Billing.Admin"])))
        assert (status, json.loads(body)["reason"]) == (200, "ok")


def test_a_removed_member_is_denied_while_the_token_is_still_valid(stack, idp):
    # Within verify's store poll (0.2 s); how soon is a benchmark figure (scripts/bench
    # pipeline), the 10 s here only tells a hang.
    server, store = stack
    tok = token(idp)
    assert call(server, body={"service": "billing"}, headers=bearer(tok))[0] == 200
    store.apply(GroupUpdate(TENANT_A, G_ENG, removed=frozenset({ALICE}), source="test"))
    removed_at = time.monotonic()
    while call(server, body={"service": "billing"}, headers=bearer(tok))[0] == 200:
        assert time.monotonic() - removed_at < 10, "a removed member is still allowed"
        time.sleep(0.02)
    status, _, body = call(server, body={"service": "billing"}, headers=bearer(tok))
    assert (status, json.loads(body)["reason"]) == (403, "not_member")
    store.apply(GroupUpdate(TENANT_A, G_ENG, added=frozenset({ALICE}), source="test"))


def test_an_oversized_request_is_a_logged_decision_too(stack):
    server, _ = stack

    def too_large(entries):
        return [e for e in entries if e.get("event") == "decision" and e.get("reason") == "too_large"]

    time.sleep(0.1)   # lines of earlier requests are written
    before = len(too_large(server.log_entries()))
    status, _, body = call(server, raw=b"{" + b" " * 65537 + b"}", headers={"Content-Type": "application/json"})
    assert (status, body) == (413, b"")
    status, _, body = call(server, raw=b"{" + b" " * (64 * 1024 - 2) + b"}", headers={"Content-Type": "application/json"})
    assert (status, json.loads(body)["reason"]) == (400, "bad_request")   # 64 KiB exactly: read (and refused)
    status, _, body = call(server, raw=b" " * 65537, path="/verify?service=billing")   # forward-auth
    assert (status, body) == (413, b"")
    lines = too_large(server.log_entries(until=lambda entries: len(too_large(entries)) > before + 1))[before:]
    assert [(e["status"], e["allow"], e["severity"], e["mode"]) for e in lines] == [
        (413, False, "NOTICE", "api"), (413, False, "NOTICE", "forward_auth")]


def test_a_decision_line_says_who_was_decided_for_where_and_how(stack, idp):
    # CONTRACT §9: one audit entry per decision, which `aadrun audit` and a reviewer read.
    server, _ = stack

    def ask(oid: str) -> dict:
        return json.loads(call(server, body={"service": "billing"}, headers=bearer(token(idp, oid=oid)))[2])

    deadline = time.monotonic() + 10
    while not (alice := ask(ALICE))["allow"]:   # an earlier test's removal and re-add, within verify's 0.2 s poll
        assert time.monotonic() < deadline
        time.sleep(0.05)
    answers = [alice, ask(BOB)]
    ids = {a["decision_id"] for a in answers}

    def decided(entries):
        found = [e for e in entries if e.get("event") == "decision" and e.get("decision_id") in ids]
        return found if len(found) == len(ids) else []

    lines = {e["decision_id"]: e for e in decided(server.log_entries(until=decided))}
    assert [(lines[a["decision_id"]]["subject"], lines[a["decision_id"]]["tenant"], lines[a["decision_id"]]["service"],
             lines[a["decision_id"]]["allow"], lines[a["decision_id"]]["reason"], lines[a["decision_id"]]["status"])
            for a in answers] == [(ALICE, TENANT_A, "billing", True, "ok", 200),
                                  (BOB, TENANT_A, "billing", False, "not_member", 403)]
    assert (lines[answers[0]["decision_id"]]["via"], lines[answers[0]["decision_id"]]["rule"]) == (G_ENG, 0)


def test_decision_log_lines_never_contain_the_token_only_its_sha256_prefix(stack, idp):
    server, _ = stack
    tok = token(idp)
    forged = tok[:-8] + ("A" * 8 if not tok.endswith("A" * 8) else "B" * 8)
    sent = {call(server, body={"service": "billing"}, headers=bearer(tok))[2]: tok,
            call(server, body={"service": "billing"}, headers=bearer(forged))[2]: forged,
            call(server, body={"service": 7}, headers=bearer(tok))[2]: None}   # not read: no fingerprint

    def decided(entries):
        ids = {json.loads(body)["decision_id"] for body in sent}
        found = [e for e in entries if e.get("event") == "decision" and e.get("decision_id") in ids]
        return found if len(found) == len(ids) else []

    decisions = {d["decision_id"]: d for d in decided(server.log_entries(until=decided))}
    assert len(decisions) == 3, "a decision was not logged"
    for body, sent_token in sent.items():
        line = decisions[json.loads(body)["decision_id"]]
        assert line["severity"] in ("INFO", "NOTICE")
        expected = hashlib.sha256(sent_token.encode()).hexdigest()[:16] if sent_token else None
        assert line.get("token_sha256") == expected
    assert [d["reason"] for d in decisions.values()][1:] == ["bad_signature", "bad_request"]
    out = server.output()
    for sent_token in (tok, forged):
        assert sent_token not in out and sent_token.split(".")[2] not in out
