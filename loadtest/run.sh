#!/usr/bin/env bash
# Load test: installs oha (cargo) and nginx (Debian) when missing, then runs loadtest/run.py.
# Usage: loadtest/run.sh [--short] [--duration SECS] [--connections N]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v oha >/dev/null; then
  cargo install oha --locked
fi
if ! command -v nginx >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light) \
    || echo "nginx unavailable: the reference proxy is skipped" >&2
fi
exec python3 loadtest/run.py "$@"
