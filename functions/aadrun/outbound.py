"""The HTTP client session of every outbound call: discovery, JWKS, Graph and MSAL."""
from __future__ import annotations

import contextlib
import socket
import threading

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection

from .config import Settings

# The deadline of the call running on this thread, if it has one.
_current = threading.local()


class _Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._connections: set = set()
        self._sockets: set = set()
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()

    def watch(self, connection) -> None:
        with self._lock:
            self._connections.add(connection)
            if connection.sock is not None:
                # Kept too: a response the server will close reads from this socket
                # after its connection has let go of it.
                self._sockets.add(connection.sock)
            expired = self.expired
        if expired:   # connected after the deadline: end it before it is used
            self._shut()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
        self._shut()

    def _shut(self) -> None:
        with self._lock:
            sockets = self._sockets | {c.sock for c in self._connections if c.sock is not None}
        for sock in sockets:
            # shutdown(), not close(): it wakes a thread blocked reading the socket. On the
            # plain socket even when TLS wraps it, so the TLS object stays to its owner.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """Calls of this thread through a ``client_session`` end within ``seconds``, whole:
    connecting, the TLS handshake, the status line, the headers and the body. A request
    timeout bounds each socket read only, so a server that trickles its answer a byte
    at a time would hold the call (and whatever lock its caller holds) for ever.
    Raises ``TimeoutError`` naming ``what`` when the deadline ended the call."""
    state = _Deadline(seconds)
    _current.deadline = state
    state.start()
    try:
        yield
    except Exception as e:
        if state.expired:
            raise TimeoutError(f"{what}: no complete answer within {seconds:g} s") from e
        raise
    finally:
        state.cancel()
        _current.deadline = None


class _Watched:
    """A connection that joins the deadline of the thread using it, if any."""

    def _join_deadline(self) -> None:
        state = getattr(_current, "deadline", None)
        if state is not None:
            state.watch(self)

    def connect(self) -> None:
        self._join_deadline()   # before: a handshake that trickles is ended too
        super().connect()
        self._join_deadline()   # after: a deadline that passed while connecting

    def request(self, *args, **kwargs):
        self._join_deadline()   # a kept-alive connection, reused
        return super().request(*args, **kwargs)

    def getresponse(self, *args, **kwargs):
        self._join_deadline()   # its socket, which the response reads
        return super().getresponse(*args, **kwargs)


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _DeadlineAdapter(HTTPAdapter):
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
        session.mount(prefix, _DeadlineAdapter())
    if settings.ca_file:
        session.verify = settings.ca_file
    return session
