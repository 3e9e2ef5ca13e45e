"""The HTTP client session of every outbound call: discovery, JWKS, Graph and MSAL."""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection

from .config import Settings

# The deadline of the call running on this thread, if it has one.
_current = threading.local()


class _Deadline:
    """A timer that shuts down the TCP connections of the calls made under it. It holds
    a duplicate of each one's descriptor: shutting that down ends the connection under
    whatever wraps the socket (TLS, TLS through a proxy), even during the handshake,
    when TLS has detached the socket it wraps, and after a response that reads until
    the server closes has taken the socket from its connection."""

    def __init__(self, seconds: float):
        self.ends = time.monotonic() + seconds
        self.expired = False
        self._duplicates: list[socket.socket] = []
        self._watched: set[int] = set()
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def left(self) -> float:
        return self.ends - time.monotonic()

    def start(self) -> None:
        self._timer.start()

    def watch(self, connection, sock, *, reused: bool = False) -> None:
        with self._lock:
            if reused and id(connection) in self._watched:   # its socket is already held
                return
            self._watched.add(id(connection))
        try:
            duplicate = socket.socket(fileno=os.dup(sock.fileno()))
        except (OSError, ValueError):   # already closed: nothing left to end
            return
        with self._lock:
            self._duplicates.append(duplicate)
            expired = self.expired
        if expired:   # connected after the deadline: end it before it is used
            _shut(duplicate)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            duplicates = list(self._duplicates)
        for duplicate in duplicates:
            _shut(duplicate)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            duplicates, self._duplicates = self._duplicates, []
        for duplicate in duplicates:
            duplicate.close()


def _shut(sock: socket.socket) -> None:
    # shutdown(), not close(): it wakes a thread blocked on the connection.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """Calls of this thread through a ``client_session`` end within ``seconds``, whole:
    connecting, the TLS handshake, the status line, the headers and the body. A request
    timeout bounds each socket read only, so a server that trickles its answer a byte
    at a time would hold the call (and whatever lock its caller holds) for ever.
    Raises ``TimeoutError`` naming ``what`` when the deadline passed before the block
    ended: an answer that ends when its connection does may otherwise look complete."""
    state, outer = _Deadline(seconds), getattr(_current, "deadline", None)
    late = f"{what}: no complete answer within {seconds:g} s"
    _current.deadline = state
    state.start()
    try:
        yield
    except Exception as e:
        # Or the socket's own timeout, which connecting set to what the deadline had
        # left, fired just before the timer did (a busy machine runs the timer late).
        if state.expired or state.left() <= 0:
            raise TimeoutError(late) from e
        raise
    finally:
        state.close()
        _current.deadline = outer
    if state.expired:
        raise TimeoutError(late)


class _Watched:
    """A connection that joins the deadline of the thread using it, if any."""

    def _new_conn(self):
        state = getattr(_current, "deadline", None)
        if state is not None:   # connecting takes no longer than the deadline has left
            self.timeout = max(min(self.timeout if isinstance(self.timeout, (int, float)) else state.left(),
                                   state.left()), 0.001)
        sock = super()._new_conn()
        if state is not None:
            state.watch(self, sock)   # before TLS wraps it: a handshake is ended too
        return sock

    def request(self, *args, **kwargs):
        state = getattr(_current, "deadline", None)
        if state is not None and self.sock is not None:
            state.watch(self, self.sock, reused=True)   # a kept-alive connection
        return super().request(*args, **kwargs)


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _Adapter(HTTPAdapter):
    """Connections that join a ``deadline``, checked against ``ca_file`` when given."""

    def __init__(self, ca_file: str | None):
        self._ca_file = ca_file
        super().__init__()

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        # requests prefers REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, when set, to the session's
        # own bundle: the one the settings name must win, or a machine whose CURL_CA_BUNDLE
        # names the system bundle undoes SSL_CERT_FILE.
        if self._ca_file and verify is not False:
            verify = self._ca_file
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    def proxy_manager_for(self, proxy, **kwargs):
        manager = super().proxy_manager_for(proxy, **kwargs)
        if proxy.lower().startswith(("http:", "https:")):   # SOCKS managers have pools of their own
            manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        return manager


def client_session(settings: Settings) -> requests.Session:
    """A session that trusts ``settings.ca_file`` when one is given (CONTRACT.md §2),
    and whose calls honour ``deadline``.

    requests reads ``REQUESTS_CA_BUNDLE`` and ``CURL_CA_BUNDLE`` by itself but not
    ``SSL_CERT_FILE``; the settings carry whichever of the two the contract names is set.
    """
    session = requests.Session()
    for prefix in ("https://", "http://"):
        session.mount(prefix, _Adapter(settings.ca_file))
    return session
