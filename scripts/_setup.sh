# Sourced by scripts/dev, scripts/test and scripts/bench: a virtualenv with
# requirements.txt installed, reused while requirements.txt is unchanged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AADRUN_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  if [ -n "$(ls -A "$VENV" 2>/dev/null)" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
    echo "setup: $VENV is a folder with files and no virtualenv: set AADRUN_VENV to another" >&2
    exit 1
  fi
  echo "setup: creating virtualenv $VENV" >&2
  python3 -m venv "$VENV"
elif [ ! -x "$VENV/bin/pip" ]; then
  # pip is the last thing venv installs: its creation was interrupted (Ctrl-C), or it
  # was made without pip. Add pip; never delete what is there.
  echo "setup: installing pip into $VENV" >&2
  "$PY" -m ensurepip --default-pip >/dev/null
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

# A command from a Debian package, installed when it is missing and we may (root,
# apt-get); otherwise a note, and the caller does without it.
debian_tool() {
  local command="$1" package="$2" why="$3"
  command -v "$command" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing $package (Debian package) $why" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null) && return 0
  fi
  echo "setup: could not install $package ($why)" >&2
  return 1
}
