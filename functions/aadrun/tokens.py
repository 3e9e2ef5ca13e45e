"""Entra token verification (CONTRACT.md §4), a pure layer over ``keys``.

The checks run in the contract's order and the first failure decides; each
raises ``TokenError`` with its reason code. Token-intrinsic checks (shape, alg,
tenant, key, signature, issuer) are cached per token (``VerifiedTokenCache``);
time and audience checks run on every call.

Hardening (RFC 8725, OWASP JWT cheat sheet): RS256 only, with the algorithm
taken from our allowlist, never from the token; keys only from the tenant's
JWKS (``jku``, ``x5u``, ``jwk`` and ``x5c`` headers are ignored); any ``crit``
header is rejected, since we implement no extensions (RFC 7515 §4.1.11).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from jwt.algorithms import RSAAlgorithm
from jwt.utils import base64url_decode

from .errors import TokenError

if TYPE_CHECKING:
    from .keys import KeyCache

MAX_TOKEN_BYTES = 16 * 1024
ALLOWED_ALGS = frozenset({"RS256"})
_RS256 = RSAAlgorithm(RSAAlgorithm.SHA256)
# base64.urlsafe_b64decode silently skips foreign characters: check the alphabet first
# (with fullmatch: a pattern's $ would let a final line break through).
_B64URL = re.compile(r"[A-Za-z0-9_-]*")

# (reason, what the step checks), in the order they run. ``explain`` prints this.
STEPS: tuple[tuple[str, str], ...] = (
    ("malformed_token", "three base64url parts of JSON, at most 16 KiB"),
    ("disallowed_alg", "alg is RS256"),
    ("unknown_tenant", "the token's tid is a tenant of the policies"),
    ("unknown_key", "kid is a signing key of that tenant"),
    ("bad_signature", "signature"),
    ("wrong_issuer", "iss is the tenant's issuer for an allowed token version"),
    ("expired", "exp present and not past"),
    ("not_yet_valid", "nbf not in the future"),
    ("wrong_audience", "an access token (no ID token) whose aud is one accepted audience of the service"),
    ("wrong_tenant", "the token's tenant is the service's tenant"),
)


_PRINTABLE_ID = re.compile(r"[\x21-\x7e]{1,256}")


@dataclasses.dataclass(frozen=True)
class VerifiedToken:
    """A token whose signature and issuer were checked."""

    claims: dict
    kid: str
    tenant: str
    version: int
    versions: tuple[int, ...]   # the tenant's allowed versions (cache key of its keys)
    # An ID token of an app whose client id is also an accepted audience would pass the
    # audience check. Every Entra access token names the client app it was issued to
    # (``azp`` in v2, ``appid`` in v1); an ID token names none, and may carry a ``nonce``,
    # which no access token does.
    access_token: bool = True

    @functools.cached_property
    def subject(self) -> str | None:
        # Entra's oid is an object id (CONTRACT.md §4: the subject is the oid as given).
        # What is not printable ASCII (a lone surrogate, a line break) could not be
        # stored, looked up or sent in X-Auth-Subject: such a token has none.
        oid = self.claims.get("oid")
        return oid if isinstance(oid, str) and _PRINTABLE_ID.fullmatch(oid) else None

    @functools.cached_property
    def roles(self) -> tuple[str, ...]:
        roles = self.claims.get("roles")
        return tuple(r for r in roles if isinstance(r, str)) if isinstance(roles, list) else ()

    @property
    def token_id(self) -> str | None:
        for name in ("uti", "jti"):
            if isinstance(self.claims.get(name), str):
                return self.claims[name]
        return None


def _json_part(part: str) -> dict:
    try:
        value = json.loads(base64url_decode(part.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error, RecursionError) as e:   # RecursionError: deep nesting
        raise TokenError("malformed_token", "a part is not base64url-encoded JSON") from e
    if not isinstance(value, dict):
        raise TokenError("malformed_token", "a part is not a JSON object")
    return value


def parse(token: str) -> tuple[dict, dict, bytes, bytes]:
    """Split and decode without verifying: (header, claims, signing input, signature)."""
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenError("malformed_token", "token larger than 16 KiB")
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]) or not all(_B64URL.fullmatch(p) for p in parts):
        raise TokenError("malformed_token", "a JWT has three dot-separated parts")
    header, claims = _json_part(parts[0]), _json_part(parts[1])
    try:
        signature = base64url_decode(parts[2].encode("ascii"))
    except (ValueError, UnicodeError, binascii.Error) as e:
        raise TokenError("malformed_token", "the signature is not base64url") from e
    # Only the canonical spelling: unused bits in the last character would give one
    # signature many spellings, each its own fingerprint in the audit log.
    if base64.urlsafe_b64encode(signature).rstrip(b"=") != parts[2].encode("ascii"):
        raise TokenError("malformed_token", "the signature is not canonical base64url")
    return header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), signature


def verify_signed(token: str, tenant_versions: Callable[[str], tuple[int, ...] | None],
                  keys: "KeyCache") -> VerifiedToken:
    """Shape, alg, tenant, key, signature and issuer checks.

    ``tenant_versions(tid)`` gives the allowed token versions of a tenant of the
    policies (None when unknown).
    """
    header, claims, signing_input, signature = parse(token)
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
        raise TokenError("disallowed_alg", "only RS256 is accepted")
    if "crit" in header:
        raise TokenError("malformed_token", "critical header extensions are not supported")
    tid = claims.get("tid")
    versions = tenant_versions(tid) if isinstance(tid, str) else None
    if not versions:
        raise TokenError("unknown_tenant", "the token's tenant is not in the policies")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise TokenError("unknown_key", "the token has no kid")
    key = keys.key_for(tid, versions, kid)
    if not _RS256.verify(signing_input, key, signature):
        raise TokenError("bad_signature", "signature does not verify")
    keyset = keys.keyset(tid, versions)
    issuers = keyset.issuers
    iss = claims.get("iss")
    version = next((v for v, issuer in issuers.items() if issuer == iss), None)
    if version is None:
        raise TokenError("wrong_issuer", f"iss {_shown(iss)} is not the tenant's issuer for an allowed token "
                                         f"version ({', '.join(issuers.values())})")
    if iss not in keyset.key_issuers.get(kid, ()):
        raise TokenError("wrong_issuer", "the signing key is not one of the token's issuer")
    return VerifiedToken(claims, kid, tid, version, versions, _is_access_token(claims))


def _is_access_token(claims: dict) -> bool:
    client = claims.get("azp", claims.get("appid"))
    return "nonce" not in claims and isinstance(client, str) and bool(client)


_NUMBER_TYPES = (int, float)
# A NumericDate beyond these bounds (year 5138) is no time: it also keeps NaN and
# infinity (which Python's json reads) and huge integers out of every comparison.
_EARLIEST, _LATEST = -1e11, 1e11


def check_time(claims: dict, now: float, leeway: float) -> None:
    exp = token_expiry(claims)
    if exp is None:
        raise TokenError("expired", "exp is missing or not a NumericDate")
    if now > exp + leeway:
        raise TokenError("expired", f"exp {_when(exp)} is past (now {_when(now)}, leeway {leeway:g} s)")
    nbf = claims.get("nbf")
    if nbf is not None and not _is_time(nbf):
        raise TokenError("not_yet_valid", "nbf is not a NumericDate")
    if nbf is not None and now + leeway < nbf:
        raise TokenError("not_yet_valid", f"nbf {_when(nbf)} is in the future (now {_when(now)}, "
                                          f"leeway {leeway:g} s)")


def token_expiry(claims: dict) -> float | None:
    """The token's ``exp`` if it is a usable NumericDate, else None."""
    exp = claims.get("exp")
    return exp if _is_time(exp) else None


def check_audience(token: VerifiedToken, accepted: tuple[str, ...]) -> None:
    aud = token.claims.get("aud")
    # One string only: a list would let a token minted for several APIs through.
    if isinstance(aud, list):
        raise TokenError("wrong_audience", f"aud is a list of {len(aud)}: it must be one string")
    if not isinstance(aud, str) or aud not in accepted:
        raise TokenError("wrong_audience", f"aud {_shown(aud)} is not an accepted audience of the service "
                                           f"({', '.join(accepted) or 'none'})")
    if not token.access_token:
        raise TokenError("wrong_audience", "an ID token (it names no client app, or carries a nonce): "
                                           "it is not for calling an API")


def _when(value: float) -> str:
    try:
        return dt.datetime.fromtimestamp(value, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):   # a NumericDate before year 1
        return f"{value:g}"


def _shown(value) -> str:
    """A claim's value for a failure's detail (explain shows it): the caller's own
    input, so cut short."""
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _is_time(value) -> bool:
    # JSON numbers decode to exactly int or float; a bool (a JSON true) is not a time.
    # The chained comparison is False for NaN.
    return type(value) in _NUMBER_TYPES and _EARLIEST < value < _LATEST


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class VerifiedTokenCache:
    """Bounded LRU of verified tokens keyed by SHA-256 of the token; an entry
    lives until the token's ``exp`` (plus leeway), never longer.

    An OrderedDict, not cachetools: its TLRUCache costs four times as much per hit,
    on a path whose whole budget is 5 µs (``scripts/bench verify``)."""

    def __init__(self, max_entries: int = 10_000):
        self._max = max_entries
        self._entries: OrderedDict[bytes, tuple[float, VerifiedToken]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: bytes, now: float) -> VerifiedToken | None:
        with self._lock:
            hit = self._entries.get(digest)
            if hit is None:
                return None
            if now > hit[0]:
                del self._entries[digest]
                return None
            self._entries.move_to_end(digest)
            return hit[1]

    def put(self, digest: bytes, token: VerifiedToken, until: float) -> None:
        with self._lock:
            self._entries[digest] = (until, token)
            self._entries.move_to_end(digest)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
