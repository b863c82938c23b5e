#!/usr/bin/env bash
# The two commands of the README, and nothing else to install by hand:
#   ./run.sh demo   [demo options]    the main job: broker + worker + replay, ends with a summary line
#   ./run.sh test   [pytest options]  the whole test suite against the real local Kafka broker
#   ./run.sh shell                    a shell with the virtual environment active
# Installs on first use: a virtual environment (reused from $INTENTSTREAM_VENV, default
# ~/.cache/intentstream/venv, because torch alone is ~3 GB), the Python packages, and the Kafka jars.
set -euo pipefail
cd "$(dirname "$0")"

VENV="${INTENTSTREAM_VENV:-$HOME/.cache/intentstream/venv}"
PY="${PYTHON:-python3}"

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "run.sh: creating the virtual environment in $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
  fi
  # Reinstall the dependencies only when pyproject.toml changed; the project itself (editable) always,
  # since this checkout may live somewhere else than the last one that used the environment.
  local stamp="$VENV/.intentstream-deps" want
  want="$(sha256sum pyproject.toml | cut -c1-16)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "run.sh: installing Python packages (first time: torch is large, allow several minutes)"
    "$VENV/bin/pip" install -q --progress-bar off -e ".[dev,bench]"
    echo "$want" > "$stamp"
  else
    "$VENV/bin/pip" install -q --no-deps -e . >/dev/null 2>&1
  fi
  export PATH="$VENV/bin:$PATH"
}

cmd="${1:-help}"; shift || true
case "$cmd" in
  demo)
    ensure_venv
    exec intentstream demo "$@"
    ;;
  test)
    ensure_venv
    started=0
    if ! intentstream kafka status >/dev/null 2>&1; then
      intentstream kafka start
      started=1
    fi
    rc=0
    ruff check . || rc=$?
    ruff format --check . || rc=$?
    mypy stream models training load_tests || rc=$?
    python -m pytest "$@" || rc=$?
    if [ "$started" = 1 ]; then intentstream kafka stop || true; fi
    exit "$rc"
    ;;
  shell)
    ensure_venv
    exec "${SHELL:-bash}"
    ;;
  *)
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    [ "$cmd" = help ] || exit 2
    ;;
esac
