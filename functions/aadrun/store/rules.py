"""Update rules both stores share, so SQLite and Firestore agree on every edge."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping

from .base import UNCHECKED, ChangeEntry, GroupUpdate, IamWrite, SyncConflict, SyncState


def check_update(update: GroupUpdate) -> None:
    """Reject an update the interface calls invalid (a programming error)."""
    if update.replace is not None and update.added:
        raise ValueError("GroupUpdate: replace and added are exclusive")
    if update.drop_link and update.sync is not None:
        raise ValueError("GroupUpdate: sync and drop_link are exclusive")


def check_expected_sync(update: GroupUpdate, stored: SyncState | None, changes_members: bool) -> None:
    """Raise ``SyncConflict`` when ``update`` expects another sync time than the
    ``stored`` state's and would change members (inside the commit's transaction; a
    backend passes True for a part that continues an update split in parts)."""
    synced_at = stored.synced_at if stored is not None else None
    if update.expect_synced_at is not UNCHECKED and update.expect_synced_at != synced_at and changes_members:
        raise SyncConflict(f"group {update.group}: another read committed while this one was in flight")
    if update.sync is not None and isinstance(update.expect_synced_at, dt.datetime) and stored is None:
        # Forgotten while the read was in flight: its link speaks of members the store
        # no longer holds, and would make the group look current without them.
        raise SyncConflict(f"group {update.group}: forgotten while this read was in flight")


def member_entries(update: GroupUpdate, added: Iterable[str], removed: Iterable[str],
                   at: dt.datetime, message_id: str | None) -> list[ChangeEntry]:
    """The change-log entries of one group update (seq not yet assigned)."""
    common = dict(at=at, tenant=update.tenant, group=update.group, source=update.source,
                  why=update.why, message_id=message_id)
    return ([ChangeEntry(kind="member_added", user=u, **common) for u in added]
            + [ChangeEntry(kind="member_removed", user=u, **common) for u in removed])


def diff_iam(current: Mapping[str, set[str]], desired: Mapping[str, set[str]]
             ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(role, member) pairs to add and to remove, sorted; a role absent from
    ``desired`` (or mapped to an empty set) has all its members removed."""
    have = {(r, m) for r, ms in current.items() for m in ms}
    want = {(r, m) for r, ms in desired.items() for m in ms}
    return sorted(want - have), sorted(have - want)


def monotonic_at(now: dt.datetime, last: dt.datetime | None) -> dt.datetime:
    """The time of a new change-log entry: never before the previous entry's, so
    that ``changes(since=...)`` is a consistent cursor even if the wall clock of
    this host (or, with Firestore, of another instance) stepped back."""
    return now if last is None or now >= last else last


def iam_entries(service: str, added, removed, at: dt.datetime, source: str, why: str, message_id: str | None, *,
                claim: bool = False, written: IamWrite | None = None) -> list[ChangeEntry]:
    """The change-log entries of one ``record_iam`` that changes the managed set by
    ``added`` and ``removed`` ((role, member) pairs).

    Only what reached IAM is ``iam_added`` / ``iam_removed``: with ``written`` (the
    set call's adds and removes) those, the adds it ``restored`` as ``iam_restored``;
    any other change of the managed set is ``iam_claimed`` / ``iam_unclaimed``.
    Without ``written`` the difference itself is the IAM change (bindings that went
    with a deleted Cloud Run service), unless it is a ``claim`` made before the set
    call. Record mode passes an empty ``written``: nothing reached IAM.
    """
    def pairs(members: Mapping[str, Iterable[str]]) -> set[tuple[str, str]]:
        return {(r, m) for r, ms in members.items() for m in ms}

    if written is None:
        reached_added, reached_removed = (set(), set()) if claim else (set(added), set(removed))
        back: set[tuple[str, str]] = set()
    else:
        reached_added, reached_removed = pairs(written.added), pairs(written.removed)
        back = pairs(written.restored) & reached_added
    kinds = ([("iam_restored" if p in back else "iam_added", p) for p in sorted(reached_added)]
             + [("iam_removed", p) for p in sorted(reached_removed)]
             + [("iam_claimed", p) for p in added if p not in reached_added]
             + [("iam_unclaimed", p) for p in removed if p not in reached_removed])
    return [ChangeEntry(kind=kind, at=at, service=service, role=r, member=m, source=source, why=why,
                        message_id=message_id) for kind, (r, m) in kinds]
