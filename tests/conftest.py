"""Shared fixtures: emulators (reused from scripts/test when it started them)."""
from __future__ import annotations

import os

import pytest
from google.auth.compute_engine import _metadata

from tests.support.devidp import DevIdentityProvider
from tests.support.emulators import ENV, Emulator


def _emulator(kind: str):
    host = os.environ.get(ENV[kind])
    if host:
        yield host
        return
    emu = Emulator(kind).start()
    os.environ[ENV[kind]] = emu.host
    try:
        yield emu.host
    finally:
        emu.stop()
        os.environ.pop(ENV[kind], None)


@pytest.fixture(scope="session")
def pubsub_emulator():
    """host:port of a running Pub/Sub emulator (PUBSUB_EMULATOR_HOST is set)."""
    yield from _emulator("pubsub")


@pytest.fixture(scope="session")
def firestore_emulator():
    """host:port of a running Firestore emulator (FIRESTORE_EMULATOR_HOST is set)."""
    yield from _emulator("firestore")


@pytest.fixture
def offline_google(monkeypatch, tmp_path):
    """No Application Default Credentials and no metadata-server probe, so Google
    clients built in a test stay on loopback (google-auth reads NO_GCE_CHECK only
    at import, hence the attribute)."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setattr(_metadata, "_NO_GCE_CHECK", True)


@pytest.fixture(scope="module")
def idp():
    """A local Entra-like identity provider for a test module (a module may define
    its own, e.g. function-scoped where tests rotate keys)."""
    with DevIdentityProvider() as server:
        yield server


# Tests that start emulators, a whole stack or a load generator of their own: one at a
# time, on one worker (scripts/test runs with --dist loadgroup), so that two of them
# never load a small machine together under the others' timeouts.
_HEAVY = frozenset({"test_chaos.py", "test_devstack.py", "test_bench.py"})


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in _HEAVY:
            item.add_marker(pytest.mark.xdist_group("heavy"))
