# Sourced by scripts/dev, scripts/test and scripts/bench: a virtualenv with
# requirements.txt installed, reused while requirements.txt is unchanged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AADRUN_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
# pip is the last thing venv installs: without it, a creation was interrupted (Ctrl-C).
if [ ! -x "$PY" ] || [ ! -x "$VENV/bin/pip" ]; then
  echo "setup: creating virtualenv $VENV" >&2
  python3 -m venv --clear "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing requirements.txt" >&2
  "$PY" -m pip install --disable-pip-version-check -q -r "$ROOT/requirements.txt" >&2
  echo "$want" > "$stamp"
fi
export PYTHONPATH="$ROOT/functions:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# For the scripts that run everything on loopback (dev, test, bench, chaos): google-auth
# must not probe a metadata server. Not for the CLI, which runs where ADC comes from one
# (Cloud Build, Cloud Shell, GCE).
offline_google() {
  export NO_GCE_CHECK="${NO_GCE_CHECK:-true}"  # google-auth compares with "true"
}
