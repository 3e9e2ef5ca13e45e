"""graph_webhook's core (aadrun.webhook.Webhook) with HttpRequest values and a
LocalBus whose handler records what would reach policy_sync."""
from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from aadrun.bus import LocalBus
from aadrun.config import Settings
from aadrun.errors import Deferred, PolicyError, Unavailable
from aadrun.http import HttpRequest
from aadrun.messages import from_json
from aadrun.policy import load_policy
from aadrun.webhook import MAX_BODY, MAX_ITEMS, Webhook

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
POLICY = load_policy(ROOT / "policies" / "example.yaml")
STATE = "golden-client-state"
OLD_STATE = "previous-client-state"
TENANT = "11111111-1111-1111-1111-111111111111"
OTHER_TENANT = "22222222-2222-2222-2222-222222222222"
NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


class Recorder:
    """policy_sync's core as the local bus sees it: records every batch, or fails."""

    def __init__(self, error: Exception | None = None):
        self.batches: list[list] = []
        self.error = error

    def __call__(self, messages):
        if self.error:
            raise self.error
        self.batches.append(messages)

    @property
    def messages(self):
        return [m for batch in self.batches for m in batch]


def make_webhook(recorder: Recorder | None = None, states=(STATE, OLD_STATE), policy_getter=None, bus_getter=None):
    recorder = recorder if recorder is not None else Recorder()
    bus = LocalBus(recorder)
    return Webhook(Settings(client_states=tuple(states)), policy_getter or (lambda: POLICY),
                   bus_getter or (lambda: bus), clock=lambda: NOW)


def post(webhook: Webhook, body: bytes | dict, path: str = "/", query=None, too_large: bool = False,
         incomplete: bool = False):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return webhook.handle(HttpRequest("POST", path, dict(query or {}), {"content-type": "application/json"},
                                      data, too_large, incomplete))


def golden(case: str) -> dict:
    return json.loads((GOLDEN / f"{case}.graph.json").read_text())


def golden_messages(case: str) -> list[dict]:
    return json.loads((GOLDEN / f"{case}.messages.json").read_text())


def item(**changes) -> dict:
    base = golden("members_added")["value"][0]
    return {k: v for k, v in {**base, **changes}.items() if v is not None}


@pytest.fixture
def records():
    """Log records of the aadrun logger (audit entries and security events)."""
    captured: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record):
            captured.append(record)

    log = logging.getLogger("aadrun")
    handler = Capture()
    log.addHandler(handler)
    yield captured
    log.removeHandler(handler)


def fields(records, event: str) -> list[dict]:
    return [r.json_fields for r in records if getattr(r, "json_fields", {}).get("event") == event]


# --- validation handshake ---------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/lifecycle"])
@pytest.mark.parametrize("token", ["Validation: Testing client application reachability for subscription Request-Id: "
                                   "2b5f2a0e-1f1c-4d0a-9a5b-3c7e1e2f4a6b", "a b+c&d=e/%", ""])
def test_handshake_echoes_the_token_as_text(path, token, records):
    recorder = Recorder()
    response = post(make_webhook(recorder, states=()), b"\xff not json", path, {"validationToken": token})
    assert response.status == 200
    assert response.content_type.startswith("text/plain")
    assert response.body == token.encode()
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert recorder.batches == []
    [logged] = fields(records, "webhook_validation")   # a subscription's creation, traced
    assert logged["path"] == path and (not token or token not in json.dumps(logged))


@pytest.mark.parametrize("token", ["x" * 4097, "a\r\nSet-Cookie: s=1", "<script>\x00</script>"])
def test_a_validation_token_graph_would_never_send_is_not_echoed(token):
    response = post(make_webhook(), b"", "/", {"validationToken": token})
    assert response.status == 400 and response.json_body()["detail"] == "bad_validation_token"
    assert token.encode() not in response.body


# --- statuses and limits ------------------------------------------------------------

def test_without_client_state_notifications_are_not_configured(records):
    response = post(make_webhook(states=()), golden("members_added"))
    assert response.status == 503
    assert response.json_body() == {"reason": "not_configured"}   # no configuration detail to the caller
    [logged] = fields(records, "webhook_error")
    assert (logged["reason"], logged["detail"]) == ("not_configured", "AADRUN_CLIENT_STATE is not set")


@pytest.mark.parametrize("body, too_large", [(b"{}", True), (b" " * (MAX_BODY + 1), False)])
def test_oversized_body_is_413(body, too_large, records):
    recorder = Recorder()
    response = post(make_webhook(recorder), body, too_large=too_large)
    assert response.status == 413
    assert response.json_body()["reason"] == "too_large"
    assert recorder.batches == []
    [logged] = fields(records, "webhook_error")        # whatever it held is lost: the log says so
    assert (logged["reason"], logged["path"]) == ("too_large", "/")


def test_a_logged_path_is_one_the_webhook_serves_whatever_was_sent(records):
    assert post(make_webhook(), b"{not json", "/lifecycle" + "/" * 100_000).status == 400
    assert [e["path"] for e in fields(records, "webhook_error")] == ["/lifecycle"]


def test_body_of_exactly_one_mib_is_read():
    payload = json.dumps(golden("members_added")).encode()
    body = payload[:-1] + b" " * (MAX_BODY - len(payload)) + b"}"
    assert len(body) == MAX_BODY
    assert post(make_webhook(), body).status == 202


def _items(n: int) -> bytes:
    """``n`` of the smallest items there are (each dropped: not an object)."""
    return json.dumps({"value": [0] * n}).encode()


@pytest.mark.parametrize("body, detail", [
    (b"\xff\xfe{}", "not_utf8"),
    (b'{"value": [], "x": "\xc3\x28"}', "not_utf8"),
    (b"", "not_json"),
    (b"{", "not_json"),
    (b'{"value": [NaN]}', "not_json"),
    (b"\xef\xbb\xbf{\"value\": []}", "not_json"),
    (b"[" * 100_000 + b"]" * 100_000, "not_json"),
    (b'{"value": [' + b"9" * 5000 + b"]}", "not_json"),
    (b"[]", "no_value"),
    (b"{}", "no_value"),
    (b'{"value": {}}', "no_value"),
    (b'{"value": null}', "no_value"),
    (b'"value"', "no_value"),
    (_items(MAX_ITEMS + 1), "too_many_items"),
])
def test_malformed_body_is_400_with_a_reason(body, detail):
    recorder = Recorder()
    response = post(make_webhook(recorder), body)
    assert response.status == 400
    assert response.json_body()["reason"] == "bad_request"
    assert response.json_body()["detail"] == detail
    assert recorder.batches == []


def test_exactly_max_items_is_202_and_the_drops_are_one_security_line(records):
    recorder = Recorder()
    assert post(make_webhook(recorder), _items(MAX_ITEMS)).status == 202
    assert recorder.messages == []
    [event] = fields(records, "security")       # not one per junk item: anyone may POST them
    assert (event["dropped"], event["reasons"]) == (MAX_ITEMS, {"not_an_object": MAX_ITEMS})


def test_drops_of_several_reasons_are_counted_in_one_line(records):
    junk = [item(clientState="wrong"), item(tenantId=OTHER_TENANT), item(clientState="wrong"), 7]
    assert post(make_webhook(), {"value": junk + [item()]}).status == 202
    [event] = fields(records, "security")
    assert event["reason"] == "bad_client_state" and event["dropped"] == 4
    assert event["reasons"] == {"bad_client_state": 2, "unknown_tenant": 1, "not_an_object": 1}


def test_the_most_items_a_body_can_hold_are_all_accepted():
    # A 400 is not retried by Graph: the item limit must never refuse a batch of
    # acceptable items that fits in the body limit.
    def lifecycle(n: int) -> dict:
        return {"subscriptionId": f"{n:08x}-0000-0000-0000-000000000000", "clientState": STATE,
                "lifecycleEvent": "missed", "tenantId": TENANT}

    each = len(json.dumps(lifecycle(0), separators=(",", ":"))) + 1   # with its comma
    items = [lifecycle(n) for n in range((MAX_BODY - len('{"value":[]}') + 1) // each)]
    assert len(json.dumps({"value": items}, separators=(",", ":"))) <= MAX_BODY
    assert len(items) > 1000
    # And the limit is no looser than that: the smallest acceptable items, one more than
    # the limit, no longer fit (junk beyond it is refused, not worked through).
    smallest = {"subscriptionId": "0" * 8 + "-0000-0000-0000-000000000000", "clientState": "",
                "lifecycleEvent": "missed", "tenantId": TENANT}
    assert len(json.dumps({"value": [smallest] * (MAX_ITEMS + 1)}, separators=(",", ":"))) > MAX_BODY
    recorder = Recorder()
    assert post(make_webhook(recorder), json.dumps({"value": items}, separators=(",", ":")).encode()).status == 202
    assert sorted(m.subscription for m in recorder.messages) == sorted(i["subscriptionId"] for i in items)


@pytest.mark.parametrize("method, path, status", [("POST", "/other", 404), ("GET", "/", 405), ("PUT", "/lifecycle", 405)])
def test_other_paths_and_methods(method, path, status):
    response = make_webhook().handle(HttpRequest(method, path, {}, {}, b""))
    assert response.status == status
    if status == 405:   # RFC 9110 §15.5.6
        assert response.headers["Allow"] == "POST"


def test_empty_value_list_is_accepted():
    recorder = Recorder()
    assert post(make_webhook(recorder), {"value": []}).status == 202
    assert recorder.batches == []


# --- Graph's payload shapes ------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(p.name.removesuffix(".graph.json") for p in GOLDEN.glob("*.graph.json")))
def test_golden_payloads_are_published(case, records):
    recorder = Recorder()
    path = "/lifecycle" if case.startswith("lifecycle") else "/"
    response = post(make_webhook(recorder), golden(case), path)
    assert response.status == 202
    assert [m.to_dict() for m in recorder.messages] == golden_messages(case)
    assert len(recorder.batches) == 1  # one publish per POST, confirmed before the 202
    logged = [f["message_id"] for f in fields(records, "membership_notification") + fields(records, "lifecycle_notification")]
    assert sorted(logged) == sorted(m.id for m in recorder.messages)
    # Each change's line says whom it adds and removes (CONTRACT §9).
    changes = {m.id: m for m in recorder.messages if m.kind == "membership"}
    assert [(f["added"], f["removed"]) for f in fields(records, "membership_notification")] == [
        (list(changes[f["message_id"]].added), list(changes[f["message_id"]].removed))
        for f in fields(records, "membership_notification")]


def test_lifecycle_item_on_the_notification_url_is_a_lifecycle_event():
    recorder = Recorder()
    assert post(make_webhook(recorder), golden("lifecycle_reauthorization_required"), "/").status == 202
    assert [m.kind for m in recorder.messages] == ["lifecycle"]


def test_either_configured_client_state_is_accepted():
    recorder = Recorder()
    body = {"value": [item(clientState=STATE), item(clientState=OLD_STATE, subscriptionId="5c1b6e6a-3f0e-4e55-9a1c-0c6c3a0f2b7d")]}
    assert post(make_webhook(recorder), body).status == 202
    assert len(recorder.messages) == 2


def test_the_same_notification_twice_is_published_once_with_a_stable_id():
    recorder = Recorder()
    webhook = make_webhook(recorder)
    assert post(webhook, {"value": [item(), item()]}).status == 202
    assert post(webhook, {"value": [item()]}).status == 202
    assert [len(b) for b in recorder.batches] == [1, 1]
    assert recorder.batches[0][0].id == recorder.batches[1][0].id


USER = "4d147cc8-10cb-4158-ac52-90ee8ff9d846"


def bare_change(removed: bool = False, **resource_data) -> dict:
    """One member change of USER with none of Graph's identifying fields (id, sequence
    number, event time) but those given."""
    entry = {"@odata.type": "#microsoft.graph.user", "id": USER, **({"@removed": "deleted"} if removed else {})}
    base = item()
    data = {k: v for k, v in base["resourceData"].items() if k not in ("sequenceNumber", "eventTime")}
    return {**{k: v for k, v in base.items() if k != "id"},
            "resourceData": {**data, "members@delta": [entry], **resource_data}}


def test_a_user_removed_added_and_removed_again_in_one_post_ends_removed():
    # Without Graph's id, sequence number or event time the two removals share an id:
    # one is kept, at its last place, after the addition.
    recorder = Recorder()
    body = {"value": [bare_change(removed=True), bare_change(), bare_change(removed=True)]}
    assert post(make_webhook(recorder), body).status == 202
    assert [(m.added, m.removed) for m in recorder.messages] == [((USER,), ()), ((), (USER,))]


def test_changes_told_apart_by_graph_s_event_time_alone_are_each_published():
    recorder = Recorder()
    body = {"value": [bare_change(eventTime=f"2024-05-01T12:00:0{i}Z") for i in range(2)]}
    assert post(make_webhook(recorder), body).status == 202
    assert len(recorder.messages) == 2


# --- per-item checks: dropped, logged, never published ----------------------------------

DROPS = [
    ("wrong client state", "not-the-state", "bad_client_state"),
    ("client state prefix", STATE[:-1], "bad_client_state"),
    ("client state longer", STATE + "x", "bad_client_state"),
    ("client state case", STATE.upper(), "bad_client_state"),
    ("no client state", None, "bad_client_state"),
    ("client state not a string", 42, "bad_client_state"),
    ("non-ASCII client state", "ümlaut\ud800", "bad_client_state"),
]


@pytest.mark.parametrize("name, state, reason", DROPS, ids=[d[0] for d in DROPS])
def test_bad_client_state_is_dropped_and_logged(name, state, reason, records):
    recorder = Recorder()
    bad = item(clientState=state) if state is not None else {k: v for k, v in item().items() if k != "clientState"}
    good = item(subscriptionId="5c1b6e6a-3f0e-4e55-9a1c-0c6c3a0f2b7d")
    assert post(make_webhook(recorder), {"value": [bad, good]}).status == 202
    assert [m.subscription for m in recorder.messages] == ["5c1b6e6a-3f0e-4e55-9a1c-0c6c3a0f2b7d"]
    [event] = fields(records, "security")
    assert event["reason"] == reason
    assert [r.levelname for r in records if getattr(r, "json_fields", {}).get("event") == "security"] == ["WARNING"]
    assert event["tenant"] == TENANT and event["subscription"] == "092ba742-89d2-4417-a4c7-c120db062842"
    logged = json.dumps([r.json_fields for r in records if hasattr(r, "json_fields")])
    assert STATE not in logged and "not-the-state" not in logged


@pytest.mark.parametrize("path", ["/lifecycle", "/"])
@pytest.mark.parametrize("state", ["forged", None])
def test_a_lifecycle_notification_without_the_client_state_is_never_published(path, state, records):
    # A forged "subscriptionRemoved" or "missed" would make policy_sync read groups at
    # will: lifecycle items pass the same check as changes.
    lifecycle = golden("lifecycle_reauthorization_required")["value"][0]
    forged = {k: v for k, v in lifecycle.items() if k != "clientState"}
    if state is not None:
        forged["clientState"] = state
    recorder = Recorder()
    webhook = make_webhook(recorder)
    assert post(webhook, {"value": [forged]}, path).status == 202
    assert recorder.messages == [] and [e["reason"] for e in fields(records, "security")] == ["bad_client_state"]
    assert post(webhook, {"value": [lifecycle]}, path).status == 202
    assert [m.kind for m in recorder.messages] == ["lifecycle"]


def test_every_configured_client_state_is_compared_in_constant_time(monkeypatch):
    # A timing test would be noise; the comparison itself is what keeps the secret's
    # prefix from showing in the answer time (and every state is compared, not the first match).
    import aadrun.webhook

    compared = []
    real = aadrun.webhook.hmac.compare_digest
    monkeypatch.setattr(aadrun.webhook.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    recorder = Recorder()
    assert post(make_webhook(recorder), {"value": [item(clientState=STATE)]}).status == 202
    assert compared == [(STATE.encode(), STATE.encode()), (STATE.encode(), OLD_STATE.encode())]
    assert len(recorder.messages) == 1


ITEM_DROPS = [
    ("unknown tenant", dict(tenantId=OTHER_TENANT), "unknown_tenant"),
    ("tenant not a GUID", dict(tenantId="contoso.onmicrosoft.com"), "bad_tenant"),
    ("tenant with newline", dict(tenantId=TENANT + "\n"), "bad_tenant"),
    ("no tenant", dict(tenantId=None), "bad_tenant"),
    ("subscription not a GUID", dict(subscriptionId="sub-1"), "bad_subscription"),
    ("no subscription", dict(subscriptionId=None), "bad_subscription"),
    ("resource not a string", dict(resource=["Groups/x"]), "bad_resource"),
    ("resource empty", dict(resource=""), "bad_resource"),
    ("resource with control characters", dict(resource="Groups/\x00"), "bad_resource"),
    ("resource too long", dict(resource="Groups/" + "a" * 3000), "bad_resource"),
    ("change type not a string", dict(changeType=1), "bad_change_type"),
    ("lifecycle event not a string", dict(lifecycleEvent=["missed"]), "bad_lifecycle_event"),
]


@pytest.mark.parametrize("name, changes, reason", ITEM_DROPS, ids=[d[0] for d in ITEM_DROPS])
def test_malformed_or_foreign_item_is_dropped_and_the_rest_goes_on(name, changes, reason, records):
    recorder = Recorder()
    good = item(subscriptionId="5c1b6e6a-3f0e-4e55-9a1c-0c6c3a0f2b7d")
    assert post(make_webhook(recorder), {"value": [item(**changes), good]}).status == 202
    assert [m.subscription for m in recorder.messages] == ["5c1b6e6a-3f0e-4e55-9a1c-0c6c3a0f2b7d"]
    assert [e["reason"] for e in fields(records, "security")] == [reason]


@pytest.mark.parametrize("value", [None, 1, "text", [], [{"a": 1}]])
def test_item_that_is_not_an_object_is_dropped(value, records):
    recorder = Recorder()
    assert post(make_webhook(recorder), {"value": [value]}).status == 202
    assert recorder.batches == []
    assert [e["reason"] for e in fields(records, "security")] == ["not_an_object"]


def test_all_items_dropped_is_still_202():
    recorder = Recorder()
    body = {"value": [item(clientState="x"), item(tenantId=OTHER_TENANT)]}
    assert post(make_webhook(recorder), body).status == 202
    assert recorder.batches == []


@pytest.mark.parametrize("changes, reason", [
    (dict(resource="Users/4d147cc8-10cb-4158-ac52-90ee8ff9d846"), "not_a_group"),
    (dict(resource="/groups"), "not_a_group"),
    (dict(changeType="renamed"), "unknown_change_type"),
    (dict(lifecycleEvent="somethingNew"), "unknown_lifecycle_event"),
    # A nested group and a device joined: aadrun grants users only, so no read is owed.
    (dict(resourceData={"id": "aaaaaaaa-0000-0000-0000-000000000001", "members@delta": [
        {"@odata.type": "#microsoft.graph.group", "id": "aaaaaaaa-0000-0000-0000-0000000000a1"},
        {"@odata.type": "#microsoft.graph.device", "id": "dddddddd-0000-0000-0000-0000000000d1",
         "@removed": "deleted"}]}), "no_user_member"),
])
def test_items_aadrun_does_not_handle_are_ignored_with_202(changes, reason, records):
    recorder = Recorder()
    assert post(make_webhook(recorder), {"value": [item(**changes)]}).status == 202
    assert recorder.batches == []
    assert [e["reason"] for e in fields(records, "notification_ignored")] == [reason]
    assert fields(records, "security") == []


def test_unreadable_members_delta_becomes_a_reread():
    recorder = Recorder()
    data = {**item()["resourceData"], "members@delta": [{"id": "not-a-guid"}]}
    assert post(make_webhook(recorder), {"value": [item(resourceData=data)]}).status == 202
    [message] = recorder.messages
    assert message.reread


# --- failures: 503 so that Graph retries; never a 500 ---------------------------------------

def test_publish_failure_is_503_unavailable():
    recorder = Recorder(error=RuntimeError("store down"))
    response = post(make_webhook(recorder), golden("members_added"))
    assert response.status == 503
    assert response.json_body() == {"reason": "unavailable"}


def test_a_failing_local_policy_sync_on_the_worker_pool_is_503_unavailable():
    bus = LocalBus(Recorder(error=RuntimeError("store down")), timeout=1.0)
    try:
        response = post(make_webhook(bus_getter=lambda: bus), golden("members_added"))
    finally:
        bus.close()
    assert (response.status, response.json_body()) == (503, {"reason": "unavailable"})


@pytest.mark.parametrize("failure, severity", [
    (Deferred("group g: Graph does not show 1 notified change(s) yet"), "WARNING"),   # aadrun's refusal
    (Unavailable("3 of 3 ordering keys not confirmed"), "ERROR"),                      # Pub/Sub, the store...
    (RuntimeError("bug"), "ERROR"),                                                   # wrapped by the bus
])
def test_a_503_from_the_local_policy_sync_is_a_warning_only_when_aadrun_chose_it(records, failure, severity):
    bus = LocalBus(Recorder(error=failure), timeout=1.0)
    try:
        response = post(make_webhook(bus_getter=lambda: bus), golden("members_added"))
    finally:
        bus.close()
    assert response.status == 503
    [logged] = [r for r in records if getattr(r, "json_fields", {}).get("event") == "webhook_error"]
    assert (logged.json_fields["reason"], logged.levelname) == ("unavailable", severity)


def test_a_slow_local_policy_sync_gets_503_at_the_deadline_and_still_finishes():
    release, handled = threading.Event(), []

    def slow(messages):
        release.wait(10)
        handled.append(messages)

    bus = LocalBus(slow, timeout=0.3, workers=1)
    webhook = make_webhook(bus_getter=lambda: bus)
    try:
        for _ in range(2):   # the second finds the only worker busy: it fails, it does not queue
            started = time.monotonic()
            response = post(webhook, golden("members_added"))
            assert (response.status, response.json_body()["reason"]) == (503, "unavailable")
            assert 0.3 <= time.monotonic() - started < 1.5
        release.set()
    finally:
        bus.close()
    assert len(handled) == 1   # the first, finished after its 503; Graph's retry would be idempotent


def test_the_publish_deadline_counts_from_the_request_not_from_the_publish():
    # Reading and checking a large POST takes time of its own (here a slow policy read):
    # the answer still comes within the publish timeout of the request's start, well
    # inside Graph's 3 s, not that much later.
    release = threading.Event()
    bus = LocalBus(lambda messages: release.wait(10), timeout=1.0)

    def slow_policy():
        time.sleep(0.8)
        return POLICY

    webhook = make_webhook(policy_getter=slow_policy, bus_getter=lambda: bus)
    try:
        started = time.monotonic()
        response = post(webhook, golden("members_added"))
        took = time.monotonic() - started
    finally:
        release.set()
        bus.close()
    assert response.status == 503 and 1.0 <= took < 1.5


def test_policy_that_cannot_load_is_503_not_configured():
    def broken():
        raise PolicyError("invalid YAML", file="policies/x.yaml", line=3)
    response = post(make_webhook(policy_getter=broken), golden("members_added"))
    assert response.status == 503
    assert response.json_body()["reason"] == "not_configured"


def test_unexpected_error_is_503_without_a_stack_trace(records):
    def broken_bus():
        raise KeyError(f"clientState={STATE}")   # the text of an unexpected error may hold anything
    response = post(make_webhook(bus_getter=broken_bus), golden("members_added"))
    assert response.status == 503
    assert STATE.encode() not in response.body and b"Traceback" not in response.body
    [logged] = fields(records, "webhook_error")
    assert logged["error"] == "KeyError" and STATE not in json.dumps(logged)   # its class only


def test_a_body_cut_short_is_a_400_even_when_what_arrived_parses():
    response = post(make_webhook(), golden("members_added"), incomplete=True)
    answer = response.json_body()
    assert (response.status, answer["reason"], answer["detail"]) == (400, "bad_request", "incomplete_body")
    assert "before its declared length" in answer["message"]


def test_nothing_to_publish_needs_no_bus():
    def no_bus():
        raise AssertionError("the bus must not be opened")
    assert post(make_webhook(bus_getter=no_bus), {"value": [item(clientState="wrong")]}).status == 202


# --- fuzz ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)
graph_keys = st.sampled_from(["changeType", "resource", "resourceData", "subscriptionId", "tenantId",
                              "organizationId", "lifecycleEvent", "subscriptionExpirationDateTime", "id"])
# Values that get an item past the early checks, so the fuzz reaches message building.
plausible = st.sampled_from([
    TENANT, "092ba742-89d2-4417-a4c7-c120db062842", "Groups/aaaaaaaa-0000-0000-0000-000000000001", "updated",
    "deleted", "missed", "reauthorizationRequired",
    {"members@delta": [{"id": "4d147cc8-10cb-4158-ac52-90ee8ff9d846"},
                       {"id": "e8a3f0a6-6b1e-4c1f-9d6a-2c4b8f7e9a10", "@removed": "deleted"}]},
    {"members@delta": [{"id": "4d147cc8-10cb-4158-ac52-90ee8ff9d846", "@removed": {"reason": "deleted"}}]},
])
any_items = st.dictionaries(graph_keys, json_values | plausible, max_size=9)
forged_items = any_items.flatmap(
    lambda d: st.text(max_size=30).filter(lambda s: s not in (STATE, OLD_STATE)).map(
        lambda state: {**d, "clientState": state}))
fuzz = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(body=st.binary(max_size=2048) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_random_bodies_only_get_202_400_413(body):
    recorder = Recorder()
    response = post(make_webhook(recorder), body)
    assert response.status in (202, 400, 413)
    assert recorder.batches == [] or response.status == 202


@fuzz
@given(items=st.lists(forged_items | json_values, max_size=6), extra=st.dictionaries(st.text(max_size=5), json_values,
                                                                                      max_size=2))
def test_fuzz_items_with_a_bad_client_state_are_never_published(items, extra):
    recorder = Recorder()
    response = post(make_webhook(recorder), {**extra, "value": items})
    assert response.status in (202, 400)
    assert recorder.batches == []


@fuzz
@given(items=st.lists(any_items.map(lambda d: {**d, "clientState": STATE}), max_size=6))
def test_fuzz_authentic_items_of_any_shape_never_fail_the_request(items):
    recorder = Recorder()
    response = post(make_webhook(recorder), {"value": items})
    assert response.status == 202
    for message in recorder.messages:
        assert message.tenant == TENANT
        assert from_json(message.to_json()) == message
