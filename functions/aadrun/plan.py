"""IAM planning: what Cloud Run IAM should hold, and the smallest change to get there.

Pure functions, no I/O. The inputs are the policy, the membership
store's view of each group, the members aadrun already manages, and optionally
the live IAM bindings; the output is a ``ServiceChanges`` per service.

What aadrun manages is kept per Cloud Run resource, not per policy service: two
services on one resource want the union of their members (neither revokes what
the other grants), and a resource no service names any more (the service was
removed, or its ``cloud_run`` moved) is an *orphan* whose managed members are all
revoked, while a grant someone else made on the new resource is never claimed.

Rules (CONTRACT.md §3, §7):
  - only services with ``cloud_run`` are planned; ``app_roles`` rules are checked
    by verify and put nothing into IAM;
  - ``bind: members`` puts one ``principal`` per current member of each group (a
    never-synced group contributes nothing, so nobody is granted on a guess);
    ``bind: group`` always puts one ``group_principal`` per group;
  - aadrun removes only members it manages (``managed_before``) and never
    touches anyone else's grant, nor any conditional binding;
  - a policy that would end up with more than ``MAX_PRINCIPALS`` members
    (each occurrence counts) is refused with ``PlanError``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from types import MappingProxyType

from .errors import PlanError
from .policy import CLOUD_RUN, MAX_PRINCIPALS, Policy, Service

MembersOf = Callable[[str, str], "set[str] | None"]
Members = Mapping[str, "set[str] | frozenset[str]"]


@dataclasses.dataclass(frozen=True)
class Binding:
    """One binding of a live IAM policy; ``condition`` is its JSON form, or None."""

    role: str
    members: tuple[str, ...]
    condition: Mapping[str, str] | None = dataclasses.field(default=None, hash=False)


def granted(member: str) -> str:
    """The member a binding's entry grants. IAM shows a grant to a deleted workforce
    subject as ``deleted:principal://...``: an undelete within 30 days revives it, so it
    is still that member's grant, to be counted present and revoked."""
    if member.startswith("deleted:") and "?uid=" not in member:
        return member[len("deleted:"):]
    return member


def _outlived(member: str) -> str | None:
    """M, for IAM's ``deleted:M?uid=N``: a grant to a Google account since deleted (a
    restore of that account within 30 days revives it; a new account with the same
    email does not hold it)."""
    if member.startswith("deleted:") and "?uid=" in member:
        return member[len("deleted:"):].split("?uid=", 1)[0]
    return None


def grant_of(member: str, ours: Collection[str], entries: Collection[str]) -> bool:
    """Whether the entry ``member``, among a role's unconditioned ``entries``, is the
    grant of one of ``ours``: itself (``granted``), or ours outlived by its Google
    account (``deleted:M?uid=N`` with M not there itself). Beside a live M it is taken
    for an older account's, someone else's (one snapshot of the policy cannot tell which
    came first)."""
    if granted(member) in ours:
        return True
    account = _outlived(member)
    return account is not None and account in ours and account not in entries


def _frozen(mapping: Mapping[str, Iterable[str]]) -> Mapping[str, frozenset[str]]:
    return MappingProxyType({role: frozenset(m) for role, m in sorted(mapping.items())})


@dataclasses.dataclass(frozen=True)
class ServiceChanges:
    """The IAM change planned for one Cloud Run service.

    ``adds`` / ``removes``: role -> members to add / remove (only non-empty
    roles). ``managed``: role -> the members aadrun manages once the change is
    applied, which is what ``Store.record_iam`` is given afterwards.
    ``principals``: member occurrences in the whole policy after the change.
    """

    service: str
    cloud_run: str
    adds: Mapping[str, frozenset[str]]
    removes: Mapping[str, frozenset[str]]
    managed: Mapping[str, frozenset[str]]
    principals: int

    @property
    def empty(self) -> bool:
        return not self.adds and not self.removes

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.adds) | set(self.removes) | set(self.managed)))

    def to_json(self) -> dict:
        """Deterministic JSON (sorted roles and members) for ``aadrun plan``."""
        return {
            "service": self.service,
            "cloud_run": self.cloud_run,
            "changes": {
                role: {"add": sorted(self.adds.get(role, ())), "remove": sorted(self.removes.get(role, ()))}
                for role in sorted(set(self.adds) | set(self.removes))
            },
            "managed": {role: sorted(self.managed[role]) for role in sorted(self.managed)},
            "principals": self.principals,
        }


def desired_members(policy: Policy, service: Service, members_of: MembersOf) -> dict[str, set[str]]:
    """Role -> IAM members the policy wants on ``service.cloud_run``.

    Every role of a group rule is present, possibly with an empty set, so that
    a rule whose groups are all empty still plans the removal of old members.
    """
    desired: dict[str, set[str]] = {}
    if not service.cloud_run:
        return desired
    for rule in service.rules:
        if not rule.groups:  # app_roles only: decided by verify, not by IAM
            continue
        members = desired.setdefault(rule.role, set())
        for group in rule.groups:
            if rule.bind == "group":
                members.add(policy.group_principal_for(group))
                continue
            users = members_of(service.tenant, group)
            if users is None:  # never synced: grant nothing on a guess
                continue
            members.update(policy.member_principal(oid) for oid in users)
    return desired


class Desired(dict):
    """Role -> IAM members wanted on one resource (``desired_on``), and how many
    principals each service naming the resource asks for: a refusal over the limit
    names them, and the one whose groups to bind as groups is not always the first."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: dict[str, int] = {}


def desired_on(policy: Policy, cloud_run: str, members_of: MembersOf) -> Desired:
    """Role -> IAM members the policy wants on the resource ``cloud_run``: the union
    over every service that names it."""
    desired = Desired()
    for service in policy.services.values():
        if service.cloud_run == cloud_run:
            wanted = desired_members(policy, service, members_of)
            desired.asked[service.name] = sum(len(members) for members in wanted.values())
            for role, members in wanted.items():
                desired.setdefault(role, set()).update(members)
    return desired


def orphans(policy: Policy, managed_targets: Iterable[str]) -> list[str]:
    """Resources aadrun manages members on that no service of the policy names
    (a key that is no resource name, as an earlier version's service name, is not one)."""
    named = {s.cloud_run for s in policy.services.values() if s.cloud_run}
    return sorted(t for t in set(managed_targets) - named if CLOUD_RUN.match(t))


def iam_targets(policy: Policy, managed_targets: Iterable[str]) -> list[tuple[str | None, str]]:
    """(service name, resource) of every service with ``cloud_run``, in name order, then
    (None, resource) of every orphaned resource: what plans and drift repairs go over."""
    named = [(name, policy.services[name].cloud_run) for name in sorted(policy.services)
             if policy.services[name].cloud_run]
    return named + [(None, resource) for resource in orphans(policy, managed_targets)]


def entries_by_role(bindings: Iterable[Binding]) -> dict[str, set[str]]:
    """Role -> the entries of its bindings without a condition (the ones aadrun edits)."""
    out: dict[str, set[str]] = {}
    for binding in bindings:
        if binding.condition is None:
            out.setdefault(binding.role, set()).update(binding.members)
    return out


def unconditioned(bindings: Iterable[Binding], managed: Members | None = None) -> dict[str, set[str]]:
    """Role -> members its bindings without a condition grant: each entry's ``granted``
    member, and a ``managed`` member whose grant outlived its Google account."""
    managed = managed or {}
    out: dict[str, set[str]] = {}
    for role, entries in entries_by_role(bindings).items():
        outlived = {account for e in entries if (account := _outlived(e)) and account not in entries}
        out[role] = {granted(m) for m in entries} | (set(managed.get(role, ())) & outlived)
    return out


def count_after(live: Sequence[Binding], adds: Members, removes: Members) -> int:
    """Member occurrences across all bindings once ``adds``/``removes`` are applied.

    Google counts every occurrence, conditional bindings included
    (cloud.google.com/iam/quotas: 1,500 principals per allow policy). ``adds``
    go to one unconditioned binding and never repeat a member already there.
    """
    entries = entries_by_role(live)
    total = 0
    for binding in live:
        gone = removes.get(binding.role, ()) if binding.condition is None else ()
        total += sum(1 for m in binding.members if not grant_of(m, gone, entries.get(binding.role, ())))
    return total + sum(len(m) for m in adds.values())


def check_limit(service: str, cloud_run: str, principals: int, asked: Mapping[str, int] | None = None) -> None:
    """Raise ``PlanError`` when a policy would exceed Google's principal limit. With
    ``asked`` (service -> principals it asks for) naming several services, the error
    names each, the largest first."""
    if principals <= MAX_PRINCIPALS:
        return
    if asked and len(asked) > 1:
        names = " and ".join(f"{name!r} ({count})" for name, count in
                             sorted(asked.items(), key=lambda item: (-item[1], item[0])))
        who, whose = f"services {names} share {cloud_run}", "their"
    else:
        who, whose = f"service {service!r} ({cloud_run})", "its"
    raise PlanError(
        f"{who}: its IAM policy would hold {principals} principals, over Google's limit of "
        f"{MAX_PRINCIPALS}; use `bind: group` for {whose} large groups (one group principal instead "
        f"of one per member)")


def diff(desired: Members, managed_before: Members, live_bindings: Sequence[Binding] | None = None,
         *, service: str = "", cloud_run: str = "", grants: bool = True) -> ServiceChanges:
    """The change from the live policy (or, without one, from ``managed_before``) to ``desired``.

    Per role, on unconditioned bindings: add what is desired and absent;
    remove what aadrun managed, is no longer desired and is still present.
    A desired member someone else already granted is left alone and not
    claimed as managed, so aadrun never later removes another party's grant.
    With ``live_bindings=None`` (record mode) the managed set stands in for
    the live policy. Raises ``PlanError`` over ``MAX_PRINCIPALS``.
    ``grants=False``: the revocations only (what a plan refused for its size still
    does: a removed member must lose access); it adds nothing, so it is not checked
    here (the writer still checks the whole policy it would set).
    """
    live = unconditioned(live_bindings, managed_before) if live_bindings is not None else {
        role: set(m) for role, m in managed_before.items()}
    roles = set(desired) | set(managed_before)
    adds: dict[str, set[str]] = {}
    removes: dict[str, set[str]] = {}
    managed: dict[str, set[str]] = {}
    for role in roles:
        want = set(desired.get(role, ()))
        mine = set(managed_before.get(role, ()))
        present = live.get(role, set())
        add = want - present if grants else set()
        remove = (mine - want) & present
        if add:
            adds[role] = add
        if remove:
            removes[role] = remove
        managed[role] = (want & mine) | add if live_bindings is not None or not grants else want
    if live_bindings is None:
        principals = sum(len(managed[r]) for r in managed) if not grants else sum(len(m) for m in desired.values())
    else:
        principals = count_after(live_bindings, adds, removes)
    if grants:
        check_limit(service, cloud_run, principals, getattr(desired, "asked", None))
    return ServiceChanges(service, cloud_run, _frozen(adds), _frozen(removes), _frozen(managed), principals)


def plan_service(policy: Policy, service: Service, members_of: MembersOf, managed_before: Members,
                 live_bindings: Sequence[Binding] | None = None, *, grants: bool = True) -> ServiceChanges:
    """``desired_on`` then ``diff`` for one service that has ``cloud_run``;
    ``managed_before`` is what aadrun manages on that resource."""
    if not service.cloud_run:
        raise ValueError(f"service {service.name!r} has no cloud_run target")
    desired = desired_on(policy, service.cloud_run, members_of)
    return diff(desired, managed_before, live_bindings, service=service.name, cloud_run=service.cloud_run,
                grants=grants)


def plan_orphan(cloud_run: str, managed_before: Members,
                live_bindings: Sequence[Binding] | None = None) -> ServiceChanges:
    """Revoke every member aadrun manages on a resource no service names (``service`` is "")."""
    return diff({}, managed_before, live_bindings, cloud_run=cloud_run)

