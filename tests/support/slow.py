"""A server's answer that trickles in: each byte within any read timeout, the whole
taking as long as the test wants (what only a deadline on the whole call ends)."""
from __future__ import annotations

import time


def head_and_body(handler, body: bytes) -> bytes:
    """The status line and headers a ``BaseHTTPRequestHandler`` has buffered, with
    ``body``: the whole answer, to be written slowly instead of by ``end_headers``."""
    answer = b"".join(handler._headers_buffer) + b"\r\n" + body
    handler._headers_buffer = []
    return answer


def write_slowly(wfile, data: bytes, gap: float) -> None:
    """``data`` a byte at a time, ``gap`` seconds apart, until the client gives up."""
    for i in range(len(data)):
        try:
            wfile.write(data[i:i + 1])
            wfile.flush()
        except OSError:
            return
        time.sleep(gap)
