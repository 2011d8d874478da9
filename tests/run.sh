#!/usr/bin/env bash
# The README's test command: installs what the test suite uses when it is missing, then
# runs `cargo test` with TESTS_NO_SKIP=1, under which a test whose tool is missing fails
# instead of skipping. Arguments go to cargo test.
#
#   tests/run.sh                   # install what is missing, then the whole suite
#   tests/run.sh --test deploy     # the same set-up, then one test binary
#   tests/run.sh --check           # say which tools are present; install nothing
#
# Installs from PyPI (python3 -m pip) and from Debian (apt-get, through sudo when not
# root). Without apt-get it names what to install and stops. The tests start their own
# Prometheus and Redis on free ports: the services the Debian packages start are
# stopped again after installing them.
set -euo pipefail
cd "$(dirname "$0")/.."

# One line per tool: name | source:package | what needs it.
TOOLS=(
  "openai|pip:openai|the OpenAI Python SDK (tests/openai_sdk.rs)"
  "yaml|pip:pyyaml|PyYAML, reads the deployment files (tests/deploy.rs)"
  "prometheus|apt:prometheus|a real Prometheus scraping the sidecar (tests/prometheus.rs)"
  "promtool|apt:prometheus|checks metrics and alerting rules (tests/metrics.rs, tests/prometheus.rs)"
  "chromium|apt:chromium|headless browser for the dashboard (tests/dashboard_browser.rs)"
  "chromedriver|apt:chromium-driver|WebDriver for that browser (tests/dashboard_browser.rs)"
  "systemd-analyze|apt:systemd|checks the systemd unit (tests/deploy.rs)"
  "redis-server|apt:redis-server|the shared budget's Redis (tests/cluster.rs and others)"
  "kubectl|apt:kubectl|kustomize builds the cluster manifests (tests/deploy.rs; or Debian kubernetes-client)"
  "compose|apt:docker-compose|docker compose config checks the compose files (tests/deploy.rs)"
)

# Whether `tool` is there, looked for as the tests look for it.
present() {
  case "$1" in
    openai | yaml) python3 -c "import $1" >/dev/null 2>&1 ;;
    prometheus | promtool) [ -x "/usr/bin/$1" ] || [ -x "/usr/local/bin/$1" ] ;;
    chromium | chromedriver) [ -x "/usr/bin/$1" ] ;;
    redis-server) command -v redis-server >/dev/null && command -v redis-cli >/dev/null ;;
    compose) docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null ;;
    *) command -v "$1" >/dev/null ;;
  esac
}

missing=()    # the TOOLS lines whose tool is absent
for line in "${TOOLS[@]}"; do
  present "${line%%|*}" || missing+=("$line")
done

# Prints each missing tool, the command that installs it and what needs it.
report_missing() {
  local line name src role how
  for line in "${missing[@]}"; do
    IFS='|' read -r name src role <<<"$line"
    case "$src" in
      pip:*) how="python3 -m pip install ${src#pip:}" ;;
      apt:*) how="apt-get install ${src#apt:}" ;;
    esac
    printf '  %-16s %-36s %s\n' "$name" "$how" "$role"
  done
}

if [ "${1:-}" = "--check" ]; then
  for line in "${TOOLS[@]}"; do
    IFS='|' read -r name src role <<<"$line"
    if present "$name"; then state=present; else state=MISSING; fi
    printf '%-8s %-16s %-22s %s\n' "$state" "$name" "(${src%%:*} ${src#*:})" "$role"
  done
  if ((${#missing[@]})); then exit 1; fi
  exit 0
fi

# Stops with the list of what is missing and how to install it.
give_up() {
  echo "tests/run.sh: $1; install these, then run tests/run.sh again:" >&2
  report_missing >&2
  exit 1
}

if ((${#missing[@]})); then
  mkdir -p target
  log=target/tests-setup.log
  : >"$log"
  run() { # a command whose output goes to the log, shown only when it fails
    if ! "$@" >>"$log" 2>&1; then
      tail -n 20 "$log" >&2
      echo "tests/run.sh: failed: $* (full log: $log)" >&2
      return 1
    fi
  }

  apt=()   # Debian packages to install
  pip=()   # PyPI packages to install
  for line in "${missing[@]}"; do
    IFS='|' read -r name src _ <<<"$line"
    case "$src" in
      pip:*) pip+=("${src#pip:}") ;;
      apt:kubectl) ;; # below: it may come from another repository
      apt:*) [[ " ${apt[*]} " == *" ${src#apt:} "* ]] || apt+=("${src#apt:}") ;;
    esac
  done
  if ((${#pip[@]})); then
    command -v python3 >/dev/null || apt+=(python3)
    python3 -m pip --version >/dev/null 2>&1 || apt+=(python3-pip)
  fi
  need_kubectl=false
  present kubectl || need_kubectl=true

  if ((${#apt[@]})) || $need_kubectl; then
    command -v apt-get >/dev/null || give_up "no apt-get on this system"
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
      command -v sudo >/dev/null || give_up "not root and no sudo"
      SUDO=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt_install() { run "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "$@"; }
    echo "tests/run.sh: apt-get update"
    run "${SUDO[@]}" apt-get update -qq
    if ((${#apt[@]})); then
      echo "tests/run.sh: apt-get install ${apt[*]}"
      apt_install "${apt[@]}"
    fi
    if $need_kubectl; then
      # The `kubectl` package comes from Kubernetes' own repository where that is
      # configured; Debian's kubernetes-client has a kubectl whose kustomize builds our
      # manifests too.
      echo "tests/run.sh: apt-get install kubectl (else kubernetes-client)"
      apt_install kubectl 2>/dev/null || apt_install kubernetes-client ||
        give_up "neither kubectl nor kubernetes-client installs"
    fi
    # The tests start their own Prometheus and Redis on free ports: stop the services
    # that the packages just installed have started.
    for service in prometheus redis-server; do
      [[ " ${apt[*]} " == *" $service "* ]] || continue
      if [ -d /run/systemd/system ]; then
        "${SUDO[@]}" systemctl stop "$service" >/dev/null 2>&1 || true
      elif command -v service >/dev/null; then
        "${SUDO[@]}" service "$service" stop >/dev/null 2>&1 || true
      fi
    done
  fi

  if ((${#pip[@]})); then
    args=(install --quiet --disable-pip-version-check)
    # Outside a virtual environment: into the user's site-packages when the
    # interpreter's is not writable, and past Debian's "externally managed" guard
    # (PEP 668) when this is the system's Python.
    read -r venv writable managed < <(python3 -c '
import os, sys, sysconfig
p = sysconfig.get_paths()
print(int(sys.prefix != sys.base_prefix), int(os.access(p["purelib"], os.W_OK)),
      int(os.path.exists(os.path.join(p["stdlib"], "EXTERNALLY-MANAGED"))))')
    if [ "$venv" = 0 ]; then
      [ "$writable" = 1 ] || args+=(--user)
      [ "$managed" = 0 ] || args+=(--break-system-packages)
    fi
    echo "tests/run.sh: python3 -m pip ${args[*]} ${pip[*]}"
    run python3 -m pip "${args[@]}" "${pip[@]}"
  fi

  missing=()
  for line in "${TOOLS[@]}"; do
    present "${line%%|*}" || missing+=("$line")
  done
  ((${#missing[@]} == 0)) || give_up "still missing after installing"
fi

echo "tests/run.sh: every tool is present; cargo test $* (TESTS_NO_SKIP=1: nothing is skipped)"
export TESTS_NO_SKIP=1
# tests/connections.rs holds both ends of 10,000 connections (about 18,700 descriptors):
# lift the soft open-file limit to the hard one.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec cargo test "$@"
