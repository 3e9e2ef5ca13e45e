"""Every log line written while serving an HTTP request carries the request's trace
(CONTRACT.md §9), whichever function serves it: served by the real functions-framework."""
from __future__ import annotations

import base64
import json
import urllib.request

import pytest

from tests.support.serve import FunctionServer
from tests.support.world import ALICE, TENANT_A, env_for, write_policy

PROJECT = "aadrun-test"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def post(url: str, body: dict, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def lines_of(server: FunctionServer, event: str, n: int, **fields) -> list[dict]:
    def found(entries):
        return [e for e in entries if e.get("event") == event and fields.items() <= e.items()]

    return found(server.log_entries(until=lambda entries: len(found(entries)) >= n))


TRACE_HEADERS = [
    ({"X-Cloud-Trace-Context": f"{TRACE_ID}/1;o=1"}, f"projects/{PROJECT}/traces/{TRACE_ID}"),
    ({"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}, f"projects/{PROJECT}/traces/{TRACE_ID}"),
    ({"X-Cloud-Trace-Context": "nothex/1;o=1"}, ""),
    ({"traceparent": f"00-{'0' * 32}-00f067aa0ba902b7-01"}, ""),    # all zeros: invalid (W3C)
    ({}, ""),
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory, idp):
    folder = tmp_path_factory.mktemp("trace")
    env = {**env_for(idp.url, write_policy(folder), f"sqlite:///{folder}/state.db"),
           "GOOGLE_CLOUD_PROJECT": PROJECT, "AADRUN_CLIENT_STATE": "the-state"}
    with FunctionServer("verify", env) as verify, FunctionServer("graph_webhook", env) as webhook:
        yield verify, webhook


def test_decision_lines_join_the_request_trace(servers, idp):
    verify, _ = servers
    token = idp.mint(TENANT_A, oid=ALICE, aud="api://billing")
    for headers, _ in TRACE_HEADERS:
        post(verify.url + "/verify", {"service": "billing"}, {"Authorization": f"Bearer {token}", **headers})
    traces = [e["logging.googleapis.com/trace"] for e in lines_of(verify, "decision", len(TRACE_HEADERS), service="billing")]
    assert traces == [expected for _, expected in TRACE_HEADERS]


def test_webhook_lines_join_the_request_trace(servers):
    _, webhook = servers
    forged = {"value": [{"clientState": "not-the-state", "subscriptionId": "x", "tenantId": TENANT_A}]}
    for headers, _ in TRACE_HEADERS:
        assert post(webhook.url + "/", forged, headers) == 202
    traces = [e["logging.googleapis.com/trace"] for e in lines_of(webhook, "security", len(TRACE_HEADERS))]
    assert traces == [expected for _, expected in TRACE_HEADERS]


def test_policy_sync_lines_join_the_trace_of_the_delivery(tmp_path):
    env = {"AADRUN_POLICY_PATH": str(write_policy(tmp_path)), "AADRUN_STORE": f"sqlite:///{tmp_path}/state.db",
           "GOOGLE_CLOUD_PROJECT": PROJECT}
    # Eventarc's binary-mode delivery of an unreadable message: logged as poison.
    headers = {"ce-specversion": "1.0", "ce-source": "//pubsub.googleapis.com/projects/p/topics/t",
               "ce-type": "google.cloud.pubsub.topic.v1.messagePublished"}
    with FunctionServer("policy_sync", env, signature="cloudevent") as sync:
        for n, (trace_headers, _) in enumerate(TRACE_HEADERS):
            message = {"data": base64.b64encode(b"not json").decode(), "messageId": str(n)}
            assert post(sync.url + "/", {"message": message, "subscription": "projects/p/subscriptions/s"},
                        {**headers, "ce-id": str(n), **trace_headers}) == 200
        lines = lines_of(sync, "poison_message", len(TRACE_HEADERS))
    assert [e["logging.googleapis.com/trace"] for e in lines] == [expected for _, expected in TRACE_HEADERS]



@pytest.mark.parametrize("header, value", [
    ("x-cloud-trace-context", "0123456789abcdef0123456789abcdef\nINJECTED/1;o=1"),
    ("x-cloud-trace-context", "0123456789abcdef0123456789abcdefXX/1"),
    ("traceparent", "00-0123456789abcdef0123456789abcdef\nINJECTED-0123456789abcdef-01"),
    ("traceparent", "00-00000000000000000000000000000000-0123456789abcdef-01"),
])
def test_a_trace_header_that_is_not_exactly_a_trace_id_names_no_trace(header, value):
    # Only 32 hex digits (not all zeros) reach the log's trace field: nothing a caller appends.
    from aadrun.http import HttpRequest
    assert HttpRequest("GET", "/", {}, {header: value}, b"").trace("proj") is None
    good = HttpRequest("GET", "/", {}, {"x-cloud-trace-context": "0123456789abcdef0123456789abcdef/1;o=1"}, b"")
    assert good.trace("proj") == "projects/proj/traces/0123456789abcdef0123456789abcdef"
