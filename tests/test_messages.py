"""messages: Graph notification -> versioned message (golden files), dedupe ids, schema.

Golden pairs live in tests/golden/: ``NAME.graph.json`` is a POST body as Microsoft
Graph sends it, ``NAME.messages.json`` the messages it must become. Set
AADRUN_UPDATE_GOLDEN=1 to rewrite the expected files after a deliberate schema change.
"""
from __future__ import annotations

import base64
import copy
import json
import os
import random
from pathlib import Path

import pytest

from aadrun.errors import RequestError
from aadrun.messages import (MAX_LISTED_MEMBERS, SCHEMA, LifecycleEvent, MembershipChange, from_dict, from_json,
                             group_of, lifecycle_from_graph, members_delta, membership_from_graph,
                             only_other_members)

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.name.removesuffix(".graph.json") for p in GOLDEN.glob("*.graph.json"))
RECEIVED_AT = "2024-05-01T12:00:00.000Z"
TENANT = "11111111-1111-1111-1111-111111111111"
GROUP = "aaaaaaaa-0000-0000-0000-000000000001"
USER = "4d147cc8-10cb-4158-ac52-90ee8ff9d846"


def graph_items(case: str) -> list[dict]:
    return json.loads((GOLDEN / f"{case}.graph.json").read_text())["value"]


def convert(item: dict, received_at: str = RECEIVED_AT):
    """What the webhook makes of an item that passed its checks."""
    tenant = (item.get("tenantId") or item["organizationId"]).lower()
    if "lifecycleEvent" in item:
        return lifecycle_from_graph(item, tenant, received_at)
    return membership_from_graph(item, tenant, received_at)


def test_every_required_shape_has_a_golden_file():
    assert {"members_added", "members_removed_string", "members_removed_object", "no_members_delta",
            "lifecycle_reauthorization_required", "several_subscriptions"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_graph_payload_becomes_golden_messages(case):
    got = [convert(item).to_dict() for item in graph_items(case)]
    expected_path = GOLDEN / f"{case}.messages.json"
    if os.environ.get("AADRUN_UPDATE_GOLDEN"):
        expected_path.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    assert got == json.loads(expected_path.read_text())


@pytest.mark.parametrize("case", CASES)
def test_golden_messages_round_trip_through_json(case):
    for item in graph_items(case):
        message = convert(item)
        assert from_json(message.to_json()) == message
        assert json.loads(message.to_json())["schema"] == SCHEMA


def test_removed_as_string_and_as_object_are_the_same_change():
    as_string = convert(graph_items("members_removed_string")[0])
    as_object = convert(graph_items("members_removed_object")[0])
    assert as_string.removed == as_object.removed == (USER,)
    assert as_string.added == as_object.added == ()
    assert as_string.id == as_object.id


def test_no_members_delta_means_reread_the_group():
    message = convert(graph_items("no_members_delta")[0])
    assert isinstance(message, MembershipChange)
    assert message.reread and message.added == message.removed == ()


@pytest.mark.parametrize("listed", [MAX_LISTED_MEMBERS, MAX_LISTED_MEMBERS + 1])
def test_a_change_naming_more_members_than_an_event_holds_is_a_reread(listed):
    # Eventarc refuses events over 512 KB: such a message would never reach policy_sync.
    item = copy.deepcopy(graph_items("members_added")[0])
    item["resourceData"]["members@delta"] = [
        {"@odata.type": "#microsoft.graph.user", "id": f"{i:08x}-0000-4000-8000-000000000000",
         **({"@removed": "deleted"} if i % 3 == 0 else {})} for i in range(listed)]
    message = convert(item)
    assert message.reread is (listed > MAX_LISTED_MEMBERS)
    assert len(message.added) + len(message.removed) in (0, listed)
    event_data = {"message": {"data": base64.b64encode(message.to_json()).decode(), "messageId": "1" * 16,
                              "publishTime": RECEIVED_AT, "orderingKey": message.ordering_key,
                              "attributes": message.attributes},
                  "subscription": "projects/my-project/subscriptions/eventarc-policy-sync"}
    assert len(json.dumps(event_data)) < 512 * 1024


def test_redelivery_gets_the_same_id():
    item = graph_items("members_added")[0]
    first = convert(item, "2024-05-01T12:00:00.000Z")
    again = convert(copy.deepcopy(item), "2024-05-01T13:30:00.000Z")
    assert first.id == again.id
    assert first.received_at != again.received_at


def test_member_order_does_not_change_the_id():
    item = graph_items("members_added_and_removed")[0]
    shuffled = copy.deepcopy(item)
    random.Random(7).shuffle(shuffled["resourceData"]["members@delta"])
    shuffled["resourceData"]["members@delta"].reverse()
    assert convert(item).id == convert(shuffled).id


def _changed(path: tuple, value):
    item = copy.deepcopy(graph_items("members_added")[0])
    target = item
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return item


@pytest.mark.parametrize("path, value", [
    (("subscriptionId",), "5c1b6e6a-3f0e-4e55-9a1c-0c6c3a0f2b7d"),
    (("resource",), "Groups/aaaaaaaa-0000-0000-0000-000000000002"),
    (("changeType",), "deleted"),
    (("resourceData", "members@delta"), [{"id": USER}]),
    (("resourceData", "members@delta"), [{"id": USER, "@removed": "deleted"}]),
    (("subscriptionExpirationDateTime",), "2024-05-04T11:00:00+00:00"),
    (("resourceData", "sequenceNumber"), 638500000000000001),
    (("id",), "notification-2"),
])
def test_different_content_gets_a_different_id(path, value):
    original = convert(graph_items("members_added")[0])
    assert convert(_changed(path, value)).id != original.id


def test_lifecycle_events_differ_by_event_and_subscription():
    item = graph_items("lifecycle_reauthorization_required")[0]
    base = convert(item)
    assert isinstance(base, LifecycleEvent) and base.event == "reauthorizationRequired"
    assert convert({**item, "lifecycleEvent": "missed"}).id != base.id
    assert convert({**item, "subscriptionId": "5c1b6e6a-3f0e-4e55-9a1c-0c6c3a0f2b7d"}).id != base.id


def test_ordering_keys_and_attributes():
    change = convert(graph_items("members_added")[0])
    assert change.ordering_key == f"{TENANT}/{GROUP}"
    assert change.attributes == {"kind": "membership", "tenant": TENANT, "group": GROUP}
    event = convert(graph_items("lifecycle_reauthorization_required")[0])
    assert event.ordering_key == TENANT
    assert event.attributes == {"kind": "lifecycle", "tenant": TENANT}
    # CONTRACT §5: the group too, where there is one.
    of_group = convert({**graph_items("lifecycle_reauthorization_required")[0], "resource": f"/groups/{GROUP.upper()}"})
    assert of_group.attributes == {"kind": "lifecycle", "tenant": TENANT, "group": GROUP}


def test_ids_in_upper_case_are_read_in_lower_case_as_the_store_keeps_them():
    # Read before any JSON round trip: the in-process bus hands these messages on as they are.
    assert members_delta({"members@delta": [{"id": USER.upper()}, {"id": GROUP.upper(), "@removed": {}}]}) == (
        (USER,), (GROUP,))
    event = from_dict({**convert(graph_items("lifecycle_reauthorization_required")[0]).to_dict(),
                       "group": GROUP.upper()})
    assert event.group == GROUP


@pytest.mark.parametrize("resource, group", [
    ("Groups/AAAAAAAA-0000-0000-0000-000000000001", GROUP),
    ("groups/aaaaaaaa-0000-0000-0000-000000000001", GROUP),
    ("/groups/aaaaaaaa-0000-0000-0000-000000000001", GROUP),
    ("/groups/aaaaaaaa-0000-0000-0000-000000000001/members", GROUP),
    ("GROUPS/aaaaaaaa-0000-0000-0000-000000000001/Members", GROUP),
    ("/groups", None),
    ("/users/aaaaaaaa-0000-0000-0000-000000000001", None),
    ("groups/not-a-guid", None),
    ("groups/aaaaaaaa-0000-0000-0000-000000000001/owners", None),
    ("groups/aaaaaaaa-0000-0000-0000-000000000001\n", None),
    (None, None),
    (42, None),
])
def test_group_of_resource(resource, group):
    assert group_of(resource) == group


@pytest.mark.parametrize("members", [
    "not a list",
    [{"id": "not-a-guid"}],
    [{"id": USER}, "string entry"],
    [{"@removed": "deleted"}],
])
def test_unreadable_members_delta_is_none(members):
    assert members_delta({"members@delta": members}) is None


def test_members_that_are_not_users_are_left_out():
    group, device = "aaaaaaaa-0000-0000-0000-0000000000a1", "dddddddd-0000-0000-0000-0000000000d1"
    gone = "0b0b0000-0000-0000-0000-000000000002"
    members = [{"@odata.type": "#microsoft.graph.group", "id": group},
               {"@odata.type": "#microsoft.graph.device", "id": device, "@removed": "deleted"},
               {"@odata.type": "#Microsoft.Graph.User", "id": USER}, {"id": gone, "@removed": "deleted"}]
    assert members_delta({"members@delta": members}) == ((USER.lower(),), (gone,))
    # Only other members: nothing for aadrun to do (graph_webhook ignores it); an empty
    # or absent list still means "re-read the group".
    assert members_delta({"members@delta": members[:2]}) == ((), ())
    assert only_other_members({"members@delta": members[:2]})
    assert not only_other_members({"members@delta": members}) and not only_other_members({"members@delta": []})
    assert not only_other_members({})


def _valid() -> dict:
    return convert(graph_items("members_added")[0]).to_dict()


@pytest.mark.parametrize("change", [
    {"schema": 2},
    {"schema": True},
    {"kind": "other"},
    {"id": ""},
    {"id": "a/b"},          # cannot name a store document
    {"id": "__x__"},
    {"id": "x" * 129},
    {"id": 7},
    {"tenant": "not-a-guid"},
    {"group": None},
    {"added": "4d147cc8-10cb-4158-ac52-90ee8ff9d846"},
    {"removed": [1]},
    {"subscription": ""},
    {"received_at": "yesterday"},
    {"received_at": "2024-05-01T12:00:00"},
    {"change_type": "renamed"},
])
def test_from_dict_rejects_a_bad_message(change):
    with pytest.raises(RequestError):
        from_dict({**_valid(), **change})


def test_a_message_with_exactly_the_contract_fields_is_read():
    # CONTRACT.md §5 names no change_type and pins no id format: another producer's
    # message is read as it is, its change type the one aadrun subscribes to.
    message = {k: v for k, v in _valid().items() if k != "change_type"}
    message["id"] = "producer-7:msg.42"
    read = from_dict(message)
    assert (read.id, read.change_type, read.added) == ("producer-7:msg.42", "updated", tuple(message["added"]))


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"null", b"\xff\xfe", b"[" * 100_000])
def test_from_json_rejects_what_is_not_a_message(data):
    with pytest.raises(RequestError):
        from_json(data)


def test_from_json_rejects_a_lifecycle_event_it_does_not_know():
    event = convert(graph_items("lifecycle_reauthorization_required")[0]).to_dict()
    with pytest.raises(RequestError):
        from_dict({**event, "event": "somethingElse"})


def test_a_removal_spelled_in_upper_case_is_the_stored_lower_case_id():
    # The policy's ids are lower case: an upper-case tenant would make the change "not referenced".
    tenant, subscription = "abcdef00-1111-2222-3333-444444444444", "fedcba00-5555-6666-7777-888888888888"
    message = from_dict({"schema": SCHEMA, "id": "x1", "kind": "membership", "tenant": tenant.upper(),
                         "group": GROUP.upper(), "added": [], "removed": [USER.upper()],
                         "subscription": subscription.upper(), "received_at": "2024-05-01T12:00:00Z"})
    assert (message.tenant, message.group, message.removed, message.subscription) == (
        tenant, GROUP, (USER,), subscription)
