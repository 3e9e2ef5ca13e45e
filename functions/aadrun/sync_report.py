"""What a policy_sync run reports (CONTRACT.md §9): its summary, its audit entries
and its policy-update event."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from . import audit
from .iam import AppliedResult
from .messages import dedupe_id, rfc3339
from .plan import ServiceChanges
from .policy import Policy
from .store import ChangeEntry, utcnow

_AUDIT_EVENT = {"member_added": "membership_change", "member_removed": "membership_change",
                "iam_added": "iam_change", "iam_removed": "iam_change", "iam_restored": "iam_change",
                "iam_claimed": "iam_claim", "iam_unclaimed": "iam_claim"}
# A first sync of a large tenant changes millions of memberships, each with its audit
# line already: a summary counts them all but keeps only this many, and a policy-update
# event lists at most this many users per group and kind, and IAM members per service
# and role; and at most MAX_EVENT_LISTED in all (Pub/Sub takes 10 MB a message).
MAX_LISTED = 1000
MAX_EVENT_LISTED = 20_000


@dataclasses.dataclass
class SyncSummary:
    """What one batch or resync did (``to_json``: the CLI's ``resync`` and maintenance's
    reconcile fold it into their reports).

    ``duplicates``: messages already processed (redeliveries); ``reflected``: messages
    whose claims an earlier Graph read had already shown (no read needed); ``ignored``:
    messages about groups no policy names. Membership changes go in through ``record``:
    ``added``/``removed`` count them, ``membership`` keeps the first ``MAX_LISTED``.
    """

    source: str
    messages: int = 0
    duplicates: int = 0
    reflected: int = 0
    ignored: int = 0
    reauthorized: int = 0
    groups: list[str] = dataclasses.field(default_factory=list)
    reads: dict[str, int] = dataclasses.field(default_factory=lambda: {"full": 0, "incremental": 0})
    membership: list[ChangeEntry] = dataclasses.field(default_factory=list)
    added: int = 0
    removed: int = 0
    # (tenant, group) -> {"added": [...], "removed": [...]}, each list cut at MAX_LISTED
    changed: dict[tuple[str, str], dict[str, list[str]]] = dataclasses.field(default_factory=dict)
    # (tenant, group) -> {"added": n, "removed": n}: how many each list would hold uncut
    counted: dict[tuple[str, str], dict[str, int]] = dataclasses.field(default_factory=dict)
    iam: dict[str, AppliedResult] = dataclasses.field(default_factory=dict)
    refused: dict[str, str] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)

    def record(self, entries: Iterable[ChangeEntry]) -> None:
        """Count membership changes (the store's entries of a group update)."""
        for e in entries:
            if e.kind not in ("member_added", "member_removed"):
                continue
            kind = "added" if e.kind == "member_added" else "removed"
            setattr(self, kind, getattr(self, kind) + 1)
            if len(self.membership) < MAX_LISTED:
                self.membership.append(e)
            self._list(e.tenant, e.group, kind, [e.user], 1)

    def absorb(self, part: "SyncSummary") -> None:
        """Add the changes ``part`` recorded (a worker's, for one group)."""
        self.added, self.removed = self.added + part.added, self.removed + part.removed
        self.membership += part.membership[:max(MAX_LISTED - len(self.membership), 0)]
        for (tenant, group), users in part.changed.items():
            for kind, listed in users.items():
                self._list(tenant, group, kind, listed, part.counted[(tenant, group)][kind])

    def _list(self, tenant: str, group: str, kind: str, users: list[str], count: int) -> None:
        listed = self.changed.setdefault((tenant, group), {"added": [], "removed": []})[kind]
        listed += users[:max(MAX_LISTED - len(listed), 0)]
        counts = self.counted.setdefault((tenant, group), {"added": 0, "removed": 0})
        counts[kind] += count

    @property
    def changes(self) -> int:
        return self.added + self.removed

    @property
    def iam_changes(self) -> dict[str, ServiceChanges]:
        return {name: r.changes for name, r in self.iam.items() if not r.changes.empty}

    def to_json(self) -> dict:
        counts = {f: getattr(self, f) for f in ("source", "messages", "duplicates", "reflected", "ignored",
                                               "reauthorized", "groups", "reads", "added", "removed", "refused",
                                               "errors")}
        return {**counts, "membership": [e.to_json() for e in self.membership],
                "iam": {name: r.to_json() for name, r in sorted(self.iam.items())}}


def audit_changes(entries: Iterable[ChangeEntry]) -> None:
    """One audit entry per membership or IAM change (CONTRACT.md §9)."""
    for e in entries:
        member = e.kind.startswith("member")
        what, where = (e.user, e.group) if member else (e.member, f"{e.service} {e.role}")
        audit.entry(_AUDIT_EVENT[e.kind], f"{e.kind} {what} ({where})", **e.to_json())


def policy_event(policy: Policy, groups: Iterable[tuple[str, str]], message_ids: Iterable[str],
                 summary: SyncSummary, replaces: Iterable[str] = ()) -> dict:
    """The policy-update event of a run: for every group it touched, the members added
    and removed; every service whose decisions that may change; the IAM changes made
    (or planned, in record mode) and refused; earlier events that were never published
    and that it stands for (``replaces``: their id@time, only when there are some). Lists
    are cut (``MAX_LISTED``, ``MAX_EVENT_LISTED``) and what was cut says ``truncated``:
    the audit log has every change. ``id`` is a digest of the content: a redelivery
    that publishes the same event again gives it the same id, but so does the same
    change recurring later (a member removed and added back twice), so an id seen
    before is a duplicate only within a short window, and applying an event twice
    must be harmless (it says what to re-read, not what to toggle)."""
    touched = sorted(set(groups) | set(summary.changed))
    budget = [MAX_EVENT_LISTED]

    def cut(lists: dict[str, list[str]], counts: dict[str, int]) -> dict:
        out: dict = {}
        for kind, names in lists.items():
            out[kind] = sorted(names)[:max(min(MAX_LISTED, budget[0]), 0)]
            budget[0] -= len(out[kind])
        return {**out, "truncated": True} if any(len(out[k]) < counts[k] for k in out) else out

    def group(key: tuple[str, str]) -> dict:
        users = summary.changed.get(key, {"added": [], "removed": []})
        return cut(users, summary.counted.get(key, {k: len(v) for k, v in users.items()}))

    def iam(changes: ServiceChanges) -> dict:
        return {role: cut(lists, {k: len(v) for k, v in lists.items()})
                for role, lists in changes.to_json()["changes"].items()}

    content = {
        "schema": 1, "kind": "policy_update", "source": summary.source,
        "groups": [{"tenant": t, "group": g, **group((t, g))} for t, g in touched],
        "services": sorted(s.name for s in policy.services.values()
                           if any((s.tenant, g) in touched for g in s.groups)),
        "iam": {name: iam(changes) for name, changes in sorted(summary.iam_changes.items())},
        "refused": sorted(summary.refused),
        "message_ids": sorted(set(message_ids)),
        **({"replaces": sorted(set(replaces))} if replaces else {}),
    }
    return {**content, "id": dedupe_id(content), "at": rfc3339(utcnow())}


def iam_outcome(summary: SyncSummary, outcomes: Iterable[tuple[str, AppliedResult | None, str | None]]) -> None:
    """Fold step 3's (service, result, refusal) triples into the summary."""
    for name, result, refused in outcomes:
        if refused:
            summary.refused[name] = refused
        if result is not None:   # a refused plan's revocations too
            summary.iam[name] = result


__all__ = ["SyncSummary", "audit_changes", "policy_event", "iam_outcome"]
