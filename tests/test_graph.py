"""GraphClient against the local Graph / Entra server over TLS, with real MSAL."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import email.utils
import logging
import os
import ssl
import time

import pytest
import requests

from aadrun.config import Settings
from tests.support.devidp import DevIdentityProvider
from aadrun.errors import ConfigError, RateLimited, UpstreamError
from aadrun.graph import (FEDERATION_AUDIENCE, graph_scope, MAX_FAIL_FAST, MAX_GROUP_SUBSCRIPTION_MINUTES, DeltaExpired,
                          GraphClient, SubscriptionExists, max_expiration)
from aadrun.keys import KeyCache
from tests.support.graph_fixtures import *  # noqa: F401,F403
from tests.support.graph_fixtures import CLIENT_ID, CLIENT_SECRET, FEDERATED_CLIENT_ID, TENANT, graph_client, \
    graph_settings
from tests.support.graph_server import HttpError

GROUP = "aaaaaaaa-0000-0000-0000-000000000001"
OTHER_GROUP = "aaaaaaaa-0000-0000-0000-000000000002"
HOOK = "https://hooks.example/graph"


def users(n: int, start: int = 0) -> set[str]:
    return {f"00000000-0000-0000-0001-{i:012d}" for i in range(start, start + n)}


def delta_calls(server) -> int:
    return len(server.calls("GET", "/v1.0/groups/delta"))


# -- tokens ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1.0/groups/delta", f"/{TENANT}/oauth2/v2.0/token"], ids=["graph", "token"])
def test_an_answer_that_trickles_in_ends_the_call_at_its_deadline(graph_server, path):
    # Each byte inside the 1 s read timeout; the answer would take minutes.
    graph_server.set_members(TENANT, GROUP, users(3))
    client = graph_client(graph_server, http_timeout_seconds=1.0)
    if path.startswith("/v1.0"):
        client.list_subscriptions()                  # the token, before Graph slows down
    graph_server.trickles[path] = 0.3
    started = time.monotonic()
    with pytest.raises(UpstreamError, match="TimeoutError"):
        client.group_delta(GROUP)
    assert time.monotonic() - started < 4 * 1.0 + 2   # the call's deadline, not the trickle's end
    graph_server.trickles.clear()
    assert client.group_delta(GROUP).added == users(3)


def test_client_secret_token_is_cached_and_stays_on_the_authority(graph_server):
    graph_server.set_members(TENANT, GROUP, users(3))
    client = graph_client(graph_server)
    assert client.group_delta(GROUP).added == users(3)
    client.list_subscriptions()
    assert graph_server.token_requests == 1   # MSAL's cache served the second call
    paths = [c.path for c in graph_server.log]
    assert f"/{TENANT}/v2.0/.well-known/openid-configuration" in paths
    assert not [p for p in paths if "discovery/instance" in p]


@pytest.mark.parametrize("graph_url, scope", [
    ("https://graph.microsoft.com/v1.0", "https://graph.microsoft.com/.default"),
    ("https://graph.microsoft.us/v1.0", "https://graph.microsoft.us/.default"),          # US Government
    ("https://microsoftgraph.chinacloudapi.cn/v1.0/", "https://microsoftgraph.chinacloudapi.cn/.default"),
])
def test_the_token_is_asked_for_the_graph_it_calls(graph_url, scope):
    # (The local Graph refuses a token of another resource, as Graph does: every test
    # that reads it checks this against its own origin.)
    assert graph_scope(graph_url) == scope


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"])
def test_either_ca_variable_alone_is_trusted_by_msal_graph_and_jwks_fetching(graph_server, graph_pki, monkeypatch,
                                                                           variable):
    for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, graph_pki.ca_file)
    settings = Settings.from_env({**os.environ, "AADRUN_AUTHORITY_URL": graph_server.authority_url,
                                  "AADRUN_GRAPH_URL": graph_server.graph_url, "AADRUN_CLIENT_ID": CLIENT_ID,
                                  "AADRUN_CLIENT_SECRET": CLIENT_SECRET})
    graph_server.set_members(TENANT, GROUP, users(2))
    assert GraphClient(settings, TENANT).group_delta(GROUP).added == users(2)   # MSAL, then Graph
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(graph_pki.cert_file, graph_pki.key_file)
    with DevIdentityProvider(tls=tls) as idp:
        keys = KeyCache(dataclasses.replace(settings, authority_url=idp.url))
        assert idp.current.kid in keys.keyset(TENANT, (2,)).keys


def test_workload_identity_federation_uses_a_google_id_token(graph_server):
    graph_server.set_members(TENANT, GROUP, users(2))
    client = graph_client(graph_server, client_id=FEDERATED_CLIENT_ID, secret=None)
    assert client.group_delta(GROUP).added == users(2)
    [meta] = graph_server.calls("GET", "/computeMetadata/")
    assert meta.query == {"audience": FEDERATION_AUDIENCE}


def test_metadata_server_failure_is_an_upstream_error(graph_server):
    client = graph_client(graph_server, client_id=FEDERATED_CLIENT_ID, secret=None,
                          metadata_url=graph_server.base_url + "/computeMetadata/v1/missing")
    with pytest.raises(UpstreamError, match="metadata server answered HTTP 404"):
        client.list_subscriptions()


def test_federation_without_a_matching_federated_credential_is_refused(graph_server):
    graph_server.google_subject = "999"   # the metadata server now speaks for another account
    client = graph_client(graph_server, client_id=FEDERATED_CLIENT_ID, secret=None)
    with pytest.raises(UpstreamError) as err:
        client.list_subscriptions()
    assert err.value.code == "invalid_client"


def test_wrong_client_secret_is_refused_without_echoing_it(graph_server):
    client = graph_client(graph_server, secret="wrong-secret")
    with pytest.raises(UpstreamError) as err:
        client.list_subscriptions()
    assert err.value.code == "invalid_client" and "AADSTS7000215" in str(err.value)
    assert "wrong-secret" not in str(err.value)


def test_an_error_answer_passes_on_no_token_and_no_code_that_is_not_an_identifier(graph_server):
    # What a Graph error says goes into logs and maintenance's report: an answer echoing
    # the request's bearer token (a proxy's, a faulty server's) must not put it there.
    graph_server.fail_next(1, status=400, retry_after=None, code="InvalidRequest" + "C" * 300,
                           message="echo: {authorization}", path="/v1.0/subscriptions")
    graph_server.fail_next(1, status=400, retry_after=None, code="InvalidRequest",
                           message="echo: {authorization}", path="/v1.0/subscriptions")
    client = graph_client(graph_server)
    for expected_code in (None, "InvalidRequest"):
        with pytest.raises(UpstreamError) as err:
            client.list_subscriptions()
        assert err.value.code == expected_code and "CCCC" not in str(err.value)
        assert "echo: [redacted]" in str(err.value) and "Bearer" not in str(err.value)


def test_a_token_refusal_passes_on_only_an_error_code(graph_server):
    real = graph_server.handle

    def refusing(method, path, query, headers, raw):
        if path.endswith("/oauth2/v2.0/token"):
            raise HttpError(401, "invalid_client the-secret-value eyJhbGciOi.eyJzdWIi", "bad", oauth=True)
        return real(method, path, query, headers, raw)

    graph_server.handle = refusing
    with pytest.raises(UpstreamError) as err:
        graph_client(graph_server, secret="the-secret-value").list_subscriptions()
    assert err.value.code is None and "the-secret-value" not in str(err.value) and "eyJ" not in str(err.value)


def test_unknown_tenant_fails_at_discovery(graph_server):
    with pytest.raises(UpstreamError, match="authority discovery failed for tenant 9999.* has no OpenID "
                                            r"configuration \(is the tenant id right\?\)"):
        graph_client(graph_server, tenant="99999999-9999-9999-9999-999999999999").list_subscriptions()


def test_an_http_authority_is_a_configuration_error_naming_the_variable(graph_server):
    # CONTRACT §2 lets verify use an http loopback authority; MSAL takes only https.
    with pytest.raises(ConfigError, match="AADRUN_AUTHORITY_URL is http://127.0.0.1:.*takes only https"):
        GraphClient(dataclasses.replace(graph_settings(graph_server), authority_url=graph_server.authority_url
                                        .replace("https://", "http://")), TENANT).list_subscriptions()


def test_no_traffic_leaves_loopback(graph_server):
    with pytest.raises(AssertionError, match="tried to"):
        requests.get("https://graph.microsoft.com/v1.0/subscriptions", timeout=1)


def test_one_client_serves_many_threads(graph_server):
    graph_server.set_members(TENANT, GROUP, users(50))
    client = graph_client(graph_server)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: client.group_delta(GROUP).added, range(16)))
    assert all(r == users(50) for r in results)
    assert len(graph_server.calls("GET", f"/{TENANT}/v2.0/.well-known/")) == 1   # one MSAL app


def test_graph_answers_401_without_a_bearer_token(graph_server):
    for headers in ({}, {"Authorization": "Bearer forged"}):
        resp = requests.get(graph_server.graph_url + "/subscriptions", headers=headers, timeout=5)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "InvalidAuthenticationToken"


def test_a_revoked_token_is_replaced_once(graph_server):
    client = graph_client(graph_server)
    client.list_subscriptions()
    graph_server.revoke_tokens()
    assert client.list_subscriptions() == []
    assert graph_server.token_requests == 2


def test_an_entra_outage_at_discovery_is_an_upstream_error(graph_server):
    graph_server.entra_outage(TENANT, 503)
    with pytest.raises(UpstreamError, match=r"authority discovery failed .*MsalServiceError \(HTTP 503\)"):
        graph_client(graph_server).list_subscriptions()


def test_an_entra_outage_at_the_token_endpoint_is_an_upstream_error(graph_server):
    client = graph_client(graph_server)
    client.list_subscriptions()                # discovery done and cached, a token held
    graph_server.revoke_tokens()               # Graph refuses it: a new token is needed
    graph_server.entra_outage(TENANT, 500)
    with pytest.raises(UpstreamError, match=r"token request failed .*MsalServiceError \(HTTP 500\)") as failed:
        client.list_subscriptions()
    assert failed.value.status_code is None    # not Graph's own answer about a resource


# -- delta ------------------------------------------------------------------------------

def test_full_delta_follows_pages_of_a_big_group(graph_server):
    graph_server.page_size = 100
    graph_server.set_members(TENANT, GROUP, users(2500))
    graph_server.add_members(TENANT, GROUP, ["bbbbbbbb-0000-0000-0000-000000000009"],
                             kind="#microsoft.graph.group")   # nested group: not a user
    graph_server.set_members(TENANT, OTHER_GROUP, users(5, start=9000))
    result = graph_client(graph_server).group_delta(GROUP)
    assert result.full and not result.removed and not result.group_deleted
    assert result.added == users(2500)
    assert result.not_users == {("#microsoft.graph.group", "bbbbbbbb-0000-0000-0000-000000000009")}
    assert delta_calls(graph_server) == 26
    first = graph_server.calls("GET", "/v1.0/groups/delta")[0]
    assert first.query == {"$select": "members", "$filter": f"id eq '{GROUP}'"}
    assert "$deltatoken=" in result.delta_link


def test_a_member_id_that_is_not_an_object_id_is_skipped(graph_server):
    # It would become an IAM principal and a cell of `aadrun audit`'s CSV.
    graph_server.set_members(TENANT, GROUP, users(1) | {'=HYPERLINK("http://evil.example/","x")', ""})
    result = graph_client(graph_server).group_delta(GROUP)
    assert result.added == users(1) and result.not_users == frozenset()


def test_member_ids_are_lower_case_as_notifications_are(graph_server):
    upper = "0A11CE00-0000-0000-0000-00000000ABCD"
    graph_server.set_members(TENANT, GROUP, [upper])
    client = graph_client(graph_server)
    first = client.group_delta(GROUP)
    assert first.added == {upper.lower()}
    graph_server.remove_members(TENANT, GROUP, [upper])
    assert client.group_delta(GROUP, first.delta_link).removed == {upper.lower()}


@pytest.mark.parametrize("marker", [{"reason": "deleted"}, "deleted"])
def test_incremental_delta_reports_additions_and_removals(graph_server, marker):
    graph_server.page_size = 3
    graph_server.removed_marker = marker   # delta query's object form, or webhooks' string form
    graph_server.set_members(TENANT, GROUP, users(10))
    client = graph_client(graph_server)
    first = client.group_delta(GROUP)
    graph_server.remove_members(TENANT, GROUP, users(2))
    graph_server.add_members(TENANT, GROUP, users(3, start=100))
    graph_server.add_members(TENANT, OTHER_GROUP, users(1, start=500))
    second = client.group_delta(GROUP, first.delta_link)
    assert not second.full
    assert second.added == users(3, start=100)
    assert second.removed == users(2)
    third = client.group_delta(GROUP, second.delta_link)
    assert (third.added, third.removed) == (frozenset(), frozenset())


def test_a_member_removed_then_added_back_is_a_member(graph_server):
    graph_server.set_members(TENANT, GROUP, users(2))
    client = graph_client(graph_server)
    first = client.group_delta(GROUP)
    graph_server.remove_members(TENANT, GROUP, users(1))
    graph_server.add_members(TENANT, GROUP, users(1))
    second = client.group_delta(GROUP, first.delta_link)
    assert second.added == users(1) and not second.removed


def test_deleted_group_is_reported(graph_server):
    graph_server.set_members(TENANT, GROUP, users(2))
    client = graph_client(graph_server)
    first = client.group_delta(GROUP)
    graph_server.delete_group(TENANT, GROUP)
    assert client.group_delta(GROUP, first.delta_link).group_deleted


@pytest.mark.parametrize("status,code", [(410, "resyncRequired"), (400, "syncStateNotFound")])
def test_expired_delta_link(graph_server, status, code):
    graph_server.set_members(TENANT, GROUP, users(4))
    client = graph_client(graph_server)
    link = client.group_delta(GROUP).delta_link
    graph_server.expire_delta_links(status=status, code=code)
    graph_server.add_members(TENANT, GROUP, users(1, start=50))
    with pytest.raises(DeltaExpired) as err:
        client.group_delta(GROUP, link)
    assert err.value.status_code == status
    restarted = client.group_delta(GROUP, link, restart_on_expiry=True)
    assert restarted.full and restarted.added == users(4) | users(1, start=50)


def test_a_next_link_that_repeats_ends_the_listing_with_an_error(graph_server, monkeypatch):
    graph_server.set_members(TENANT, GROUP, users(1))
    served = graph_server.handle
    again = f"{graph_server.graph_url}/groups/delta?$skiptoken=again"

    def looping(method, path, query, headers, raw):
        status, body = served(method, path, query if "$skiptoken" not in query else {
            "$select": "members", "$filter": f"id eq '{GROUP}'"}, headers, raw)
        if path in ("/v1.0/groups/delta", "/v1.0/subscriptions") and status == 200:
            body.pop("@odata.deltaLink", None)
            body["@odata.nextLink"] = again if path.endswith("delta") else f"{graph_server.graph_url}/subscriptions"
        return status, body

    monkeypatch.setattr(graph_server, "handle", looping)
    client = graph_client(graph_server)
    with pytest.raises(UpstreamError, match="a page link repeats"):
        client.group_delta(GROUP)
    assert delta_calls(graph_server) == 2
    with pytest.raises(UpstreamError, match="a page link repeats"):
        client.list_subscriptions()


def test_a_listing_of_more_pages_than_any_real_one_ends_with_an_error(graph_server, monkeypatch):
    import aadrun.graph

    monkeypatch.setattr(aadrun.graph._Links, "MAX_PAGES", 3)
    graph_server.page_size = 1
    graph_server.set_members(TENANT, GROUP, users(5))   # five pages, each link new
    with pytest.raises(UpstreamError, match="more than 3 pages"):
        graph_client(graph_server).group_delta(GROUP)
    assert delta_calls(graph_server) == 3


def test_a_nested_group_that_left_is_not_reported_as_a_member_that_is_no_user(graph_server):
    nested = "bbbbbbbb-0000-0000-0000-000000000009"
    graph_server.set_members(TENANT, GROUP, users(1))
    graph_server.add_members(TENANT, GROUP, [nested], kind="#microsoft.graph.group")
    client = graph_client(graph_server)
    first = client.group_delta(GROUP)
    assert first.not_users == {("#microsoft.graph.group", nested)}
    graph_server.remove_members(TENANT, GROUP, [nested])
    assert client.group_delta(GROUP, first.delta_link).not_users == frozenset()


def test_a_delta_link_stored_under_another_graph_url_starts_a_full_read(graph_server):
    graph_server.set_members(TENANT, GROUP, users(2))
    link = graph_client(graph_server).group_delta(GROUP).delta_link
    moved = link.replace(graph_server.graph_url, "https://graph.example.invalid/v1.0")
    with pytest.raises(DeltaExpired):
        graph_client(graph_server).group_delta(GROUP, moved)
    result = graph_client(graph_server).group_delta(GROUP, moved, restart_on_expiry=True)
    assert result.full and result.added == users(2)
    assert not [c for c in graph_server.calls("GET", "/v1.0/groups/delta") if "deltatoken" in str(c.query)]


def test_links_off_the_graph_host_are_refused(graph_server):
    # A stored link elsewhere is never followed: it counts as expired (above).
    with pytest.raises(DeltaExpired, match="not on"):
        graph_client(graph_server).group_delta(GROUP, "https://elsewhere.example/v1.0/groups/delta?$deltatoken=x")


def test_a_next_link_off_the_graph_host_is_refused(graph_server, monkeypatch):
    # The bearer token goes wherever a link points.
    served = graph_server.handle

    def elsewhere(method, path, query, headers, raw):
        status, body = served(method, path, query, headers, raw)
        if path == "/v1.0/groups/delta" and status == 200:
            body.pop("@odata.deltaLink", None)
            body["@odata.nextLink"] = "https://elsewhere.example/v1.0/groups/delta?$skiptoken=x"
        return status, body

    monkeypatch.setattr(graph_server, "handle", elsewhere)
    with pytest.raises(UpstreamError, match="refusing a link outside"):
        graph_client(graph_server).group_delta(GROUP)


def test_group_id_must_be_an_object_id(graph_server):
    with pytest.raises(ValueError):
        graph_client(graph_server).group_delta("x' or id eq 'y")


# -- throttling -------------------------------------------------------------------------

def test_retry_after_is_honoured_then_the_call_succeeds(graph_server):
    graph_server.set_members(TENANT, GROUP, users(3))
    sleeps: list[float] = []
    client = graph_client(graph_server, sleeps=sleeps)
    graph_server.fail_next(2, status=429, retry_after=1)
    graph_server.fail_next(1, status=503, retry_after=None)
    assert client.group_delta(GROUP).added == users(3)
    assert sleeps == [1.0, 1.0, 4.0]   # Retry-After twice, then backoff (third attempt)


def test_retry_after_as_an_http_date(graph_server):
    sleeps: list[float] = []
    when = email.utils.format_datetime(dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=3), usegmt=True)
    graph_server.fail_next(1, status=503, retry_after=when)
    assert graph_client(graph_server, sleeps=sleeps).list_subscriptions() == []
    assert len(sleeps) == 1 and 0 < sleeps[0] <= 3


def test_throttled_forever_raises_rate_limited(graph_server):
    sleeps: list[float] = []
    client = graph_client(graph_server, sleeps=sleeps)
    graph_server.fail_next(10, status=429, retry_after=2)
    with pytest.raises(RateLimited) as err:
        client.list_subscriptions()
    assert err.value.retry_after == 2 and err.value.status_code == 429
    assert sleeps == [2.0, 2.0, 2.0]


def test_once_throttled_past_its_budget_the_client_fails_fast_until_retry_after_ends(graph_server):
    sleeps: list[float] = []
    client = graph_client(graph_server, sleeps=sleeps)
    graph_server.fail_next(10, status=429, retry_after=1)
    with pytest.raises(RateLimited):
        client.list_subscriptions()
    calls = len(graph_server.calls("GET", "/v1.0/subscriptions"))
    for _ in range(5):   # a run over many groups: no request, no wait, each
        with pytest.raises(RateLimited, match="throttled by Microsoft Graph") as err:
            client.group_delta(GROUP)
        assert 0 < err.value.retry_after <= 1
    assert sleeps == [1.0, 1.0, 1.0] and delta_calls(graph_server) == 0
    time.sleep(1.1)
    graph_server.clear_faults()
    assert client.list_subscriptions() == [] and len(graph_server.calls("GET", "/v1.0/subscriptions")) == calls + 1


def test_a_call_made_while_another_waits_out_retry_after_waits_too(graph_server):
    # Graph throttles the app, and counts requests sent while throttled: policy_sync's
    # parallel reads share one client, and none may call while another was told to wait.
    graph_server.set_members(TENANT, GROUP, users(2))
    client = GraphClient(graph_settings(graph_server), TENANT)   # real sleeps
    client.group_delta(GROUP)   # token fetched
    sent, real = [], graph_server.handle

    def timed(method, path, *rest):
        sent.append((time.monotonic(), path))
        return real(method, path, *rest)

    graph_server.handle = timed
    graph_server.fail_next(1, status=429, retry_after=2, path="/v1.0/groups/delta")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.group_delta, GROUP)
        time.sleep(0.5)
        assert client.group_delta(GROUP).added == users(2)
        assert first.result().added == users(2)
    deltas = [t for t, path in sent if path == "/v1.0/groups/delta"]
    assert len(deltas) == 3 and all(t - deltas[0] >= 1.9 for t in deltas[1:]), [t - deltas[0] for t in deltas]


@pytest.mark.parametrize("retry_after", ["999999999999", "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_an_absurd_retry_after_silences_the_client_for_minutes_at_most(graph_server, retry_after):
    client = graph_client(graph_server)
    graph_server.fail_next(1, status=503, retry_after=retry_after)
    with pytest.raises(RateLimited):
        client.list_subscriptions()
    with pytest.raises(RateLimited) as err:
        client.group_delta(GROUP)       # failing fast, not sent
    assert 0 < err.value.retry_after <= MAX_FAIL_FAST


@pytest.mark.parametrize("retry_after", ["inf", "1e12", "1.5", "-3", "soon"])
def test_a_retry_after_that_is_neither_seconds_nor_a_date_means_backoff(graph_server, retry_after):
    sleeps: list[float] = []
    graph_server.fail_next(2, status=429, retry_after=retry_after)
    assert graph_client(graph_server, sleeps=sleeps).list_subscriptions() == []
    assert sleeps == [1.0, 2.0]


def test_a_wait_beyond_the_budget_is_not_shortened(graph_server):
    sleeps: list[float] = []
    graph_server.fail_next(1, status=429, retry_after=120)
    with pytest.raises(RateLimited) as err:
        graph_client(graph_server, sleeps=sleeps).list_subscriptions()
    assert err.value.retry_after == 120 and sleeps == []


# -- subscriptions ------------------------------------------------------------------------

def test_subscription_lifecycle(graph_server):
    client = graph_client(graph_server)
    expiry = max_expiration()
    sub = client.create_subscription(f"/groups/{GROUP}", HOOK, HOOK + "/lifecycle", "state-1", expiry)
    assert sub["changeType"] == "updated,deleted" and sub["clientState"] == "state-1"
    assert sub["lifecycleNotificationUrl"] == HOOK + "/lifecycle"
    with pytest.raises(SubscriptionExists) as err:
        client.create_subscription(f"/groups/{GROUP}", HOOK, None, "state-1", expiry)
    assert err.value.status_code == 409
    [listed] = client.list_subscriptions()
    assert listed["id"] == sub["id"] and listed["clientState"] is None

    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)
    renewed = client.renew_subscription(sub["id"], later)
    assert dt.datetime.fromisoformat(renewed["expirationDateTime"]) == later
    client.reauthorize_subscription(sub["id"])
    assert graph_server.subscriptions(TENANT, CLIENT_ID)[sub["id"]]["reauthorizations"] == 1
    client.delete_subscription(sub["id"])
    client.delete_subscription(sub["id"])   # already gone: fine
    assert client.list_subscriptions() == []


def test_subscription_list_follows_pages(graph_server):
    graph_server.page_size = 2
    client = graph_client(graph_server)
    for i in range(5):
        client.create_subscription(f"/groups/aaaaaaaa-0000-0000-0000-00000000010{i}", HOOK, None, "s",
                                   max_expiration())
    assert len({s["id"] for s in client.list_subscriptions()}) == 5
    assert len(graph_server.calls("GET", "/v1.0/subscriptions")) == 3


def test_subscription_expiration_limit(graph_server):
    client = graph_client(graph_server)
    too_late = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=MAX_GROUP_SUBSCRIPTION_MINUTES + 5)
    with pytest.raises(UpstreamError) as err:
        client.create_subscription(f"/groups/{GROUP}", HOOK, None, "s", too_late)
    assert err.value.status_code == 400
    with pytest.raises(ValueError):
        client.create_subscription(f"/groups/{GROUP}", HOOK, None, "s", dt.datetime(2030, 1, 1))


def test_unknown_subscription_renewal_fails_with_graph_code(graph_server):
    with pytest.raises(UpstreamError) as err:
        graph_client(graph_server).renew_subscription("nope", max_expiration())
    assert (err.value.status_code, err.value.code) == (404, "ResourceNotFound")


# -- secrets ------------------------------------------------------------------------------

def test_no_access_token_or_secret_in_any_error(graph_server):
    graph_server.set_members(TENANT, GROUP, users(2))
    client = graph_client(graph_server)
    link = client.group_delta(GROUP).delta_link
    client.create_subscription(f"/groups/{GROUP}", HOOK, None, "s", max_expiration())
    errors: list[Exception] = []
    attempts = [
        lambda: client.create_subscription(f"/groups/{GROUP}", HOOK, None, "s", max_expiration()),
        lambda: client.renew_subscription("nope", max_expiration()),
        lambda: (graph_server.expire_delta_links(), client.group_delta(GROUP, link)),
        lambda: (graph_server.fail_next(9), client.list_subscriptions()),
    ]
    for attempt in attempts:
        with pytest.raises(UpstreamError) as err:
            attempt()
        errors.append(err.value)
    tokens = graph_server.issued_tokens
    assert tokens
    for e in errors:
        text = " ".join(str(x) for x in (e, repr(e), e.__cause__, e.__context__, e.args))
        assert not [t for t in tokens if t in text]
        assert CLIENT_SECRET not in text


def test_a_token_answer_that_is_not_json_is_an_upstream_error_and_never_logged(graph_server, monkeypatch, capfd,
                                                                                caplog):
    # Some OAuth servers and proxies answer form-encoded: MSAL logs such an answer.
    leaked = "eyJ0eXAiOiJKV1QifQ.not-json-access-token.sig"
    served = graph_server.handle

    def form_encoded_tokens(method, path, query, headers, raw):
        if path.endswith("/oauth2/v2.0/token"):
            return 200, f"access_token={leaked}&token_type=Bearer&expires_in=3599"
        return served(method, path, query, headers, raw)

    monkeypatch.setattr(graph_server, "handle", form_encoded_tokens)
    with caplog.at_level(logging.DEBUG), pytest.raises(UpstreamError) as err:
        graph_client(graph_server).list_subscriptions()
    assert "token request failed" in str(err.value)
    out, errors = capfd.readouterr()
    text = " ".join([out, errors, caplog.text, repr(err.value), str(err.value.__cause__), str(err.value.__context__)])
    assert leaked not in text



def test_a_group_deleted_and_restored_within_a_round_is_read_in_full(graph_server):
    # Graph lists an object once per change: the group's @removed occurrence, then the
    # live one. The last says it exists; a full read says who its members are.
    graph_server.set_members(TENANT, GROUP, users(3))
    client = graph_client(graph_server)
    first = client.group_delta(GROUP)
    graph_server.delete_group(TENANT, GROUP)
    graph_server.restore_group(TENANT, GROUP)
    second = client.group_delta(GROUP, first.delta_link)
    assert not second.group_deleted
    assert second.full and second.added == users(3)


def test_a_group_restored_then_deleted_within_a_round_is_deleted(graph_server):
    graph_server.set_members(TENANT, GROUP, users(3))
    client = graph_client(graph_server)
    graph_server.delete_group(TENANT, GROUP)
    first = client.group_delta(GROUP)
    graph_server.restore_group(TENANT, GROUP)
    graph_server.delete_group(TENANT, GROUP)
    assert client.group_delta(GROUP, first.delta_link).group_deleted
