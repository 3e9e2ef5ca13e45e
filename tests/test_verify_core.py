"""Token verification and decisions through ``Verifier`` with real keys, a real
identity-provider server on 127.0.0.1 and a real SQLite store.

The attack catalog follows RFC 8725 and the OWASP JWT cheat sheet.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import types
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from jwt.utils import base64url_decode
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from aadrun.config import Settings
from tests.support.devidp import DevIdentityProvider, SigningKey
from aadrun.keys import KeyCache
from aadrun.policy import load_policy
from aadrun.store import GroupUpdate, SyncState, open_store, utcnow
from aadrun.errors import Unavailable
from aadrun.verify import MembershipView, Verifier, log_decision
from tests.support.sync_world import audit_lines  # noqa: F401 - fixture
from tests.support.world import (ALICE, BOB, G_ENG, POLICY, TENANT_A, TENANT_B, TENANT_OTHER, settings_for,
                                 write_policy)


def b64(data: bytes | dict) -> str:
    if isinstance(data, dict):
        data = json.dumps(data).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, claims: dict, signature: bytes = b"") -> str:
    return f"{b64(header)}.{b64(claims)}.{b64(signature) if signature else ''}"


@pytest.fixture()
def idp():
    with DevIdentityProvider() as server:
        yield server


@pytest.fixture()
def world(tmp_path, idp):
    policy_path = write_policy(tmp_path)
    store = open_store(f"sqlite:///{tmp_path}/state.db")
    store.apply(GroupUpdate(TENANT_A, G_ENG, replace=frozenset({ALICE}), sync=SyncState(None, utcnow()),
                            source="test"))
    settings = settings_for(idp.url, policy_path, f"sqlite:///{tmp_path}/state.db")
    policy = load_policy(policy_path)
    keys = KeyCache(settings)
    return Verifier(settings, lambda: policy, keys, lambda: store), store, keys, settings


def own_verifier(tmp_path, authority_url: str, *, clock=None, **overrides) -> Verifier:
    """A Verifier with its own settings and key cache (``world``'s are shared), ALICE in G_ENG."""
    policy_path = write_policy(tmp_path)
    settings = settings_for(authority_url, policy_path, f"sqlite:///{tmp_path}/s.db", **overrides)
    store = open_store(settings.store_url)
    store.apply(GroupUpdate(TENANT_A, G_ENG, replace=frozenset({ALICE}), sync=SyncState(None, utcnow())))
    policy = load_policy(policy_path)
    keys = KeyCache(settings, clock=clock) if clock else KeyCache(settings)
    return Verifier(settings, lambda: policy, keys, lambda: store)


def claims(idp, token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def good(idp, **kw) -> str:
    kw.setdefault("aud", "api://billing")
    return idp.mint(TENANT_A, oid=kw.pop("oid", ALICE), **kw)


# -- the attack catalog ------------------------------------------------------------

@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_in_any_case_is_disallowed(world, idp, alg):
    verifier = world[0]
    token = forge({"alg": alg, "typ": "JWT", "kid": idp.current.kid}, claims(idp, good(idp)))
    assert verifier.decide("billing", token).reason == "disallowed_alg"


def test_hs256_keyed_with_the_public_key_is_disallowed(world, idp):
    verifier = world[0]
    public_pem = idp.current.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "typ": "JWT", "kid": idp.current.kid}
    body = claims(idp, good(idp))
    signing_input = f"{b64(header)}.{b64(body)}".encode()
    signature = hmac.new(public_pem, signing_input, hashlib.sha256).digest()
    assert verifier.decide("billing", forge(header, body, signature)).reason == "disallowed_alg"


@pytest.mark.parametrize("alg", ["HS256", "HS512", "ES256", "PS256", "RS384", "RS512", "EdDSA", "rs256", ""])
def test_every_alg_but_rs256_is_disallowed(world, idp, alg):
    token = forge({"alg": alg, "kid": idp.current.kid}, claims(idp, good(idp)), b"x" * 64)
    assert world[0].decide("billing", token).reason == "disallowed_alg"


def test_es256_psychic_signature_r_s_zero_is_disallowed(world, idp):
    token = forge({"alg": "ES256", "kid": idp.current.kid}, claims(idp, good(idp)), bytes(64))
    assert world[0].decide("billing", token).reason == "disallowed_alg"


def test_stripped_signature_is_rejected(world, idp):
    head, body, _ = good(idp).split(".")
    assert world[0].decide("billing", f"{head}.{body}.").reason == "bad_signature"


def test_a_signature_spelled_another_way_is_malformed_not_a_second_identity(world, idp):
    # A 256-byte signature leaves 4 unused bits in its last base64url character: 16
    # spellings of one signature, each a new fingerprint in the audit log.
    token = good(idp)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    respelled = token[:-1] + alphabet[last | 1]
    signatures = [base64url_decode(t.split(".")[2].encode()) for t in (token, respelled)]
    assert respelled != token and signatures[0] == signatures[1]          # the same signature bytes
    assert world[0].decide("billing", token).reason == "ok"
    assert world[0].decide("billing", respelled).reason == "malformed_token"


def test_foreign_signature_with_a_real_kid_is_rejected(world, idp):
    attacker = SigningKey(kid=idp.current.kid)
    token = good(idp, key=attacker)
    assert world[0].decide("billing", token).reason == "bad_signature"


def test_signature_of_another_token_is_rejected(world, idp):
    head, body, _ = good(idp, oid=BOB).split(".")
    _, _, signature = good(idp).split(".")
    assert world[0].decide("billing", f"{head}.{body}.{signature}").reason == "bad_signature"


def test_embedded_jwk_is_never_used(world, idp):
    attacker = SigningKey()
    token = good(idp, key=attacker, headers={"jwk": attacker.jwk()})
    assert world[0].decide("billing", token).reason == "unknown_key"
    token = good(idp, key=SigningKey(kid=idp.current.kid), headers={"jwk": attacker.jwk()})
    assert world[0].decide("billing", token).reason == "bad_signature"


class _Trap:
    """A key server an attacker points jku/x5u at: it must never be asked."""

    def __init__(self, jwk: dict):
        self.hits = 0
        trap = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                trap.hits += 1
                data = json.dumps({"keys": [jwk]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/keys"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.parametrize("header", ["jku", "x5u"])
def test_jku_and_x5u_are_never_fetched(world, idp, header):
    attacker = SigningKey()
    trap = _Trap(attacker.jwk())
    try:
        token = good(idp, key=attacker, headers={header: trap.url})
        assert world[0].decide("billing", token).reason == "unknown_key"
        assert trap.hits == 0
    finally:
        trap.server.shutdown()


def test_discovery_and_keys_are_never_fetched_through_a_redirect(tmp_path, idp):
    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", idp.url + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        verifier = own_verifier(tmp_path, f"http://127.0.0.1:{server.server_address[1]}")
        assert verifier.decide("billing", good(idp)).reason == "unavailable"
        assert sum(idp.requests.values()) == 0   # the redirect was not followed
    finally:
        server.shutdown()


def test_a_discovery_document_that_never_ends_is_read_only_up_to_the_size_limit(tmp_path, idp):
    class Endless(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()            # no length: the body ends when the server closes
            try:
                while True:
                    self.wfile.write(b" " * 65536)
            except OSError:               # the client stopped reading
                pass

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        verifier = own_verifier(tmp_path, f"http://127.0.0.1:{server.server_address[1]}", http_timeout_seconds=30)
        started = time.monotonic()
        assert verifier.decide("billing", good(idp)).reason == "unavailable"
        assert time.monotonic() - started < 10   # stopped at the limit, not at the 30 s deadline
    finally:
        server.shutdown()


@pytest.mark.parametrize("kid", ["../../../etc/passwd", "' OR '1'='1' --", "%00", "a" * 5000, ""])
def test_hostile_kids_are_unknown_keys(world, idp, kid):
    token = good(idp, key=SigningKey(kid=kid or "x"), headers={"kid": kid})
    assert world[0].decide("billing", token).reason == "unknown_key"
    assert idp.jwks_fetches() <= 2 * 2  # first use + one refetch, for the v2 key set (+ v1 never)


def test_token_of_tenant_a_presented_for_tenant_b(world, idp):
    # Even with the audience of tenant B's service, tenant A's token is refused.
    token = idp.mint(TENANT_A, oid=ALICE, aud="api://aadrun-test")
    assert world[0].decide("tenant-b-app", token).reason == "wrong_audience"
    token = idp.mint(TENANT_A, oid=ALICE, aud="api://tenant-b")
    assert world[0].decide("tenant-b-app", token).reason == "wrong_tenant"


def test_tid_of_another_tenant_with_keys_of_this_one(world, idp):
    # tid picks whose keys verify: claiming tenant B while issued by A fails the issuer check.
    token = idp.mint(TENANT_A, oid=ALICE, aud="api://tenant-b", tid=TENANT_B)
    assert world[0].decide("tenant-b-app", token).reason == "wrong_issuer"


def test_v1_token_where_only_v2_is_allowed(world, idp):
    assert world[0].decide("billing", good(idp, version=1)).reason == "wrong_issuer"


def test_v1_token_where_v1_is_allowed(world, idp, tmp_path):
    store = world[1]
    from tests.support.world import CAROL, G_B
    store.apply(GroupUpdate(TENANT_B, G_B, replace=frozenset({CAROL}), sync=SyncState(None, utcnow())))
    token = idp.mint(TENANT_B, oid=CAROL, aud="api://tenant-b", version=1)
    decision = world[0].decide("tenant-b-app", token)
    assert (decision.allow, decision.reason, decision.subject) == (True, "ok", CAROL)


PERSONAL_ACCOUNTS = "https://login.microsoftonline.com/9188040d-6c67-4c5b-b112-36a304b66dad/v2.0"


def test_v1_and_v2_tokens_of_one_tenant_share_keys_the_v2_key_set_scopes_to_v2(world, idp):
    store = world[1]
    from tests.support.world import CAROL, G_B
    store.apply(GroupUpdate(TENANT_B, G_B, replace=frozenset({CAROL}), sync=SyncState(None, utcnow())))
    assert idp.document(f"/{TENANT_B}/discovery/v2.0/keys")["keys"][0]["issuer"].endswith("/{tenantid}/v2.0")
    for version in (1, 2):   # the v1 key set lists the same key with no issuer
        token = idp.mint(TENANT_B, oid=CAROL, aud="api://tenant-b", version=version)
        assert world[0].decide("tenant-b-app", token).reason == "ok"
    # A key scoped to another issuer in the v2 set signs no v2 token of this tenant, though the
    # v1 set lists it too: a listing without issuer scopes a key to its own set's issuer.
    foreign = SigningKey(issuer=PERSONAL_ACCOUNTS)
    idp.keys.append(foreign)
    token = idp.mint(TENANT_B, oid=CAROL, aud="api://tenant-b", key=foreign)
    assert world[0].decide("tenant-b-app", token).reason == "wrong_issuer"


@pytest.mark.parametrize("issuer, reason", [
    (PERSONAL_ACCOUNTS, "wrong_issuer"),   # a key of another issuer in a shared key set
    (f"https://login.microsoftonline.com/{TENANT_B}/v2.0", "wrong_issuer"),
    ("https://login.microsoftonline.com/{TenantId}/v2.0", "ok"),
    (f"https://login.microsoftonline.com/{TENANT_A}/v2.0", "ok"),
])
def test_a_key_signs_only_for_the_issuer_its_key_set_names(world, idp, issuer, reason):
    key = SigningKey(issuer=issuer)
    idp.keys.append(key)
    assert world[0].decide("billing", good(idp, key=key)).reason == reason


@pytest.mark.parametrize("claims, reason, shown", [
    (dict(aud=["api://billing", "api://other"]), "wrong_audience", "aud is a list of 2: it must be one string"),
    (dict(aud="api://other"), "wrong_audience", "aud 'api://other' is not an accepted audience of the service "
                                                "(api://billing)"),
    (dict(exp=1_700_000_000), "expired", "exp 2023-11-14T22:13:20Z is past (now "),
    (dict(exp="soon"), "expired", "exp is missing or not a NumericDate"),
    (dict(nbf=4_000_000_000), "not_yet_valid", "nbf 2096-10-02T07:06:40Z is in the future (now "),
    (dict(iss="https://issuer.example/"), "wrong_issuer", "iss 'https://issuer.example/' is not the tenant's "
                                                          "issuer for an allowed token version (http"),
])
def test_a_refusal_s_detail_shows_the_values_that_failed(world, idp, claims, reason, shown):
    # What explain shows an operator: the token's value and what was expected.
    decision = world[0].decide("billing", good(idp, **claims))
    assert decision.reason == reason and decision.detail.startswith(shown), decision.detail
    if reason in ("expired", "not_yet_valid") and "NumericDate" not in shown:
        assert decision.detail.endswith("leeway 60 s)")


@pytest.mark.parametrize("version, client_app", [(2, {"azp": None, "azpacr": None, "scp": None}),
                                                 (1, {"appid": None, "appidacr": None, "scp": None})])
def test_an_id_token_is_not_an_access_token(world, idp, tmp_path, version, client_app):
    # The shape of Entra's ID token: aud is the app's client id, as is the v2 access
    # token's; app roles assigned to the user are in it too; MSAL asks for a nonce.
    client_id = "c11e47a0-0000-0000-0000-00000000b111"
    policy = load_policy(write_policy(tmp_path, POLICY.replace("audience: api://billing", f"audience: {client_id}")
                                      .replace("token_versions: [2]", "token_versions: [1, 2]")))
    verifier = Verifier(world[3], lambda: policy, world[2], lambda: world[1])
    id_token = idp.mint(TENANT_A, oid=BOB, aud=client_id, version=version, roles=["Billing.Admin"],
                        nonce="n-0S6_WzA2Mj", **client_app)
    decision = verifier.decide("billing", id_token)
    assert (decision.allow, decision.reason) == (False, "wrong_audience") and "ID token" in decision.detail
    # Without a nonce (an ID token of the refresh-token or device-code grant) it still
    # names no client app, which every access token does: refused all the same.
    id_token = idp.mint(TENANT_A, oid=BOB, aud=client_id, version=version, roles=["Billing.Admin"], **client_app)
    assert verifier.decide("billing", id_token).reason == "wrong_audience"
    access_token = idp.mint(TENANT_A, oid=BOB, aud=client_id, version=version, roles=["Billing.Admin"])
    assert verifier.decide("billing", access_token).reason == "ok"
    # A nonce alone, with the client app named: an ID token still (access tokens carry none).
    with_nonce = idp.mint(TENANT_A, oid=BOB, aud=client_id, version=version, roles=["Billing.Admin"], nonce="n")
    decision = verifier.decide("billing", with_nonce)
    assert decision.reason == "wrong_audience" and "ID token" in decision.detail


@pytest.mark.parametrize("token", [
    "abc", "a.b", "a.b.c.d.e", "!!!.???.###", "e30.e30.e30.e30.e30",
    b64({"alg": "RS256"}) + ".bm90IGpzb24." + "c2ln",
    b64(b"[1,2]") + "." + b64({}) + ".c2ln",
    b64(b"[" * 5000 + b"]" * 5000) + ".e30.c2ln",                      # nesting deeper than json allows
    b64({"alg": "RS256"}) + "." + b64(b'{"a":' * 1500 + b"1" + b"}" * 1500) + ".c2ln",
])
def test_malformed_tokens(world, token):
    assert world[0].decide("billing", token).reason == "malformed_token"


@pytest.mark.parametrize("foreign", ["*", "****", "+/==", " \n\t "])
def test_non_base64_characters_are_malformed(world, idp, foreign):
    # A lenient decoder would skip them (four keep the padding right): never a token.
    head, body, sig = good(idp).split(".")
    assert world[0].decide("billing", f"{head}.{body[:10]}{foreign}{body[10:]}.{sig}").reason == "malformed_token"


@pytest.mark.parametrize("part", [0, 1, 2])
def test_a_line_break_ending_a_part_is_malformed(world, idp, part):
    # A regular expression's $ also matches before a final line break, and the lenient
    # decoder then skips it: some lengths of part would decode. Every length is tried.
    for pad in range(4):
        parts = good(idp, note="x" * pad).split(".")
        parts[part] += "\n"
        assert world[0].decide("billing", ".".join(parts)).reason == "malformed_token", (part, pad)


def _token_of_length(idp, length: int) -> str:
    """A signed token of exactly ``length`` characters (base64url never gives a part a
    length of 4k+1, so a second claim's length is varied too)."""
    for extra in ("", "x", "xx"):
        size = 12_000
        for _ in range(8):
            token = good(idp, padding="p" * size, extra=extra)
            if len(token) == length:
                return token
            size += (length - len(token)) * 3 // 4 or 1
    raise AssertionError(f"no token of {length} characters")


@pytest.mark.parametrize("jwks_uri", ["http://keys.example.com/keys", "ftp://127.0.0.1/keys", "file:///etc/passwd"])
def test_keys_are_fetched_only_from_a_jwks_uri_aadrun_would_accept_as_an_authority(tmp_path, audit_lines, jwks_uri):
    # CONTRACT §2: plain http only on loopback. The discovery document names the key set,
    # so a tampered or misconfigured one must not send aadrun to fetch keys elsewhere.
    class Elsewhere(DevIdentityProvider):
        def _discovery(self, tenant: str, version: int) -> dict:
            return {**super()._discovery(tenant, version), "jwks_uri": jwks_uri}

    with Elsewhere() as idp:
        decision = own_verifier(tmp_path, idp.url).decide("billing", good(idp))
    assert (decision.reason, decision.status) == ("unavailable", 503)   # keys never fetched
    [failed] = [a for a in audit_lines if a["event"] == "keys_fetch_failed"]
    assert failed["error"] == "ValueError" and "jwks_uri" in failed["detail"]


@pytest.mark.parametrize("ids, field", [({}, "uti"), ({"uti": None, "jti": "the-jti"}, "jti"), ({"uti": None}, None)])
def test_a_decision_line_names_the_token_by_its_uti_or_jti_and_hash_never_by_itself(world, idp, audit_lines,
                                                                                  ids, field):
    token = good(idp, **ids)
    log_decision(world[0].decide("billing", token), token)
    [line] = [a for a in audit_lines if a["event"] == "decision"]
    assert line.get("token_id") == (claims(idp, token)[field] if field else None)
    assert line["token_sha256"] == hashlib.sha256(token.encode()).hexdigest()[:16]
    # No piece of it either: not the header, not the claims (personal data), not the signature.
    text = json.dumps(line)
    assert [token[i:i + 20] for i in range(0, len(token) - 20, 5) if token[i:i + 20] in text] == []


def test_an_empty_crit_header_is_rejected_too(world, idp):
    # RFC 7515 §4.1.11: crit must not be an empty list; aadrun implements no extension at all.
    assert world[0].decide("billing", good(idp, headers={"crit": []})).reason == "malformed_token"


@pytest.mark.parametrize("aud", ["API://billing", "api://BILLING"])
def test_the_audience_is_matched_exactly(world, idp, aud):
    assert world[0].decide("billing", good(idp, aud=aud)).reason == "wrong_audience"


def test_the_leeway_bounds_are_inclusive(world, idp):
    _, store, keys, settings = world
    policy = load_policy(settings.policy_path)
    t0, leeway = 2_000_000_000, settings.leeway_seconds
    token = good(idp, now=t0)   # nbf t0, exp t0 + 3600

    def at(now: float) -> str:
        return Verifier(settings, lambda: policy, keys, lambda: store, clock=lambda: now).decide("billing", token).reason

    assert (at(t0 + 3600 + leeway), at(t0 - leeway)) == ("ok", "ok")
    assert (at(t0 + 3600 + leeway + 1), at(t0 - leeway - 1)) == ("expired", "not_yet_valid")


def test_a_token_with_a_character_appended_is_not_the_cached_token(world, idp):
    token = good(idp)
    assert world[0].decide("billing", token).reason == "ok"   # now cached, by its hash
    assert world[0].decide("billing", token + "\udc80").reason == "malformed_token"


def test_a_token_of_16_kib_is_read_and_a_longer_one_is_malformed(world, idp):
    assert world[0].decide("billing", _token_of_length(idp, 16 * 1024)).reason == "ok"
    assert world[0].decide("billing", _token_of_length(idp, 16 * 1024 + 1)).reason == "malformed_token"


def test_five_part_jwe_shape_is_malformed(world):
    jwe = ".".join([b64({"alg": "RSA-OAEP", "enc": "A256GCM"}), b64(b"k"), b64(b"iv"), b64(b"ct"), b64(b"tag")])
    assert world[0].decide("billing", jwe).reason == "malformed_token"


def test_unknown_crit_header_is_rejected(world, idp):
    token = good(idp, headers={"crit": ["exp"], "exp": 1})
    assert world[0].decide("billing", token).reason == "malformed_token"


def test_unknown_tenant(world, idp):
    token = idp.mint(TENANT_OTHER, oid=ALICE, aud="api://billing")
    assert world[0].decide("billing", token).reason == "unknown_tenant"


@pytest.mark.parametrize("change,reason", [
    ({"exp": None}, "expired"),
    ({"exp": "9999999999"}, "expired"),
    ({"exp": True}, "expired"),
    ({"aud": ["api://billing"]}, "wrong_audience"),
    ({"aud": ["api://billing", "api://other"]}, "wrong_audience"),
    ({"aud": "api://aadrun-test"}, "wrong_audience"),   # the tenant's audience, overridden by the service
])
def test_claim_shapes(world, idp, change, reason):
    body = {k: v for k, v in change.items() if v is not None}
    token = good(idp, **body) if "exp" not in change or change["exp"] is not None else None
    if token is None:
        raw = claims(idp, good(idp))
        raw.pop("exp")
        token = jwt.encode(raw, idp.current.private, algorithm="RS256", headers={"kid": idp.current.kid})
    assert world[0].decide("billing", token).reason == reason


def _signed_raw(idp, payload: bytes) -> str:
    """A token whose claims are exactly ``payload`` (JSON text), signed with the current key."""
    return jwt.api_jws.encode(payload, idp.current.private, algorithm="RS256", headers={"kid": idp.current.kid})


@pytest.mark.parametrize("oid, subject", [
    ('"\\ud800"', None), ('"x\\r\\nSet-Cookie: a=b"', None), ('"two words"', None), ('""', None), ("7", None),
    ('"not-an-object-id"', "not-an-object-id"),   # CONTRACT.md §4: the subject is the token's oid
])
def test_an_oid_that_cannot_be_sent_on_counts_as_none(world, idp, oid, subject):
    # Signed by the tenant's key, yet no subject: never a 500, never a header injection.
    body = json.dumps({k: v for k, v in claims(idp, good(idp)).items() if k != "oid"})[:-1]
    decision = world[0].decide("billing", _signed_raw(idp, f'{body}, "oid": {oid}}}'.encode()))
    assert (decision.reason, decision.subject) == ("not_member", subject)


def test_what_cannot_be_decided_is_denied_and_logged(world, idp, monkeypatch, audit_lines):
    verifier = world[0]

    def broken(*args):
        raise KeyError("a defect")

    monkeypatch.setattr(verifier.memberships, "lookup", broken)
    decision = verifier.decide("billing", good(idp))
    assert (decision.allow, decision.reason, decision.status) == (False, "unavailable", 503)
    assert [(a["error"], a["severity"]) for a in audit_lines if a["event"] == "decision_error"] == [
        ("KeyError", "ERROR")]


@pytest.mark.parametrize("exp,nbf,reason", [
    ("NaN", None, "expired"), ("Infinity", None, "expired"), ("1e999", None, "expired"),
    ("1" + "0" * 400, None, "expired"), ("-Infinity", None, "expired"),
    ("4102444800", "NaN", "not_yet_valid"), ("4102444800", "-1e999", "not_yet_valid"),
])
def test_exp_and_nbf_must_be_finite_numeric_dates(world, idp, exp, nbf, reason):
    # Python's json reads NaN, Infinity and 1e999: none may pass a time check or stay cached.
    body = json.dumps({k: v for k, v in claims(idp, good(idp)).items() if k not in ("exp", "nbf")})[:-1]
    token = _signed_raw(idp, f'{body}, "exp": {exp}{f", {chr(34)}nbf{chr(34)}: {nbf}" if nbf else ""}}}'.encode())
    for _ in range(2):   # and the same the second time, from the verified-token cache or not
        assert world[0].decide("billing", token).reason == reason
    if nbf is None:
        assert len(world[0].tokens) == 0   # an exp that is no time is never cached


def test_leeway_applies_to_exp_and_nbf(world, idp):
    now = time.time()
    assert world[0].decide("billing", good(idp, now=now - 3600 - 30)).reason == "ok"          # 30 s past exp
    assert world[0].decide("billing", good(idp, now=now - 3600 - 90)).reason == "expired"     # 90 s past
    assert world[0].decide("billing", good(idp, now=now + 30)).reason == "ok"                 # nbf 30 s ahead
    assert world[0].decide("billing", good(idp, now=now + 90)).reason == "not_yet_valid"


def test_groups_claim_is_ignored_membership_store_decides(world, idp):
    token = good(idp, oid=BOB, groups=[G_ENG])
    assert world[0].decide("billing", token).reason == "not_member"


def test_app_role_allows_without_membership(world, idp):
    decision = world[0].decide("billing", good(idp, oid=BOB, roles=["Billing.Admin"]))
    assert (decision.allow, decision.via) == (True, "Billing.Admin")


def test_never_synced_group_is_membership_unknown(world, idp):
    assert world[0].decide("unsynced", good(idp, aud="api://aadrun-test")).reason == "membership_unknown"


def test_a_token_without_oid_is_in_no_group_and_a_never_synced_group_stays_unknown(world, idp):
    def without_oid(**kw) -> str:
        return _signed_raw(idp, json.dumps({k: v for k, v in claims(idp, good(idp, **kw)).items()
                                            if k != "oid"}).encode())

    assert world[0].decide("billing", without_oid()).reason == "not_member"
    assert world[0].decide("unsynced", without_oid(aud="api://aadrun-test")).reason == "membership_unknown"


def test_service_without_matching_rule(world, idp):
    assert world[0].decide("roles-only", good(idp, aud="api://aadrun-test")).reason == "no_matching_rule"


# -- keys: rotation, outage, refetch storm ------------------------------------------------

def test_key_rotation_picks_up_a_new_key_and_drops_a_removed_one(world, idp):
    verifier, _, keys, _ = world
    old_token = good(idp)
    assert verifier.decide("billing", old_token).allow
    idp.rotate(keep_old=False)
    assert verifier.decide("billing", good(idp)).allow              # unknown kid -> refetch
    assert verifier.decide("billing", old_token).reason == "unknown_key"   # cached, but its key left


def test_jwks_outage_keeps_cached_keys(world, idp, audit_lines):
    verifier = world[0]
    assert verifier.decide("billing", good(idp)).allow
    idp.down = True
    assert verifier.decide("billing", good(idp)).allow              # new token, cached key
    assert verifier.decide("billing", good(idp, key=SigningKey())).reason == "unknown_key"
    assert verifier.decide("billing", good(idp)).allow              # the failed refetch kept the keys
    # The log says what failed, not only that something did.
    [failed] = [a for a in audit_lines if a["event"] == "keys_fetch_failed"]
    assert failed["kept_previous"] and "HTTP 503" in failed["detail"]


def test_the_issuer_and_the_key_location_come_from_discovery_never_guessed(tmp_path, idp):
    # Another cloud (or authority): issuers and key locations that are not the global
    # cloud's. Only the tenant's discovery documents say what they are.
    idp.issuers = {2: "https://login.cloud.example/{tenant}/v2.0", 1: "https://sts.cloud.example/{tenant}/"}
    idp.key_paths = {2: "keys/v2", 1: "keys/v1"}
    verifier = own_verifier(tmp_path, idp.url)
    assert verifier.decide("billing", good(idp)).reason == "ok"
    assert set(idp.requests) >= {f"/{TENANT_A}/keys/v2"}
    guessed = good(idp, iss=f"https://login.microsoftonline.com/{TENANT_A}/v2.0")
    assert verifier.decide("billing", guessed).reason == "wrong_issuer"


def test_keys_never_fetched_is_unavailable(tmp_path, idp):
    idp.down = True
    policy_path = write_policy(tmp_path)
    settings = settings_for(idp.url, policy_path, f"sqlite:///{tmp_path}/s.db")
    store = open_store(settings.store_url)
    store.apply(GroupUpdate(TENANT_A, G_ENG, replace=frozenset({ALICE}), sync=SyncState(None, utcnow())))
    verifier = Verifier(settings, lambda: load_policy(policy_path), KeyCache(settings), lambda: store)
    decision = verifier.decide("billing", good(idp))
    assert (decision.allow, decision.reason, decision.status) == (False, "unavailable", 503)
    idp.down = False
    time.sleep(1.05)  # failed first fetches are retried at most once a second
    assert verifier.decide("billing", good(idp)).allow


def test_refetch_storm_is_rate_limited_and_single_flight(world, idp):
    verifier = world[0]
    assert verifier.decide("billing", good(idp)).allow
    before = idp.jwks_fetches()
    forged = [good(idp, key=SigningKey(kid=uuid.uuid4().hex)) for _ in range(8)] * 40
    results = []

    def attack(tokens):
        results.extend(verifier.decide("billing", t).reason for t in tokens)

    threads = [threading.Thread(target=attack, args=(forged[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {"unknown_key"} and len(results) == 320
    assert idp.jwks_fetches() - before == 1   # one refetch (one key set: v2 only) in 30 s


def test_unknown_kids_waiting_out_a_refresh_in_flight_make_one_refetch_between_them(tmp_path, idp):
    clock = [0.0]
    verifier = own_verifier(tmp_path, idp.url, clock=lambda: clock[0])
    assert verifier.decide("billing", good(idp)).allow
    forged = [good(idp, key=SigningKey(kid=uuid.uuid4().hex)) for _ in range(4)]   # new keys take a while
    token = good(idp)
    before = idp.jwks_fetches()
    idp.delay, clock[0] = 0.5, 3601.0                 # the hourly refresh is due; the provider is slow
    assert verifier.decide("billing", token).allow     # starts it on a thread of its own
    deadline = time.monotonic() + 5
    while idp.jwks_fetches() == before and time.monotonic() < deadline:   # until it is being answered
        time.sleep(0.005)
    reasons: list[str] = []
    threads = [threading.Thread(target=lambda t=t: reasons.append(verifier.decide("billing", t).reason))
               for t in forged]
    for t in threads:   # each finds the refetch window open and waits for the refresh to end
        t.start()
    idp.delay = 0.0
    for t in threads:
        t.join()
    assert reasons == ["unknown_key"] * 4
    # The refresh, and the one refetch that closed the window: the others saw it closed.
    assert idp.jwks_fetches() - before == 2


class _BrokenKey(SigningKey):
    """A JWKS entry that claims RSA but carries no modulus or exponent."""

    def jwk(self, issuer: str | None = None) -> dict:
        return {"kty": "RSA", "kid": self.kid, "use": "sig"}


def test_a_malformed_jwks_entry_is_skipped_and_the_others_still_verify(world, idp):
    verifier = world[0]
    idp.keys.append(_BrokenKey())
    assert verifier.decide("billing", good(idp)).reason == "ok"            # first fetch
    idp.rotate()                                                         # a new key next to the broken one
    idp.keys.append(_BrokenKey())
    assert verifier.decide("billing", good(idp)).reason == "ok"            # refetch for its kid


def test_an_empty_jwks_keeps_the_last_good_keys(world, idp):
    verifier = world[0]
    token = good(idp)
    assert verifier.decide("billing", token).reason == "ok"
    signer, idp.keys = idp.current, []
    assert verifier.decide("billing", good(idp, key=SigningKey())).reason == "unknown_key"   # refetch: empty
    assert verifier.decide("billing", good(idp, key=signer)).reason == "ok"


def test_a_new_kid_arriving_while_its_fetch_is_in_flight_waits_for_it(world, idp):
    verifier = world[0]
    assert verifier.decide("billing", good(idp)).reason == "ok"
    new_key = idp.rotate()
    idp.delay = 0.3
    first, second = good(idp, key=new_key), good(idp, key=new_key)
    reasons = {}
    fetching = threading.Thread(target=lambda: reasons.update(first=verifier.decide("billing", first).reason))
    fetching.start()
    time.sleep(0.1)   # the first request's fetch is in flight
    reasons["second"] = verifier.decide("billing", second).reason
    fetching.join()
    assert reasons == {"first": "ok", "second": "ok"}


def test_a_new_kid_whose_fetch_outlasts_the_wait_is_undecided_not_invalid(world, idp):
    # Entra signs with a key just rolled in, and its JWKS answers slowly: requests that
    # give up waiting for that fetch cannot tell the token is bad, so they fail closed
    # with 503 (retried), never 401 invalid_token for a valid token.
    verifier = world[0]
    assert verifier.decide("billing", good(idp)).reason == "ok"
    new_key = idp.rotate(keep_old=True)
    idp.delay = 0.8   # per document: the fetch (discovery, then keys) outlasts the 1 s wait
    first, later = good(idp, key=new_key), good(idp, key=new_key)
    reasons = {}
    fetching = threading.Thread(target=lambda: reasons.update(first=verifier.decide("billing", first)))
    fetching.start()
    time.sleep(0.1)
    waited = verifier.decide("billing", later)
    fetching.join()
    assert (waited.reason, waited.status) == ("unavailable", 503) and reasons["first"].reason == "ok"
    assert verifier.decide("billing", later).reason == "ok"


def test_no_decision_waits_for_a_periodic_refresh_hanging_on_the_identity_provider(tmp_path, idp):
    verifier = own_verifier(tmp_path, idp.url, jwks_refresh_seconds=0.2)
    assert verifier.decide("billing", good(idp)).reason == "ok"
    idp.delay = 4.0   # the identity provider hangs
    forged = [good(idp, key=SigningKey()) for _ in range(4)]   # (key generation is not what is timed)
    time.sleep(0.3)   # the refresh is due
    started = time.monotonic()
    assert verifier.decide("billing", good(idp)).reason == "ok"              # starts the refresh, cached keys
    # Forged kids: the first waits (at most 1 s) for the refresh in flight, which may yet
    # bring its key (undecided: 503); that refresh counts as the window's fetch, so the
    # others are refused at once.
    assert [verifier.decide("billing", token).reason for token in forged] == ["unavailable"] + ["unknown_key"] * 3
    assert time.monotonic() - started < 2.5   # one short wait in all, long before the identity provider


@pytest.mark.parametrize("head", [False, True], ids=["body", "status line and headers too"])
def test_an_identity_provider_trickling_its_answer_holds_no_decision_for_long(tmp_path, idp, head):
    # A byte every 0.2 s: each read is within the 1 s timeout, the answer never ends.
    verifier = own_verifier(tmp_path, idp.url, http_timeout_seconds=1.0)
    idp.trickle, idp.trickle_head = 0.2, head
    reasons: list[str] = []
    started = time.monotonic()
    deciders = [threading.Thread(target=lambda: reasons.append(verifier.decide("billing", good(idp)).reason))
                for _ in range(4)]
    for decider in deciders:
        decider.start()
    for decider in deciders:
        decider.join(timeout=15)
    assert reasons == ["unavailable"] * 4          # fail closed, and every thread answered
    assert time.monotonic() - started < 6          # a fetch's deadline and a wait's, not for ever
    idp.trickle, idp.trickle_head = 0.0, False
    deadline = time.monotonic() + 5
    while verifier.decide("billing", good(idp)).reason != "ok":   # once it answers again, keys arrive
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.parametrize("delay, timeout, waiters_get", [
    (0.3, 5.0, "ok"),            # a first fetch in flight is waited for...
    (1.35, 2.0, "unavailable"),  # ...for as long as one document may take (2 s), not for two (2.7 s)
])
def test_requests_wait_for_the_first_key_fetch_in_flight_but_not_for_ever(tmp_path, idp, delay, timeout,
                                                                         waiters_get):
    verifier = own_verifier(tmp_path, idp.url, http_timeout_seconds=timeout)
    idp.delay = delay            # before each of the two documents (discovery, JWKS)
    reasons: dict[str, str] = {}
    first = threading.Thread(target=lambda: reasons.setdefault("first", verifier.decide("billing", good(idp)).reason))
    asked = sum(dict(idp.requests).values())   # a copy: the server's threads count on
    first.start()
    deadline = time.monotonic() + 5
    while sum(dict(idp.requests).values()) == asked and time.monotonic() < deadline:
        time.sleep(0.005)        # until the first fetch is in flight
    waiters = [threading.Thread(target=lambda n=n: reasons.setdefault(n, verifier.decide("billing", good(idp)).reason))
               for n in ("a", "b", "c")]
    for waiter in waiters:
        waiter.start()
    for thread in [*waiters, first]:
        thread.join(timeout=10)
    assert reasons == {"first": "ok", "a": waiters_get, "b": waiters_get, "c": waiters_get}


def test_a_refresh_that_gets_no_thread_leaves_the_keys_refreshable(tmp_path, idp, monkeypatch):
    import aadrun.keys

    class NoThread(threading.Thread):
        def start(self):
            raise RuntimeError("can't start new thread")

    verifier = own_verifier(tmp_path, idp.url, jwks_refresh_seconds=0.2)
    old = idp.current
    assert verifier.decide("billing", good(idp)).reason == "ok"
    idp.rotate(keep_old=False)
    time.sleep(0.3)
    monkeypatch.setattr(aadrun.keys, "threading", types.SimpleNamespace(Thread=NoThread, Lock=threading.Lock))
    verifier.decide("billing", good(idp, key=old))                    # the refresh cannot start
    monkeypatch.undo()
    verifier.decide("billing", good(idp, key=old))                    # the next one can: the lock is free
    deadline = time.monotonic() + 5
    while verifier.decide("billing", good(idp, key=old)).reason == "ok":
        assert time.monotonic() < deadline, "the keys were never refreshed again"
        time.sleep(0.05)


def test_a_cached_token_is_refused_once_the_periodic_refresh_drops_its_key(tmp_path, idp):
    verifier = own_verifier(tmp_path, idp.url, jwks_refresh_seconds=0.2)
    token = good(idp)
    assert verifier.decide("billing", token).reason == "ok"   # now in the verified-token cache
    idp.rotate(keep_old=False)
    idp.delay = 0.5   # a slow identity provider
    time.sleep(0.3)
    # Only the cached token arrives. Its decision starts the due refresh and does not
    # wait for it (the key is still there)...
    assert verifier.decide("billing", token).reason == "ok"
    # ...and once the refresh is in, the key that left the JWKS no longer verifies.
    deadline = time.monotonic() + 5
    while verifier.decide("billing", token).reason == "ok":
        assert time.monotonic() < deadline, "the refresh never dropped the key"
        time.sleep(0.05)
    assert verifier.decide("billing", token).reason == "unknown_key"


def test_periodic_refresh_drops_keys_that_left(tmp_path, idp):
    verifier = own_verifier(tmp_path, idp.url, jwks_refresh_seconds=0.2)
    old_key = idp.current
    assert verifier.decide("billing", good(idp)).allow
    idp.rotate(keep_old=False)
    time.sleep(0.3)
    verifier.decide("billing", good(idp))   # triggers the refresh
    assert verifier.decide("billing", good(idp, key=old_key)).reason == "unknown_key"


# -- caches and revocation ----------------------------------------------------------

def test_repeated_token_is_cached_but_membership_is_checked_every_time(world, idp):
    verifier, store = world[0], world[1]
    token = good(idp)
    assert verifier.decide("billing", token).allow
    assert len(verifier.tokens) == 1
    store.apply(GroupUpdate(TENANT_A, G_ENG, removed=frozenset({ALICE}), source="test"))
    deadline = time.monotonic() + 1.0
    while verifier.decide("billing", token).allow and time.monotonic() < deadline:
        time.sleep(0.01)
    assert verifier.decide("billing", token).reason == "not_member"


def test_expired_entry_is_not_served_from_cache(world, idp):
    verifier = world[0]
    token = good(idp, lifetime=1, now=time.time() - 60 + 0.5)  # 0.5-1.5 s left within the leeway
    assert verifier.decide("billing", token).allow
    assert len(verifier.tokens) == 1
    time.sleep(1.6)
    assert verifier.decide("billing", token).reason == "expired"
    assert len(verifier.tokens) == 0   # the entry left the cache at exp + leeway, and was not put back


def _two_failures(idp, pair: str) -> tuple[str, str | None]:
    """(service, token) failing the two named neighbouring steps of CONTRACT.md §4 at once."""
    past, future = time.time() - 7200, time.time() + 7200
    signed = good(idp)
    head, body, _ = signed.split(".")
    wrong_iss = "https://login.microsoftonline.com/" + TENANT_B + "/v2.0"
    return {
        "unknown_service+missing_token": ("no-such-service", None),
        "malformed_token+disallowed_alg": ("billing", forge({"alg": "HS256"}, claims(idp, signed)) + "A" * 17000),
        "disallowed_alg+unknown_tenant": ("billing", forge({"alg": "HS256", "kid": idp.current.kid},
                                                           {**claims(idp, signed), "tid": TENANT_OTHER})),
        "unknown_tenant+unknown_key": ("billing", good(idp, tid=TENANT_OTHER, key=SigningKey())),
        "unknown_key+bad_signature": ("billing", forge({"alg": "RS256", "kid": "no-such-kid"}, claims(idp, signed),
                                                       b"not a signature")),
        "bad_signature+wrong_issuer": ("billing", f"{head}.{b64({**claims(idp, signed), 'iss': wrong_iss})}."
                                                  f"{signed.split('.')[2]}"),
        "wrong_issuer+expired": ("billing", good(idp, iss=wrong_iss, now=past)),
        "expired+not_yet_valid": ("billing", good(idp, exp=int(past), nbf=int(future))),
        "not_yet_valid+wrong_audience": ("billing", good(idp, nbf=int(future), aud="api://elsewhere")),
        "wrong_audience+wrong_tenant": ("tenant-b-app", good(idp, aud="api://elsewhere")),
        "wrong_tenant+rule": ("tenant-b-app", good(idp, aud="api://tenant-b", oid=BOB)),
    }[pair]


@pytest.mark.parametrize("pair", ["unknown_service+missing_token", "malformed_token+disallowed_alg",
                                  "disallowed_alg+unknown_tenant", "unknown_tenant+unknown_key",
                                  "unknown_key+bad_signature", "bad_signature+wrong_issuer", "wrong_issuer+expired",
                                  "expired+not_yet_valid", "not_yet_valid+wrong_audience",
                                  "wrong_audience+wrong_tenant", "wrong_tenant+rule"])
def test_of_two_failed_neighbouring_checks_the_earlier_decides(world, idp, pair):
    service, token = _two_failures(idp, pair)
    assert world[0].decide(service, token).reason == pair.split("+")[0]


def test_checks_run_in_the_contract_order_and_the_first_failure_decides(world, idp):
    # Expired, for another audience and another tenant's service at once: exp is checked first.
    token = good(idp, aud="api://elsewhere", now=time.time() - 7200)
    assert world[0].decide("billing", token).reason == "expired"
    assert world[0].decide("tenant-b-app", token).reason == "expired"
    token = good(idp, aud="api://elsewhere")
    assert world[0].decide("tenant-b-app", token).reason == "wrong_audience"


def test_an_unknown_kid_refetches_again_once_the_window_has_passed(tmp_path, idp):
    clock = [1000.0]
    verifier = own_verifier(tmp_path, idp.url, clock=lambda: clock[0])
    window = Settings().jwks_unknown_kid_interval
    assert verifier.decide("billing", good(idp)).allow
    before = idp.jwks_fetches()
    for _ in range(3):
        assert verifier.decide("billing", good(idp, key=SigningKey())).reason == "unknown_key"
    assert idp.jwks_fetches() - before == 1
    clock[0] += window - 1
    assert verifier.decide("billing", good(idp, key=SigningKey())).reason == "unknown_key"
    assert idp.jwks_fetches() - before == 1            # still within the window
    clock[0] += 1
    new_key = idp.rotate()
    assert verifier.decide("billing", good(idp, key=new_key)).allow
    assert idp.jwks_fetches() - before == 2            # the window passed: one more fetch


@pytest.mark.parametrize("members, reason", [
    ({"use": "enc"}, "unknown_key"), ({"key_ops": ["encrypt"]}, "unknown_key"), ({"key_ops": "verify"}, "unknown_key"),
    ({"alg": "RS512"}, "unknown_key"), ({"alg": "PS256"}, "unknown_key"),
    ({"key_ops": ["verify"]}, "ok"), ({"key_ops": ["sign", "verify"]}, "ok"), ({"alg": "RS256"}, "ok"),
], ids=["use enc", "key_ops encrypt", "key_ops not a list", "alg RS512", "alg PS256",
        "key_ops verify", "key_ops sign and verify", "alg RS256"])
def test_a_jwks_entry_signs_only_for_its_use_and_algorithm(world, idp, members, reason):
    # RFC 7517 §4.2-4.4: a key meant for encryption, or for another algorithm, verifies
    # no RS256 signature, even one it would mathematically check.
    class NamedKey(SigningKey):
        def jwk(self, issuer: str | None = None) -> dict:
            return {**super().jwk(issuer), **members}

    key = NamedKey()
    idp.keys.append(key)
    assert world[0].decide("billing", good(idp, key=key)).reason == reason


class _ShortKey(SigningKey):
    def __init__(self, bits: int):
        super().__init__()
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=bits)


class _PublishedPrivateKey(SigningKey):
    """A JWKS entry that carries its private members: anyone can sign with it."""

    def jwk(self, issuer: str | None = None) -> dict:
        private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private))
        return {**super().jwk(issuer), **{k: private[k] for k in ("d", "p", "q", "dp", "dq", "qi")}}


@pytest.mark.filterwarnings("ignore:The RSA key is 1024 bits long")   # PyJWT's, as the test mints with it
@pytest.mark.parametrize("make_key", [lambda: _ShortKey(1024), _PublishedPrivateKey],
                         ids=["1024-bit", "private-members"])
def test_a_weak_or_published_private_key_is_never_a_signing_key(world, idp, make_key, audit_lines):
    key = make_key()
    idp.keys.append(key)
    decision = world[0].decide("billing", good(idp, key=key))
    assert (decision.status, decision.reason) == (401, "unknown_key")
    assert not [a for a in audit_lines if a["severity"] == "ERROR"]   # skipped, not an error per request
    assert world[0].decide("billing", good(idp)).reason == "ok"        # the tenant's good key still verifies


class BrokenStore:
    """A store whose backend fails on every call (as an unreachable database does)."""

    def generation(self):
        raise OSError("backend unreachable")

    def membership(self, *args):
        raise OSError("backend unreachable")


def test_store_down_fails_closed(world, idp, audit_lines):
    settings, keys = world[3], world[2]
    policy = load_policy(settings.policy_path)
    verifier = Verifier(settings, lambda: policy, keys, BrokenStore)
    decision = verifier.decide("billing", good(idp))
    assert (decision.allow, decision.reason, decision.status) == (False, "unavailable", 503)
    time.sleep(settings.membership_poll_seconds + 0.05)
    assert verifier.decide("billing", good(idp)).reason == "unavailable"
    # Why, once per outage (not once per decision): the backend's own words.
    assert [(a["severity"], a["error"], a["detail"]) for a in audit_lines if a["event"] == "store_unavailable"] == [
        ("ERROR", "OSError", "backend unreachable")]
    # An app-role rule needs no membership, so it still decides.
    assert verifier.decide("billing", good(idp, oid=BOB, roles=["Billing.Admin"])).allow


def test_a_store_failure_denies_until_the_store_answers_again(world):
    store, down = world[1], [True]

    class Flaky:
        def generation(self):
            if down[0]:
                raise OSError("backend unreachable")
            return store.generation()

        def membership(self, *args):
            return store.membership(*args)

    clock = [0.0]
    view = MembershipView(Flaky, 0.2, clock=lambda: clock[0])
    with pytest.raises(Unavailable):
        view.lookup(TENANT_A, ALICE, (G_ENG,))
    down[0] = False
    clock[0] += 0.1
    with pytest.raises(Unavailable):   # within the poll interval the failure still stands
        view.lookup(TENANT_A, ALICE, (G_ENG,))
    clock[0] += 0.2
    assert view.lookup(TENANT_A, ALICE, (G_ENG,)) == {G_ENG: True}
    for _ in range(4):   # and every lookup after it, within the poll interval and past it
        clock[0] += 0.07
        assert view.lookup(TENANT_A, ALICE, (G_ENG,)) == {G_ENG: True}


def test_a_membership_read_that_a_removal_overtook_is_never_cached(tmp_path):
    # One request reads "member", the answer arrives after a removal committed, and
    # another request has seen the new generation meanwhile: that stale answer must
    # not be kept, or the removed user stays allowed until some other change.
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    store.apply(GroupUpdate(TENANT_A, G_ENG, replace=frozenset({ALICE}), sync=SyncState(None, utcnow())))
    read, removal_committed = threading.Event(), threading.Event()

    class SlowFirstRead:
        slow = True

        def generation(self):
            return store.generation()

        def membership(self, *args):
            answer = store.membership(*args)
            if SlowFirstRead.slow:
                SlowFirstRead.slow = False
                read.set()
                removal_committed.wait(10)
            return answer

    clock = [0.0]
    view = MembershipView(SlowFirstRead, 0.2, clock=lambda: clock[0])
    first = threading.Thread(target=view.lookup, args=(TENANT_A, ALICE, (G_ENG,)))
    first.start()
    assert read.wait(10)
    store.apply(GroupUpdate(TENANT_A, G_ENG, removed=frozenset({ALICE})))   # policy_sync's removal
    clock[0] += 0.3
    assert view.lookup(TENANT_A, ALICE, (G_ENG,)) == {G_ENG: False}        # sees the new generation
    removal_committed.set()
    first.join(10)
    clock[0] += 0.1                                                        # within the poll interval
    assert view.lookup(TENANT_A, ALICE, (G_ENG,)) == {G_ENG: False}
    clock[0] += 10
    assert view.lookup(TENANT_A, ALICE, (G_ENG,)) == {G_ENG: False}


def test_a_token_of_another_issuer_signed_by_that_issuers_key_is_refused(world, idp):
    # tid names this tenant, but iss and the key are personal accounts': the tenant's own
    # issuers decide, whatever issuer the shared key set scopes the key to.
    key = SigningKey(issuer=PERSONAL_ACCOUNTS)
    idp.keys.append(key)
    assert world[0].decide("billing", good(idp, key=key, iss=PERSONAL_ACCOUNTS)).reason == "wrong_issuer"


def test_a_cached_token_of_a_version_the_policy_no_longer_allows_is_refused(tmp_path, idp):
    from tests.support.world import CAROL, G_B
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    store.apply(GroupUpdate(TENANT_B, G_B, replace=frozenset({CAROL}), sync=SyncState(None, utcnow())))
    settings = settings_for(idp.url, write_policy(tmp_path), f"sqlite:///{tmp_path}/s.db")
    current = {"policy": load_policy(write_policy(tmp_path))}
    verifier = Verifier(settings, lambda: current["policy"], KeyCache(settings), lambda: store)
    token = idp.mint(TENANT_B, oid=CAROL, aud="api://tenant-b", version=1)
    assert verifier.decide("tenant-b-app", token).reason == "ok"          # verified, and cached
    current["policy"] = load_policy(write_policy(tmp_path, POLICY.replace("token_versions: [1, 2]",
                                                                          "token_versions: [2]")))
    assert verifier.decide("tenant-b-app", token).reason == "wrong_issuer"


def test_while_the_first_fetch_fails_the_identity_provider_is_asked_once_a_second(tmp_path, idp):
    verifier = own_verifier(tmp_path, idp.url)
    token = good(idp)
    idp.down = True
    reasons, started = set(), time.monotonic()
    while time.monotonic() - started < 0.5:
        reasons.add(verifier.decide("billing", token).reason)
    assert reasons == {"unavailable"} and sum(idp.requests.values()) == 1


def test_keys_not_refreshed_for_two_refresh_intervals_are_reported_stale(tmp_path, idp):
    now = [1_000_000.0]
    policy_path = write_policy(tmp_path)
    settings = settings_for(idp.url, policy_path, f"sqlite:///{tmp_path}/s.db", jwks_refresh_seconds=3600)
    store = open_store(settings.store_url)
    store.apply(GroupUpdate(TENANT_A, G_ENG, replace=frozenset({ALICE}), sync=SyncState(None, utcnow())))
    keys = KeyCache(settings, clock=lambda: now[0])
    policy = load_policy(policy_path)
    verifier = Verifier(settings, lambda: policy, keys, lambda: store)
    assert verifier.decide("billing", good(idp)).allow
    assert keys.status() == {TENANT_A: "ok"}
    idp.down = True                       # the periodic refreshes fail: the last good keys stay
    now[0] += 2 * 3600 + 1
    assert verifier.decide("billing", good(idp)).allow
    time.sleep(0.3)                       # the refresh it started has failed
    assert keys.status() == {TENANT_A: "stale"}


def test_a_full_token_cache_evicts_the_least_recently_used_and_keeps_the_newest():
    from aadrun.tokens import VerifiedTokenCache
    cache = VerifiedTokenCache(max_entries=2)
    a, b, c = (object() for _ in range(3))
    cache.put(b"a", a, until=10)
    cache.put(b"b", b, until=10)
    assert cache.get(b"a", now=0) is a    # a is now the most recently used
    cache.put(b"c", c, until=10)
    assert (cache.get(b"b", now=0), cache.get(b"a", now=0), cache.get(b"c", now=0)) == (None, a, c)


def test_a_refusal_s_detail_survives_a_time_no_calendar_can_show(world, idp):
    # exp -9e10 is a NumericDate (_is_time) before year 1: "expired" (401), not a 503.
    decision = world[0].decide("billing", good(idp, exp=-90_000_000_000))
    assert decision.reason == "expired" and decision.detail.startswith("exp -9e+10 is past"), decision.detail


def test_a_refusal_s_detail_cuts_a_long_claim_short(world, idp):
    decision = world[0].decide("billing", good(idp, aud="api://" + "x" * 500))
    assert decision.reason == "wrong_audience" and "x" * 200 not in decision.detail
    assert "... is not an accepted audience" in decision.detail
