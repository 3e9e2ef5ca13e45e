"""The authorization decision: pure, from a verified token's facts, the
service's rules and the caller's live group memberships (CONTRACT.md §3).

Group rules are decided from the membership store only, never from the token's
``groups`` claim: that claim is stale until the token expires and is absent on
group overage.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from .policy import Service


class RuleOutcome(NamedTuple):   # immutable, and 4x cheaper to build than a frozen dataclass
    allow: bool
    reason: str                 # ok | not_member | membership_unknown | no_matching_rule
    rule: int | None = None     # index of the allowing rule in service.access
    via: str | None = None      # the group id or app role that allowed


def decide(service: Service, roles: tuple[str, ...], membership: Mapping[str, bool | None]) -> RuleOutcome:
    """``membership``: group id -> True (member), False (not a member), None (never synced)."""
    for index, rule in enumerate(service.rules):
        for role in rule.app_roles:
            if role in roles:
                return RuleOutcome(True, "ok", index, role)
        for group in rule.groups:
            if membership.get(group) is True:
                return RuleOutcome(True, "ok", index, group)
    groups = service.groups
    if any(membership.get(g) is None for g in groups):
        return RuleOutcome(False, "membership_unknown")
    if groups:
        return RuleOutcome(False, "not_member")
    return RuleOutcome(False, "no_matching_rule")
