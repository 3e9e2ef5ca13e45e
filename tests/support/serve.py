"""Serve a function of functions/main.py with the real functions-framework in a
subprocess on a free loopback port (each function in its own process: several
``create_app`` calls in one process collide on the module name ``main``)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import weakref
from collections.abc import Callable
from pathlib import Path

from tests.support.emulators import free_port

ROOT = Path(__file__).resolve().parents[2]


# The child gets SIGTERM when the thread that started it dies, so a killed test run
# leaves no server behind: through util-linux's setpriv, not a preexec_fn. A preexec_fn
# makes subprocess fork() the whole multi-threaded test process, and gRPC's fork
# handler (installed once a test used Pub/Sub or Firestore) can deadlock in that fork.
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "TERM", "--"] if shutil.which("setpriv") else []


def _remove(log) -> None:
    log.close()
    with contextlib.suppress(OSError):
        os.unlink(log.name)


class FunctionServer:
    def __init__(self, target: str, env: dict[str, str], port: int | None = None, signature: str | None = None,
                 source: Path | None = None):
        self.target, self.env = target, env
        self.source = source or ROOT / "functions" / "main.py"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.signature = signature
        self.log = tempfile.NamedTemporaryFile(prefix=f"aadrun-{target}-", suffix=".log", delete=False)
        # The log outlives stop() (tests read what was written at exit) but not this object.
        weakref.finalize(self, _remove, self.log)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "FunctionServer":
        args = [*_DIE_WITH_PARENT, sys.executable, "-m", "functions_framework", "--source", str(self.source),
                "--target", self.target, "--host", "127.0.0.1", "--port", str(self.port)]
        if self.signature:
            args += ["--signature-type", self.signature]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "functions"), **self.env}
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.target} exited:\n{self.output()}")
            try:
                urllib.request.urlopen(self.url + "/__ready__", timeout=0.5)
                return self
            except urllib.error.HTTPError:
                return self  # it answered
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.target} not listening after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def log_entries(self, until: Callable[[list[dict]], bool] = bool, timeout: float = 10.0) -> list[dict]:
        """The JSON lines written so far, once ``until`` holds for them (audit lines
        reach stdout in batches, a fraction of a second after the request)."""
        deadline = time.monotonic() + timeout
        while True:
            # Complete lines only: the last one may be half written while we read.
            entries = [json.loads(line) for line in self.output().split("\n")[:-1] if line.startswith("{")]
            if until(entries) or time.monotonic() > deadline:
                return entries
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "FunctionServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``data`` as it is (a request no HTTP client would write), end the sending
    side, and return the answer's status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body
