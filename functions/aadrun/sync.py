"""policy_sync's core: membership changes -> membership store -> Cloud Run IAM ->
policy-update events (CONTRACT.md §5-§7, §9).

    PolicySync(app)
      .handle_cloud_event(data)       one Pub/Sub message as Eventarc (or a raw push) delivers it
      .handle_messages(messages)      a batch: the local bus, tests
      .resync(tenant, group, full)    delta reads of referenced groups: CLI ``resync``, reconcile

A batch runs in four steps; each group is read and each service written at most
once, however many messages name them (and concurrent batches of one process
share reads and writes: ``coalesce.Combiner``):

  1. removals  all removals of a group in one store commit, before any Graph call:
               verify denies within its 0.2 s generation poll. The commit drops the
               group's delta link, so its next read is a full one even if this
               process dies now.
  2. reads     one Graph delta read per group (``_READ``); only Graph's answer adds
               members. A full read follows any removal: it undoes a stale or
               reordered removal, whose re-add an incremental link that already
               consumed it would never repeat. A read never undoes a removal
               committed while it was in flight (``_answer``), and an answer is
               not applied over another read committed while it was in flight
               (another instance's, maybe newer): the group is read again, and a
               read overtaken on every try fails the batch (``Contested``). Nor
               does a read that lags behind a message on its first delivery
               undo it (``_read``): the batch fails, and the redelivery's read
               decides.
  3. IAM       one read-modify-write per Cloud Run service that names a changed
               group, planned inside the etag retry loop from fresh store reads,
               the service's writers taking turns on a store lease (``_write_service``).
  4. report    one audit entry per change, one policy-update event.

Nothing is skipped as a duplicate: two distinct notifications can share an id
(messages.py) and every step is idempotent. A message id is marked processed no
later than the first change it causes; a redelivered message (one already marked)
makes IAM re-checked and the event published again, as the attempt that applied
it may have died in between. An addition whose claims the store already shows
(``_reflected``) needs no read at all; a removal always gets one.

Failures (``Unavailable``, ``UpstreamError``, ``ConfigError``, anything
unexpected) are raised once every step has gone as far as it can, so Pub/Sub
redelivers. What redelivering cannot fix is logged as an error and not raised:
an unreadable message, a plan over the principal limit (``PlanError``), a grant
IAM refuses (``managed_write``) and a Cloud Run service that does not exist.
"""
from __future__ import annotations

import base64
import binascii
import concurrent.futures
import contextvars
import dataclasses
import itertools
import json
import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import audit
from .coalesce import Combiner, StoreLease
from .errors import AadrunError, Deferred, RequestError, UpstreamError
from .graph import DeltaResult, GraphClient
from .iam import IamWriter
from .messages import LifecycleEvent, MembershipChange, Message, from_json
from .managed_write import write_managed
from .plan import desired_on
from .policy import Policy, Service
from .store import ChangeEntry, GroupUpdate, Store, SyncConflict, SyncState, utcnow
from .subscriptions import Subscriptions, subscribed_group
from .sync_report import SyncSummary, audit_changes, iam_outcome, policy_event

# Message ids carried into change-log entries; a larger batch marks its ids in a
# commit of their own, just before the group's first change.
MAX_LOGGED_IDS = 8
MAX_CHECKED_CLAIMS = 16   # users of one message looked up in the store before reading Graph
WORKERS = 8
# Reads of one group in a row while removals or other reads keep landing during them
# (then Pub/Sub redelivery or the reconcile takes over).
CONTESTED_READS = 3
# A message whose changes Graph's read did not show is marked so, in a store record
# that outlives Pub/Sub's redeliveries and Graph's own retries (up to 4 hours): its
# later deliveries' reads decide, concurrent duplicates' included. (The same change
# recurring within it, same content and so same id, is decided by its read too.)
UNCONFIRMED_TTL_S = 6 * 3600
# A resync's policy-update event that could not be published is owed by its tenant
# (a store record): nothing redelivers a resync, and the next one may change nothing.
# The next resync of all the tenant's groups publishes one for them.
OWED_EVENT_TTL_S = 30 * 86400
_RANK = {None: 0, "incremental": 1, "full": 2}
# (carries removals, "group changed", already processed) -> the Graph read its group needs.
# A redelivered "group changed" was fully read by the attempt that marked it.
_READ = {
    (True, False, False): "full", (True, False, True): "full",
    (False, True, False): "full", (False, True, True): "incremental",
    (False, False, False): "incremental", (False, False, True): "incremental",
}


@dataclasses.dataclass
class _Group:
    """What a batch asks of one group."""

    tenant: str
    group: str
    read: str | None = None                   # None | "incremental" | "full"
    removed: set[str] = dataclasses.field(default_factory=set)
    # What the messages claim: a read that does not show it yet lags behind them
    # (``_read``), unless a delivery of them found so already (``decides``).
    claimed_removed: set[str] = dataclasses.field(default_factory=set)
    claimed_added: set[str] = dataclasses.field(default_factory=set)
    decides: bool | None = None               # the read decides (None: not looked up yet)
    ids: list[str] = dataclasses.field(default_factory=list)
    redelivered: bool = False                 # a message of the batch was already processed
    recheck: bool = False                     # check IAM even if the store does not change

    def need(self, read: str | None) -> None:
        self.read = max(self.read, read, key=_RANK.__getitem__)


def decode_event(data: Any) -> Message:
    """The message inside a ``messagePublished`` CloudEvent's data
    (``{"message": {"data": base64, ...}, "subscription": ...}``); RequestError if unusable."""
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except (ValueError, RecursionError):
            raise RequestError("event data is not JSON") from None
    message = data.get("message") if isinstance(data, Mapping) else None
    if not isinstance(message, Mapping) or not isinstance(message.get("data"), str):
        raise RequestError("event data has no message.data")
    try:
        raw = base64.b64decode(message["data"], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("message.data is not base64") from None
    return from_json(raw)


class PolicySync:
    """policy_sync's core, shared by every request thread of an instance.

    ``graph_factory(tenant)`` and ``iam_writer`` default to the real clients built
    from ``app.settings``; ``workers`` bounds the concurrent Graph reads and IAM
    writes of the instance.
    """

    def __init__(self, app, *, graph_factory: Callable[[str], GraphClient] | None = None,
                 iam_writer: IamWriter | None = None, workers: int = WORKERS):
        self._app = app
        self._graph_factory = graph_factory or (lambda tenant: GraphClient(app.settings, tenant))
        self._graphs: dict[str, GraphClient] = {}
        self._iam = iam_writer
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="policy-sync")
        self._reads, self._writes = Combiner(), Combiner()
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._calls = itertools.count(1)

    # -- entry points ------------------------------------------------------------

    def handle_cloud_event(self, data: Any) -> SyncSummary | None:
        """One Pub/Sub message. An unreadable one is logged and dropped (redelivering a
        poison message cannot help); other failures raise, so Pub/Sub redelivers."""
        try:
            message = decode_event(data)
        except RequestError as e:
            envelope = data.get("message") if isinstance(data, Mapping) else None
            message_id = envelope.get("messageId") if isinstance(envelope, Mapping) else None
            audit.entry("poison_message", "policy_sync dropped an unreadable message", severity="ERROR",
                        reason=str(e), pubsub_message_id=message_id if _is_message_id(message_id) else None)
            return None
        return self.handle_messages([message])

    def handle_messages(self, messages: Sequence[Message]) -> SyncSummary:
        """Apply a batch of changes-topic messages (the steps of the module docstring)."""
        policy = self._app.policy
        summary = SyncSummary("notification", messages=len(messages))
        unique = list({m.id: m for m in messages}.values())
        seen = self._app.store.processed([m.id for m in unique])
        referenced = policy.referenced_groups()
        groups: dict[tuple[str, str], _Group] = {}
        reauthorize: list[LifecycleEvent] = []
        forget: set[tuple[str, str]] = set()
        for message in unique:
            if isinstance(message, LifecycleEvent) and message.tenant not in policy.tenants:
                # Published before a policy change dropped the tenant: nothing to do for it.
                summary.ignored += 1
                audit.entry("message_ignored", "lifecycle event of a tenant no policy names",
                            reason="unknown_tenant", message_id=message.id, tenant=message.tenant,
                            lifecycle_event=message.event, subscription=message.subscription)
            elif isinstance(message, LifecycleEvent):
                self._lifecycle(message, referenced, groups, reauthorize)
            else:
                self._membership(message, message.id in seen, referenced, groups, summary, forget)
        return self._run(policy, groups, reauthorize, summary, forget=forget)

    def forget_unreferenced(self) -> tuple[list[dict], list[dict]]:
        """Forget each group the store knows that no policy names (``Store.forget_group``):
        maintenance's reconcile. Returns the groups forgotten, with how many members each
        had, and those that failed, with why; one failure does not stop the others."""
        referenced = self._app.policy.referenced_groups()
        forgotten, failed = [], []
        for tenant, group in sorted(self._app.store.synced_groups()):
            if group in referenced.get(tenant, ()):
                continue
            try:
                forgotten.append(self._forget(tenant, group, "maintenance"))
            except AadrunError as e:
                failed.append({"tenant": tenant, "group": group, "error": e.reason, "detail": str(e)})
                audit.entry("maintenance_item_failed", f"forgetting group {group} failed", severity="ERROR",
                            task="reconcile", tenant=tenant, group=group, error=e.reason, detail=str(e))
        return forgotten, failed

    def resync(self, tenant: str | None = None, group: str | None = None, *, full: bool = False,
               raise_errors: bool = True) -> SyncSummary:
        """Delta reads of every referenced group (or those of ``tenant`` / ``group``),
        then IAM of every service naming them: the notification path with Graph as the
        only input. Incremental from each stored link unless ``full``; RequestError
        when no referenced group matches. A step that failed raises once the others
        are done, or, without ``raise_errors``, is listed in the summary's ``errors``
        (a report then keeps what the other groups did)."""
        policy = self._app.policy
        groups = {(t, g): _Group(t, g, read="full" if full else "incremental", recheck=True)
                  for t, names in policy.referenced_groups().items() if tenant in (None, t)
                  for g in sorted(names) if group in (None, g)}
        if not groups:
            raise RequestError("no group referenced by the policies matches")
        store = self._app.store
        owed = {} if group is not None else {
            t: lost for t in {t for t, _ in groups} if (lost := store.lease_holder(_owed_event(t)))}
        return self._run(policy, groups, [], SyncSummary("resync"), raise_errors=raise_errors, owed=owed)

    # -- what a message asks for --------------------------------------------------------

    def _membership(self, message: MembershipChange, seen: bool, referenced: Mapping[str, set[str]],
                    groups: dict, summary: SyncSummary, forget: set[tuple[str, str]]) -> None:
        if message.group not in referenced.get(message.tenant, ()):
            summary.ignored += 1
            audit.entry("message_ignored", "membership change of a group no policy names", reason="not_referenced",
                        message_id=message.id, tenant=message.tenant, group=message.group)
            if message.removed or message.reread:
                # What the store holds of the group is stale now: a policy naming it
                # again before maintenance forgets it must not grant from it.
                forget.add((message.tenant, message.group))
            return
        work = groups.setdefault((message.tenant, message.group), _Group(message.tenant, message.group))
        if seen:
            work.redelivered = work.recheck = True
            summary.duplicates += 1
        if self._reflected(message):
            summary.reflected += 1
            return
        work.need(_READ[(bool(message.removed), message.reread, seen)])
        # A removal checks IAM even when the store already shows it: whatever removed
        # it there (a reconcile, another message) may have failed to write IAM.
        work.recheck |= bool(message.removed)
        work.removed.update(message.removed)
        work.claimed_removed.update(message.removed)
        work.claimed_added.update(message.added)
        work.ids.append(message.id)

    def _reflected(self, message: MembershipChange) -> bool:
        """Whether the group's last Graph read already showed every user the message
        adds as a member: such a message cannot grant, so it needs no read. Only a
        group with a delta link qualifies, as the link is dropped whenever the store
        may differ from Graph's last answer."""
        # A removal always gets its read: a read in flight (here or on another
        # instance) may carry an older answer that still lists the user, and only a
        # read that starts after the removal settles it.
        if message.removed:
            return False
        if not message.added or len(message.added) > MAX_CHECKED_CLAIMS:
            return False
        store, tenant, group = self._app.store, message.tenant, message.group
        # Membership first: an added user the store does not show stops at one store read.
        if not all(store.membership(tenant, user, [group])[group] is True for user in message.added):
            return False
        state = store.sync_state(tenant, group)
        return bool(state and state.delta_link)

    def _lifecycle(self, event: LifecycleEvent, referenced: Mapping[str, set[str]], groups: dict,
                   reauthorize: list[LifecycleEvent]) -> None:
        """reauthorizationRequired -> reauthorize the subscription, and a delta read of
        its group: Graph pauses notifications until then, and those of the pause are
        lost; missed and subscriptionRemoved -> full read. Each reads the subscription's
        group: the one it names, else the one recorded when the subscription was made;
        every group of the tenant for the tenant-wide subscription or one with no record,
        and none for a group no policy names (creating a subscription again is
        maintenance's task)."""
        read = "full"
        if event.event == "reauthorizationRequired":
            reauthorize.append(event)
            read = "incremental"   # the stored delta link covers the pause
        if event.event == "subscriptionRemoved":
            audit.entry("subscription_removed", "Graph removed a subscription: maintenance must create it again",
                        severity="WARNING", tenant=event.tenant, subscription=event.subscription, group=event.group)
        names = referenced.get(event.tenant, set())
        group = event.group or subscribed_group(self._app.store, event.subscription)
        if group is not None and group not in names:
            return   # of a group no policy names (a subscription maintenance is to delete)
        for group in [group] if group else sorted(names):
            work = groups.setdefault((event.tenant, group), _Group(event.tenant, group))
            work.need(read)
            # IAM checked whatever the read finds: a lifecycle event has no id to tell a
            # redelivery by, and the attempt whose read changed the store may have died
            # before IAM (lifecycle events are rare: one IAM read each is cheap).
            work.recheck = True

    # -- the steps -------------------------------------------------------------------

    def _run(self, policy: Policy, groups: dict[tuple[str, str], _Group], reauthorize: list[LifecycleEvent],
             summary: SyncSummary, raise_errors: bool = True, owed: Mapping[str, str] | None = None,
             forget: set[tuple[str, str]] = frozenset()) -> SyncSummary:
        owed = owed or {}   # tenant -> the event it owes, as id@time
        errors: list[Exception] = []
        summary.groups = [f"{t}/{g}" for t, g in groups]
        store = self._app.store
        for tenant, group in sorted(forget):
            _guarded(errors, lambda t=tenant, g=group: store.sync_state(t, g) and self._forget(t, g, "notification"))
        for work in groups.values():
            if work.removed:
                _guarded(errors, lambda w=work: summary.record(self._remove(w)))
        reads = {key: self._submit(self._tallied_read, key, work, summary.source) for key, work in groups.items()
                 if work.read}
        auths = [self._submit(self._reauthorize, event) for event in reauthorize]
        for kind, part, unconfirmed in _results(reads, errors):
            summary.reads[kind] += 1
            summary.absorb(part)
            if unconfirmed:
                errors.append(unconfirmed)
        summary.reauthorized = sum(_results(auths, errors))
        # IAM where the store changed, and after a redelivery (the attempt that changed
        # the store may have died before IAM); a resync checks every group it read.
        dirty = set(summary.changed) | {k for k, w in groups.items() if w.recheck}
        why = "resync" if summary.source == "resync" else "group membership changed"
        message_id = next((i for w in groups.values() for i in w.ids), None)
        writes = [self._submit(self._writes.run, s.name, s,
                               lambda _, s=s: self._write_service(policy, s, why, message_id))
                  for s in policy.services.values() if s.cloud_run and any((s.tenant, g) in dirty for g in s.groups)]
        iam_outcome(summary, _results(writes, errors))
        if summary.changes or summary.iam_changes or owed or any(w.redelivered for w in groups.values()):
            event = policy_event(policy, groups, (i for w in groups.values() for i in w.ids), summary,
                                 replaces=owed.values())
            failed = len(errors)
            _guarded(errors, lambda: self._app.bus.publish_policy_update(event))
            if summary.source == "resync":
                # The lost event by its id and time: the same change recurring has the same id.
                lost_as, lost = f"{event['id']}@{event['at']}", len(errors) > failed
                _guarded(errors, lambda: self._owe_event({t for t, _ in groups}, owed, lost_as, lost))
        summary.errors = [_described(e) for e in errors]
        ids = [i for w in groups.values() for i in w.ids]
        # One line per batch, so an operator can follow a message id end to end.
        audit.entry("sync_batch", f"policy_sync {summary.source}: {summary.changes} membership change(s)",
                    severity="WARNING" if errors else "INFO", source=summary.source, message_ids=ids[:50],
                    messages=summary.messages, duplicates=summary.duplicates, reflected=summary.reflected,
                    reads=dict(summary.reads), changes=summary.changes, errors=len(errors))
        if errors and raise_errors:
            raise errors[0]
        return summary

    def _owe_event(self, tenants: set[str], owed: Mapping[str, str], lost_as: str, lost: bool) -> None:
        """Record the tenants a resync's lost event (``lost_as``: its id@time) leaves
        owing it, or clear what the published one paid. A tenant owing an earlier event
        keeps owing that one: the event that pays names it (``replaces``)."""
        store = self._app.store
        for tenant in sorted(tenants if lost else owed):
            if lost:
                store.acquire_lease(_owed_event(tenant), owed.get(tenant, lost_as), OWED_EVENT_TTL_S)
            else:
                store.release_lease(_owed_event(tenant), owed[tenant])

    def _tallied_read(self, key: tuple[str, str], work: _Group, source: str) -> tuple[str, SyncSummary]:
        """Step 2 for one group (``_read``, shared by every batch that asks at once), its
        changes counted here: a first read of a large group has a change per member,
        and a run must not hold them all until every group is read."""
        kind, entries, listed = self._reads.run(key, work, self._read)
        part = SyncSummary(source)
        part.record(entries)
        removed = work.claimed_removed & listed
        added = work.claimed_added - work.claimed_removed - listed
        unconfirmed = None
        if (removed or added) and not self._decides(work):
            unconfirmed = Unconfirmed.of(work.tenant, work.group, removed, added)
            for message_id in work.ids:   # their next delivery's read decides
                self._app.store.acquire_lease(_unconfirmed(message_id), "unconfirmed", UNCONFIRMED_TTL_S)
        return kind, part, unconfirmed

    def _decides(self, work: _Group) -> bool:
        """Whether the group's read decides for this batch: a delivery of one of its
        messages already found Graph not showing their changes (looked up once, and
        only when a read does not show them)."""
        if work.decides is None:
            store = self._app.store
            work.decides = any(store.lease_holder(_unconfirmed(i)) for i in work.ids)
        return work.decides

    def _forget(self, tenant: str, group: str, source: str) -> dict:
        entries: list[ChangeEntry] = []
        try:
            entries = self._app.store.forget_group(tenant, group, source=source, why="no policy names the group")
        except Exception as e:
            entries = list(getattr(e, "committed", ()))
            raise
        finally:
            audit_changes(entries)
        audit.entry("group_forgotten", f"group {group} forgotten: no policy names it", tenant=tenant, group=group,
                    members=len(entries), source=source)
        return {"tenant": tenant, "group": group, "members": len(entries)}

    def _remove(self, work: _Group) -> list[ChangeEntry]:
        """Step 1: the group's removals in one commit, dropping its delta link."""
        store = self._app.store
        entries: list[ChangeEntry] = []
        try:
            # The link is dropped inside the commit: a state read before it and written
            # back could equal again what an older read in flight expects.
            _apply(store, GroupUpdate(
                work.tenant, work.group, removed=frozenset(work.removed), drop_link=True,
                message_ids=self._marks(work.tenant, work.group, work.ids), source="notification",
                why="removal notified by Microsoft Graph"), entries)
        finally:
            audit_changes(entries)
        return entries

    def _read(self, requests: list[_Group]) -> tuple[str, list[ChangeEntry], frozenset[str]]:
        """Step 2 for one group, on behalf of every batch whose request joined this run.

        Graph's reads lag its writes by seconds at times (Entra is eventually
        consistent), so a read right after a notification may not show it yet. A
        removal Graph still lists is kept, and an addition it does not list yet is
        not made: both are ``Unconfirmed``, which the batch raises (its messages
        marked so), and Pub/Sub's redelivery reads again. That delivery's read, or
        Graph's retry's, is the truth, whatever it says: a user removed and added
        back at once is a member again one redelivery later. Returns the read's
        kind, its commits and which of the claimed users Graph lists."""
        tenant, group = requests[0].tenant, requests[0].group
        ids = list(dict.fromkeys(i for r in requests for i in r.ids))
        claimed = frozenset(u for r in requests for u in r.claimed_removed | r.claimed_added)
        store = self._app.store
        full = any(r.read == "full" for r in requests)
        marks, entries = self._marks(tenant, group, ids), []
        try:
            for attempt in range(1, CONTESTED_READS + 1):
                # The link read after the position: a removal committed before it has
                # dropped it (a full read), one committed after it is in _removed_since.
                position, before = store.last_seq(), store.sync_state(tenant, group)
                link = None if full or before is None else before.delta_link
                result = self._graph(tenant).group_delta(group, link, restart_on_expiry=True)
                if result.not_users:
                    _log_not_users(tenant, group, result.not_users)
                # A claimed removal Graph still lists is kept, unless the read decides.
                kept = frozenset(u for r in requests if r.claimed_removed & result.added and not self._decides(r)
                                 for u in r.claimed_removed)
                meanwhile = self._removed_since(tenant, group, position)
                update = _answer(tenant, group, result, meanwhile | kept, marks)
                try:
                    applied = _apply(store, dataclasses.replace(
                        update, expect_synced_at=before.synced_at if before else None), entries)
                except SyncConflict:
                    # Another read (another instance's) committed while ours was in flight:
                    # ours may be the older answer, so it must not change that one's
                    # members. Read again; after the last try the batch fails, and its
                    # redelivery (or the next reconcile) reads once the contention is over.
                    if attempt < CONTESTED_READS:
                        full = True
                        continue
                    raise
                marks = ()
                # Removals others committed after the check above: a grant the apply made
                # over one is taken back; one the answer cannot settle must not stay under
                # the link the apply stored (a later incremental read would never see it).
                ours = {e.seq for e in applied}
                others = [e for e in self._removals_after(tenant, group, position) if e.seq not in ours]
                late = _regranted(others, applied)
                unsettled = _contested(result, frozenset(e.user for e in others) - meanwhile)
                if late or unsettled:
                    _apply(store, GroupUpdate(tenant, group, removed=late, drop_link=True, source="notification",
                                              why="removal committed during a read"), entries)
                # A removal committed while the read was in flight outranks it; a read
                # started after that removal is Graph's truth again, so read once more
                # now rather than leave the group to the next notification or reconcile.
                if not late and not unsettled and not _contested(result, meanwhile):
                    break
                full = True
            else:
                # The last try's answer was overtaken too (a grant taken back, a removal it
                # leaves unread): only a later read settles the group, so the batch fails.
                raise Contested(f"group {group}: reads kept being overtaken; it is read again on redelivery")
        finally:
            audit_changes(entries)   # every commit made, even if a later read of the loop fails
        return ("full" if result.full else "incremental"), entries, _listed(store, result, tenant, group, claimed)

    def _marks(self, tenant: str, group: str, ids: Sequence[str]) -> tuple[str, ...]:
        """The ids to mark processed in the group's next commit: a larger set is marked
        now, in a commit of its own (early is safe: a processed id never skips work)."""
        if len(ids) <= MAX_LOGGED_IDS:
            return tuple(ids)
        self._app.store.apply(GroupUpdate(tenant, group, message_ids=tuple(ids), source="policy-sync"))
        return ()

    def _removals_after(self, tenant: str, group: str, position: int) -> list[ChangeEntry]:
        """The group's removals committed after change-log ``position``. By position, not
        time: a removal's stamp may predate a read it committed during (taken before it
        waited for the store's lock, or by another instance's clock)."""
        return [e for e in self._app.store.changes_after(position)
                if e.kind == "member_removed" and e.tenant == tenant and e.group == group]

    def _removed_since(self, tenant: str, group: str, position: int) -> frozenset[str]:
        """Users of the group whose removal someone committed while our read was in flight."""
        return frozenset(e.user for e in self._removals_after(tenant, group, position))

    def _reauthorize(self, event: LifecycleEvent) -> int:
        """Answer reauthorizationRequired, as maintenance's subscriptions do (the
        10-minute rule against a renewal, given back when the call fails). Failures
        raise (redelivery retries), except a subscription that no longer exists:
        maintenance creates it again."""
        outcome = Subscriptions(self._app.settings, self._app.store, self._graph).reauthorize(
            event.tenant, event.subscription)
        fields = dict(tenant=event.tenant, subscription=event.subscription, message_id=event.id)
        if outcome == "deferred":
            audit.entry("subscription_reauthorize_deferred", "renewed less than 10 minutes ago: left to maintenance",
                        **fields)
        elif outcome == "gone":
            audit.entry("subscription_gone", "reauthorization found no subscription: maintenance must create it",
                        severity="WARNING", **fields)
        else:
            audit.entry("subscription_reauthorized", "subscription reauthorized", **fields)
        return int(outcome == "reauthorized")

    def _write_service(self, policy: Policy, service: Service, why: str, message_id: str | None):
        """Step 3 for one service: (name, AppliedResult or None, refusal or None), the
        write itself shared with the drift repair (``managed_write``), under the lease
        ``iam/{resource}`` every aadrun writer of that resource takes turns on."""
        store, target = self._app.store, service.cloud_run
        with StoreLease(store, f"iam/{target}", f"{self._holder}:{next(self._calls)}") as lease:
            try:
                written = write_managed(store, self._iam_writer(), lease, target,
                                        lambda: desired_on(policy, target, store.group_members),
                                        service=service.name, source="policy-sync", why=why, message_id=message_id)
            except UpstreamError as e:
                if e.status_code != 404:
                    raise
                # Not deployed yet, or a typo in the policy: redelivery cannot fix it; the
                # drift task grants once the service exists, and reports it until then.
                missing = f"{target} does not exist (not deployed yet, or a typo in the policy)"
                audit.entry("iam_target_missing", f"{service.name}: {missing}", severity="ERROR",
                            service=service.name, cloud_run=target)
                return service.name, None, missing
        result = written.result
        if result is not None and self._iam_writer().mode == "record" and not result.changes.empty:
            audit.entry("iam_plan", f"IAM plan for {service.name} (AADRUN_IAM=record: not applied)",
                        plan=result.changes.to_json())
        return service.name, result, written.refusal

    # -- clients -----------------------------------------------------------------------

    def _graph(self, tenant: str) -> GraphClient:
        with self._lock:
            client = self._graphs.get(tenant)
            if client is None:
                client = self._graphs[tenant] = self._graph_factory(tenant)
            return client

    def _iam_writer(self) -> IamWriter:
        with self._lock:
            if self._iam is None:
                self._iam = IamWriter(self._app.settings)
            return self._iam

    def _submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        # In the caller's context, so the lines a worker writes keep the request's trace.
        return self._pool.submit(contextvars.copy_context().run, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for client in self._graphs.values():
            client.close()
        if self._iam is not None:
            self._iam.close()


class Contested(Deferred):
    """A group's reads kept being overtaken by other commits: a later delivery reads it."""


class Unconfirmed(Deferred):
    """Notified changes of a group that Graph's read does not show yet."""

    @classmethod
    def of(cls, tenant: str, group: str, removed: frozenset[str], added: frozenset[str]) -> "Unconfirmed":
        audit.entry("notification_unconfirmed", "Graph does not show notified changes yet: they are read again on "
                    "redelivery", severity="WARNING", tenant=tenant, group=group,
                    removals_kept=sorted(removed)[:50], additions_waiting=sorted(added)[:50])
        return cls(f"group {group}: Graph does not show {len(removed) + len(added)} notified change(s) yet")


def _unconfirmed(message_id: str) -> str:
    return f"unconfirmed/{message_id}"


def _is_message_id(value: Any) -> bool:
    """A Pub/Sub message id as Pub/Sub writes one (digits), fit for a log line."""
    return isinstance(value, str) and 0 < len(value) <= 64 and value.isascii() and value.isdigit()


def _owed_event(tenant: str) -> str:
    return f"owed-policy-update/{tenant}"


def _listed(store: Store, result: DeltaResult, tenant: str, group: str, asked: frozenset[str]) -> frozenset[str]:
    """Which of ``asked`` Graph lists in the group (users or not), after ``result``
    was applied. An incremental answer speaks of changes only: of the users it does
    not name, the store has Graph's last word."""
    shown = (result.added - result.removed) | {oid for _, oid in result.not_users}
    unnamed = set() if result.full else asked - shown - result.removed
    if len(unnamed) > MAX_CHECKED_CLAIMS:
        still = unnamed & (store.group_members(tenant, group) or set())
    else:
        still = {u for u in unnamed if store.membership(tenant, u, [group])[group]}
    return frozenset(asked & shown) | still


def _answer(tenant: str, group: str, result: DeltaResult, stale: frozenset[str],
            ids: tuple[str, ...]) -> GroupUpdate:
    """The store update of Graph's answer. A user Graph lists but someone removed while
    the read was in flight stays removed, and the delta link is then dropped (it no
    longer matches the store), so that the next read is a full one."""
    complete = result.full or result.group_deleted
    members = result.added if result.full else frozenset()
    common = dict(sync=SyncState(None if _contested(result, stale) else result.delta_link, utcnow()),
                  message_ids=ids, source="graph-delta", why=f"{'full' if result.full else 'incremental'} delta read")
    if complete:
        return GroupUpdate(tenant, group, replace=members, removed=stale, **common)
    return GroupUpdate(tenant, group, added=result.added - stale, removed=result.removed, **common)


def _regranted(removals: list[ChangeEntry], applied: list[ChangeEntry]) -> frozenset[str]:
    """Users ``applied`` granted although their removal (one of ``removals``) committed first."""
    granted = {e.user: e.seq for e in applied if e.kind == "member_added"}
    return frozenset(e.user for e in removals if e.user in granted and e.seq < granted[e.user])


def _contested(result: DeltaResult, stale: frozenset[str]) -> frozenset[str]:
    """The removals ``stale`` (committed apart from this answer) that the answer cannot
    settle. A full answer settles every user it does not list. An incremental one speaks
    only of changes since its link: a removal committed meanwhile may be stale (Graph
    re-added the user before that link), and silence cannot tell, so any such removal
    leaves the group to a full read; otherwise a restored link would make the store
    look current while it lacks a member."""
    if result.full or result.group_deleted:
        return stale & (result.added if result.full else frozenset())
    return stale


def _log_not_users(tenant: str, group: str, members: frozenset[tuple[str, str]]) -> None:
    # The token's groups claim counts nested groups' members; aadrun grants the group's
    # own users only: say so, or such a user's denial would have no explanation.
    kinds = sorted({kind.rsplit(".", 1)[-1] for kind, _ in members})
    audit.entry("members_not_granted", f"group {group} has members that are not users ({', '.join(kinds)}): "
                "aadrun grants its direct user members only, not the members of nested groups",
                severity="WARNING", tenant=tenant, group=group,
                members=[{"type": kind, "id": oid} for kind, oid in sorted(members)[:50]], count=len(members))


def _apply(store: Store, update: GroupUpdate, entries: list[ChangeEntry]) -> list[ChangeEntry]:
    """``store.apply``, adding what it committed to ``entries``: on failure too, as a
    large update commits in parts (``committed`` on the error) and each change must
    still reach the audit log."""
    try:
        applied = store.apply(update)
    except Exception as e:
        entries += getattr(e, "committed", ())
        raise
    entries += applied
    return applied


def _guarded(errors: list[Exception], step: Callable[[], Any], group: tuple[str, str] | None = None) -> None:
    """Run one step; a failure is logged and kept for the end of the batch, so the
    other steps still go as far as they can. A failure of one group's step names it."""
    try:
        step()
    except Exception as e:
        if group is not None:
            e.aadrun_group = group
        errors.append(e)
        audit.entry("sync_error", "policy_sync step failed: a redelivery or the next reconcile retries it",
                    severity="ERROR", error=type(e).__name__, detail=str(e),
                    tenant=group and group[0], group=group and group[1])


def _described(error: Exception) -> str:
    group = getattr(error, "aadrun_group", None)
    return (f"group {group[1]}: " if group else "") + f"{type(error).__name__}: {error}"


def _results(futures: list[concurrent.futures.Future] | Mapping[tuple[str, str], concurrent.futures.Future],
             errors: list[Exception]) -> list:
    """The futures' results in order; a failure is ``_guarded``'s (with its group,
    when the futures are keyed by group)."""
    keyed = futures.items() if isinstance(futures, Mapping) else ((None, f) for f in futures)
    out: list = []
    for group, future in keyed:
        _guarded(errors, lambda f=future: out.append(f.result()), group)
    return out
