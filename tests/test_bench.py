"""scripts/bench verify runs end to end and prints every figure with its ratio: a
benchmark that broke would otherwise go unnoticed until someone needs it. The
figures themselves are not asserted (they are measurements, not tests)."""
from __future__ import annotations

import re
import subprocess

from tests.support.serve import ROOT

ROW = re.compile(r"^ *(?P<name>\S.*?)\s{2,}.*?\s(?P<ratio>\d+\.\d+)(x| us)\s", re.M)


def test_bench_verify_prints_each_figure_with_its_baseline_and_target():
    done = subprocess.run([str(ROOT / "scripts" / "bench"), "verify", "--tokens", "20", "--seconds", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {m["name"].strip(): float(m["ratio"]) for m in ROW.finditer(done.stdout)}
    assert set(rows) == {"cold decision (distinct tokens)", "repeated token", "HTTP (forward-auth GET)",
                         "for reference: same response", "... plus its audit line (§9)",
                         "verify vs that one"}, done.stdout
    assert all(value > 0 for value in rows.values()), done.stdout
    assert "vs PyJWT decode" in done.stdout and "vs empty function" in done.stdout
