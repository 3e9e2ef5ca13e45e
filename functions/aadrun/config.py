"""Settings: one frozen object built once from the environment (CONTRACT.md §2).

The core never reads ``os.environ``; entry points call ``Settings.from_env()``
and pass the result down. Bad values fail here, naming the variable.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import ssl
from collections.abc import Mapping
from urllib.parse import urlsplit

from .errors import ConfigError
from .messages import is_guid

DEFAULT_AUTHORITY = "https://login.microsoftonline.com"
DEFAULT_GRAPH = "https://graph.microsoft.com/v1.0"
MAX_CLIENT_STATE = 128   # subscription.clientState (learn.microsoft.com/graph/api/resources/subscription)


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(name: str, url: str) -> str:
    """https everywhere; plain http only towards a loopback host (tests, local dev).
    Paths are appended to it, so it is a bare base URL: no query, fragment or
    credentials, and nothing ``urlsplit`` would quietly drop (spaces, a newline)."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{name} must not carry credentials")   # not echoed: it holds a secret
    # A query may hold a key (an Azure Functions ?code=, a signed URL): never echoed either.
    base = re.split(r"[?#]", url, maxsplit=1)[0]
    cut = base != url
    shown = repr(base) + (" (its query or fragment not shown)" if cut else "")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ConfigError(f"{name} must be a URL without spaces or control characters: {shown}")
    try:
        parts.port   # noqa: B018 - parsed on access: out of range or not a number raises
    except ValueError:
        raise ConfigError(f"{name} has no valid port: {shown}") from None
    if cut:
        raise ConfigError(f"{name} must be a base URL, without query or fragment: {shown}")
    if parts.scheme == "https" and parts.hostname:
        return url.rstrip("/")
    if parts.scheme == "http" and is_loopback(parts.hostname):
        return url.rstrip("/")
    raise ConfigError(f"{name} must be an https:// URL (http:// only for a loopback host): {shown}")


STORE_SCHEMES = ("sqlite:///", "firestore://")


def check_store_url(url: str) -> str:
    if not url.startswith(STORE_SCHEMES):
        raise ConfigError(f"AADRUN_STORE must start with sqlite:/// or firestore://, got {url!r}")
    if url.startswith("sqlite:///") and not url[len("sqlite:///"):].strip():
        raise ConfigError("AADRUN_STORE: sqlite:/// needs the database file's path, as in sqlite:///.aadrun/state.db")
    return url


# A topic id (https://cloud.google.com/pubsub/docs/create-topic#resource_names).
_TOPIC_ID = re.compile(r"[A-Za-z][A-Za-z0-9._~+%-]{2,254}")


def check_topic(name: str, topic: str) -> str:
    if "/" in topic:
        raise ConfigError(f"{name} is a topic id, not its path (the project is GOOGLE_CLOUD_PROJECT): {topic!r}")
    if not _TOPIC_ID.fullmatch(topic) or topic.lower().startswith("goog"):
        raise ConfigError(f"{name} must be a Pub/Sub topic id (3-255 letters, digits and -._~+%, "
                          f"starting with a letter, not with goog): {topic!r}")
    return topic


def _ca_file(env: Mapping[str, str]) -> str | None:
    for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        path = env.get(name)
        if path:
            # Else every outbound call fails (keys, Graph), and verify only ever answers 503.
            if not os.access(path, os.R_OK):
                raise ConfigError(f"{name}: no readable CA bundle at {path!r}")
            if os.path.isdir(path):
                return path   # requests (aadrun's outbound calls) takes a folder of hashed certificates too
            try:
                ssl.create_default_context(cafile=path)
            except (ssl.SSLError, OSError, ValueError):
                raise ConfigError(f"{name}: {path!r} is not a file of PEM certificates") from None
            return path
    return None


def _text(env: Mapping[str, str], name: str) -> str | None:
    """A value with surrounding blanks dropped (a secret made with ``echo`` ends in a
    newline); blanks only count as unset."""
    return (env.get(name) or "").strip() or None


def _client_id(env: Mapping[str, str]) -> str | None:
    """An Entra application (client) id is a GUID: anything else (a name, a secret
    pasted in the wrong variable) would fail every Graph call instead of start-up."""
    value = _text(env, "AADRUN_CLIENT_ID")
    if value is not None and not is_guid(value):
        raise ConfigError("AADRUN_CLIENT_ID must be the app registration's Application (client) ID, a GUID")
    return value


def _float(env: Mapping[str, str], name: str, default: float, maximum: float, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):   # a NaN leeway would make every exp check pass
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum:g}, got {raw!r}" if minimum
                          else f"{name} must not be negative, got {raw!r}")
    if value > maximum:
        raise ConfigError(f"{name} must be at most {maximum:g}, got {raw!r}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = env.get(name) or default
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Settings:
    policy_path: str = "policies/"
    store_url: str = "sqlite:///.aadrun/state.db"
    bus: str = "local"
    topic_changes: str = "aadrun-membership-changes"
    topic_policy: str = "aadrun-policy-updates"
    iam_mode: str = "record"
    cloudrun_endpoint: str | None = None
    authority_url: str = DEFAULT_AUTHORITY
    graph_url: str = DEFAULT_GRAPH
    client_id: str | None = None
    client_secret: str | None = None
    client_states: tuple[str, ...] = ()
    notification_url: str | None = None
    project: str | None = None
    ca_file: str | None = None   # extra CA bundle for outbound HTTPS (tests, private CAs)
    # Tunables (not pinned by the contract).
    leeway_seconds: float = 60.0
    jwks_refresh_seconds: float = 3600.0
    jwks_unknown_kid_interval: float = 30.0
    http_timeout_seconds: float = 5.0
    membership_poll_seconds: float = 0.2
    publish_timeout_seconds: float = 2.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        states = tuple(s.strip() for s in (env.get("AADRUN_CLIENT_STATE") or "").split(",") if s.strip())
        endpoint = env.get("AADRUN_CLOUDRUN_ENDPOINT") or None
        notification = env.get("AADRUN_NOTIFICATION_URL") or None
        settings = cls(
            policy_path=env.get("AADRUN_POLICY_PATH") or "policies/",
            store_url=check_store_url(env.get("AADRUN_STORE") or cls.store_url),
            bus=_choice(env, "AADRUN_BUS", "local", ("local", "pubsub")),
            topic_changes=check_topic("AADRUN_TOPIC_CHANGES", env.get("AADRUN_TOPIC_CHANGES") or cls.topic_changes),
            topic_policy=check_topic("AADRUN_TOPIC_POLICY", env.get("AADRUN_TOPIC_POLICY") or cls.topic_policy),
            iam_mode=_choice(env, "AADRUN_IAM", "record", ("record", "cloudrun")),
            cloudrun_endpoint=check_url("AADRUN_CLOUDRUN_ENDPOINT", endpoint) if endpoint else None,
            authority_url=check_url("AADRUN_AUTHORITY_URL", env.get("AADRUN_AUTHORITY_URL") or DEFAULT_AUTHORITY),
            graph_url=check_url("AADRUN_GRAPH_URL", env.get("AADRUN_GRAPH_URL") or DEFAULT_GRAPH),
            client_id=_client_id(env),
            client_secret=_text(env, "AADRUN_CLIENT_SECRET"),
            client_states=states,
            notification_url=check_url("AADRUN_NOTIFICATION_URL", notification) if notification else None,
            project=_text(env, "GOOGLE_CLOUD_PROJECT"),
            ca_file=_ca_file(env),
            # Bounds past which a setting undoes what it tunes: a leeway of hours keeps
            # expired tokens valid, keys refreshed less than daily keep removed keys (and
            # more than every second fetch them for every request), a poll of minutes keeps
            # removed members allowed.
            leeway_seconds=_float(env, "AADRUN_LEEWAY_SECONDS", 60.0, maximum=600),
            jwks_refresh_seconds=_float(env, "AADRUN_JWKS_REFRESH_SECONDS", 3600.0, maximum=86400, minimum=1),
            membership_poll_seconds=_float(env, "AADRUN_MEMBERSHIP_POLL_SECONDS", 0.2, maximum=60),
        )
        if env.get("AADRUN_CLIENT_STATE") and not states:   # blanks and commas only (a stray newline)
            raise ConfigError("AADRUN_CLIENT_STATE holds no secret: give one, or NEW,OLD during a rotation")
        if any(len(state) > MAX_CLIENT_STATE for state in states):
            # Graph refuses such a subscription: say so at start-up, not on every renewal.
            raise ConfigError(f"AADRUN_CLIENT_STATE: each secret must be at most {MAX_CLIENT_STATE} characters")
        if settings.bus == "pubsub" and not settings.project:
            raise ConfigError("AADRUN_BUS=pubsub needs GOOGLE_CLOUD_PROJECT")
        return settings

    def __repr__(self) -> str:  # secrets never reach a log line
        return "Settings(" + ", ".join(
            f"{f.name}={'***' if f.name in ('client_secret', 'client_states') else getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)) + ")"
