"""Messages on the changes topic: the schema, Graph notification -> message, and back.

Schema version 1 (CONTRACT.md §5). Every message is one JSON object (UTF-8):

    field         type                 membership            lifecycle
    schema        int                  1                     1
    id            str (64 hex: ours)   dedupe key            dedupe key
    kind          str                  "membership"          "lifecycle"
    tenant        str (GUID, lower)    Entra tenant id       Entra tenant id
    group         str | null (GUID)    the group             the group when Graph names one
    added         [str] (GUID)         user object ids       (absent)
    removed       [str] (GUID)         user object ids       (absent)
    change_type   str                  Graph's changeType    (absent)   (optional on input)
    subscription  str (GUID, lower)    Graph subscription    Graph subscription
    received_at   str (RFC 3339, UTC)  when the webhook got it
    event         str                  (absent)              reauthorizationRequired |
                                                             subscriptionRemoved | missed

A membership message with ``added`` and ``removed`` both empty means "this group
changed: re-read it" (a notification without ``members@delta``, a deleted group,
or member entries that could not be read). Pub/Sub attributes: ``kind``,
``tenant`` and ``group`` where there is one; ordering key ``tenant/group``
(``tenant`` for lifecycle).

``id`` is the SHA-256 of the canonical JSON of the notification's content (kind,
subscription, tenant, group, change type, sorted members or lifecycle event, and
Graph's own identifying fields when present), never of ``received_at``: Graph's
redelivery of a notification gets the same ``id``. Two genuinely distinct changes
with identical content (a user removed, re-added and removed again within one
subscription period) can share an ``id``, so consumers should use it to skip
redeliveries of work that is not idempotent, and apply removals regardless.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from .errors import RequestError

SCHEMA = 1
GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# Group resources as Graph names them: "Groups/{id}" in notifications, "/groups/{id}"
# and "/groups/{id}/members" in subscriptions (learn.microsoft.com/graph/api/resources/subscription).
GROUP_RESOURCE = re.compile(r"/?groups/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?:/members)?/?",
                            re.IGNORECASE)
CHANGE_TYPES = ("created", "updated", "deleted")
USER_TYPE = "#microsoft.graph.user"   # the members aadrun grants; groups, devices... never
# Eventarc delivers events of at most 512 KB (cloud.google.com/eventarc/docs/quotas),
# the message base64-encoded inside: a change naming more members than this is
# published as "re-read the group", which always fits (a GUID listed takes 39 bytes).
MAX_LISTED_MEMBERS = 5000
LIFECYCLE_EVENTS = ("reauthorizationRequired", "subscriptionRemoved", "missed")
# Graph's own fields that tell one notification from another (changeNotification
# resource: "id" is documented as optional); identical on redelivery.
_IDENTITY_FIELDS = ("id", "subscriptionExpirationDateTime")
_RESOURCE_IDENTITY_FIELDS = ("sequenceNumber", "eventTime")


def is_guid(value: Any) -> bool:
    # fullmatch: "$" would also accept a trailing newline.
    return isinstance(value, str) and GUID.fullmatch(value) is not None


def group_of(resource: Any) -> str | None:
    """The group id (lower case) of a group resource, else None."""
    if not isinstance(resource, str):
        return None
    match = GROUP_RESOURCE.fullmatch(resource)
    return match.group(1).lower() if match else None


def rfc3339(moment: dt.datetime) -> str:
    """UTC, millisecond precision, ``Z`` suffix."""
    return moment.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def canonical(obj: Any) -> bytes:
    """Sorted keys, no spaces, ASCII only (so any string Graph sends, even a lone
    surrogate, serialises): the same content always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def dedupe_id(content: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(content)).hexdigest()


@dataclasses.dataclass(frozen=True)
class MembershipChange:
    """Members added to or removed from one group (both empty: re-read the group)."""

    kind: ClassVar[str] = "membership"
    id: str
    tenant: str
    group: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    subscription: str
    received_at: str
    change_type: str = "updated"

    @property
    def reread(self) -> bool:
        """True when the notification carried no member changes to apply."""
        return not self.added and not self.removed

    @property
    def ordering_key(self) -> str:
        return f"{self.tenant}/{self.group}"

    @property
    def attributes(self) -> dict[str, str]:
        return {"kind": self.kind, "tenant": self.tenant, "group": self.group}

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "id": self.id, "kind": self.kind, "tenant": self.tenant, "group": self.group,
                "added": list(self.added), "removed": list(self.removed), "change_type": self.change_type,
                "subscription": self.subscription, "received_at": self.received_at}

    def to_json(self) -> bytes:
        return canonical(self.to_dict())


@dataclasses.dataclass(frozen=True)
class LifecycleEvent:
    """A Graph lifecycle notification about one subscription."""

    kind: ClassVar[str] = "lifecycle"
    id: str
    tenant: str
    group: str | None
    subscription: str
    event: str
    received_at: str

    @property
    def ordering_key(self) -> str:
        return self.tenant

    @property
    def attributes(self) -> dict[str, str]:
        attrs = {"kind": self.kind, "tenant": self.tenant}
        if self.group:
            attrs["group"] = self.group
        return attrs

    def to_dict(self) -> dict[str, Any]:
        # added/removed are always empty here; present so both kinds share one shape (CONTRACT §5).
        return {"schema": SCHEMA, "id": self.id, "kind": self.kind, "tenant": self.tenant, "group": self.group,
                "added": [], "removed": [], "subscription": self.subscription, "event": self.event,
                "received_at": self.received_at}

    def to_json(self) -> bytes:
        return canonical(self.to_dict())


Message = MembershipChange | LifecycleEvent


# --- Graph notification -> message ----------------------------------------------

def _identity(item: Mapping[str, Any]) -> dict[str, Any]:
    out = {f: item[f] for f in _IDENTITY_FIELDS if isinstance(item.get(f), (str, int))}
    data = item.get("resourceData")
    if isinstance(data, Mapping):
        out.update({f: data[f] for f in _RESOURCE_IDENTITY_FIELDS if isinstance(data.get(f), (str, int))})
    return out


def members_delta(data: Any) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(added, removed) from ``resourceData["members@delta"]``, sorted and lower case.

    An entry with ``"@removed"`` is a removal whatever its value: a string
    (``"deleted"``, as webhooks send it) or an object (``{"reason": "deleted"}``, as
    delta query does). Members of another type (``@odata.type`` a group, service
    principal, device: never granted) are left out. None when the list is absent or
    any entry is unreadable, which the caller turns into "re-read the group".
    """
    entries = data.get("members@delta") if isinstance(data, Mapping) else None
    if not isinstance(entries, list):
        return None
    added: set[str] = set()
    removed: set[str] = set()
    for entry in entries:
        if not isinstance(entry, Mapping) or not is_guid(entry.get("id")):
            return None
        if not _is_user(entry):
            continue
        (removed if "@removed" in entry else added).add(entry["id"].lower())
    return tuple(sorted(added)), tuple(sorted(removed))


def _is_user(entry: Mapping[str, Any]) -> bool:
    return str(entry.get("@odata.type", USER_TYPE)).lower() == USER_TYPE


def only_other_members(data: Any) -> bool:
    """Whether ``resourceData["members@delta"]`` names members and none of them is a
    user: a change aadrun has nothing to do for (it grants users only)."""
    entries = data.get("members@delta") if isinstance(data, Mapping) else None
    return isinstance(entries, list) and bool(entries) and members_delta(data) == ((), ())


def membership_from_graph(item: Mapping[str, Any], tenant: str, received_at: str) -> MembershipChange:
    """A validated group change notification as a message (the caller checked
    clientState, tenant, subscriptionId, that the resource is a group and
    changeType is one of CHANGE_TYPES)."""
    group = group_of(item["resource"])
    assert group is not None
    delta = members_delta(item.get("resourceData"))
    added, removed = delta if delta is not None else ((), ())
    if len(added) + len(removed) > MAX_LISTED_MEMBERS:
        added, removed = (), ()
    subscription = item["subscriptionId"].lower()
    content = {"kind": "membership", "subscription": subscription, "tenant": tenant, "group": group,
               "change_type": item["changeType"], "added": list(added), "removed": list(removed),
               "graph": _identity(item)}
    return MembershipChange(dedupe_id(content), tenant, group, added, removed, subscription, received_at,
                            item["changeType"])


def lifecycle_from_graph(item: Mapping[str, Any], tenant: str, received_at: str) -> LifecycleEvent:
    """A validated lifecycle notification as a message (event in LIFECYCLE_EVENTS)."""
    subscription = item["subscriptionId"].lower()
    group = group_of(item.get("resource"))
    content = {"kind": "lifecycle", "subscription": subscription, "tenant": tenant, "group": group,
               "event": item["lifecycleEvent"], "graph": _identity(item)}
    return LifecycleEvent(dedupe_id(content), tenant, group, subscription, item["lifecycleEvent"], received_at)


# --- JSON -> message (consumers) -----------------------------------------------

def _field(obj: Mapping[str, Any], name: str, check, what: str):
    value = obj.get(name)
    if not check(value):
        raise RequestError(f"message field {name!r} must be {what}")
    return value


def _guids(value: Any) -> bool:
    return isinstance(value, list) and all(is_guid(v) for v in value)


def _timestamp(value: Any) -> bool:
    try:
        return isinstance(value, str) and dt.datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is not None
    except ValueError:
        return False


_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_COMMON = (
    # Ours are 64 hex digits; another producer's dedupe key is taken as it is, if it can
    # name a store document (no "/", never "." or "__x__").
    ("id", lambda v: isinstance(v, str) and _ID.fullmatch(v) is not None,
     "1-128 letters, digits or _.:- starting with a letter or digit"),
    ("tenant", is_guid, "a GUID"),
    ("subscription", is_guid, "a GUID"),
    ("received_at", _timestamp, "an RFC 3339 time with offset"),
)
_BY_KIND = {
    "membership": (
        ("group", is_guid, "a GUID"),
        ("added", _guids, "a list of GUIDs"),
        ("removed", _guids, "a list of GUIDs"),
        # Not among CONTRACT.md §5's fields: optional, "updated" (what aadrun subscribes to) when absent.
        ("change_type", lambda v: v is None or v in CHANGE_TYPES, f"one of {', '.join(CHANGE_TYPES)}"),
    ),
    "lifecycle": (
        ("group", lambda v: v is None or is_guid(v), "a GUID or null"),
        ("event", lambda v: v in LIFECYCLE_EVENTS, f"one of {', '.join(LIFECYCLE_EVENTS)}"),
    ),
}


def from_dict(obj: Any) -> Message:
    """A message from its decoded JSON; raises RequestError naming the bad field."""
    if not isinstance(obj, Mapping):
        raise RequestError("message must be a JSON object")
    if obj.get("schema") != SCHEMA or isinstance(obj.get("schema"), bool):
        raise RequestError(f"message schema must be {SCHEMA}")
    kind = obj.get("kind")
    if not isinstance(kind, str) or kind not in _BY_KIND:
        raise RequestError(f"message kind must be one of {', '.join(_BY_KIND)}")
    v = {name: _field(obj, name, check, what) for name, check, what in _COMMON + _BY_KIND[kind]}
    lower = {k: v[k].lower() for k in ("tenant", "subscription")}
    if kind == "lifecycle":
        return LifecycleEvent(v["id"], lower["tenant"], v["group"] and v["group"].lower(), lower["subscription"],
                              v["event"], v["received_at"])
    return MembershipChange(v["id"], lower["tenant"], v["group"].lower(),
                            tuple(sorted({a.lower() for a in v["added"]})),
                            tuple(sorted({r.lower() for r in v["removed"]})),
                            lower["subscription"], v["received_at"], v["change_type"] or "updated")


def from_json(data: bytes | str) -> Message:
    """A message from its JSON text; raises RequestError when it is not a valid message."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:  # includes JSONDecodeError and UnicodeDecodeError
        raise RequestError("message is not JSON") from e
    return from_dict(obj)
