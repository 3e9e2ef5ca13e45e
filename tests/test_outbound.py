"""outbound.deadline: a call made under it ends by its deadline, whatever the server
trickles and wherever it trickles it (a request timeout bounds each read only)."""
from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time

import certifi
import pytest

from aadrun import outbound
from aadrun.config import Settings
from aadrun.outbound import client_session, deadline
from tests.support.graph_fixtures import make_pki

BODY = b'{"keys": []}'
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
# Each byte well inside the 5 s read timeout; the whole far beyond the 1 s deadline.
GAP, DEADLINE, READ_TIMEOUT = 0.2, 1.0, 5.0


def _serve(handle, tls: ssl.SSLContext | None = None) -> int:
    """A loopback server calling ``handle(connection)`` on a thread per connection."""
    listener = socket.create_server(("127.0.0.1", 0))

    def one(conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            handle(tls.wrap_socket(conn, server_side=True) if tls else conn)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=one, args=(listener.accept()[0],), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1]


def _read_head(conn) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


def _trickle(conn, data: bytes) -> None:
    for i in range(len(data)):
        conn.sendall(data[i:i + 1])
        time.sleep(GAP)


def _answer(trickled: bool):
    def handle(conn) -> None:
        while _read_head(conn):
            if trickled:
                return _trickle(conn, ANSWER * 20)
            conn.sendall(ANSWER)
    return handle


def _until_close(conn) -> None:
    # HTTP/1.0 without a length: the body ends when the connection does.
    _read_head(conn)
    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
    _trickle(conn, b'{"keys": [' + b" " * 200 + b"]}")


def _stuck_handshake(conn) -> None:
    conn.recv(4096)                        # the ClientHello
    conn.sendall(b"\x16\x03\x03\x40\x00")  # a handshake record of 16 KiB follows...
    _trickle(conn, b"\x00" * 200)          # ...a byte at a time


def _proxy(conn) -> None:
    """An HTTPS proxy's CONNECT, then bytes relayed both ways."""
    target = _read_head(conn).split(b" ")[1].decode()
    host, port = target.rsplit(":", 1)
    upstream = socket.create_connection((host, int(port)))
    conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

    def relay(a, b) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    threading.Thread(target=relay, args=(upstream, conn), daemon=True).start()
    relay(conn, upstream)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert_file, pki.key_file)
    return pki, context


@pytest.fixture
def session(tls, monkeypatch):
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    return client_session(Settings(ca_file=tls[0].ca_file))


CASES = ["status line and headers", "body until the server closes", "TLS handshake", "answer over TLS",
         "answer over TLS through an HTTPS proxy"]


@pytest.mark.parametrize("case", CASES)
def test_a_trickling_server_is_cut_off_at_the_deadline(case, tls, session):
    pki, context = tls
    if case == "status line and headers":
        url = f"http://127.0.0.1:{_serve(_answer(trickled=True))}/"
    elif case == "body until the server closes":
        url = f"http://127.0.0.1:{_serve(_until_close)}/"
    elif case == "TLS handshake":
        url = f"https://127.0.0.1:{_serve(_stuck_handshake)}/"
    else:
        url = f"https://127.0.0.1:{_serve(_answer(trickled=True), context)}/"
        if case.endswith("proxy"):
            session.proxies = {"https": f"https://127.0.0.1:{_serve(_proxy, context)}"}
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="no complete answer within 1 s"):
        with deadline(DEADLINE, "the document"):
            with session.get(url, timeout=READ_TIMEOUT, stream=True) as response:
                response.raw.read(1 << 20)
    # Before its read timeout could end it: the deadline did (and well before the trickle's end).
    assert time.monotonic() - started < READ_TIMEOUT - 1


def test_a_deadline_whose_timer_runs_late_still_ends_the_call_as_a_deadline(tls, session, monkeypatch):
    # On a busy machine the timer thread may run after the socket's own timeout (set to
    # what the deadline had left) fired: the call still ends as the deadline's.
    late_timer = threading.Timer
    monkeypatch.setattr(outbound.threading, "Timer", lambda seconds, fn: late_timer(seconds + 3, fn))
    url = f"https://127.0.0.1:{_serve(lambda conn: conn.recv(4096) and time.sleep(READ_TIMEOUT))}/"   # silent
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="no complete answer within 1 s"):
        with deadline(DEADLINE, "the document"):
            session.get(url, timeout=READ_TIMEOUT)
    assert time.monotonic() - started < 3


def test_calls_after_a_cut_off_and_calls_without_a_deadline_are_served_as_before(session):
    quick = f"http://127.0.0.1:{_serve(_answer(trickled=False))}/"
    slow = f"http://127.0.0.1:{_serve(_answer(trickled=True))}/"
    with deadline(DEADLINE, "a quick one"):
        assert session.get(quick, timeout=READ_TIMEOUT).content == BODY
    with pytest.raises(TimeoutError), deadline(DEADLINE, "a slow one"):
        session.get(slow, timeout=READ_TIMEOUT)
    assert session.get(quick, timeout=READ_TIMEOUT).content == BODY    # the kept-alive connection
    time.sleep(DEADLINE + 0.2)                                            # past the first deadline, no timer left
    assert session.get(quick, timeout=READ_TIMEOUT).content == BODY


def test_the_ca_bundle_aadrun_is_given_is_the_one_used_whatever_curl_s_variable_names(tls, monkeypatch):
    # requests prefers CURL_CA_BUNDLE to a session's own bundle: a machine naming the
    # system bundle there must not undo the one aadrun takes from SSL_CERT_FILE.
    pki, context = tls
    for name in ("REQUESTS_CA_BUNDLE", "NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CURL_CA_BUNDLE", certifi.where())
    monkeypatch.setenv("SSL_CERT_FILE", pki.ca_file)
    session = client_session(Settings.from_env())
    url = f"https://127.0.0.1:{_serve(_answer(trickled=False), context)}/"
    assert session.get(url, timeout=READ_TIMEOUT).content == BODY
