"""The message bus: where graph_webhook hands its messages (CONTRACT.md §2, §5).

    Bus                    publish_changes(messages), publish_policy_update(event)
    ├── LocalBus           calls policy_sync's core in this process (AADRUN_BUS=local)
    └── PubSubBus          Google Cloud Pub/Sub, or its emulator (AADRUN_BUS=pubsub)

Both return only once every message is confirmed and raise ``Unavailable``
otherwise, so the webhook can answer 202 (persisted) or 503 (Graph retries).
"""
from __future__ import annotations

import abc
import concurrent.futures
import contextvars
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .config import Settings
from .errors import ConfigError, Unavailable
from .messages import Message, canonical
from .rpc_budget import Budget

# Backoff between attempts within one publish deadline (seconds).
_FIRST_DELAY, _MAX_DELAY = 0.05, 0.4
# Shortest per-attempt RPC deadline worth starting.
_MIN_ATTEMPT = 0.1
# Pub/Sub takes at most 1,000 messages in one Publish request (cloud.google.com/pubsub/quotas).
MAX_PER_REQUEST = 1000


def _deadline(started: float | None, timeout: float) -> float:
    """When a publish must be confirmed: ``timeout`` after the request began (Graph's
    deadline counts from there), or after now."""
    return (time.monotonic() if started is None else started) + timeout


class Bus(abc.ABC):
    @abc.abstractmethod
    def publish_changes(self, messages: Sequence[Message], *, started: float | None = None) -> None:
        """Publish to the changes topic; returns once every message is confirmed,
        raises ``Unavailable`` if any is not (failed, or not confirmed in time). In
        time: within the publish timeout of ``started`` (the ``time.monotonic()`` at
        which the request began: Graph's deadline counts from there), else of now."""

    @abc.abstractmethod
    def publish_policy_update(self, event: Mapping[str, Any]) -> None:
        """Publish one policy-update event (policy topic); same guarantee."""

    def close(self) -> None:
        """Release clients (end of process or test)."""


class LocalBus(Bus):
    """Hands messages to ``handler`` (policy_sync's core) in this process and waits
    for it: a failure of the handler is a publish failure. ``policy_handler``
    receives policy-update events; without one they are discarded (nothing
    subscribes in process).

    With a ``timeout``, the handler runs on one of ``workers`` threads and the
    wait ends at the deadline, like a Pub/Sub publish: so graph_webhook answers
    503 within Graph's deadline even while Graph throttles policy_sync's reads.
    A handler still running then finishes on its own; Graph's retry of the same
    notification is applied idempotently. When every worker is busy until the
    deadline, the publish fails rather than queueing work without bound.
    """

    def __init__(self, handler: Callable[[list[Message]], Any],
                 policy_handler: Callable[[dict], Any] | None = None, *,
                 timeout: float | None = None, workers: int = 8):
        self._handler = handler
        self._policy_handler = policy_handler
        self._timeout = timeout
        self._slots = threading.BoundedSemaphore(workers)
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="aadrun-local-sync") \
            if timeout is not None else None

    def publish_changes(self, messages: Sequence[Message], *, started: float | None = None) -> None:
        if messages:
            self._call(self._handler, list(messages), started)

    def publish_policy_update(self, event: Mapping[str, Any]) -> None:
        if self._policy_handler is not None:
            self._call(self._policy_handler, dict(event))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _call(self, handler: Callable, arg: Any, started: float | None = None) -> None:
        try:
            if self._pool is None:
                handler(arg)
            else:
                self._call_by_deadline(handler, arg, started)
        except Unavailable:
            raise
        except Exception as e:  # any failure of the core means "not persisted"
            raise Unavailable(f"local handler failed: {e.__class__.__name__}") from e

    def _call_by_deadline(self, handler: Callable, arg: Any, started: float | None) -> None:
        deadline = _deadline(started, self._timeout)
        if not self._slots.acquire(timeout=max(deadline - time.monotonic(), 0)):
            raise Unavailable("local handler busy: no worker free in time")

        def run() -> None:
            try:
                handler(arg)
            finally:
                self._slots.release()

        # The copied context keeps the request's log trace on the worker's lines.
        future = self._pool.submit(contextvars.copy_context().run, run)
        try:
            future.result(timeout=max(deadline - time.monotonic(), 0))
        except concurrent.futures.TimeoutError:
            raise Unavailable("local handler did not finish in time") from None


class PubSubBus(Bus):
    """Google Cloud Pub/Sub through one thread-safe ``PublisherClient`` per instance.

    Pub/Sub takes one ordering key per Publish request, so a call sends each ordering
    key's messages, in order, all keys at once on a small pool: one request per key,
    or several one after another when a key has more than Pub/Sub's 1,000 per
    request. The call returns once every request is confirmed. A call that fails
    part-way leaves some keys published: Graph's retry publishes them again with the
    same ``id``, and policy_sync applies them idempotently. The raw Publish call (not
    the batching client's per-key sequencers) leaves no key paused after a failure,
    and its retries, each attempt
    included, end by ``publish_timeout_seconds``, so none outlives the webhook's answer.
    """

    # Concurrent Publish requests per instance (threads that mostly wait on the network):
    # a POST naming a few hundred groups, or several such POSTs at once, stays well
    # within Graph's 3 s.
    _SENDERS = 64

    def __init__(self, settings: Settings, client: Any = None):
        from google.api_core import exceptions as api_exceptions
        from google.api_core import retry as api_retry
        from google.cloud import pubsub_v1

        if not settings.project:
            raise ConfigError("AADRUN_BUS=pubsub needs GOOGLE_CLOUD_PROJECT")
        self._timeout = settings.publish_timeout_seconds
        self._client = client or pubsub_v1.PublisherClient()
        self._changes = self._client.topic_path(settings.project, settings.topic_changes)
        self._policy = self._client.topic_path(settings.project, settings.topic_policy)
        self._message = pubsub_v1.types.PubsubMessage
        self._api_error = api_exceptions.GoogleAPIError
        self._retry = api_retry.Retry(
            predicate=api_retry.if_exception_type(
                api_exceptions.ServiceUnavailable, api_exceptions.InternalServerError, api_exceptions.Aborted,
                api_exceptions.TooManyRequests, api_exceptions.Unknown, api_exceptions.DeadlineExceeded),
            initial=_FIRST_DELAY, maximum=_MAX_DELAY, multiplier=2.0)
        self._senders = concurrent.futures.ThreadPoolExecutor(self._SENDERS, thread_name_prefix="aadrun-publish")
        self._closed = False

    def publish_changes(self, messages: Sequence[Message], *, started: float | None = None) -> None:
        self._publish(self._changes, [self._message(data=m.to_json(), ordering_key=m.ordering_key,
                                                    attributes=dict(m.attributes)) for m in messages], started)

    def publish_policy_update(self, event: Mapping[str, Any]) -> None:
        self._publish(self._policy, [self._message(data=canonical(dict(event)),
                                                   attributes={"kind": "policy_update"})])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._senders.shutdown(wait=True)
            self._client.stop()

    def _publish(self, topic: str, messages: list, started: float | None = None) -> None:
        if not messages:
            return
        if self._closed:
            raise Unavailable("the bus is closed")
        deadline = _deadline(started, self._timeout)
        by_key: dict[str, list] = {}
        for message in messages:
            by_key.setdefault(message.ordering_key, []).append(message)
        if len(by_key) == 1:
            self._send_in_order(topic, messages, deadline)
            return
        try:
            futures = [self._senders.submit(self._send_in_order, topic, batch, deadline)
                       for batch in by_key.values()]
        except RuntimeError as e:   # the pool was shut down: the bus is closed
            raise Unavailable("the bus is closed") from e
        done, late = concurrent.futures.wait(futures, timeout=max(deadline - time.monotonic(), 0))
        failed = [f.exception() for f in done if f.exception() is not None]
        if late or failed:
            for future in late:
                future.cancel()
            raise Unavailable(f"{len(late) + len(failed)} of {len(futures)} ordering keys not confirmed"
                              + (f" ({failed[0]})" if failed else " in time"))

    def _send_in_order(self, topic: str, messages: list, deadline: float) -> None:
        """One ordering key's messages: each request starts once the one before is
        confirmed, so the key's order holds across requests."""
        for start in range(0, len(messages), MAX_PER_REQUEST):
            self._send(topic, messages[start:start + MAX_PER_REQUEST], deadline)

    def _send(self, topic: str, messages: list, deadline: float) -> None:
        """One Publish request: messages that share one ordering key."""
        left = deadline - time.monotonic()
        if left < _MIN_ATTEMPT:
            raise Unavailable("no time left to publish")
        try:
            response = self._client.api.publish(topic=topic, messages=messages,
                                                retry=self._retry.with_timeout(left), timeout=Budget(left))
        except (self._api_error, OSError, ValueError) as e:  # RetryError is an API error too
            raise Unavailable(f"{len(messages)} messages not confirmed by {topic} ({e.__class__.__name__})") from e
        if len(response.message_ids) != len(messages):
            raise Unavailable(f"{len(messages) - len(response.message_ids)} messages not confirmed")


def open_bus(settings: Settings, local_handler: Callable[[list[Message]], Any] | None = None) -> Bus:
    """The bus ``settings.bus`` names; ``local_handler`` is policy_sync's core (local only)."""
    if settings.bus == "pubsub":
        return PubSubBus(settings)
    if local_handler is None:
        raise ConfigError("AADRUN_BUS=local needs policy_sync's core in process")
    return LocalBus(local_handler, timeout=settings.publish_timeout_seconds)
