"""The resilience scenarios of ``scripts/chaos`` in their quick form: every row must
show nothing lost, nothing wrong, and convergence (the full run: ``scripts/chaos``)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import chaos  # noqa: E402
import chaos_load  # noqa: E402

# Variables a lab sets for its processes; restored after each test.
_ENV = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "PUBSUB_EMULATOR_HOST", "FIRESTORE_EMULATOR_HOST",
        "GOOGLE_CLOUD_PROJECT")


@pytest.fixture
def isolated_env(monkeypatch):
    import os

    for name in _ENV:
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("name", list(chaos.SCENARIOS))
def test_fault_scenario_loses_nothing_and_converges(name, pubsub_emulator, isolated_env):
    row, lab = chaos.run_one(name, quick=True, pubsub=pubsub_emulator)
    assert (row.lost, row.wrong) == (0, 0), chaos.table([row])
    assert row.converge_s is not None, chaos.table([row])
    if lab.pubsub == pubsub_emulator:
        # The shared emulator must not keep pushing this lab's messages to its dead endpoint.
        from google.cloud import pubsub_v1

        subscriber = pubsub_v1.SubscriberClient()
        left = [s.name for s in subscriber.list_subscriptions(project=f"projects/{chaos.chaos_lab.PROJECT}")
                if s.name.endswith(f"policy-sync-{lab.id}")]
        subscriber.close()
        assert left == []


def test_load_quick(pubsub_emulator, isolated_env):
    # Correctness under load only: latency is a figure of scripts/chaos and scripts/bench.
    rows = chaos_load.load(quick=True)
    assert [(r.lost, r.wrong) for r in rows] == [(0, 0), (0, 0)], chaos.table(rows)
