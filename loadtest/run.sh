#!/usr/bin/env bash
# Load test: builds the release binary, installs oha (cargo), nginx-light and redis-server
# (Debian) when missing, then runs loadtest/run.py (which writes target/loadtest/results.{json,md}).
# Usage: loadtest/run.sh [--short] [--duration SECS] [--connections N] [--only a,b,...]
#        [--pacing-realtime] [--pacing-situations 1,2-bare,...] [--pacing-serial]
#        [--cluster-rates 6000,60000] [--soak-minutes N]
# --short is the CI form (a few seconds per scenario, a one-minute soak, about 2.5
# minutes): it fails on crashes, lost requests and wrong statuses, never on timing, but for
# the cluster scenario's bounds (admitted at least 90% of the shared budget and, beyond the
# shared bucket's burst, at most 2% above it; at most 0.1 Redis round trips per admitted
# request) and the soak's leak checks (descriptors and RSS back near their baseline).
# The 30-minute soak by hand: loadtest/run.sh --only soak (--soak-minutes N to change it).
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
if ! command -v redis-server >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server) \
    || echo "redis-server unavailable: the cluster scenario will fail" >&2
fi
cargo build --release --quiet
# 10,000 idle connections and 1,000 dashboard clients need descriptors on both ends.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 loadtest/run.py --no-build "$@"
