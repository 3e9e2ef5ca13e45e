"""One write of the members aadrun manages on a Cloud Run resource (CONTRACT.md §7):
policy_sync's writes and maintenance's drift repair both go through ``write_managed``.

The caller holds the store lease ``iam/{resource}``, so aadrun's writers of one
resource take turns and the managed set a plan reads is the one the previous writer
recorded. Within one write:

  - the members it adds are recorded as managed *before* the set call (the claim,
    logged ``iam_claimed``), so a crash after the call cannot orphan them in IAM,
    where no later plan would remove them; a later plan drops a claimed member it
    finds absent (``iam_unclaimed``). Only what the set call did is logged as
    ``iam_added`` / ``iam_removed``;
  - a 409 re-reads IAM and the store and plans again (``IamWriter.apply_with``); a
    member claimed by an attempt whose set never happened, and granted by someone
    else meanwhile, is theirs, not aadrun's to revoke later;
  - a claim an earlier write left (its set failed, or its outcome is unknown: a
    timed-out call may still land) is dropped only with a set call, even one that
    changes nothing: the call moves the policy's etag, so a late set of that
    earlier write fails (409) rather than grant a member nobody manages any more;
  - a plan refused for its size (over Google's principal limit), or whose set call
    IAM refuses (400: a member it cannot resolve, such as a principal of a pool
    that does not exist, or one an organization policy forbids), still makes its
    revocations without its grants: a removed member must lose access;
  - every change-log entry it records is one audit entry (CONTRACT.md §9), even
    when the set call then fails; and what a set call did is audited even when the
    store write after it fails (the lease lapsed, the store is down), though the
    change log then lacks it.

``record`` mode reads no IAM and plans as if its own plans had been applied: what
it manages is kept apart, under ``record:{resource}`` (``managed_store``). Kept with
what set calls made, a switch to ``cloudrun`` would take a grant someone made by
hand for aadrun's (and revoke it later), and a spell in ``record`` mode would drop
members aadrun granted from the record (never to be revoked).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from . import audit
from .coalesce import StoreLease
from .errors import PlanError, UpstreamError
from .iam import AppliedResult, IamWriter
from .plan import Binding, Members, ServiceChanges, diff
from .store import ChangeEntry, IamWrite, Store, utcnow
from .store.rules import iam_entries
from .sync_report import audit_changes


RECORDED = "record:"   # key prefix of what record mode manages (never a Cloud Run resource)


class _RecordedPlans:
    """The store, with record mode's managed members in place of the real ones."""

    def __init__(self, store: Store):
        self._store = store

    def managed_members(self, cloud_run: str) -> dict[str, set[str]]:
        return self._store.managed_members(RECORDED + cloud_run)

    def managed_targets(self) -> set[str]:
        return {t[len(RECORDED):] for t in self._store.managed_targets() if t.startswith(RECORDED)}

    def record_iam(self, cloud_run: str, desired, **kwargs) -> list[ChangeEntry]:
        return self._store.record_iam(RECORDED + cloud_run, desired, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._store, name)


def managed_store(store: Store, mode: str) -> Store:
    """``store`` as IAM mode ``mode`` keeps its managed members (module doc)."""
    return _RecordedPlans(store) if mode == "record" else store


@dataclasses.dataclass
class WriteOutcome:
    result: AppliedResult | None   # None: refused outright (below)
    refusal: str | None            # why its grants were refused, if they were
    entries: list[ChangeEntry]     # what reached the change log
    managed_before: dict[str, set[str]]   # the managed set the last plan started from
    live: list[Binding] | None     # the live bindings the last plan read (None: record mode)

    @property
    def refused_outright(self) -> bool:
        """Even the revocations alone would leave the live policy over the limit
        (other parties' bindings): nothing was written."""
        return self.result is None


def write_managed(store: Store, writer: IamWriter, lease: StoreLease, resource: str,
                  desired: Callable[[], Members], *, service: str, source: str, why: str,
                  message_id: str | None = None, repair: bool = False) -> WriteOutcome:
    """Bring the managed members of ``resource`` to ``desired()`` (role -> members,
    asked again on each attempt); ``service`` names it in plans and errors. A
    ``repair`` (maintenance's drift task) logs each managed member it puts back in
    IAM as ``iam_restored`` rather than ``iam_added``."""
    store = managed_store(store, writer.mode)
    before: dict[str, set[str]] = {}
    pending: dict[str, set[str]] = {}     # claimed by the attempt in flight
    unwritten: dict[str, set[str]] = {}   # claimed by attempts whose set did not happen
    entries: list[ChangeEntry] = []
    seen: dict = {"live": None, "grants": False}   # the last plan's live bindings; did its set grant?
    grants = True
    record = dict(source=source, why=why, message_id=message_id, lease=lease.key)

    def plan_for(live: list[Binding] | None) -> ServiceChanges:
        lease.renew()   # each attempt: a 409 plans again
        for role, members in pending.items():   # a new attempt: the last one's set did not happen
            unwritten.setdefault(role, set()).update(members)
        pending.clear()
        before.clear()
        before.update({r: m - unwritten.get(r, set()) for r, m in store.managed_members(resource).items()})
        seen["live"], seen["grants"] = live, False
        return diff(desired(), before, live, service=service, cloud_run=resource, grants=grants)

    def claim(changes: ServiceChanges) -> None:
        seen["grants"] = any(changes.adds.values())
        roles = set(before) | set(changes.adds)
        for role, members in changes.adds.items():   # newly claimed, not the already managed
            pending[role] = set(members) - before.get(role, set())
        intent = {r: before.get(r, set()) | set(changes.adds.get(r, ())) for r in roles}
        entries.extend(store.record_iam(resource, intent, claim=True, **record))

    def drops_claims(changes: ServiceChanges) -> bool:
        return any(members - changes.managed.get(role, frozenset()) - changes.removes.get(role, frozenset())
                   for role, members in before.items())

    def outcome(result: AppliedResult | None, refusal: str | None) -> WriteOutcome:
        return WriteOutcome(result, refusal, entries, dict(before), seen["live"])

    refusal = None
    try:
        try:
            result = writer.apply_with(resource, plan_for, claim, drops_claims)
        except (PlanError, UpstreamError) as e:
            if isinstance(e, UpstreamError) and not (e.status_code == 400 and seen["grants"]):
                raise
            refusal, grants = str(e), False
            audit.entry("iam_refused", f"{e}; its revocations are still made", severity="ERROR",
                        reason=e.reason, service=service, cloud_run=resource)
            try:
                result = writer.apply_with(resource, plan_for, claim, drops_claims)
            except PlanError:
                return outcome(None, refusal)
        changes = result.changes
        # What the set call did (nothing, when none was needed). Record mode makes none:
        # nothing reached IAM, so its plan is recorded as claims, never as grants.
        written = IamWrite({}, {}) if writer.mode == "record" else IamWrite(
            changes.adds, changes.removes,
            {r: frozenset(m) & before.get(r, set()) for r, m in changes.adds.items()} if repair else {})
        managed = {r: set(m) for r, m in changes.managed.items() if m}
        # After a claim the store's record is the claim's, whatever the plan held.
        if entries or written.added or written.removed or managed != {r: m for r, m in before.items() if m}:
            try:
                # A write that outlived its lease must not overwrite a newer holder's record.
                entries.extend(store.record_iam(resource, managed, written=written, **record))
            except Exception:
                if written.added or written.removed:   # what the set call did happened: audited all the same
                    entries.extend(iam_entries(resource, (), (), utcnow(), source, why, message_id, written=written))
                raise
        return outcome(result, refusal)
    finally:
        audit_changes(entries)
