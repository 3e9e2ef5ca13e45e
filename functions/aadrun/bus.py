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
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from .config import Settings
from .errors import ConfigError, Unavailable
from .messages import Message, canonical

# Backoff between attempts within one publish deadline (seconds).
_FIRST_DELAY, _MAX_DELAY = 0.05, 0.4
# Shortest per-attempt RPC deadline worth starting.
_MIN_ATTEMPT = 0.1
# Batches are committed by a timer thread, so a future can resolve a little after
# its RPC deadline.
_GRACE = 0.15


class Bus(abc.ABC):
    @abc.abstractmethod
    def publish_changes(self, messages: Sequence[Message]) -> None:
        """Publish to the changes topic; returns once every message is confirmed,
        raises ``Unavailable`` if any is not (failed, or not confirmed in time)."""

    @abc.abstractmethod
    def publish_policy_update(self, event: Mapping[str, Any]) -> None:
        """Publish one policy-update event (policy topic); same guarantee."""

    def close(self) -> None:
        """Release clients (end of process or test)."""


class LocalBus(Bus):
    """Hands messages synchronously to ``handler`` (policy_sync's core): a failure
    of the handler is a publish failure. ``policy_handler`` receives policy-update
    events; without one they are discarded (nothing subscribes in process)."""

    def __init__(self, handler: Callable[[list[Message]], Any],
                 policy_handler: Callable[[dict], Any] | None = None):
        self._handler = handler
        self._policy_handler = policy_handler

    def publish_changes(self, messages: Sequence[Message]) -> None:
        if messages:
            self._call(self._handler, list(messages))

    def publish_policy_update(self, event: Mapping[str, Any]) -> None:
        if self._policy_handler is not None:
            self._call(self._policy_handler, dict(event))

    @staticmethod
    def _call(handler: Callable, arg: Any) -> None:
        try:
            handler(arg)
        except Exception as e:  # any failure of the core means "not persisted"
            raise Unavailable(f"local handler failed: {e.__class__.__name__}") from e


class _Outgoing(NamedTuple):
    data: bytes
    ordering_key: str
    attributes: Mapping[str, str]


def _failed(error: BaseException) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_exception(error)
    return future


def _outcome(future: concurrent.futures.Future, deadline: float) -> BaseException | None:
    try:
        future.result(timeout=max(deadline - time.monotonic(), 0.0))
        return None
    except concurrent.futures.TimeoutError as e:
        return e
    except Exception as e:
        return e


class PubSubBus(Bus):
    """One thread-safe ``PublisherClient`` per instance, with message ordering.

    The library retries an ordered publish for ever (it would outlive the HTTP
    request and publish after we answered 503, duplicating Graph's retry), so each
    attempt here is a single RPC bounded by the remaining time, and retries are
    ours, all within ``publish_timeout_seconds``. A failed publish pauses its
    ordering key until ``resume_publish`` (FACTS.md): a publish that finds its key
    paused resumes it and tries again. Only an attempt still unanswered at the
    deadline can land after the 503; Graph's retry then repeats it with the same
    message ``id``.
    """

    def __init__(self, settings: Settings, client: Any = None):
        from google.api_core import exceptions as api_exceptions
        from google.cloud import pubsub_v1
        from google.cloud.pubsub_v1.publisher.exceptions import PublishToPausedOrderingKeyException

        if not settings.project:
            raise ConfigError("AADRUN_BUS=pubsub needs GOOGLE_CLOUD_PROJECT")
        self._timeout = settings.publish_timeout_seconds
        self._client = client or pubsub_v1.PublisherClient(
            publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True))
        self._changes = self._client.topic_path(settings.project, settings.topic_changes)
        self._policy = self._client.topic_path(settings.project, settings.topic_policy)
        self._paused_error = PublishToPausedOrderingKeyException
        # Transient failures worth another attempt; others (NotFound, PermissionDenied,
        # a timed-out attempt that may still land) end the publish at once.
        self._retryable = (api_exceptions.ServiceUnavailable, api_exceptions.InternalServerError,
                           api_exceptions.Aborted, api_exceptions.TooManyRequests, api_exceptions.Unknown,
                           api_exceptions.Cancelled, PublishToPausedOrderingKeyException, RuntimeError)

    def publish_changes(self, messages: Sequence[Message]) -> None:
        self._publish(self._changes, [_Outgoing(m.to_json(), m.ordering_key, m.attributes) for m in messages])

    def publish_policy_update(self, event: Mapping[str, Any]) -> None:
        self._publish(self._policy, [_Outgoing(canonical(dict(event)), "", {"kind": "policy_update"})])

    def close(self) -> None:
        self._client.stop()

    def _publish(self, topic: str, items: list[_Outgoing]) -> None:
        deadline = time.monotonic() + self._timeout
        pending, delay = items, _FIRST_DELAY
        while pending:
            failed = self._attempt(topic, pending, deadline)
            errors = [error for _, error in failed]
            pending = [item for item, _ in failed]
            if not pending:
                return
            retryable = all(isinstance(e, self._retryable) for e in errors)
            if not retryable or time.monotonic() + delay + _MIN_ATTEMPT > deadline:
                first = errors[0]
                raise Unavailable(f"{len(pending)} of {len(items)} messages not confirmed "
                                  f"({first.__class__.__name__})") from first
            time.sleep(delay)
            delay = min(delay * 2, _MAX_DELAY)

    def _attempt(self, topic: str, items: list[_Outgoing],
                 deadline: float) -> list[tuple[_Outgoing, BaseException]]:
        """Publish every item once and wait for all; returns those that failed."""
        futures = [(item, self._submit(topic, item, deadline)) for item in items]
        outcomes = [(item, _outcome(future, deadline + _GRACE)) for item, future in futures]
        return [(item, error) for item, error in outcomes if error is not None]

    def _submit(self, topic: str, item: _Outgoing, deadline: float) -> concurrent.futures.Future:
        timeout = max(deadline - time.monotonic(), _MIN_ATTEMPT)

        def publish():
            return self._client.publish(topic, item.data, ordering_key=item.ordering_key,
                                        retry=None, timeout=timeout, **item.attributes)
        try:
            future = publish()
            if item.ordering_key and self._is_paused(future):
                self._resume(topic, item.ordering_key)
                future = publish()
            return future
        except Exception as e:  # stopped client, oversized message: fail this item
            return _failed(e)

    def _is_paused(self, future: concurrent.futures.Future) -> bool:
        return future.done() and isinstance(future.exception(timeout=0), self._paused_error)

    def _resume(self, topic: str, key: str) -> None:
        try:
            self._client.resume_publish(topic, key)
        except (RuntimeError, ValueError):
            pass  # not paused (any more), or never seen: nothing to resume


def open_bus(settings: Settings, local_handler: Callable[[list[Message]], Any] | None = None) -> Bus:
    """The bus ``settings.bus`` names; ``local_handler`` is policy_sync's core (local only)."""
    if settings.bus == "pubsub":
        return PubSubBus(settings)
    if local_handler is None:
        raise ConfigError("AADRUN_BUS=local needs policy_sync's core in process")
    return LocalBus(local_handler)
