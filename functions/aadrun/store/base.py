"""The membership store: one interface, SQLite (embedded default) and Firestore.

What it holds (CONTRACT.md §3, §5):
  - memberships     (tenant, group, user) -> member since, source, message id
  - group sync      (tenant, group) -> delta link, last full/incremental sync;
                    a group with no sync record was *never synced* (verify then
                    answers ``membership_unknown``, never a guess)
  - processed ids   message ids already applied, with expiry (dedupe)
  - managed members (Cloud Run resource, role) -> IAM members aadrun put there
  - change log      append-only: what changed, when, why, from which message
  - leases          named, expiring locks for maintenance runs
  - generation      a number raised by every membership change, so readers
                    (verify) can cheaply tell that their cached view is stale

Every mutating call is atomic: it either commits all of its effects (memberships,
sync state, processed ids, change-log entries, generation) or none. Any backend
failure is raised as ``aadrun.errors.Unavailable``.
"""
from __future__ import annotations

import abc
import dataclasses
import datetime as dt
import enum
import time
from collections.abc import Iterable, Mapping

from ..config import check_store_url
from ..errors import Deferred

UTC = dt.timezone.utc


def generation_after(current: int) -> int:
    """The generation that follows ``current``: one more, or the clock in microseconds
    when that is more. A store restored from a backup takes its generation back, and
    plain counting would bring it again to a number a reader has cached with the
    memberships of before: that reader would go on allowing members removed since."""
    return max(current + 1, time.time_ns() // 1000)


def utcnow() -> dt.datetime:
    return dt.datetime.now(UTC)


@dataclasses.dataclass(frozen=True)
class SyncState:
    delta_link: str | None
    synced_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class ChangeEntry:
    """One line of the change log (also the shape of `aadrun audit` rows).

    kind: ``member_added`` | ``member_removed`` (membership store);
          ``iam_added`` | ``iam_removed`` | ``iam_restored`` (a Cloud Run IAM member
          granted, revoked, or put back after a change made outside aadrun);
          ``iam_claimed`` | ``iam_unclaimed`` (no IAM change: a member recorded as
          managed just before the set call that grants it, and a member no longer
          managed without being revoked: claimed by a set that never happened, or gone
          from IAM already). A claim with no ``iam_added`` after it was not granted,
          unless the process died between the two: the live policy then tells.
    """

    kind: str
    at: dt.datetime
    tenant: str | None = None
    group: str | None = None
    user: str | None = None
    service: str | None = None   # IAM entries: the Cloud Run resource
    role: str | None = None
    member: str | None = None
    source: str = ""          # who: "graph-delta", "notification", "maintenance", ...
    why: str = ""             # human-readable reason
    message_id: str | None = None
    seq: int | None = None    # assigned by the store, increasing

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["at"] = self.at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")   # one width
        return out


@dataclasses.dataclass(frozen=True)
class IamWrite:
    """What one Cloud Run set call did (role -> members), for ``record_iam`` to log."""

    added: Mapping[str, frozenset[str]]
    removed: Mapping[str, frozenset[str]]
    restored: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)   # of added: put back


class SyncConflict(Deferred):
    """An update's ``expect_synced_at`` no longer held: another read of the group committed
    first, and the update would have changed its members. Nothing was written, but the
    parts a backend already committed of an update it commits in parts (``committed``)."""


class Unchecked(enum.Enum):
    UNCHECKED = "unchecked"


UNCHECKED = Unchecked.UNCHECKED


@dataclasses.dataclass(frozen=True)
class GroupUpdate:
    """Everything one atomic membership update does to one group.

    - ``added`` / ``removed``: user object ids to add or remove.
    - ``replace``: the complete member set (a full delta read); users not in it
      are removed. Exclusive with ``added``.
    - ``sync``: when set, the group's sync state is stored (marks it synced).
    - ``drop_link``: the stored delta link is dropped, in the commit, keeping the
      sync time (the next read is a full one). Exclusive with ``sync``.
    - ``message_ids``: marked processed (for ``processed_ttl`` seconds).
    - ``expect_synced_at``: the sync time of the group its caller read before asking
      Graph (None: never synced). If the stored one differs when the update commits
      and the update would add or remove a member, it raises ``SyncConflict`` instead:
      a Graph answer must not change members over a read committed after it began.
      Only a read sets a sync time: a removal (``drop_link``) committed meanwhile is
      no conflict, as the caller leaves out of its answer the removals committed
      during its read.
    """

    tenant: str
    group: str
    added: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()
    replace: frozenset[str] | None = None
    sync: SyncState | None = None
    message_ids: tuple[str, ...] = ()
    source: str = ""
    why: str = ""
    expect_synced_at: dt.datetime | None | Unchecked = UNCHECKED
    drop_link: bool = False


class Store(abc.ABC):
    """Abstract store. Implementations must be safe to share between threads."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise ``Unavailable`` unless the backend answers."""

    @abc.abstractmethod
    def generation(self) -> int:
        """A number that changes whenever any membership changes, and never comes back
        to one it had (``generation_after``)."""

    @abc.abstractmethod
    def membership(self, tenant: str, user: str, groups: Iterable[str]) -> dict[str, bool | None]:
        """For each group: True (member), False (synced, not a member), None (never synced)."""

    @abc.abstractmethod
    def group_members(self, tenant: str, group: str) -> set[str] | None:
        """Current members, or None when the group was never synced."""

    @abc.abstractmethod
    def sync_state(self, tenant: str, group: str) -> SyncState | None:
        """The stored sync state, or None when the group was never synced."""

    @abc.abstractmethod
    def apply(self, update: GroupUpdate, processed_ttl: float = 7 * 86400) -> list[ChangeEntry]:
        """Apply one group update; returns the change-log entries written (only real
        differences: re-adding a member writes nothing). Atomic, except that a backend
        may commit an update too large for one commit in parts (removals first, the
        sync state last; with ``expect_synced_at``, the first part also marks the group as
        being written); an error after some parts carries their entries as
        ``committed``."""

    @abc.abstractmethod
    def synced_groups(self) -> set[tuple[str, str]]:
        """(tenant, group) of every group with a sync state."""

    @abc.abstractmethod
    def unsync_group(self, tenant: str, group: str) -> bool:
        """Delete the group's sync state, so that it reads as never synced (and changes
        the generation); whether it had one. Its membership rows stay until removed."""

    def forget_group(self, tenant: str, group: str, *, source: str, why: str) -> list[ChangeEntry]:
        """Drop all the store knows of a group no policy names: nothing keeps its
        membership current meanwhile, so a policy that names it again must not trust it
        (verify answers ``membership_unknown`` and plans grant nothing until a read).
        Its members go first, each logged as removed, with its delta link (were this to
        stop here, a policy naming it again would find it empty and read it in full, and
        the group is still synced, so the next forget finishes); then its sync state.
        A read committed before the members go keeps them; one committed before the sync
        state goes leaves its members unsynced, to be read again in full."""
        state = self.sync_state(tenant, group)
        try:
            entries = self.apply(GroupUpdate(tenant, group, replace=frozenset(), drop_link=True, source=source,
                                             why=why, expect_synced_at=state.synced_at if state else None))
        except SyncConflict as e:   # read meanwhile: by an instance whose policy names it
            return list(getattr(e, "committed", ()))
        try:
            self.unsync_group(tenant, group)
        except Exception as e:
            e.committed = entries   # the removals happened: the caller still audits them
            raise
        return entries

    @abc.abstractmethod
    def processed(self, message_ids: Iterable[str]) -> set[str]:
        """Which of these message ids were already applied (and not yet expired)."""

    @abc.abstractmethod
    def managed_members(self, cloud_run: str) -> dict[str, set[str]]:
        """Role -> IAM members aadrun manages on this Cloud Run resource."""

    @abc.abstractmethod
    def managed_targets(self) -> set[str]:
        """The Cloud Run resources on which aadrun manages at least one member."""

    @abc.abstractmethod
    def adopt_managed(self, legacy: str, cloud_run: str) -> bool:
        """Move the managed members a store of an earlier version kept under a service
        name (``legacy``) to the service's Cloud Run resource, merging with what is
        there, without change-log entries (nobody's access changes). True if any moved."""

    @abc.abstractmethod
    def record_iam(self, cloud_run: str, desired: Mapping[str, set[str]], *, source: str, why: str,
                   message_id: str | None = None, claim: bool = False, written: IamWrite | None = None,
                   lease: tuple[str, str] | None = None) -> list[ChangeEntry]:
        """Store the managed members of a Cloud Run resource (role -> members) and log
        the change (``rules.iam_entries``; the entries' ``service`` is the resource):
        with ``written``, what that set call did; with ``claim``, a claim made before a
        set call; with neither, the difference itself (bindings gone with their
        Cloud Run service). With
        ``lease=(name, holder)``, in the same transaction as a check that ``holder``
        still has that lease (``Unavailable`` otherwise): a writer that lost it never
        overwrites a newer holder's record."""

    @abc.abstractmethod
    def changes(self, since: dt.datetime | None = None, limit: int | None = None) -> list[ChangeEntry]:
        """Change-log entries at or after ``since``, oldest first."""

    @abc.abstractmethod
    def last_seq(self) -> int:
        """The ``seq`` of the newest change-log entry (0 while the log is empty)."""

    @abc.abstractmethod
    def changes_after(self, seq: int) -> list[ChangeEntry]:
        """Change-log entries committed after entry ``seq``, in commit order: unlike
        ``changes(since=...)``, this does not trust the clocks that stamped them."""

    @abc.abstractmethod
    def acquire_lease(self, name: str, holder: str, ttl_seconds: float) -> bool:
        """Take or extend the lease ``name`` for ``holder``; False when another holder has it."""

    @abc.abstractmethod
    def renew_lease(self, name: str, holder: str, ttl_seconds: float) -> bool:
        """Extend the lease ``name`` only if ``holder`` still has it, even expired, as long
        as nobody took it meanwhile: never re-take a lease someone else held and gave back."""

    @abc.abstractmethod
    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease back if ``holder`` has it."""

    @abc.abstractmethod
    def lease_holder(self, name: str) -> str | None:
        """Who holds the lease ``name`` now (None: nobody, or it expired)."""

    def close(self) -> None:  # pragma: no cover - optional
        pass


def open_store(url: str, project: str | None = None) -> Store:
    """``sqlite:///relative``, ``sqlite:////absolute`` or ``firestore://[DATABASE]``
    (of ``project``: Settings.project, as the bus's topics are)."""
    check_store_url(url)
    if url.startswith("sqlite:///"):
        from .sqlite import SqliteStore

        return SqliteStore(url[len("sqlite:///"):])
    from .firestore import FirestoreStore

    return FirestoreStore(url[len("firestore://"):] or None, project=project)
