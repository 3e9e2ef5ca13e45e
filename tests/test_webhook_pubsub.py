"""graph_webhook through the real functions-framework, publishing to the real Pub/Sub
emulator (AADRUN_BUS=pubsub); what was published is read back with a pull
subscription created for each test."""
from __future__ import annotations

import datetime as dt
import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from google.api_core import exceptions as api_exceptions
from google.pubsub_v1.services.publisher import PublisherClient
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber import SubscriberClient
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from aadrun.bus import PubSubBus
from aadrun.config import Settings
from aadrun.errors import Unavailable
from aadrun.messages import from_json
from aadrun.webhook import MAX_ITEMS
from tests.support.emulators import Emulator
from tests.support.flaky_grpc import FlakyMethod
from tests.support.serve import FunctionServer

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
PROJECT = "aadrun-test"
STATES = "previous-client-state,golden-client-state"
MAX_BODY = 1024 * 1024


class PubSub:
    """The test's own view of an emulator: admin and pull, on insecure channels to ``host``."""

    def __init__(self, host: str):
        self.host = host
        self.publisher = PublisherClient(transport=PublisherGrpcTransport(channel=grpc.insecure_channel(host)))
        self.subscriber = SubscriberClient(transport=SubscriberGrpcTransport(channel=grpc.insecure_channel(host)))

    def create_topic(self, topic_id: str) -> str:
        name = f"projects/{PROJECT}/topics/{topic_id}"
        self.publisher.create_topic(name=name)
        return name

    def subscribe(self, topic: str) -> str:
        name = f"projects/{PROJECT}/subscriptions/pull-{uuid.uuid4().hex[:12]}"
        self.subscriber.create_subscription(request={"name": name, "topic": topic, "ack_deadline_seconds": 60,
                                                     "enable_message_ordering": True})
        return name

    def pull(self, subscription: str, until=lambda got: False, wait: float = 30.0) -> list:
        """Pull and ack until ``until(messages)`` holds or ``wait`` seconds pass (a
        shared emulator on a loaded machine may take seconds to deliver)."""
        got: list = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not until(got):
            try:
                response = self.subscriber.pull(request={"subscription": subscription, "max_messages": 1000},
                                                timeout=1.0, retry=None)
            except api_exceptions.DeadlineExceeded:
                continue
            if response.received_messages:
                self.subscriber.acknowledge(subscription=subscription,
                                            ack_ids=[m.ack_id for m in response.received_messages])
                got.extend(m.message for m in response.received_messages)
        return got


def golden(case: str) -> bytes:
    return (GOLDEN / f"{case}.graph.json").read_bytes()


def golden_messages(case: str) -> list[dict]:
    return json.loads((GOLDEN / f"{case}.messages.json").read_text())


def post(url: str, body: bytes, path: str = "/", query: str = ""):
    request = urllib.request.Request(url + path + query, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get("Content-Type"), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()


def webhook_env(host: str, topic_id: str, policy: Path) -> dict[str, str]:
    return {"AADRUN_BUS": "pubsub", "PUBSUB_EMULATOR_HOST": host, "GOOGLE_CLOUD_PROJECT": PROJECT,
            "AADRUN_CLIENT_STATE": STATES, "AADRUN_POLICY_PATH": str(policy), "AADRUN_TOPIC_CHANGES": topic_id}


def decoded(messages) -> list[dict]:
    return [json.loads(m.data) for m in messages]


def without_time(message: dict) -> dict:
    return {k: v for k, v in message.items() if k != "received_at"}


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text((ROOT / "policies" / "example.yaml").read_text())
    return path


@pytest.fixture(scope="module")
def stack(pubsub_emulator, policy_file):
    """graph_webhook served by functions-framework, publishing to a fresh topic."""
    pubsub = PubSub(pubsub_emulator)
    topic_id = f"changes-{uuid.uuid4().hex[:8]}"
    topic = pubsub.create_topic(topic_id)
    with FunctionServer("graph_webhook", webhook_env(pubsub_emulator, topic_id, policy_file)) as server:
        yield server, pubsub, topic


@pytest.fixture
def subscription(stack):
    """A pull subscription that sees only what this test publishes."""
    _, pubsub, topic = stack
    return pubsub.subscribe(topic)


@pytest.mark.parametrize("path", ["/", "/lifecycle"])
def test_handshake_through_the_framework_echoes_the_decoded_token(stack, path):
    server, _, _ = stack
    query = "?validationToken=Validation%3A%20Testing%20client+reachability%20a%2Bb%26c%3Dd"
    status, content_type, body = post(server.url, b"", path, query)
    assert status == 200
    assert content_type.startswith("text/plain")
    assert body == b"Validation: Testing client reachability a+b&c=d"


@pytest.mark.parametrize("case", ["members_added", "members_removed_string", "members_removed_object",
                                  "no_members_delta", "several_subscriptions", "lifecycle_reauthorization_required",
                                  "lifecycle_missed_group"])
def test_notifications_are_published_with_ordering_key_and_attributes(stack, subscription, case):
    server, pubsub, _ = stack
    before = dt.datetime.now(dt.timezone.utc)
    path = "/lifecycle" if case.startswith("lifecycle") else "/"
    status, _, _ = post(server.url, golden(case), path)
    assert status == 202
    expected = golden_messages(case)
    got = pubsub.pull(subscription, until=lambda m: len(m) >= len(expected))
    assert sorted(map(without_time, decoded(got)), key=lambda m: m["id"]) == \
        sorted(map(without_time, expected), key=lambda m: m["id"])
    for message, body in zip(got, decoded(got)):
        assert dt.datetime.fromisoformat(body["received_at"].replace("Z", "+00:00")) >= before.replace(microsecond=0)
        key = body["tenant"] if body["kind"] == "lifecycle" else f"{body['tenant']}/{body['group']}"
        assert message.ordering_key == key
        expected_attrs = {"kind": body["kind"], "tenant": body["tenant"]}
        if body["group"]:   # where there is one: every membership change, and lifecycle_missed_group
            expected_attrs["group"] = body["group"]
        assert dict(message.attributes) == expected_attrs


def _with(case: str, **changes) -> bytes:
    doc = json.loads(golden(case))
    doc["value"] = [{**item, **changes} for item in doc["value"]]
    return json.dumps(doc).encode()


def test_rejected_and_dropped_posts_publish_nothing(stack, subscription):
    server, pubsub, _ = stack
    refused = [
        (_with("members_added", clientState="wrong"), 202),
        (_with("members_added", tenantId="22222222-2222-2222-2222-222222222222"), 202),
        (_with("members_added", subscriptionId="not-a-guid"), 202),
        (b"{not json", 400),
        (b"\xff\xfe", 400),
        (b'{"value": "x"}', 400),
        (json.dumps({"value": [{}] * (MAX_ITEMS + 1)}).encode(), 400),
        (b"{" + b" " * MAX_BODY + b"}", 413),
    ]
    for body, expected in refused:
        status, _, _ = post(server.url, body)
        assert status == expected
    # A sentinel published afterwards: once it has arrived, anything the refused
    # POSTs had published (confirmed before they were answered) would have too.
    assert post(server.url, golden("members_removed_string"))[0] == 202
    got = pubsub.pull(subscription, until=lambda m: len(m) >= 1)
    got += pubsub.pull(subscription, wait=1.0)
    assert [m["id"] for m in decoded(got)] == [golden_messages("members_removed_string")[0]["id"]]


def test_a_body_of_exactly_one_mib_is_published_one_byte_more_is_413(stack, subscription):
    # CONTRACT §5: 413 only over 1 MiB. Graph does not send a 4xx again, so a lower limit
    # anywhere on the way (the serving stack, the entry point) would lose the batch.
    server, pubsub, _ = stack
    body = golden("members_added").rstrip()
    padded = body[:-1] + b" " * (MAX_BODY - len(body)) + body[-1:]   # JSON's own blanks
    assert len(padded) == MAX_BODY
    assert post(server.url, padded)[0] == 202
    got = pubsub.pull(subscription, until=lambda m: len(m) >= 1)
    assert [m["id"] for m in decoded(got)] == [golden_messages("members_added")[0]["id"]]
    assert post(server.url, padded[:-1] + b" " + padded[-1:])[0] == 413


def test_bus_fails_fast_on_a_missing_topic_then_publishes_on_the_same_key(pubsub_emulator):
    pubsub = PubSub(pubsub_emulator)
    suffix = uuid.uuid4().hex[:8]
    settings = Settings(bus="pubsub", project=PROJECT, topic_changes=f"changes-{suffix}",
                        topic_policy=f"policy-{suffix}")
    bus = PubSubBus(settings)
    message = from_json(json.dumps(golden_messages("members_added")[0]))
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable, match=rf"not confirmed by projects/{PROJECT}/topics/changes-{suffix} "
                                              r"\(NotFound\)"):
            bus.publish_changes([message])  # NotFound is not retried: the topic does not exist
        with pytest.raises(Unavailable, match="ordering keys not confirmed"):  # several keys: as many requests
            bus.publish_changes([from_json(json.dumps(m)) for m in golden_messages("several_subscriptions")])
        assert time.monotonic() - started < 1.0
        changes = pubsub.subscribe(pubsub.create_topic(settings.topic_changes))
        policy = pubsub.subscribe(pubsub.create_topic(settings.topic_policy))
        bus.publish_changes([message])  # same ordering key: a failure leaves no key paused
        bus.publish_policy_update({"service": "billing-api", "version": 3})
        [published] = pubsub.pull(changes, until=lambda m: len(m) >= 1)
        assert json.loads(published.data) == golden_messages("members_added")[0]
        [update] = pubsub.pull(policy, until=lambda m: len(m) >= 1)
        assert json.loads(update.data) == {"service": "billing-api", "version": 3}
        assert dict(update.attributes) == {"kind": "policy_update"}
    finally:
        bus.close()


class _PublishRecorder(grpc.UnaryUnaryClientInterceptor):
    """Sees every Publish request a client sends on its channel."""

    def __init__(self):
        self.requests: list = []

    def intercept_unary_unary(self, continuation, client_call_details, request):
        if client_call_details.method.endswith("/Publish"):
            self.requests.append(request)
        return continuation(client_call_details, request)


def _bus_seen_on_the_wire(host: str):
    """(test view, pull subscription, recorder of Publish requests, PubSubBus) on a fresh topic."""
    from google.cloud import pubsub_v1

    pubsub = PubSub(host)
    # These tests are about how messages are split into requests, not the deadline.
    settings = Settings(bus="pubsub", project=PROJECT, topic_changes=f"changes-{uuid.uuid4().hex[:8]}",
                        publish_timeout_seconds=30)
    subscription = pubsub.subscribe(pubsub.create_topic(settings.topic_changes))
    recorder = _PublishRecorder()
    channel = grpc.intercept_channel(grpc.insecure_channel(host), recorder)
    bus = PubSubBus(settings, client=pubsub_v1.PublisherClient(transport=PublisherGrpcTransport(channel=channel)))
    return pubsub, subscription, recorder, bus


def test_a_post_spanning_several_groups_sends_one_publish_request_per_ordering_key(pubsub_emulator):
    # Pub/Sub refuses a Publish request whose messages carry different ordering keys
    # (the emulator does not check it, so the requests are checked on the wire).
    pubsub, subscription, recorder, bus = _bus_seen_on_the_wire(pubsub_emulator)
    expected = golden_messages("several_subscriptions") + golden_messages("members_added_and_removed")
    try:
        bus.publish_changes([from_json(json.dumps(m)) for m in expected])
    finally:
        bus.close()
    with pytest.raises(Unavailable, match="closed"):   # a closed bus refuses, as a failed publish does
        bus.publish_changes([from_json(json.dumps(m)) for m in expected])
    keys = [{m.ordering_key for m in r.messages} for r in recorder.requests]
    assert all(len(k) == 1 for k in keys), keys
    assert sorted(k.pop() for k in keys) == sorted({m.ordering_key for m in map(from_json, map(json.dumps, expected))})
    got = pubsub.pull(subscription, until=lambda m: len(m) >= len(expected))
    assert sorted(m["id"] for m in decoded(got)) == sorted(m["id"] for m in expected)
    # Within a key, the order of the POST.
    group_2 = [m["id"] for m in decoded(got) if (m.get("group") or "").endswith("0002")]
    assert group_2 == [m["id"] for m in expected if (m.get("group") or "").endswith("0002")]


def test_a_key_with_more_messages_than_one_request_takes_is_sent_in_order_in_several(pubsub_emulator):
    # Pub/Sub refuses a Publish request of more than 1,000 messages.
    pubsub, subscription, recorder, bus = _bus_seen_on_the_wire(pubsub_emulator)
    template = golden_messages("members_added")[0]
    expected = [dict(template, id=f"{n:064x}") for n in range(2500)]
    other_key = dict(golden_messages("several_subscriptions")[-1], id="f" * 64)
    assert from_json(json.dumps(other_key)).ordering_key != from_json(json.dumps(template)).ordering_key
    try:
        bus.publish_changes([from_json(json.dumps(m)) for m in expected])
        bus.publish_changes([from_json(json.dumps(m)) for m in expected[:1500] + [other_key]])   # two keys
    finally:
        bus.close()
    sizes = [len(r.messages) for r in recorder.requests]
    assert sizes[:3] == [1000, 1000, 500] and sorted(sizes[3:]) == [1, 500, 1000]
    got = pubsub.pull(subscription, until=lambda m: len(m) >= len(expected) + 1501, wait=30)
    ids = [m["id"] for m in decoded(got)]
    assert [i for i in ids if i != other_key["id"]] == [m["id"] for m in expected + expected[:1500]]


def test_emulator_down_is_503_then_the_same_post_is_published_under_one_id(policy_file):
    emulator = Emulator("pubsub").start()
    try:
        pubsub = PubSub(emulator.host)
        topic_id = "changes-outage"
        topic = pubsub.create_topic(topic_id)
        with FunctionServer("graph_webhook", webhook_env(emulator.host, topic_id, policy_file)) as server:
            assert post(server.url, golden("members_added"))[0] == 202  # the publisher is up and connected
            body = golden("members_removed_string")
            emulator.stop()
            started = time.monotonic()
            status, _, answer = post(server.url, body)
            assert (status, json.loads(answer)["reason"]) == (503, "unavailable")
            assert time.monotonic() - started < 3.0  # Graph's deadline
            emulator.start()
            topic = pubsub.create_topic(topic_id)  # the emulator keeps nothing across a restart
            subscription = pubsub.subscribe(topic)
            statuses = [post(server.url, body)[0]]
            deadline = time.monotonic() + 20
            while statuses[-1] != 202 and time.monotonic() < deadline:
                time.sleep(0.2)  # the publisher's channel reconnects with backoff
                statuses.append(post(server.url, body)[0])
            assert statuses[-1] == 202 and set(statuses[:-1]) <= {503}
            first = pubsub.pull(subscription, until=lambda m: len(m) >= 1)
            first += pubsub.pull(subscription, wait=1.5)
            expected = {golden_messages("members_removed_string")[0]["id"]}
            # A POST answered 503 may still have been published (its answer came too
            # late, not its message): a duplicate, under the same dedupe id.
            assert {m["id"] for m in decoded(first)} == expected
            # Graph's redelivery of the same notification: published again, same dedupe id.
            assert post(server.url, body)[0] == 202
            again = pubsub.pull(subscription, until=lambda m: len(m) >= 1)
            assert {m["id"] for m in decoded(again)} == expected
    finally:
        emulator.stop()


def test_no_publish_attempt_outlives_the_publish_deadline_when_pub_sub_fails_then_stalls():
    # After a second of fast failures, google-api-core would give a float timeout's next
    # attempt the whole timeout again: the webhook would answer after Graph's 3 s.
    from google.cloud import pubsub_v1
    from google.pubsub_v1.types import PublishRequest

    publisher = FlakyMethod("google.pubsub.v1.Publisher", "Publish", PublishRequest, failing=0.6)

    settings = Settings(bus="pubsub", project=PROJECT, publish_timeout_seconds=1.5)
    client = pubsub_v1.PublisherClient(transport=PublisherGrpcTransport(channel=grpc.insecure_channel(publisher.host)))
    bus = PubSubBus(settings, client=client)
    one_group = [from_json(json.dumps(m)) for m in golden_messages("members_added_and_removed")]
    several = [from_json(json.dumps(m)) for m in golden_messages("several_subscriptions")]
    try:
        for messages in (one_group, several):   # one ordering key on the caller's thread; several on the pool
            publisher.outage_starts()
            started = time.monotonic()
            with pytest.raises(Unavailable):
                bus.publish_changes(messages)
            assert len(publisher.deadlines) > 2                         # it failed fast, retried, then stalled
            assert max(publisher.deadlines) <= started + 1.5 + publisher.TRANSIT_SLACK    # every attempt ends by the deadline
    finally:
        bus.close()
        publisher.stop()
