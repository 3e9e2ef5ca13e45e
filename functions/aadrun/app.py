"""The process-wide composition root: settings -> policy, store, bus, keys, cores.

Parts are built on first use (so, for example, graph_webhook's validation
handshake works before a client state is configured) and then shared by every
request thread of the instance.
"""
from __future__ import annotations

import functools
import threading
import time

from .config import Settings

_lock = threading.Lock()
_app: "App | None" = None


class App:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.RLock()

    def _once(name):  # noqa: N805 - decorator factory used in the class body
        def wrap(build):
            @functools.wraps(build)
            def getter(self):
                value = self.__dict__.get(name)
                if value is None:
                    with self._lock:
                        value = self.__dict__.get(name)
                        if value is None:
                            value = build(self)
                            self.__dict__[name] = value
                return value
            return property(getter)
        return wrap

    @_once("_policy")
    def policy(self):
        from .errors import AadrunError
        from .policy import load_policy

        try:
            return load_policy(self.settings.policy_path)
        except AadrunError as e:
            self._policy_failed(e)
            raise

    def _policy_failed(self, error) -> None:
        # Every request retries the load while it fails (a fixed file is picked up at
        # once); the operator reads why in the log, once a minute or when it changes.
        from . import audit

        now = time.monotonic()
        last = getattr(self, "_policy_error", None)
        if last is None or last[0] != str(error) or now - last[1] >= 60:
            self._policy_error = (str(error), now)
            audit.entry("policy_error", f"policies not loaded from {self.settings.policy_path}: {error}",
                        severity="ERROR", reason=error.reason, policy_path=self.settings.policy_path,
                        file=getattr(error, "file", None), line=getattr(error, "line", None),
                        field=getattr(error, "field", None))

    @_once("_store")
    def store(self):
        from .store import open_store

        return open_store(self.settings.store_url, self.settings.project)

    @_once("_keys")
    def keys(self):
        from .keys import KeyCache

        return KeyCache(self.settings)

    @_once("_verifier")
    def verifier(self):
        from .verify import Verifier

        return Verifier(self.settings, lambda: self.policy, self.keys, lambda: self.store)

    @_once("_verifier_http")
    def verifier_http(self):
        from .verify_http import VerifyEndpoint, health_check

        health = health_check(lambda: self.policy, lambda: self.store, lambda: self.keys)
        return VerifyEndpoint(self.verifier, health)

    @_once("_bus")
    def bus(self):
        from .bus import open_bus

        return open_bus(self.settings, local_handler=lambda messages: self.sync.handle_messages(messages))

    @_once("_webhook")
    def webhook(self):
        from .webhook import Webhook

        return Webhook(self.settings, lambda: self.policy, lambda: self.bus)

    @_once("_sync")
    def sync(self):
        from .sync import PolicySync

        return PolicySync(self)

    @_once("_maintenance")
    def maintenance(self):
        from .maintenance import Maintenance

        return Maintenance(self)

    del _once


def get_app() -> App:
    """The instance's App, built from the environment on first use."""
    global _app
    if _app is None:
        with _lock:
            if _app is None:
                _app = App(Settings.from_env())
    return _app
