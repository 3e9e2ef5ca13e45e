"""Taking turns: within one process (``Combiner``) and across processes (``StoreLease``).

    Combiner      per key, one run at a time; whoever arrives during a run is served,
                  with every other such caller, by the next run (one Graph read per
                  group, one IAM write per service, however many requests pile up)
    StoreLease    a named store lease held for a block: waits for it, renews it,
                  gives it back (aadrun's writers of one service's IAM take turns)
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from . import audit
from .errors import AadrunError, Unavailable


class _Ticket:
    __slots__ = ("request", "batch", "outcome", "done")

    def __init__(self, request: Any):
        self.request, self.batch, self.outcome = request, None, (None, None)
        self.done = threading.Event()


class Combiner:
    """``run(key, request, work)`` returns ``work(requests)`` of a run that started
    after the call, so that run sees everything the caller committed before calling.

    Callers that arrive while a run of their key is in flight wait; when it ends, the
    first of them leads the next run on behalf of all (``work`` gets every waiting
    request), the others get its result or its exception. Thread-safe.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting: dict[Hashable, list[_Ticket]] = {}   # key present: a run is in flight

    def run(self, key: Hashable, request: Any, work: Callable[[list], Any]) -> Any:
        ticket = _Ticket(request)
        with self._lock:
            if key in self._waiting:
                self._waiting[key].append(ticket)
            else:
                self._waiting[key], ticket.batch = [], [ticket]
        if ticket.batch is None:
            ticket.done.wait()   # served by the next run, or chosen to lead it
        if ticket.batch is not None:
            self._lead(key, ticket, work)
        value, error = ticket.outcome
        if error is not None:
            raise error
        return value

    def _lead(self, key: Hashable, ticket: _Ticket, work: Callable[[list], Any]) -> None:
        batch = ticket.batch
        try:
            outcome = (work([t.request for t in batch]), None)
        except Exception as e:  # every caller of the run gets it
            outcome = (None, e)
        with self._lock:
            queue = self._waiting.pop(key)
            if queue:
                self._waiting[key], queue[0].batch = [], queue
        for t in batch:
            t.outcome = outcome
            if t is not ticket:
                t.done.set()
        if queue:
            queue[0].done.set()


class StoreLease:
    """``with StoreLease(store, name, holder) as lease:`` holds the store lease ``name``.

    Waits up to ``wait`` seconds for it (``Unavailable`` after that), polling with
    backoff; ``renew()`` extends it once a third of ``ttl`` has passed and ``confirm()``
    at once (both ``Unavailable`` if another holder took it meanwhile, even one that
    has given it back since); gives it back at the end. A holder that dies keeps
    others out for ``ttl`` seconds at most.
    """

    def __init__(self, store, name: str, holder: str, *, ttl: float = 30.0, wait: float = 30.0):
        self.store, self.name, self.holder, self.ttl, self.wait = store, name, holder, ttl, wait
        self._taken = 0.0

    def __enter__(self) -> "StoreLease":
        deadline, delay = time.monotonic() + self.wait, 0.005
        while not self.store.acquire_lease(self.name, self.holder, self.ttl):
            if time.monotonic() + delay > deadline:
                raise Unavailable(f"lease {self.name} is held by another worker")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        self._taken = time.monotonic()
        return self

    def renew(self) -> None:
        if time.monotonic() - self._taken > self.ttl / 3:
            self.confirm()

    @property
    def key(self) -> tuple[str, str]:
        """(name, holder): what ``Store.record_iam(lease=...)`` checks in its transaction."""
        return self.name, self.holder

    def confirm(self) -> None:
        if not self.store.renew_lease(self.name, self.holder, self.ttl):
            raise Unavailable(f"lease {self.name} was lost")
        self._taken = time.monotonic()

    def __exit__(self, *exc) -> None:
        try:
            self.store.release_lease(self.name, self.holder)
        except AadrunError as e:  # it expires on its own
            audit.entry("lease_not_released", "a lease was not given back; it expires on its own",
                        severity="WARNING", lease=self.name, detail=str(e))
