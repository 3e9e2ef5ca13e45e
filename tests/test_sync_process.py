"""policy_sync served by the real functions-framework in its own process: the raw
Pub/Sub push of the emulator, a binary-mode CloudEvent as Eventarc sends it, a
poison message, and a process killed mid-batch whose message is then redelivered
to a fresh process. Graph and Cloud Run IAM are the local servers; the store is a
SQLite file shared with the test."""
from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from aadrun.store import open_store
from tests.support.cloudrun_server import CloudRunIamServer
from tests.support.graph_fixtures import CLIENT_ID, CLIENT_SECRET, TENANT
from tests.support.graph_fixtures import *  # noqa: F401,F403 - graph_server, graph_pki, loopback_only
from tests.support.serve import FunctionServer
from tests.support.sync_world import ALICE, BOB, CAROL, G_ENG, G_OPS, POLICY, REPORTS, change, user

EVENT_TYPE = "google.cloud.pubsub.topic.v1.messagePublished"


def push_body(message, message_id: str) -> dict:
    """The JSON a Pub/Sub push subscription (and the emulator) POSTs."""
    return {"message": {"data": base64.b64encode(message.to_json()).decode(), "messageId": message_id,
                        "publishTime": "2024-05-01T12:00:00.000Z", "orderingKey": message.ordering_key,
                        "attributes": message.attributes},
            "subscription": "projects/aadrun-test/subscriptions/policy-sync"}


def post(url: str, body: dict, headers: dict | None = None, timeout: float = 30) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def _post_or_error(url: str, body: dict):
    try:
        return post(url, body)
    except OSError:   # http.client.RemoteDisconnected, ConnectionResetError
        return "connection lost"


def binary_headers(message_id: str) -> dict:
    """A binary-mode CloudEvent (https://github.com/cloudevents/spec, HTTP binding), as Eventarc sends."""
    return {"ce-id": message_id, "ce-specversion": "1.0", "ce-type": EVENT_TYPE,
            "ce-source": "//pubsub.googleapis.com/projects/aadrun-test/topics/aadrun-membership-changes",
            "ce-time": "2024-05-01T12:00:00.000Z"}


class Stack:
    """Graph, Cloud Run IAM, a policy file and a store path for policy_sync processes."""

    def __init__(self, graph, tmp_path):
        self.graph = graph
        self.cloudrun = CloudRunIamServer().start()
        (tmp_path / "policy.yaml").write_text(POLICY)
        self.store_url = f"sqlite:///{tmp_path}/state/aadrun.db"
        self.env = {"AADRUN_POLICY_PATH": str(tmp_path / "policy.yaml"), "AADRUN_STORE": self.store_url,
                    "AADRUN_IAM": "cloudrun", "AADRUN_CLOUDRUN_ENDPOINT": self.cloudrun.url,
                    "AADRUN_AUTHORITY_URL": graph.authority_url, "AADRUN_GRAPH_URL": graph.graph_url,
                    "AADRUN_CLIENT_ID": CLIENT_ID, "AADRUN_CLIENT_SECRET": CLIENT_SECRET,
                    # No Application Default Credentials, no metadata-server probe: anonymous.
                    "GOOGLE_APPLICATION_CREDENTIALS": "", "NO_GCE_CHECK": "true",
                    "CLOUDSDK_CONFIG": str(tmp_path / "gcloud")}
        self.store = open_store(self.store_url)

    def function(self) -> FunctionServer:
        return FunctionServer("policy_sync", self.env, signature="cloudevent").start()

    def members(self, resource: str) -> set[str]:
        return {m for b in self.cloudrun.policy(resource).get("bindings", []) for m in b["members"]}


@pytest.fixture
def stack(graph_server, tmp_path):
    s = Stack(graph_server, tmp_path)
    yield s
    s.cloudrun.stop()


def test_raw_pubsub_push_binary_cloud_event_and_poison_message(stack):
    with stack.function() as fn:
        stack.graph.add_members(TENANT, G_ENG, [ALICE])
        assert post(fn.url, push_body(change(G_ENG, added=[ALICE]), "101")) == 200, fn.output()
        assert stack.store.group_members(TENANT, G_ENG) == {ALICE}
        assert user(ALICE) in stack.members(REPORTS)

        stack.graph.add_members(TENANT, G_OPS, [BOB])
        envelope = push_body(change(G_OPS, added=[BOB]), "102")
        assert post(fn.url, envelope, binary_headers("102")) == 200, fn.output()
        assert stack.store.group_members(TENANT, G_OPS) == {BOB}

        poison = {"message": {"data": base64.b64encode(b"{not json").decode(), "messageId": "103"},
                  "subscription": "projects/aadrun-test/subscriptions/policy-sync"}
        assert post(fn.url, poison) == 200           # acknowledged: redelivery cannot fix it
        deadline = time.monotonic() + 5              # log lines are written by a background thread
        while '"poison_message"' not in fn.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert '"poison_message"' in fn.output()


def raw_post(url: str, body: bytes, headers: dict, method: str = "POST") -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.parametrize("body, content_type, status", [
    (b'{"message": {"data": 5}}', "application/json", 400),        # no CloudEvent, no Pub/Sub push
    (b"[1]", "application/json", 400),
    (b'{"context": [1], "data": {}}', "application/json", 400),
    (b"\xff", "application/cloudevents+json", 400),
    (b'{"specversion": "1.0", "id": "1", "source": "s", "type": "t", "data_base64": 5}',
     "application/cloudevents+json", 400),
])
def test_what_is_not_a_delivery_gets_a_short_answer_and_one_log_line(stack, body, content_type, status):
    secret = "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    trace = "0123456789abcdef0123456789abcdef"
    with stack.function() as fn:
        answer = raw_post(fn.url, body, {"Content-Type": content_type, "Authorization": secret,
                                         "X-Cloud-Trace-Context": f"{trace}/1;o=1"})
        assert answer == (status, b'{"error":"bad_request"}')
        # Log lines are written by a background thread. (The readiness probe's GET got a
        # request_failed line of its own, a 405.)
        fn.log_entries(until=lambda entries: any(e.get("status") == 400 for e in entries))
        # Complete lines only: a later one may be half written as we read.
        lines = [line for line in fn.output().split("\n")[:-1] if line.strip()]
    entries = [json.loads(line) for line in lines]   # every line one JSON object: no traceback
    [line] = [e for e in entries if e.get("status") == 400]
    assert (line["event"], line["reason"]) == ("request_failed", "bad_request")
    assert line["logging.googleapis.com/trace"].endswith(trace)   # joins the delivery's trace
    assert "eyJ" not in "".join(lines)


def test_a_method_policy_sync_does_not_take_gets_405_naming_post(stack):
    with stack.function() as fn, pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(fn.url, timeout=30)   # a GET
    assert (answer.value.code, answer.value.read()) == (405, b'{"error":"method_not_allowed"}')
    assert "POST" in answer.value.headers["Allow"]


def test_a_process_killed_mid_batch_converges_on_redelivery(stack):
    """The removal commits, then the process dies while Graph's answer is on its
    way; the redelivered message, served by a fresh process, finishes the work and
    repeats nothing."""
    stack.graph.add_members(TENANT, G_ENG, [ALICE, BOB])
    victim = stack.function()
    assert post(victim.url, push_body(change(G_ENG, added=[ALICE, BOB]), "201")) == 200, victim.output()
    assert stack.members(REPORTS) == {user(ALICE), user(BOB)}

    stack.graph.remove_members(TENANT, G_ENG, [BOB])
    stack.graph.add_members(TENANT, G_ENG, [CAROL])
    message = push_body(change(G_ENG, added=[CAROL], removed=[BOB]), "202")
    asked, release = threading.Event(), threading.Event()
    real = stack.graph.handle

    def held_delta(method, path, query, headers, raw):
        answer = real(method, path, query, headers, raw)
        if path == "/v1.0/groups/delta":
            asked.set()
            release.wait(30)   # the answer is on its way when the process dies
        return answer

    stack.graph.handle = held_delta
    outcome: list = []
    sender = threading.Thread(target=lambda: outcome.append(_post_or_error(victim.url, message)))
    sender.start()
    assert asked.wait(20), victim.output()
    victim.kill()
    sender.join()
    assert outcome == ["connection lost"]
    stack.graph.handle = real
    release.set()
    assert stack.store.group_members(TENANT, G_ENG) == {ALICE}      # the removal was committed
    assert stack.members(REPORTS) == {user(ALICE), user(BOB)}        # IAM not reached yet

    with stack.function() as fresh:                                   # Pub/Sub redelivers
        assert post(fresh.url, message) == 200, fresh.output()
    assert stack.store.group_members(TENANT, G_ENG) == {ALICE, CAROL}
    assert stack.members(REPORTS) == {user(ALICE), user(CAROL)}
    log = [(e.kind, e.user or e.member, e.service) for e in stack.store.changes()]
    assert len(log) == len(set(log)), "a change was logged twice"
    assert ("member_removed", BOB, None) in log and ("member_added", CAROL, None) in log
    assert ("iam_removed", user(BOB), REPORTS) in log and ("iam_added", user(CAROL), REPORTS) in log


def test_a_failed_delivery_is_a_503_with_one_log_line_and_no_traceback(stack):
    with stack.function() as fn:
        stack.graph.add_members(TENANT, G_ENG, [ALICE])
        assert post(fn.url, push_body(change(G_ENG, added=[ALICE]), "201")) == 200, fn.output()
        # Graph's read still lists ALICE: the removal is kept, and the delivery fails so
        # that Pub/Sub redelivers it; the framework prints no exception chain.
        removal = change(G_ENG, removed=[ALICE])
        assert post(fn.url, push_body(removal, "202")) == 503
        [failed] = fn.log_entries(until=lambda e: any(x.get("event") == "sync_delivery_failed" for x in e))[-1:]
        assert (failed["event"], failed["severity"], failed["error"]) == \
            ("sync_delivery_failed", "WARNING", "Unconfirmed")
        assert "Traceback" not in fn.output()
        assert stack.store.group_members(TENANT, G_ENG) == set()
        stack.graph.remove_members(TENANT, G_ENG, [ALICE])
        assert post(fn.url, push_body(removal, "202")) == 200      # the redelivery
        assert user(ALICE) not in stack.members(REPORTS)


def test_a_delivery_failed_by_an_upstream_error_is_logged_as_an_error_with_its_own_message(stack):
    with stack.function() as fn:
        stack.graph.add_members(TENANT, G_ENG, [ALICE])
        stack.cloudrun.inject_error(REPORTS, "setIamPolicy", 500, "INTERNAL", "Internal error encountered.")
        assert post(fn.url, push_body(change(G_ENG, added=[ALICE]), "301")) == 503
        [failed] = fn.log_entries(until=lambda e: any(x.get("event") == "sync_delivery_failed" for x in e))[-1:]
        assert (failed["severity"], failed["error"]) == ("ERROR", "UpstreamError")
        assert "setIamPolicy" in failed["detail"] and "Internal error encountered" in failed["detail"]
        assert "Traceback" not in fn.output()
        assert post(fn.url, push_body(change(G_ENG, added=[ALICE]), "301")) == 200   # the redelivery
        assert user(ALICE) in stack.members(REPORTS)
