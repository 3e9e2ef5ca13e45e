"""Properties of the pure decision function (Hypothesis)."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from aadrun.decide import decide
from aadrun.policy import Rule, Service

GROUPS = [f"aaaaaaaa-0000-0000-0000-00000000000{i}" for i in range(4)]
ROLES = ["A", "B", "C"]

rules = st.builds(
    lambda groups, roles: Rule(tuple(groups), tuple(roles)),
    st.lists(st.sampled_from(GROUPS), max_size=2, unique=True),
    st.lists(st.sampled_from(ROLES), max_size=2, unique=True),
).filter(lambda r: r.groups or r.app_roles)
services = st.builds(lambda rs: Service("s", "t", tuple(rs)), st.lists(rules, min_size=1, max_size=3))
memberships = st.dictionaries(st.sampled_from(GROUPS), st.sampled_from([True, False, None]))
held_roles = st.lists(st.sampled_from(ROLES + ["Z"]), max_size=3).map(tuple)


@given(services, held_roles, memberships)
def test_never_allows_without_a_matching_rule(service, roles, membership):
    outcome = decide(service, roles, membership)
    matches = any(set(r.app_roles) & set(roles) or any(membership.get(g) is True for g in r.groups)
                  for r in service.rules)
    assert outcome.allow == matches
    if outcome.allow:
        rule = service.rules[outcome.rule]
        assert outcome.via in rule.app_roles + rule.groups


@given(services, held_roles, memberships)
def test_deterministic(service, roles, membership):
    assert decide(service, roles, dict(membership)) == decide(service, roles, dict(membership))


@given(services, held_roles, memberships)
def test_deny_reasons_follow_the_contract(service, roles, membership):
    outcome = decide(service, roles, membership)
    if outcome.allow:
        return
    groups = service.groups
    if any(membership.get(g) is None for g in groups):
        assert outcome.reason == "membership_unknown"
    elif groups:
        assert outcome.reason == "not_member"
    else:
        assert outcome.reason == "no_matching_rule"


@given(services, held_roles, memberships, st.sampled_from(GROUPS))
def test_removing_a_membership_never_widens_access(service, roles, membership, group):
    before = decide(service, roles, membership)
    after = decide(service, roles, {**membership, group: False})
    assert not (after.allow and not before.allow)


def test_the_allowing_rule_is_named_by_its_place_in_access():
    # The audit line and `explain` report it as access[N]: the second rule here.
    service = Service("s", "t", (Rule((), ("A",)), Rule((GROUPS[0],), ())))
    assert decide(service, (), {GROUPS[0]: True}) == (True, "ok", 1, GROUPS[0])
    assert decide(service, ("A",), {GROUPS[0]: True}) == (True, "ok", 0, "A")   # the first that allows
