"""Entra signing keys: OIDC discovery + JWKS per tenant, cached and refreshed.

Per tenant, the discovery document of each allowed token version gives the
accepted ``issuer`` and the ``jwks_uri`` (never guessed; CONTRACT.md §2).

Refresh rules:
  - a ``kid`` not in the cache triggers a refetch that is single-flight and rate
    limited to one per tenant per ``jwks_unknown_kid_interval`` (30 s), however
    many requests carry unknown kids: a flood of forged kids cannot make us
    hammer the identity provider;
  - a failed fetch keeps the last good keys (an outage does not empty the cache);
  - every ``jwks_refresh_seconds`` (1 h) keys are refetched, in the background
    (no request waits for it), so keys that left the JWKS stop verifying.
"""
from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from collections.abc import Callable

import jwt
import requests

from . import audit
from .config import Settings, check_url
from .errors import ConfigError, TokenError, Unavailable
from .outbound import client_session, deadline

_MAX_DOCUMENT = 512 * 1024
# How long a token with an unknown kid waits for a key fetch already in flight.
_FETCH_WAIT = 1.0
_TENANT_PLACEHOLDER = re.compile(re.escape("{tenantid}"), re.IGNORECASE)
# RS256 keys: at least 2,048 bits (RFC 7518 §3.3); Entra's are 2,048. A far larger
# key would only make every signature check slow.
MIN_RSA_BITS, MAX_RSA_BITS = 2048, 8192
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth"})


@dataclasses.dataclass(frozen=True)
class KeySet:
    issuers: dict[int, str]   # token version -> issuer
    keys: dict[str, object]   # kid -> public key object (cryptography)
    fetched_at: float
    # kid -> the only issuers it may sign for: its JWK's ``issuer`` member, or else the
    # issuer of the key set's version (Entra's v1 sets name none), over every set that
    # lists it. A key set shared across tenants can hold keys of another issuer, e.g.
    # personal Microsoft accounts': those sign nothing for this tenant.
    key_issuers: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)


class _TenantKeys:
    def __init__(self) -> None:
        self.current: KeySet | None = None
        self.lock = threading.Lock()          # single flight: one fetch at a time
        self.last_unknown_kid_fetch = -1e18
        self.kid_fetch_in_flight = False      # a fetch for an unknown kid holds the lock
        self.last_failure = -1e18


def _undecided(tenant: str) -> Unavailable:
    # The fetch that may bring the kid is still running: a valid token of a key Entra
    # has just started to use must not be called invalid (401), so verify cannot decide yet.
    return Unavailable(f"signing keys of tenant {tenant} are being fetched: the token's kid is not known yet")


class KeyCache:
    """Thread-safe cache of each tenant's issuers and signing keys."""

    def __init__(self, settings: Settings, session: requests.Session | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._settings = settings
        self._session = session or client_session(settings)
        self._clock = clock
        self._tenants: dict[tuple[str, tuple[int, ...]], _TenantKeys] = {}
        self._guard = threading.Lock()

    # -- public --------------------------------------------------------------

    def keyset(self, tenant: str, versions: tuple[int, ...]) -> KeySet:
        """The tenant's keys, fetching them on first use and refreshing when due.
        Raises ``Unavailable`` when they were never fetched and cannot be."""
        entry = self._entry(tenant, versions)
        current = entry.current
        if current is None or self._clock() - current.fetched_at >= self._settings.jwks_refresh_seconds:
            self._refresh(tenant, versions, entry, wait=current is None)
            current = entry.current
        if current is None:
            raise Unavailable(f"signing keys of tenant {tenant} could not be fetched")
        return current

    def key_for(self, tenant: str, versions: tuple[int, ...], kid: str) -> object:
        """The public key for ``kid``; an unknown kid refetches at most once per
        interval, then raises ``TokenError('unknown_key')``."""
        keyset = self.keyset(tenant, versions)
        key = keyset.keys.get(kid)
        if key is not None:
            return key
        entry = self._entry(tenant, versions)
        interval = self._settings.jwks_unknown_kid_interval
        if self._clock() - entry.last_unknown_kid_fetch >= interval:
            # Single flight: wait (bounded, so a fetch hanging on an outage holds one
            # thread, not all) for a fetch in flight, then fetch unless it brought the kid.
            if entry.lock.acquire(timeout=_FETCH_WAIT):
                try:
                    if kid not in (entry.current.keys if entry.current else {}) and \
                            self._clock() - entry.last_unknown_kid_fetch >= interval:
                        # The flag first: whoever sees the window open also sees the fetch.
                        entry.kid_fetch_in_flight = True
                        entry.last_unknown_kid_fetch = self._clock()
                        try:
                            self._fetch_into(tenant, versions, entry, reason="unknown_kid")
                        finally:
                            entry.kid_fetch_in_flight = False
                finally:
                    entry.lock.release()
            else:
                # A refresh hangs on the lock: it counts as this window's fetch, so the
                # next unknown kids are refused at once instead of each waiting a second.
                entry.last_unknown_kid_fetch = self._clock()
                raise _undecided(tenant)
        elif entry.kid_fetch_in_flight:
            # Another request is fetching for an unknown kid (a key rollover): this kid is
            # likely the same one, so wait for those keys rather than deny on the old ones.
            # A flood of forged kids waits only while that one rate-limited fetch runs.
            if not entry.lock.acquire(timeout=_FETCH_WAIT):
                raise _undecided(tenant)
            entry.lock.release()
        key = entry.current.keys.get(kid) if entry.current else None
        if key is None:
            raise TokenError("unknown_key", "the token's kid is not a signing key of its tenant")
        return key

    def status(self) -> dict[str, str]:
        """Tenant -> ``ok`` | ``stale`` | ``never_fetched`` (for /healthz)."""
        out = {}
        for (tenant, _), entry in list(self._tenants.items()):
            if entry.current is None:
                out[tenant] = "never_fetched"
            elif self._clock() - entry.current.fetched_at > 2 * self._settings.jwks_refresh_seconds:
                out[tenant] = "stale"
            else:
                out[tenant] = "ok"
        return out

    def still_valid(self, tenant: str, versions: tuple[int, ...], kid: str) -> bool:
        """Whether ``kid`` is still among the tenant's keys. Like every use of them, it
        starts the periodic refresh when due: a removed key is noticed even while only
        cached tokens arrive."""
        return kid in self.keyset(tenant, versions).keys

    # -- internals -------------------------------------------------------------

    def _entry(self, tenant: str, versions: tuple[int, ...]) -> _TenantKeys:
        key = (tenant, versions)
        entry = self._tenants.get(key)
        if entry is None:
            with self._guard:
                entry = self._tenants.setdefault(key, _TenantKeys())
        return entry

    def _refresh(self, tenant: str, versions: tuple[int, ...], entry: _TenantKeys, wait: bool) -> None:
        """With no keys yet every caller waits for the fetch. Otherwise the refresh runs
        on a thread of its own and every caller goes on with the current keys: no
        request waits for it, even while the identity provider hangs."""
        # With no keys yet, wait for a first fetch in flight, but not longer than one
        # document may take: a stuck fetch must not hold every request thread.
        if not entry.lock.acquire(timeout=self._settings.http_timeout_seconds if wait else 0):
            return   # a fetch is in flight
        current = entry.current
        due = current is None or self._clock() - current.fetched_at >= self._settings.jwks_refresh_seconds
        # After a failure, don't retry on every request: at most once per second.
        if not due or self._clock() - entry.last_failure < 1.0:
            entry.lock.release()
            return

        def fetch() -> None:
            try:
                self._fetch_into(tenant, versions, entry, reason="refresh" if current else "first_use")
            finally:
                entry.lock.release()

        if wait:
            fetch()
            return
        try:
            threading.Thread(target=fetch, name="aadrun-keys-refresh", daemon=True).start()
        except RuntimeError:   # no thread to be had: never leave the lock taken
            entry.lock.release()

    def _fetch_into(self, tenant: str, versions: tuple[int, ...], entry: _TenantKeys, reason: str) -> None:
        try:
            entry.current = self._fetch(tenant, versions)
            audit.entry("keys_fetched", f"signing keys of tenant {tenant} fetched", tenant=tenant,
                        trigger=reason, kids=sorted(entry.current.keys))
        except Exception as e:  # noqa: BLE001 - whatever went wrong, keep the last good keys
            entry.last_failure = self._clock()
            audit.entry("keys_fetch_failed", f"signing keys of tenant {tenant} could not be fetched",
                        severity="WARNING", tenant=tenant, trigger=reason, error=e.__class__.__name__,
                        detail=str(e)[:300], kept_previous=entry.current is not None)

    def _fetch(self, tenant: str, versions: tuple[int, ...]) -> KeySet:
        base = self._settings.authority_url
        issuers: dict[int, str] = {}
        keys: dict[str, object] = {}
        scoped: dict[str, set[str]] = {}   # kid -> the issuers it may sign for
        for version in versions:
            path = f"{tenant}/v2.0/.well-known/openid-configuration" if version == 2 else \
                f"{tenant}/.well-known/openid-configuration"
            document = self._get_json(f"{base}/{path}")
            issuer = document["issuer"]
            jwks_uri = document["jwks_uri"]
            if not isinstance(issuer, str) or not isinstance(jwks_uri, str):
                raise ValueError("discovery document without issuer or jwks_uri")
            # Multi-tenant documents carry a placeholder; ours are tenant-specific.
            issuers[version] = _with_tenant(issuer, tenant)
            for jwk in self._get_json(jwks_uri).get("keys", []):
                key = _public_key(jwk)
                if key is None:
                    continue
                kid, issuer = jwk["kid"], jwk.get("issuer")
                keys[kid] = key
                scoped.setdefault(kid, set()).add(
                    _with_tenant(issuer, tenant) if isinstance(issuer, str) else issuers[version])
        if not keys:
            # Entra always publishes signing keys: an empty set is a broken answer,
            # and taking it would deny every token until the next fetch.
            raise ValueError("no usable signing key in the JWKS")
        return KeySet(issuers, keys, self._clock(), {kid: frozenset(names) for kid, names in scoped.items()})

    def _get_json(self, url: str) -> dict:
        try:
            check_url("jwks_uri", url)
        except ConfigError as e:
            raise ValueError(str(e)) from e
        # No redirects: check_url vetted this URL, not wherever a redirect would lead
        # (Entra serves discovery and keys directly). Read at most the size limit.
        # Each document whole within the timeout, headers included: the fetch holds the
        # tenant's lock, which every refresh and unknown kid of the tenant waits for.
        timeout = self._settings.http_timeout_seconds
        with deadline(timeout, url), \
                self._session.get(url, timeout=timeout, allow_redirects=False, stream=True) as response:
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code} from {url}")
            body = response.raw.read(_MAX_DOCUMENT + 1, decode_content=True)
        if len(body) > _MAX_DOCUMENT:
            raise ValueError("document too large")
        document = json.loads(body)
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        return document


def _with_tenant(issuer: str, tenant: str) -> str:
    """Multi-tenant documents and keys name the issuer with a ``{tenantid}`` placeholder."""
    return _TENANT_PLACEHOLDER.sub(lambda _: tenant, issuer)


def _public_key(jwk: dict) -> object | None:
    """An RSA signature key from a JWK, or None for keys we must not use: of another
    kind or use, with private members (a published private key signs anyone's tokens),
    or shorter than the 2,048 bits RS256 requires (RFC 7518 §3.3)."""
    if not isinstance(jwk, dict) or jwk.get("kty") != "RSA" or not isinstance(jwk.get("kid"), str):
        return None
    if jwk.get("use", "sig") != "sig" or not _PRIVATE_MEMBERS.isdisjoint(jwk):
        return None
    # A key for other operations or another algorithm (RFC 7517 §4.3, §4.4) verifies
    # no RS256 signature. Entra's keys name neither.
    key_ops, alg = jwk.get("key_ops"), jwk.get("alg")
    if (key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops)) or \
            (alg is not None and alg != "RS256"):
        return None
    try:
        key = jwt.PyJWK(jwk, algorithm="RS256").key
    except (jwt.PyJWTError, ValueError, TypeError):   # PyJWTError covers PyJWKError and InvalidKeyError
        return None
    return key if MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS else None
