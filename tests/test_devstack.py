"""scripts/dev: the local stack plays its scenario and Ctrl-C leaves nothing behind."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support.emulators import free_port

ROOT = Path(__file__).resolve().parents[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_scenario_passes_in_embedded_mode(tmp_path):
    port = free_port()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "devstack.py"), "--once", "--port", str(port),
                           "--state", str(tmp_path / "dev")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    timeline = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert any("verify denies Alice" in line for line in timeline)
    assert any("verify for Carol: 403 not_member" in line for line in timeline)
    assert timeline[-1].endswith("scenario passed")
    assert not listening(port)


def test_ctrl_c_stops_everything(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "devstack.py"), "--port", str(port),
                             "--state", str(tmp_path / "dev")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        ports = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", "".join(lines))}
        assert port in ports and all(listening(p) for p in ports), "".join(lines[-30:])
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        # verify, graph_webhook, the identity provider and the Graph stand-in are all gone.
        assert [p for p in ports if listening(p)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
