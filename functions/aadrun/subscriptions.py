"""Microsoft Graph subscriptions covering every group the policies reference
(CONTRACT.md §5, §6): maintenance's ``subscriptions`` task and ``aadrun subscribe``.

What exists is read from Graph every run (``GET /subscriptions`` is the truth);
aadrun keeps no copy of subscription ids or expirations. Per tenant:

  - ours      subscriptions of this app whose ``notificationUrl`` is
              ``AADRUN_NOTIFICATION_URL`` and whose resource is a group resource;
              the app's other subscriptions are left alone but count against
              Graph's quota of 100 per app and tenant;
  - wanted    ``/groups/{id}`` per referenced group while that fits in the quota,
              else one tenant-wide ``/groups`` (webhook and sync ignore the
              notifications of groups no policy names);
  - actions   create what is wanted and missing (a removed, expired or vanished
              subscription is simply missing), renew what expires within
              ``renew_within``, delete ours that are no longer wanted, after the
              creations so that coverage has no gap when switching shapes.

Graph asks not to reauthorize and renew one subscription within 10 minutes of
each other (learn.microsoft.com/graph/change-notifications-lifecycle-events).
The time of the last of either is kept as a store lease named
``graph-subscription/{id}`` held for 10 minutes by the action's name
(``claim_touch``): a renewal finding a fresh reauthorization (or the reverse) is
deferred, which is safe because renewals start days before expiry and a renewal
also reauthorizes.

Graph never returns a subscription's ``clientState``, so the state each was
created with is kept as a store lease named ``graph-subscription-state/{id}``,
held by the state's fingerprint. A subscription whose state is not the first of
``AADRUN_CLIENT_STATE`` is replaced (deleted, then created: Graph allows one per
resource; the scheduled reconcile covers the moment between). That is how a
rotation completes: with ``NEW,OLD`` configured, every subscription not known to
carry NEW is replaced; OLD can go once that is done. One made before states were
kept is replaced once too: its state is unknown. So is one made for fewer change
types than ``SUBSCRIBED_CHANGES`` (Graph cannot change a subscription's type).

Graph's lifecycle notifications name no resource, so the resource each was
created for is kept the same way, as ``graph-subscription-resource/{id}`` held
by the resource (``subscribed_group``): a group's ``reauthorizationRequired``
then reads that group alone rather than every group of the tenant.

Action names in reports: ``created``, ``exists`` (409 on create), ``renewed``,
``kept``, ``replaced``, ``deferred``, ``deleted``, ``error``, ``unreachable`` (a
tenant naming no group whose subscriptions could not be listed), and ``foreign``:
this app's subscription to the resource notifies another URL (left alone, and a
failure of the run: the resource's changes do not reach this webhook).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Callable, Iterable
from typing import Any

from . import audit
from .config import Settings
from .errors import AadrunError, ConfigError, UpstreamError
from .graph import SUBSCRIBED_CHANGES, GraphClient, SubscriptionExists, max_expiration
from .messages import group_of
from .store import Store, utcnow

# https://learn.microsoft.com/graph/api/resources/subscription (quota per app and tenant)
QUOTA = 100
TENANT_WIDE = "/groups"
RENEW_WITHIN = dt.timedelta(days=3)
TOUCH_WINDOW_S = 600.0
# Longer than a subscription lives between renewals (29 days), which extend it.
STATE_RECORD_TTL_S = 60 * 86400.0


def claim_touch(store: Store, subscription_id: str, action: str) -> bool:
    """Whether ``action`` ("renew" or "reauthorize") may touch the subscription now.

    Claims the 10-minute window for ``action``; False when the other action
    claimed it less than 10 minutes ago. Repeating the same action is allowed.
    """
    return store.acquire_lease(f"graph-subscription/{subscription_id}", action, TOUCH_WINDOW_S)


def release_touch(store: Store, subscription_id: str, action: str) -> None:
    """Give the window back when ``action`` failed: it did not reauthorize anything,
    so the other action must not be deferred by it."""
    store.release_lease(f"graph-subscription/{subscription_id}", action)


def state_fingerprint(client_state: str) -> str:
    """What the store keeps of a client state: enough to tell states apart, not to recover one."""
    return hashlib.sha256(client_state.encode("utf-8")).hexdigest()[:32]


def _state_record(subscription_id: str) -> str:
    return f"graph-subscription-state/{subscription_id}"


def _resource_record(subscription_id: str) -> str:
    return f"graph-subscription-resource/{subscription_id.lower()}"   # lifecycle events carry it lower case


def subscribed_group(store: Store, subscription_id: str) -> str | None:
    """The group a subscription of ours was made for; None for the tenant-wide one,
    and for one whose resource is not recorded (made before resources were kept)."""
    return group_of(store.lease_holder(_resource_record(subscription_id)))


def _record(store: Store, sub: dict, resource: str, client_state: str) -> None:
    """What Graph never tells again: the state ``sub`` carries, and (lifecycle
    notifications name none) its resource. Both live as long as it can."""
    store.acquire_lease(_state_record(sub["id"]), state_fingerprint(client_state), STATE_RECORD_TTL_S)
    store.acquire_lease(_resource_record(sub["id"]), resource, STATE_RECORD_TTL_S)


def resource_key(resource: str) -> str:
    """Graph echoes resources with or without the leading slash, in any case."""
    return "/" + resource.strip().strip("/").lower()


def is_group_resource(resource: object) -> bool:
    return isinstance(resource, str) and resource_key(resource).split("/")[1:2] == ["groups"]


def wanted_resources(groups: Iterable[str], others: int, quota: int = QUOTA) -> list[str]:
    """One resource per group while ``others`` (the app's subscriptions aadrun does not
    own) plus one per group stays within ``quota``; else the tenant-wide one."""
    groups = sorted({g.lower() for g in groups})
    if not groups:
        return []
    if others + len(groups) <= quota:
        return [f"/groups/{g}" for g in groups]
    return [TENANT_WIDE]


def _expiry(sub: dict) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(sub.get("expirationDateTime")).replace("Z", "+00:00"))
    except ValueError:
        return None


def _asks_every_change(sub: dict) -> bool:
    """Whether ``sub`` was made for every change type aadrun needs. Graph cannot
    change a subscription's changeType (PATCH takes the expiry and the URL only)."""
    have = {part.strip().lower() for part in str(sub.get("changeType") or "").split(",")}
    return have >= set(SUBSCRIBED_CHANGES.split(","))


@dataclasses.dataclass
class _Tenant:
    """One tenant's run: its client, what Graph lists, and the actions taken."""

    tenant: str
    graph: GraphClient
    ours: dict[str, dict]
    others: int
    actions: list[dict] = dataclasses.field(default_factory=list)
    gone: set[str] = dataclasses.field(default_factory=set)   # resources whose renewal found it gone

    def report(self, action: str, resource: str, sub: dict | None = None, *, severity: str | None = None,
               **extra) -> None:
        expires = (sub or {}).get("expirationDateTime")
        self.actions.append({"tenant": self.tenant, "resource": resource, "action": action,
                             "subscription": (sub or {}).get("id"), "expires": expires, **extra})
        severity = severity or ("ERROR" if action == "error" else "INFO")
        audit.entry("subscription", f"subscription {action}: {resource}", severity=severity,
                    tenant=self.tenant, resource=resource, action=action, subscription=(sub or {}).get("id"),
                    **extra)


class Subscriptions:
    """Keeps Graph subscriptions in line with the policies, one tenant at a time.

    ``graph_for(tenant)`` gives the tenant's client; ``now`` and ``quota`` are
    injectable for tests. Raises ``ConfigError`` when the notification URL or
    client state is missing; Graph failures are reported per resource.
    """

    def __init__(self, settings: Settings, store: Store, graph_for: Callable[[str], GraphClient], *,
                 now: Callable[[], dt.datetime] = utcnow, quota: int = QUOTA,
                 renew_within: dt.timedelta = RENEW_WITHIN):
        self.settings, self.store, self.graph_for = settings, store, graph_for
        self.now, self.quota, self.renew_within = now, quota, renew_within

    def _config(self) -> tuple[str, str]:
        if not self.settings.notification_url:
            raise ConfigError("AADRUN_NOTIFICATION_URL is required to create subscriptions")
        if not self.settings.client_states:
            raise ConfigError("AADRUN_CLIENT_STATE is required to create subscriptions")
        return self.settings.notification_url, self.settings.client_states[0]

    def ensure(self, referenced: dict[str, set[str]]) -> list[dict]:
        """Create, renew and delete so that each tenant's referenced groups are covered;
        every action taken (or failed) is one entry of the returned list."""
        self._config()
        actions: list[dict] = []
        for tenant in sorted(referenced):
            groups = referenced[tenant]
            try:
                run = self._load(tenant)
            except ConfigError:   # no credentials for Graph at all: the whole task is misconfigured
                raise
            except AadrunError as e:
                # A tenant naming no group may have no consent or credentials for Graph at
                # all: only subscriptions left from an earlier policy could be there.
                action = "error" if groups else "unreachable"
                actions.append({"tenant": tenant, "resource": None, "action": action, "error": str(e)})
                # Logged as every other action is: a scheduler keeps no response body.
                audit.entry("subscription", f"subscription {action}: tenant {tenant} could not be read",
                            severity="ERROR" if groups else "WARNING", tenant=tenant, action=action,
                            error=str(e))
                continue
            # Moving off the tenant-wide subscription, it holds a slot until the
            # per-group ones are all made: at exactly the quota, it stays.
            others = run.others + (TENANT_WIDE in run.ours)
            self._tenant(run, wanted_resources(groups, others, self.quota), groups)
            actions += run.actions
        return actions

    def _load(self, tenant: str) -> _Tenant:
        graph = self.graph_for(tenant)
        url = self._config()[0]
        ours: dict[str, dict] = {}
        others = 0
        for sub in graph.list_subscriptions():
            if sub.get("notificationUrl") != url or not is_group_resource(sub.get("resource")):
                others += 1
                continue
            key = resource_key(sub["resource"])
            # Two of ours for one resource cannot be created (409), but keep the longest-lived.
            if key not in ours or (_expiry(sub) or self.now()) > (_expiry(ours[key]) or self.now()):
                ours[key] = sub
        return _Tenant(tenant, graph, ours, others)

    def _tenant(self, run: _Tenant, wanted: list[str], groups: set[str]) -> None:
        referenced = {f"/groups/{g.lower()}" for g in groups}
        # Ours for groups no policy names go first: nothing takes over from them, and
        # the creates below may need their quota slots.
        for key in sorted(k for k in run.ours if k not in wanted and k != TENANT_WIDE and k not in referenced):
            sub = run.ours.pop(key)
            self._guarded(run, key, lambda s=sub, k=key: self._forget(run, s, k))
        if TENANT_WIDE in wanted and TENANT_WIDE not in run.ours and run.ours and \
                len(run.ours) + run.others >= self.quota:
            # Graph would refuse the tenant-wide subscription while ours fill the quota:
            # free one slot first (an unreferenced group's if any). Until the tenant-wide
            # one exists, only that group waits for the scheduled delta reconcile.
            slot = min(run.ours, key=lambda k: (k in referenced, k))
            if self._guarded(run, slot, lambda: self._forget(run, run.ours[slot], slot, replacing=True)):
                del run.ours[slot]
        covered = {r: self._guarded(run, r, lambda r=r: self._cover(run, r)) for r in wanted}
        for key, sub in sorted(run.ours.items()):
            if key in wanted:
                continue
            # What takes over (the unreferenced are gone already): every group's for the
            # tenant-wide one, the tenant-wide one for a referenced group's.
            replacements = wanted if key == TENANT_WIDE else [r for r in wanted if r == TENANT_WIDE]
            if all(covered[r] for r in replacements):
                self._guarded(run, key, lambda s=sub, k=key: self._forget(run, s, k))
            else:
                # Its replacement is not in place (e.g. the tenant-wide subscription hit
                # the quota): it keeps its groups covered until a later run succeeds.
                run.report("kept", key, sub, reason="its replacement could not be made")

    def _guarded(self, run: _Tenant, resource: str, step: Callable[[], bool | None]) -> bool:
        """Whether ``step`` did its part: it did not fail, nor answer False."""
        try:
            return step() is not False
        except AadrunError as e:
            run.report("error", resource, error=str(e))
            return False

    def _cover(self, run: _Tenant, resource: str) -> bool:
        sub = run.ours.get(resource)
        expires = _expiry(sub) if sub else None
        if sub is not None and (expires is None or expires <= self.now()):
            # Graph deletes expired subscriptions; one still listed cannot be renewed.
            self._forget(run, sub, resource, replacing=True)
            sub = None
        if sub is None:
            return self._create(run, resource)
        elif not _asks_every_change(sub):
            self._forget(run, sub, resource, replacing=True)
            return self._create(run, resource, "replaced", replaced=sub["id"],
                                why=f"it was made for changeType {sub.get('changeType')!r}, not "
                                f"{SUBSCRIBED_CHANGES!r} (by an earlier version): a permanent deletion of "
                                "the group would not be notified")
        elif (recorded := self._recorded_state(sub)) != state_fingerprint(self.settings.client_states[0]):
            self._forget(run, sub, resource, replacing=True)
            return self._create(run, resource, "replaced", replaced=sub["id"],
                                why="its client state is not the first configured" if recorded else
                                "its client state is unknown (made by an earlier version, or recorded in "
                                "another store)")
        elif expires - self.now() < self.renew_within:
            return self._renew(run, resource, sub)
        else:
            run.report("kept", resource, sub)

    def _recorded_state(self, sub: dict) -> str | None:
        """The fingerprint of the client state ``sub`` was created with, if recorded. One
        with no record (made before states were kept) may carry any earlier state: it is
        replaced once, which the scheduled reconcile covers."""
        return self.store.lease_holder(_state_record(sub["id"]))

    def _create(self, run: _Tenant, resource: str, action: str = "created", *, adopt: bool = True,
                **extra) -> bool:
        """Create a subscription to ``resource``; on 409, adopt the one Graph has unless
        ``adopt`` is False (create and renew must not call each other without end while
        Graph lists a subscription it answers is gone)."""
        url, state = self._config()
        try:
            sub = run.graph.create_subscription(resource, url, f"{url}/lifecycle", state,
                                                max_expiration(self.now()))
        except SubscriptionExists:
            if not adopt:
                run.report("error", resource, error="Graph refuses a new subscription (409) while it answers that "
                           "the one it lists is gone (404): the next run tries again")
                return False
            return self._exists(run, resource)
        run.report(action, resource, sub, **extra)   # it exists, whatever the store writes below do
        _record(self.store, sub, resource, state)
        return True

    def _exists(self, run: _Tenant, resource: str) -> bool:
        """409: this app already subscribes to ``resource``: a concurrent create (ours:
        True), or one with another notification URL, reported and left alone (False:
        its notifications do not reach this webhook)."""
        listed = [s for s in run.graph.list_subscriptions() if resource_key(str(s.get("resource"))) == resource]
        mine = next((s for s in listed if s.get("notificationUrl") == self._config()[0]), None)
        if mine is None:
            # Typically left by a deployment at an earlier URL: until it is deleted or
            # expires (at most 29 days), this resource's changes arrive only by the
            # scheduled delta resync. An operator must see that, not a routine line.
            other = listed[0].get("notificationUrl") if listed else None
            run.report("foreign", resource, listed[0] if listed else None, severity="ERROR",
                       notification_url=other, why="this app's subscription to it notifies another URL: "
                       "changes reach this webhook only by the scheduled resync until it is deleted or expires")
            return False
        run.report("exists", resource, mine)
        expires = _expiry(mine)
        if expires is not None and expires - self.now() < self.renew_within:
            return self._renew(run, resource, mine)
        return True

    def _renew(self, run: _Tenant, resource: str, sub: dict) -> bool:
        """Whether ``resource`` is covered after the renewal (or its deferral)."""
        if not claim_touch(self.store, sub["id"], "renew"):
            run.report("deferred", resource, sub, why="reauthorized less than 10 minutes ago")
            return True
        renewed = self._touch(sub["id"], "renew", lambda: run.graph.renew_subscription(
            sub["id"], max_expiration(self.now())))
        if renewed is _GONE:   # vanished between list and renew: created again, adopted once at most
            again = resource in run.gone
            run.gone.add(resource)
            return self._create(run, resource, adopt=not again)
        # Only one carrying the first state is renewed: its records live as long as it does.
        _record(self.store, sub, resource, self.settings.client_states[0])
        run.report("renewed", resource, renewed)
        return True

    def _forget(self, run: _Tenant, sub: dict, resource: str, *, replacing: bool = False) -> None:
        """Delete ``sub`` from Graph (gone already is fine), then its record. Reported
        at once: the create that follows one ``replacing`` it can fail."""
        run.graph.delete_subscription(sub["id"])
        run.report("deleted", resource, sub, **({"replacing": True} if replacing else {}))
        for record in (_state_record(sub["id"]), _resource_record(sub["id"])):
            holder = self.store.lease_holder(record)
            if holder is not None:
                self.store.release_lease(record, holder)

    def reauthorize(self, tenant: str, subscription_id: str) -> str:
        """Answer ``reauthorizationRequired``: "reauthorized", "deferred" (renewed less
        than 10 minutes ago, which reauthorized it) or "gone" (404: the next
        ``ensure`` creates it again)."""
        if not claim_touch(self.store, subscription_id, "reauthorize"):
            return "deferred"
        done = self._touch(subscription_id, "reauthorize",
                           lambda: self.graph_for(tenant).reauthorize_subscription(subscription_id))
        return "gone" if done is _GONE else "reauthorized"

    def _touch(self, subscription_id: str, action: str, call: Callable[[], Any]) -> Any:
        """``call`` (the renewal or reauthorization that claimed the window): its answer,
        or ``_GONE`` when Graph no longer has the subscription. Any other failure gives
        the window back: it touched nothing, so the other action must not be deferred."""
        try:
            return call()
        except Exception as e:
            if isinstance(e, UpstreamError) and e.status_code == 404:
                return _GONE
            release_touch(self.store, subscription_id, action)
            raise


_GONE = object()   # Graph answered 404: the subscription no longer exists
