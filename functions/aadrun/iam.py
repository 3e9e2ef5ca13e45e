"""Cloud Run IAM writer (CONTRACT.md §7).

Two modes, from ``Settings.iam_mode``:

  - ``record``: calls nothing; ``apply`` returns the plan as if applied;
  - ``cloudrun``: google-cloud-run's ``run_v2.ServicesClient`` get/set IAM policy,
    read-modify-write with the policy's etag, applying only the planned adds and
    removes to unconditioned bindings of the planned roles. Everything else in the
    policy (other roles, conditional bindings, audit configs) goes back exactly
    as read.

``apply(changes)`` writes a plan made beforehand; ``apply_with(resource, plan_for)``
makes the plan inside the loop from each fresh read (policy_sync does, so a retry
after a conflict also re-reads the membership store).

A stale etag makes Cloud Run answer 409 ABORTED; the whole read-modify-write is
then retried with jittered exponential backoff, as the IAM retry guidance says
(cloud.google.com/iam/docs/retry-strategy). Over REST a 409 arrives as
``google.api_core.exceptions.Conflict`` (its subclass ``Aborted`` on gRPC), so
``Conflict`` is what is caught.

Throttling (429) is retried in place with the same backoff, for
``transient_retry_s`` at most, and so is a passing unavailability (503) of a read:
without that, one such answer failed the service in both maintenance tasks, and a
retry of the whole run reads every group again. A set call answered 503 is not:
its write may have landed, and the retry's 409 would then pass for "not written",
which would leave a grant aadrun made as if another had made it (never revoked).

Failures surface as ``UpstreamError`` (its ``status_code`` 429 when throttled), whose message
names the call, the resource and the API's own message, never a credential;
missing Application Default Credentials (outside loopback) are a ``ConfigError``.
"""
from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from urllib.parse import urlsplit

from .config import Settings, is_loopback
from .errors import ConfigError, UpstreamError
from .plan import Binding, ServiceChanges, check_limit, grant_of, granted

# Conditions are returned (and kept on write) only when version 3 is requested
# and sent back (cloud.google.com/iam/docs/policies#specifying-version-get).
POLICY_VERSION = 3
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"


@dataclasses.dataclass(frozen=True)
class AppliedResult:
    """What ``apply`` did: ``wrote`` (a set call succeeded), ``attempts`` (reads
    made, 0 in record mode) and ``members``: role -> members of that role's
    unconditioned bindings after the call (in record mode, the planned
    managed members)."""

    changes: ServiceChanges
    wrote: bool
    attempts: int
    members: Mapping[str, frozenset[str]]

    def to_json(self) -> dict:
        return {**self.changes.to_json(), "wrote": self.wrote, "attempts": self.attempts,
                "members": {role: sorted(m) for role, m in sorted(self.members.items())}}


def make_client(settings: Settings):
    """A ``ServicesClient`` over REST.

    REST everywhere keeps one code path from tests to production. With a
    loopback ``http://`` endpoint (tests, local dev) credentials come from ADC,
    or are anonymous when none are set up; otherwise the library finds ADC.
    """
    from google.cloud import run_v2

    endpoint = settings.cloudrun_endpoint
    if not endpoint:
        return run_v2.ServicesClient(transport="rest")
    parts = urlsplit(endpoint)
    credentials = _local_credentials() if parts.scheme == "http" and is_loopback(parts.hostname) else None
    return run_v2.ServicesClient(credentials=credentials, transport="rest",
                                 client_options={"api_endpoint": endpoint})


def _local_credentials():
    import google.auth
    from google.auth.credentials import AnonymousCredentials
    from google.auth.exceptions import DefaultCredentialsError

    try:
        credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM])
    except DefaultCredentialsError:
        return AnonymousCredentials()
    return credentials


def _bindings(policy) -> list[Binding]:
    from google.protobuf import json_format

    return [Binding(b.role, tuple(b.members),
                    json_format.MessageToDict(b.condition) if b.HasField("condition") else None)
            for b in policy.bindings]


def edit_policy(policy, adds: Mapping[str, frozenset[str]], removes: Mapping[str, frozenset[str]]) -> bool:
    """Apply ``adds``/``removes`` to ``policy`` (a ``policy_pb2.Policy``) in place.

    Touches only unconditioned bindings of the given roles: removes members
    from each, adds missing ones to the first (a new binding when the role has
    none), and drops a binding it emptied. Returns whether anything changed.
    """
    changed = False
    emptied = []
    for role in sorted(set(adds) | set(removes)):
        plain = [b for b in policy.bindings if b.role == role and not b.HasField("condition")]
        gone = removes.get(role, frozenset())
        entries = {m for b in plain for m in b.members}
        for binding in plain:
            keep = [m for m in binding.members if not grant_of(m, gone, entries)]
            if len(keep) != len(binding.members):
                del binding.members[:]
                binding.members.extend(keep)
                changed = True
                if not keep:
                    emptied.append(binding)
        present = {granted(m) for b in plain for m in b.members}
        new = sorted(set(adds.get(role, ())) - present)
        if new:
            target = next((b for b in plain if b.members), None) or policy.bindings.add(role=role)
            target.members.extend(new)
            changed = True
    for binding in emptied:
        if not binding.members:
            policy.bindings.remove(binding)
    if changed and any(b.HasField("condition") for b in policy.bindings):
        policy.version = POLICY_VERSION  # a policy with conditions must be written as v3
    return changed


def _upstream(action: str, resource: str, error: Exception) -> UpstreamError:
    """Translate a library exception; only its status and the API's message are kept."""
    from google.api_core import exceptions as gexc

    if isinstance(error, gexc.RetryError) and error.cause is not None:
        error = error.cause   # the in-place retries ran out: what the API said last
    if isinstance(error, gexc.GoogleAPICallError):
        status = int(error.code) if isinstance(error.code, int) else None
        text = f"Cloud Run {action} on {resource} failed: {status} {error.message}"
        return UpstreamError(text, status_code=status, code=error.__class__.__name__)
    return UpstreamError(f"Cloud Run {action} on {resource} failed: {error.__class__.__name__}")


class IamWriter:
    """Applies ``ServiceChanges`` to Cloud Run IAM (or only records them).

    Thread-safe: one writer may be shared by all request threads; the client is
    built on first use, so record mode never builds one.
    """

    def __init__(self, settings: Settings, *, client=None, max_attempts: int = 8,
                 backoff: float = 0.05, max_backoff: float = 2.0, transient_retry_s: float = 10.0,
                 sleep: Callable[[float], None] = time.sleep):
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.settings = settings
        self.mode = settings.iam_mode
        self.max_attempts, self.backoff, self.max_backoff = max_attempts, backoff, max_backoff
        self.transient_retry_s = transient_retry_s
        self._sleep = sleep
        self._client = client
        self._lock = threading.Lock()

    @property
    def client(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    from google.auth.exceptions import DefaultCredentialsError

                    try:
                        self._client = make_client(self.settings)
                    except DefaultCredentialsError as e:  # a deployment problem, not a passing one
                        raise ConfigError("AADRUN_IAM=cloudrun needs Application Default Credentials") from e
                    except Exception as e:  # only the class name: the detail could hold secrets
                        raise UpstreamError(f"cannot set up the Cloud Run client: {e.__class__.__name__}") from e
        return self._client

    def live_bindings(self, resource: str) -> list[Binding] | None:
        """The live bindings of ``resource`` (None in record mode), for plans and drift checks."""
        if self.mode == "record":
            return None
        return _bindings(self._get(resource))

    def apply(self, changes: ServiceChanges) -> AppliedResult:
        """Apply one service's planned change; re-reads and retries on conflicting writes.

        Makes no set call when the fresh policy already reflects the change.
        Raises ``UpstreamError`` (also when conflicts outlast ``max_attempts``) and
        ``PlanError`` when the fresh policy would exceed the principal limit.
        """
        return self.apply_with(changes.cloud_run, lambda live: changes)

    def apply_with(self, resource: str, plan_for: Callable[[list[Binding] | None], ServiceChanges],
                   before_write: Callable[[ServiceChanges], None] | None = None,
                   must_write: Callable[[ServiceChanges], bool] | None = None) -> AppliedResult:
        """Plan and apply inside one read-modify-write of ``resource``'s policy.

        Each attempt reads the live policy, asks ``plan_for(live_bindings)`` for the
        change (``plan_for(None)`` once in record mode), calls ``before_write`` with
        it just before the set call, and sets the policy with the etag of that read.
        A conflicting write makes the next attempt read and plan again, so a plan
        never rests on inputs older than the policy it is written over. A plan that
        changes no binding sets nothing, unless ``must_write(changes)``: then the
        unchanged policy is set, which moves its etag. Raises as ``apply`` does;
        whatever ``plan_for``, ``before_write`` or ``must_write`` raise ends the loop.
        """
        if self.mode == "record":
            changes = plan_for(None)
            return AppliedResult(changes, wrote=False, attempts=0, members=changes.managed)
        for attempt in range(1, self.max_attempts + 1):
            policy = self._get(resource)
            changes = plan_for(_bindings(policy))
            if not edit_policy(policy, changes.adds, changes.removes) and not (must_write and must_write(changes)):
                return AppliedResult(changes, wrote=False, attempts=attempt, members=_members(policy, changes.roles))
            check_limit(changes.service, resource, sum(len(b.members) for b in policy.bindings))
            if before_write is not None:
                before_write(changes)
            written = self._set(resource, policy, attempt)
            if written is not None:
                return AppliedResult(changes, wrote=True, attempts=attempt, members=_members(written, changes.roles))
            self._sleep(random.uniform(0, min(self.max_backoff, self.backoff * 2 ** (attempt - 1))))
        raise AssertionError("unreachable")  # pragma: no cover

    def _set(self, resource: str, policy, attempt: int):
        """One set call: the written policy, or None after a conflict worth another attempt."""
        from google.api_core import exceptions as gexc

        client = self.client
        try:
            return client.set_iam_policy(request={"resource": resource, "policy": policy},
                                         timeout=self.settings.http_timeout_seconds, retry=self._transient(write=True))
        except gexc.Conflict as e:  # someone wrote since our read: read again
            if attempt == self.max_attempts:
                raise UpstreamError(
                    f"Cloud Run setIamPolicy on {resource} failed: the policy kept changing "
                    f"under us ({attempt} attempts)", status_code=409, code="Conflict") from e
            return None
        except Exception as e:
            raise _upstream("setIamPolicy", resource, e) from e

    def _transient(self, write: bool = False):
        """In-place retries (module doc): of a refusal, and of a read's unavailability."""
        from google.api_core import exceptions as gexc
        from google.api_core import retry

        retried = (gexc.TooManyRequests,) if write else (gexc.TooManyRequests, gexc.ServiceUnavailable)
        return retry.Retry(predicate=retry.if_exception_type(*retried), initial=self.backoff,
                           maximum=self.max_backoff, timeout=self.transient_retry_s)

    def _get(self, resource: str):
        from google.iam.v1 import options_pb2

        client = self.client
        options = options_pb2.GetPolicyOptions(requested_policy_version=POLICY_VERSION)
        try:
            return client.get_iam_policy(request={"resource": resource, "options": options},
                                         timeout=self.settings.http_timeout_seconds, retry=self._transient())
        except Exception as e:  # library, transport and auth errors alike
            raise _upstream("getIamPolicy", resource, e) from e

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.transport.close()


def _members(policy, roles) -> Mapping[str, frozenset[str]]:
    out: dict[str, set[str]] = {role: set() for role in roles}
    for binding in policy.bindings:
        if binding.role in out and not binding.HasField("condition"):
            out[binding.role].update(map(granted, binding.members))
    return MappingProxyType({role: frozenset(m) for role, m in out.items()})
