"""policy_sync against a model of Microsoft Graph: random histories of membership
changes whose notifications arrive at once, late, twice, out of order or never, on two
instances, with reconciles in between (SQLite store, Cloud Run IAM and Graph served
locally, as in test_sync.py).

After every step: a removal whose notification was handled holds (out of the store,
denied by verify) unless Graph added the user back; the store never holds a member
Graph never had. Once every notification is delivered, one reconcile and one drift run
leave the store equal to Graph and IAM equal to what the policy derives from it.
"""
from __future__ import annotations

import random

import pytest

from aadrun.errors import Deferred
from tests.support.graph_fixtures import *  # noqa: F401,F403 - graph_server, graph_pki, loopback_only
from tests.support.sync_world import *  # noqa: F401,F403 - world, app, store_url, no_adc
from tests.support.sync_world import ALICE, BILLING, BOB, CAROL, G_ENG, G_OPS, REPORTS, TENANT, change, user

USERS = (ALICE, BOB, CAROL)
GROUPS = (G_ENG, G_OPS)   # reports names both; billing names G_ENG
STEPS = 20


def _handle(app, batch: list, pending: list) -> bool:
    """One Pub/Sub delivery: a batch that fails goes back to be delivered again."""
    try:
        app.sync.handle_messages(batch)
        return True
    except Deferred:
        pending.extend(batch)
        return False


@pytest.mark.parametrize("seed", range(30))
def test_random_histories_keep_removals_and_converge_to_graph(world, app, seed):
    rng = random.Random(seed)
    apps = [app, world.app()]
    verifier = world.verifier()
    graph = world.graph
    pending: list = []
    ever = {g: set() for g in GROUPS}   # every member Graph ever had
    removed: set[tuple[str, str]] = set()   # (group, user): removal handled, not added back since

    def check() -> None:
        for g in GROUPS:
            assert (app.store.group_members(TENANT, g) or set()) <= ever[g], "a member Graph never had"
        for g, u in removed:
            assert app.store.membership(TENANT, u, [g])[g] is not True, f"removal of {u} from {g} undone"
            if all((other, u) in removed or u not in ever[other] for other in GROUPS):   # no other way in
                token = world.idp.mint(TENANT, oid=u, aud="api://aadrun-test")
                assert not verifier.decide("reports", token).allow

    for step in range(STEPS):
        op = rng.choice(("change", "change", "change", "forged", "deliver", "deliver", "reconcile"))
        if op == "forged":   # an addition Graph does not show (forged, or replayed after a removal)
            g = rng.choice(GROUPS)
            outsiders = [u for u in USERS if u not in graph.members(TENANT, g)]
            if outsiders:
                pending.append(change(g, added=[rng.choice(outsiders)], salt=f"forged {step}"))
        elif op == "change":
            g, u = rng.choice(GROUPS), rng.choice(USERS)
            if u in graph.members(TENANT, g):
                graph.remove_members(TENANT, g, [u])
                message = change(g, removed=[u], salt=str(step))
            else:
                graph.add_members(TENANT, g, [u])
                ever[g].add(u)
                removed.discard((g, u))
                message = change(g, added=[u], salt=str(step))
            fate = rng.choice(("now", "later", "twice", "lost"))
            if fate == "now":
                if _handle(rng.choice(apps), [message], pending) and message.removed:
                    removed.add((g, u))
            elif fate != "lost":
                pending.extend([message] * (2 if fate == "twice" else 1))
        elif op == "deliver" and pending:
            rng.shuffle(pending)   # Pub/Sub keeps no order across keys, and redeliveries come late
            size = rng.randint(1, 3)
            batch = pending[:size]
            del pending[:size]
            if _handle(rng.choice(apps), batch, pending):
                removed.update((m.group, u) for m in batch for u in m.removed
                               if u not in graph.members(TENANT, m.group))
        elif op == "reconcile":
            rng.choice(apps).maintenance.run(["reconcile"])
        check()

    for _ in range(20):   # Pub/Sub redelivers until every message is accepted
        if not pending:
            break
        batch, pending[:] = list(pending), []
        _handle(app, batch, pending)
    assert not pending, "a message never accepted"
    summary = app.maintenance.run(["reconcile", "drift"])
    assert summary["ok"], summary
    truth = {g: graph.members(TENANT, g) for g in GROUPS}
    assert {g: app.store.group_members(TENANT, g) for g in GROUPS} == truth
    assert world.members(REPORTS) == {user(u) for g in GROUPS for u in truth[g]}
    assert {m for m in world.members(BILLING) if "/subject/" in m} == {user(u) for u in truth[G_ENG]}
    check()
