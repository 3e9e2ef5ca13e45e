"""Firestore membership store (``firestore://[DATABASE]``), for several instances.

Collections (document ids from ``doc_id``, fields hold the raw values):

    memberships/{tenant~group~user}   tenant, group, user, since, source, message_id
    groups/{tenant~group}             tenant, group, delta_link, synced_at (= synced)
    versions/{tenant~group}           tenant, group, version: + 1 with every member change
    processed/{message id}            id, expires_at
    managed/{cloud run resource}      service (the resource), roles: [{role, members: [...]}]
    changes/{seq, 20 digits}          the ChangeEntry fields
    leases/{name}                     name, holder, ttl_s, expires_at
    meta/counters                     generation, seq, last_at

Every mutating call is one transaction, so all of its effects commit together.
``meta/counters`` gives change-log entries a gap-free ``seq`` and
``generation()`` a single-document read. Every change goes through it, so it is
the one hot document, and it is handled optimistically: read outside the
transaction, written with a precondition on its update time, the whole
transaction retried (with jitter) when another writer got there first. Reading
it inside the transaction would take a shared lock that two writers then both
try to upgrade: a deadlock that Firestore breaks by aborting one of them, and
the emulator only after a 2 s lock timeout. A call that changes nothing (a
re-add) does not touch it at all.

A full read (``replace``) needs the group's current members, and a query inside a
transaction locks more than its results: the emulator then holds every other
group's member writes until it ends, and gives up after 2 s (four full reads of
four groups at once failed most of their commits). So the members are queried
outside the transaction, with the group's ``versions`` counter read before and
after (equal: the set is the one at that version); inside, the counter is read
again, and a change meanwhile re-runs the transaction. Every member change bumps
it (a blind increment, no read), and so waits for a full read holding it.

Change-log ids are the zero-padded ``seq`` and ``at`` never goes backwards
(``monotonic_at``), so ``changes(since=...)`` needs only the automatic
single-field index on ``at``.

Expired processed ids are ignored on read and purged lazily; in production a
Firestore TTL policy on ``processed.expires_at`` (scripts/setup-gcp) does the same
server-side (https://cloud.google.com/firestore/docs/ttl). Leases get none: they are
few (one per Cloud Run resource and task), and an expired one must stay readable so
its holder can still renew it while nobody else has taken it (``renew_lease``).

One commit may carry at most 10 MiB (https://cloud.google.com/firestore/quotas;
the emulator takes 4 MiB), and a member change writes about 1 KB (its membership
document and its change-log entry). An ``apply`` of more than
``MAX_CHANGES_PER_COMMIT`` changes (a large group's first read or deletion, a
large delta page) is committed in parts: removals first, then additions, then the
update itself (its sync state, what is left). The first part marks the message
ids processed, so a redelivery after a failure between parts re-checks IAM as
well as applying the rest; the error carries the entries already committed
(``committed``) for the audit log. A first read in parts stays invisible to
``membership`` (the group has no sync state yet) until its last part.

Every RPC, including the transaction's own begin/commit/rollback which the client
library sends without a deadline argument, gets a short retry budget
(``timeout``), so an outage fails fast as ``Unavailable`` instead of hanging for
the library's default 60-300 s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import itertools
import os
import random
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from urllib.parse import quote

from google.api_core import exceptions as gexc
from google.api_core import gapic_v1
from google.api_core import retry as gretry
from google.auth import exceptions as auth_exc
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

from ..errors import ConfigError, Unavailable
from ..rpc_budget import Budget
from .base import (UNCHECKED, UTC, ChangeEntry, GroupUpdate, IamWrite, Store, SyncState, generation_after,
                   utcnow)
from .rules import check_expected_sync, check_update, diff_iam, iam_entries, member_entries, monotonic_at

EMULATOR_PROJECT = "aadrun-local"
TIMEOUT_S = 5.0
# A query may stream a whole large group (replace, group_members): give one
# attempt longer to finish; retries of a failing start still stop at the timeout.
QUERY_TIMEOUT_S = 60.0
# Attempts of a transaction: on Aborted (lock contention, retried by the client
# library) and, separately, on a lost race for meta/counters (retried by _run).
MAX_ATTEMPTS = 10
PURGE_BATCH = 200
MAX_CHANGES_PER_COMMIT = 2000
TRANSIENT = (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.InternalServerError)
# What a commit raises when meta/counters moved since we read it (see module doc).
LOST_RACE = (gexc.FailedPrecondition, gexc.AlreadyExists)
CHANGE_FIELDS = ("kind", "tenant", "group", "user", "service", "role", "member", "source", "why",
                 "message_id")


def doc_id(*parts: str) -> str:
    """A valid Firestore document id for a tuple of strings.

    Ids must not contain '/', be '.' or '..', match ``__.*__`` or exceed 1,500
    bytes (https://firebase.google.com/docs/firestore/quotas#collections_documents_and_fields).
    Each part is percent-encoded (so it holds neither '/' nor '~') and parts are
    joined with '~', which keeps ids readable and distinct; an id that would still
    break a rule becomes '#' + SHA-256 (percent-encoding never yields '#').
    """
    key = "~".join(quote(p, safe="").replace("~", "%7E") for p in parts)
    if key in (".", "..") or (key.startswith("__") and key.endswith("__")) or len(key.encode()) > 1500:
        return "#" + hashlib.sha256(key.encode()).hexdigest()
    return key


def _version(snap) -> int:
    return snap.get("version") if snap.exists else 0


def _plain(value: dt.datetime) -> dt.datetime:
    """Firestore returns DatetimeWithNanoseconds; hand out plain UTC datetimes."""
    v = value.astimezone(UTC)
    return dt.datetime(v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond, tzinfo=UTC)


def _entry(d: dict) -> ChangeEntry:
    """A ``changes`` document as a ChangeEntry."""
    return ChangeEntry(at=_plain(d["at"]), seq=d["seq"], **{f: d.get(f) for f in CHANGE_FIELDS})


def _lapsed(lease: firestore.DocumentSnapshot) -> bool:
    """Whether a lease's time ran out, on Firestore's clock: its last write (taken or
    renewed) plus its ttl, against the time of this read. The instances' clocks may
    disagree; a holder whose clock runs behind would otherwise hold a lease the
    others already see as lapsed. (``expires_at``, on the writer's clock, is still
    written for instances of an earlier version during a deploy, and judges a
    lease written before ``ttl_s`` existed.)"""
    ttl = (lease.to_dict() or {}).get("ttl_s")
    if ttl is None:
        return lease.get("expires_at") <= utcnow()
    return lease.read_time >= lease.update_time + dt.timedelta(seconds=ttl)


def _aware(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Map backend failures to ``Unavailable`` (fail closed, CONTRACT.md §4)."""
    try:
        yield
    except (gexc.GoogleAPIError, auth_exc.GoogleAuthError) as e:
        raise Unavailable(f"firestore store: {e}") from e
    except ValueError as e:
        # The transaction helper wraps an exhausted Aborted retry, or a failed
        # rollback after an RPC error, in ValueError; anything else is a bug.
        cause = e.__cause__ or e.__context__
        if isinstance(cause, gexc.GoogleAPIError):
            raise Unavailable(f"firestore store: {cause}") from e
        raise


def _fail_fast(client: firestore.Client, timeout: float) -> None:
    """Give every RPC of ``client`` a retry budget of ``timeout`` seconds.

    The transaction helper calls BeginTransaction/Commit/Rollback without retry or
    timeout arguments, so they would get the generated defaults (retry for 60 s);
    replacing the defaults at the transport is the one place that covers them.
    This reaches into the generated client of google-cloud-firestore 2.x (pinned
    in requirements.txt); tests/test_store.py checks that an outage still fails
    within the budget.
    """
    transport = client._firestore_api._transport
    retry = gretry.Retry(predicate=gretry.if_exception_type(*TRANSIENT), initial=0.05,
                         maximum=1.0, multiplier=2.0, timeout=timeout)
    for rpc in list(transport._wrapped_methods):
        deadline = max(timeout, QUERY_TIMEOUT_S) if rpc is transport.run_query else timeout
        transport._wrapped_methods[rpc] = gapic_v1.method.wrap_method(
            rpc, default_retry=retry, default_timeout=Budget(deadline), client_info=client._client_info)


def _marked(parts: list[GroupUpdate], update: GroupUpdate, now: dt.datetime) -> list[GroupUpdate]:
    """The parts of an ``update`` checked against the sync time of a synced group: the
    first also stores a mark of its own (no link, ``now``), so an older read's answer
    conflicts with the parts still to come, and every later part expects that mark
    (each part strictly: ``_apply``'s ``split``). A group never synced gets no mark:
    it must stay unknown to verify until the last part."""
    if len(parts) == 1 or not isinstance(update.expect_synced_at, dt.datetime):
        return parts
    mark = SyncState(None, now)
    first, *rest = parts
    return [dataclasses.replace(first, sync=mark, drop_link=False)] + [
        dataclasses.replace(p, expect_synced_at=now) for p in rest]


class FirestoreStore(Store):
    """The membership store in Firestore (or its emulator). Safe to share between
    threads: the client is thread-safe and each call runs its own transaction."""

    purge_interval = 60.0  # seconds between lazy purges of expired processed ids
    max_changes_per_commit = MAX_CHANGES_PER_COMMIT

    def __init__(self, database: str | None = None, project: str | None = None, client=None, *,
                 timeout: float = TIMEOUT_S):
        self._owns_client = client is None
        if client is None:
            project = project or (os.environ.get("GOOGLE_CLOUD_PROJECT") or "").strip() or None   # as Settings
            if project is None and os.environ.get("FIRESTORE_EMULATOR_HOST"):
                project = EMULATOR_PROJECT
            try:
                client = firestore.Client(project=project, database=database or None)
            except auth_exc.DefaultCredentialsError as e:
                raise ConfigError(f"AADRUN_STORE=firestore:// needs Google credentials: {e}") from e
        self._client = client
        self.timeout = timeout
        _fail_fast(client, timeout)
        self._counters = client.collection("meta").document("counters")
        self._last_purge = float("-inf")
        self._purge_lock = threading.Lock()

    # -- references ---------------------------------------------------------

    def _doc(self, collection: str, *parts: str) -> firestore.DocumentReference:
        return self._client.collection(collection).document(doc_id(*parts))

    def _members_query(self, tenant: str, group: str):
        # Two equality filters are served by merging the automatic single-field
        # indexes: no composite index to deploy.
        return (self._client.collection("memberships")
                .where(filter=FieldFilter("tenant", "==", tenant))
                .where(filter=FieldFilter("group", "==", group)))

    @staticmethod
    def _read(source, refs: list) -> dict[str, firestore.DocumentSnapshot]:
        """One batched read (client or transaction), keyed by document path."""
        return {snap.reference.path: snap for snap in source.get_all(refs)} if refs else {}

    def _run(self, fn, *args):
        """Run ``fn(transaction, *args)`` as one transaction; retry it while it
        loses the race for meta/counters."""
        with _translated():
            for attempt in itertools.count(1):
                transaction = self._client.transaction(max_attempts=MAX_ATTEMPTS)
                try:
                    return firestore.transactional(fn)(transaction, *args)
                except (*LOST_RACE, gexc.Aborted):
                    # Aborted: contention the library does not retry, met on a read
                    # inside the transaction rather than at its commit.
                    if attempt == MAX_ATTEMPTS:
                        raise
                # Full jitter, so racing writers spread out rather than collide again.
                time.sleep(random.uniform(0, min(0.01 * 2 ** attempt, 0.25)))

    # -- reads ----------------------------------------------------------------

    def ping(self) -> None:
        self.generation()

    def generation(self) -> int:
        with _translated():
            snap = self._counters.get()
        return snap.get("generation") if snap.exists else 0

    def membership(self, tenant: str, user: str, groups: Iterable[str]) -> dict[str, bool | None]:
        wanted = list(dict.fromkeys(groups))
        pairs = [(self._doc("groups", tenant, g), self._doc("memberships", tenant, g, user))
                 for g in wanted]
        with _translated():
            snaps = self._read(self._client, [ref for pair in pairs for ref in pair])
        return {g: (snaps[m.path].exists if snaps[s.path].exists else None)
                for g, (s, m) in zip(wanted, pairs)}

    def group_members(self, tenant: str, group: str) -> set[str] | None:
        with _translated():
            if not self._doc("groups", tenant, group).get().exists:
                return None
            return {snap.get("user") for snap in self._members_query(tenant, group).stream()}

    def sync_state(self, tenant: str, group: str) -> SyncState | None:
        with _translated():
            snap = self._doc("groups", tenant, group).get()
        if not snap.exists:
            return None
        return SyncState(snap.get("delta_link"), _plain(snap.get("synced_at")))

    def synced_groups(self) -> set[tuple[str, str]]:
        with _translated():
            return {(snap.get("tenant"), snap.get("group"))
                    for snap in self._client.collection("groups").select(["tenant", "group"]).stream()}

    def unsync_group(self, tenant: str, group: str) -> bool:
        return self._run(self._unsync, tenant, group)

    def _unsync(self, txn, tenant: str, group: str) -> bool:
        ref = self._doc("groups", tenant, group)
        if not ref.get(transaction=txn).exists:
            return False
        counters = self._counters_now()
        txn.delete(ref)
        self._log(txn, [], counters, bump_generation=True)
        return True

    def processed(self, message_ids: Iterable[str]) -> set[str]:
        ids = list(dict.fromkeys(message_ids))
        now = utcnow()
        with _translated():
            snaps = self._read(self._client, [self._doc("processed", i) for i in ids])
        return {s.get("id") for s in snaps.values() if s.exists and s.get("expires_at") > now}

    def managed_members(self, service: str) -> dict[str, set[str]]:
        with _translated():
            snap = self._doc("managed", service).get()
        return self._roles(snap)

    def managed_targets(self) -> set[str]:
        with _translated():
            return {snap.get("service") for snap in self._client.collection("managed").stream() if self._roles(snap)}

    def adopt_managed(self, legacy: str, cloud_run: str) -> bool:
        return self._run(self._adopt, legacy, cloud_run)

    def _adopt(self, txn, legacy: str, cloud_run: str) -> bool:
        old, new = self._doc("managed", legacy), self._doc("managed", cloud_run)
        snaps = self._read(txn, [old, new])
        if not snaps[old.path].exists:
            return False
        moved, merged = self._roles(snaps[old.path]), self._roles(snaps[new.path])
        for role, members in moved.items():
            merged.setdefault(role, set()).update(members)
        roles = [{"role": r, "members": sorted(m)} for r, m in sorted(merged.items()) if m]
        txn.set(new, {"service": cloud_run, "roles": roles})
        txn.delete(old)
        return bool(moved)

    @staticmethod
    def _roles(snap) -> dict[str, set[str]]:
        if not snap.exists:
            return {}
        return {b["role"]: set(b["members"]) for b in snap.get("roles") if b["members"]}

    def last_seq(self) -> int:
        with _translated():
            snap = self._counters.get()
        return snap.get("seq") if snap.exists else 0

    def changes_after(self, seq: int) -> list[ChangeEntry]:
        query = self._client.collection("changes").where(filter=FieldFilter("seq", ">", seq)).order_by("seq")
        with _translated():
            return [_entry(snap.to_dict()) for snap in query.stream()]

    def changes(self, since: dt.datetime | None = None, limit: int | None = None) -> list[ChangeEntry]:
        query = self._client.collection("changes")
        if since is not None:
            query = query.where(filter=FieldFilter("at", ">=", _aware(since)))
        # Ties on `at` fall back to document id order, i.e. seq (see module doc).
        query = query.order_by("at")
        if limit is not None:
            query = query.limit(limit)
        with _translated():
            return [_entry(snap.to_dict()) for snap in query.stream()]

    # -- writes -----------------------------------------------------------------

    def apply(self, update: GroupUpdate, processed_ttl: float = 7 * 86400) -> list[ChangeEntry]:
        check_update(update)
        now = utcnow()
        entries: list[ChangeEntry] = []
        try:
            # The message ids go with the first part: a redelivery after a later part
            # failed is then seen as one, so policy_sync re-checks IAM for what the
            # committed parts changed (early is safe: a processed id never skips work).
            parts = _marked(self._parts(update), update, now)
            for i, part in enumerate(parts):
                entries += self._run(self._apply, part, now, processed_ttl, i == 0, len(parts) > 1)
        except Exception as e:
            e.committed = entries   # what the parts before the failure changed, for the audit log
            raise
        self._purge_expired(now)
        return entries

    def _parts(self, update: GroupUpdate) -> list[GroupUpdate]:
        """``update`` alone, or the parts that commit a large one (module doc): removals,
        additions, then the update itself (its sync state, and what changed meanwhile)."""
        if update.replace is None:
            removed, added = update.removed, update.added - update.removed
        else:
            with _translated():
                current = {snap.get("user") for snap in
                           self._members_query(update.tenant, update.group).stream()}
            target = update.replace - update.removed
            removed, added = current - target, target - current
        if len(removed) + len(added) <= self.max_changes_per_commit:
            return [update]
        size = self.max_changes_per_commit
        parts = [dataclasses.replace(update, replace=None, sync=None, **{kind: frozenset(chunk[i:i + size]),
                                                                        other: frozenset()})
                 for kind, other, chunk in (("removed", "added", sorted(removed)), ("added", "removed", sorted(added)))
                 for i in range(0, len(chunk), size)]
        # The update itself last: what the parts did is no change any more.
        rest = update if update.replace is not None else dataclasses.replace(update, added=frozenset(),
                                                                             removed=frozenset())
        return parts + [rest]

    def _apply(self, txn, update: GroupUpdate, now: dt.datetime, ttl: float, first: bool = True,
               split: bool = False) -> list[ChangeEntry]:
        """Transaction body (re-run on contention): all reads, then all writes. Only the
        first part of an update (``first``) marks its message ids processed; each part of
        an update committed in parts (``split``) checks its expected sync time strictly:
        a part that changes no member still marks the group or stores its link."""
        t, g = update.tenant, update.group
        group_ref = self._doc("groups", t, g)
        member = {u: self._doc("memberships", t, g, u)
                  for u in (update.added | update.removed if update.replace is None else ())}
        # A removal that only drops the link needs no read of a group record that exists
        # (one is deleted only once no policy names its group, ``unsync_group``; the update
        # of one deleted meanwhile fails, and its message comes again): removals
        # of one group at once would each hold a read of it and wait for one another's
        # to end before writing it (the emulator gives up on all but one of a dozen).
        blind = update.drop_link and update.sync is None and update.replace is None and not split and \
            update.expect_synced_at is UNCHECKED and group_ref.get().exists
        version_ref = self._doc("versions", t, g)
        if update.replace is not None:
            seen, current = self._members_at(t, g, version_ref)
        snaps = self._read(txn, ([] if blind else [group_ref]) + list(member.values()) +
                           ([version_ref] if update.replace is not None else []))
        if update.replace is not None:
            if _version(snaps[version_ref.path]) != seen:
                raise gexc.Aborted(f"members of {g} changed during its full read")   # _run re-runs it
            target = update.replace - update.removed
            to_add, to_remove = sorted(target - current), sorted(current - target)
            member = {u: self._doc("memberships", t, g, u) for u in to_add + to_remove}
        else:
            present = {u for u, ref in member.items() if snaps[ref.path].exists}
            to_add = sorted(update.added - update.removed - present)
            to_remove = sorted(update.removed & present)
        stored = None if blind else snaps[group_ref.path]
        if stored is not None:
            check_expected_sync(update, SyncState(stored.get("delta_link"), _plain(stored.get("synced_at")))
                                if stored.exists else None, bool(to_add or to_remove) or split)
        first_sync = update.sync is not None and not stored.exists
        message_id = ",".join(update.message_ids) or None
        entries: list[ChangeEntry] = []
        if to_add or to_remove or first_sync:
            counters = self._counters_now()
            at = monotonic_at(now, counters["last_at"])
            entries = member_entries(update, to_add, to_remove, at, message_id)
            entries = self._log(txn, entries, counters, bump_generation=True)
        for u in to_add:
            txn.set(member[u], {"tenant": t, "group": g, "user": u, "since": now,
                                "source": update.source, "message_id": message_id})
        for u in to_remove:
            txn.delete(member[u])
        if to_add or to_remove:
            txn.set(version_ref, {"tenant": t, "group": g, "version": firestore.Increment(1)}, merge=True)
        if update.drop_link and (blind or stored.exists):
            txn.update(group_ref, {"delta_link": None})
        if update.sync is not None:
            txn.set(group_ref, {"tenant": t, "group": g, "delta_link": update.sync.delta_link,
                                "synced_at": _aware(update.sync.synced_at)})
        expires = now + dt.timedelta(seconds=ttl)
        for mid in dict.fromkeys(update.message_ids) if first else ():
            txn.set(self._doc("processed", mid), {"id": mid, "expires_at": expires})
        return entries

    def _members_at(self, tenant: str, group: str, version_ref) -> tuple[int, set[str]]:
        """The group's members and the version they are at, read outside any transaction
        (module doc): a version equal before and after the query dates its answer."""
        for _ in range(MAX_ATTEMPTS):
            before = _version(version_ref.get())
            members = {snap.get("user") for snap in self._members_query(tenant, group).stream()}
            if _version(version_ref.get()) == before:
                return before, members
        raise gexc.Aborted(f"members of {group} kept changing during its full read")

    def record_iam(self, service: str, desired: Mapping[str, set[str]], *, source: str, why: str,
                   message_id: str | None = None, claim: bool = False, written: IamWrite | None = None,
                   lease: tuple[str, str] | None = None) -> list[ChangeEntry]:
        return self._run(self._record_iam, service, desired, source, why, message_id, claim, written, lease,
                         utcnow())

    def _record_iam(self, txn, service: str, desired: Mapping[str, set[str]], source: str, why: str,
                    message_id: str | None, claim: bool, written: IamWrite | None,
                    lease: tuple[str, str] | None, now: dt.datetime) -> list[ChangeEntry]:
        ref = self._doc("managed", service)
        held = self._doc("leases", lease[0]) if lease is not None else None
        snaps = self._read(txn, [ref] + ([held] if held else []))
        if held is not None and (not snaps[held.path].exists or snaps[held.path].get("holder") != lease[1]):
            raise Unavailable(f"lease {lease[0]} was lost")
        current = self._roles(snaps[ref.path])
        added, removed = diff_iam(current, desired)
        if not added and not removed and not (written and (written.added or written.removed)):
            return []
        counters = self._counters_now()
        at = monotonic_at(now, counters["last_at"])
        entries = iam_entries(service, added, removed, at, source, why, message_id, claim=claim, written=written)
        if not entries:
            return []
        entries = self._log(txn, entries, counters, bump_generation=False)
        roles = [{"role": r, "members": sorted(ms)} for r, ms in sorted(desired.items()) if ms]
        txn.set(ref, {"service": service, "roles": roles})
        return entries

    def acquire_lease(self, name: str, holder: str, ttl_seconds: float) -> bool:
        return self._run(self._acquire, name, holder, ttl_seconds, utcnow())

    def _acquire(self, txn, name: str, holder: str, ttl: float, now: dt.datetime) -> bool:
        # Optimistic, as meta/counters (module doc): the writers of one resource all
        # poll its lease, and all try to take it the moment it lapses.
        ref = self._doc("leases", name)
        snap = ref.get()
        if snap.exists and snap.get("holder") != holder and not _lapsed(snap):
            return False
        lease = {"name": name, "holder": holder, "ttl_s": ttl, "expires_at": now + dt.timedelta(seconds=ttl)}
        if snap.exists:   # fails (FailedPrecondition, and _run reads again) if another writer was first
            txn.update(ref, lease, option=self._client.write_option(last_update_time=snap.update_time))
        else:
            txn.create(ref, lease)
        return True

    def renew_lease(self, name: str, holder: str, ttl_seconds: float) -> bool:
        return self._run(self._renew, name, holder, ttl_seconds, utcnow())

    def _renew(self, txn, name: str, holder: str, ttl: float, now: dt.datetime) -> bool:
        ref = self._doc("leases", name)
        snap = self._read(txn, [ref])[ref.path]
        if not snap.exists or snap.get("holder") != holder:
            return False
        txn.update(ref, {"ttl_s": ttl, "expires_at": now + dt.timedelta(seconds=ttl)})
        return True

    def release_lease(self, name: str, holder: str) -> None:
        self._run(self._release, name, holder)

    def _release(self, txn, name: str, holder: str) -> None:
        ref = self._doc("leases", name)
        snap = self._read(txn, [ref])[ref.path]
        if snap.exists and snap.get("holder") == holder:
            txn.delete(ref)

    def lease_holder(self, name: str) -> str | None:
        with _translated():
            snap = self._doc("leases", name).get()
        return snap.get("holder") if snap.exists and not _lapsed(snap) else None

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # -- helpers ----------------------------------------------------------------

    def _counters_now(self) -> dict:
        """meta/counters as committed now: read outside the transaction on purpose
        (no lock), and guarded by the precondition ``_log`` writes it with."""
        snap = self._counters.get()
        data = snap.to_dict() if snap.exists else {}
        last = data.get("last_at")
        return {"generation": data.get("generation", 0), "seq": data.get("seq", 0),
                "last_at": _plain(last) if last is not None else None,
                "update_time": snap.update_time if snap.exists else None}

    def _log(self, txn, entries: list[ChangeEntry], counters: dict, *,
             bump_generation: bool) -> list[ChangeEntry]:
        """Write entries with the next seqs and meta/counters, the latter on condition
        that nobody changed it since ``_counters_now`` (else ``_run`` retries)."""
        seq = counters["seq"]
        out = []
        for e in entries:
            seq += 1
            e = dataclasses.replace(e, seq=seq)
            txn.create(self._client.collection("changes").document(f"{seq:020d}"),
                       {"seq": seq, "at": e.at, **{f: getattr(e, f) for f in CHANGE_FIELDS}})
            out.append(e)
        fields = {"seq": seq, "generation": generation_after(counters["generation"]) if bump_generation
                  else counters["generation"],
                  "last_at": entries[-1].at if entries else counters["last_at"]}
        if counters["update_time"] is None:
            txn.create(self._counters, fields)  # fails (AlreadyExists) if another writer was first
        else:
            txn.update(self._counters, fields,
                       option=self._client.write_option(last_update_time=counters["update_time"]))
        return out

    def _purge_expired(self, now: dt.datetime) -> None:
        """Delete a batch of expired processed ids, at most every ``purge_interval``.

        Housekeeping only (reads already ignore expired ids), so a failure is left
        for the next round. Each delete is conditioned on the document's update
        time, so an id refreshed meanwhile by another apply is not lost.
        """
        with self._purge_lock:
            if time.monotonic() - self._last_purge < self.purge_interval:
                return
            self._last_purge = time.monotonic()
        query = (self._client.collection("processed")
                 .where(filter=FieldFilter("expires_at", "<=", now)).limit(PURGE_BATCH))
        with contextlib.suppress(gexc.GoogleAPIError):
            batch = self._client.batch()
            for snap in query.stream():
                unchanged = self._client.write_option(last_update_time=snap.update_time)
                batch.delete(snap.reference, option=unchanged)
            if len(batch):
                batch.commit()
