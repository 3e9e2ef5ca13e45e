"""Start the Pub/Sub and Firestore emulators (gcloud) on free loopback ports.

Used by ``scripts/test`` (``python -m tests.support.emulators``) and, when the
variables are not already set, by the pytest fixtures in ``tests/conftest.py``.
"""
from __future__ import annotations

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

COMMANDS = {
    "pubsub": ["gcloud", "beta", "emulators", "pubsub", "start"],
    "firestore": ["gcloud", "emulators", "firestore", "start"],
}
ENV = {"pubsub": "PUBSUB_EMULATOR_HOST", "firestore": "FIRESTORE_EMULATOR_HOST"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    def __init__(self, kind: str, port: int | None = None):
        self.kind = kind
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.data_dir = tempfile.mkdtemp(prefix=f"aadrun-{kind}-")
        self.log_path = os.path.join(self.data_dir, "emulator.log")
        # Data and log live as long as this object (a restart reuses them).
        weakref.finalize(self, shutil.rmtree, self.data_dir, True)

    def start(self, timeout: float = 90.0) -> "Emulator":
        if not shutil.which("gcloud"):
            raise RuntimeError("gcloud is not installed: the emulators come with the Google Cloud CLI")
        args = COMMANDS[self.kind] + [f"--host-port={self.host}"]
        if self.kind == "pubsub":
            args.append(f"--data-dir={self.data_dir}")
        log = open(self.log_path, "ab")
        # New session so stop() can end the JVM that gcloud spawns, not just gcloud.
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} emulator exited:\n{self._log_tail()}")
            if self.ready():
                self._warm(max(5.0, deadline - time.monotonic()))
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.kind} emulator not ready after {timeout}s:\n{self._log_tail()}")

    def _log_tail(self, size: int = 4000) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(max(0, os.path.getsize(self.log_path) - size))
            return log.read().decode(errors="replace")

    def _warm(self, timeout: float) -> None:
        """One request through the emulator's backend: a new emulator's first answer
        takes a second idle and several on a loaded machine (its JVM warming up), which
        a first call of a test or of the stack would otherwise pay within its own
        timeout (measured: the first Firestore read after this, 0.09 s instead of 0.96)."""
        path = {"pubsub": "/v1/projects/warm-up/topics",
                "firestore": "/v1/projects/warm-up/databases/(default)/documents/warm-up/x"}[self.kind]
        try:
            urllib.request.urlopen(f"http://{self.host}{path}", timeout=timeout).close()
        except OSError:   # a 404 for the missing document is an answer too; no answer: callers wait, as before
            pass

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the emulator and return once its port no longer accepts connections:
        gcloud exits before the JVM it started has let go of the port."""
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + 15
            while self._listening() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self._listening():
                break
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False


def main() -> int:
    """Start both emulators, print `export VAR=host` lines, stay until SIGTERM."""
    started = [Emulator(kind).start() for kind in COMMANDS]
    for emu in started:
        print(f"export {ENV[emu.kind]}={emu.host}", flush=True)
    print("ready", flush=True)
    stop = lambda *_: (_ for _ in ()).throw(SystemExit(0))  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while all(e.proc and e.proc.poll() is None for e in started):
            time.sleep(1)
        return 1
    finally:
        for emu in started:
            emu.stop()


if __name__ == "__main__":
    sys.exit(main())
