#!/usr/bin/env bash
# Runs the whole Loupe test suite on a fresh machine.
#
# Installs what the tests need (idempotently), then runs every test of the workspace:
# - a Python venv in target/test-venv with the OpenTelemetry SDK and OTLP exporters
#   (tests/python/requirements.txt), used to export real SDK traces to `loupe standalone`.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh -p loupe-core`).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="target/test-venv"
req="tests/python/requirements.txt"
stamp="$venv/.requirements"
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$req" "$stamp"; then
  echo "==> installing Python test dependencies into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  cp "$req" "$stamp"
fi
export LOUPE_TEST_PYTHON="$PWD/$venv/bin/python"

echo "==> cargo test --workspace"
log="target/test-output.log"
set +e
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6; i += $8 }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, i }' "$log"
exit "$status"
