#!/usr/bin/env bash
# Set up everything toolcell needs on a Debian 12 (bookworm) machine, as root.  Safe to re-run; when all is
# in place it finishes in a few seconds.  Used by both README commands (main job and tests) and by CI.
#
#   1. Debian packages (docker.io, debootstrap, runc, tini, runsc, python3-venv, iproute2, ...), apt only when missing
#   2. runsc (gVisor) registered as an extra engine runtime in /etc/docker/daemon.json (merged, not clobbered)
#   3. the Docker engine running (started directly when there is no systemd; reloaded when daemon.json changed)
#   4. .venv with `pip install -e '.[dev]'` (skipped while pyproject.toml is unchanged), and /usr/local/bin/toolcell
#      linked to its console script when no other toolcell is on PATH
#   5. images/build.sh (skips images whose inputs are unchanged; unpacks their root filesystems for the oci engine)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
readonly DAEMON_JSON=/etc/docker/daemon.json
readonly DOCKERD_LOG=/var/log/toolcell-dockerd.log
readonly RUNSC=/usr/bin/runsc
readonly VENV="$REPO/.venv"
readonly STAMP="$VENV/.toolcell-setup-stamp"
# runsc is optional: it is only built for some architectures.
# runc and tini: the oci engine (engine.kind oci) runs sandboxes with them directly, no daemon.
readonly REQUIRED_PACKAGES=(ca-certificates debootstrap docker.io iproute2 python3 python3-venv runc tar tini util-linux)
readonly OPTIONAL_PACKAGES=(runsc)
export DEBIAN_FRONTEND=noninteractive

T0=$SECONDS
log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

installed() { [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]; }

ensure_packages() {
  local missing=() optional=() p
  for p in "${REQUIRED_PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
  for p in "${OPTIONAL_PACKAGES[@]}"; do installed "$p" || optional+=("$p"); done
  if ((${#missing[@]} + ${#optional[@]} == 0)); then
    log "packages: all present"
    return
  fi
  log "packages: installing ${missing[*]} ${optional[*]}"
  # Third-party sources that are unreachable must not stop us: the Debian mirror is what matters.
  apt-get update -qq || log "warning: apt-get update reported errors; continuing"
  # Keep package scripts from starting services: this script starts dockerd itself, its own way.
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && own_policy=1
  fi
  local rc=0
  if ((${#missing[@]})); then
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
  fi
  for p in "${optional[@]}"; do
    apt-get install -y -qq --no-install-recommends "$p" >/dev/null \
      || log "warning: optional package $p could not be installed; continuing without it"
  done
  if ((own_policy)); then rm -f "$policy"; fi
  ((rc == 0)) || die "apt-get install ${missing[*]} failed (exit $rc)"
}

# Merge the runsc runtime into daemon.json; print "changed" when the file was rewritten.
register_runsc() {
  if [[ ! -x "$RUNSC" ]]; then
    log "runsc: not installed; engine keeps runc only"
    return
  fi
  mkdir -p "$(dirname "$DAEMON_JSON")"
  python3 - "$DAEMON_JSON" "$RUNSC" <<'PY'
import json, os, sys, tempfile
path, runsc = sys.argv[1], sys.argv[2]
try:
    with open(path) as f:
        text = f.read()
    config = json.loads(text) if text.strip() else {}
except FileNotFoundError:
    config = {}
if not isinstance(config, dict):
    sys.exit(f"{path}: top level is not a JSON object; fix it by hand")
want = {"path": runsc, "runtimeArgs": ["--network=none"]}
runtimes = config.setdefault("runtimes", {})
if runtimes.get("runsc") == want:
    sys.exit(0)
runtimes["runsc"] = want
fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".daemon.json.")
with os.fdopen(fd, "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
os.chmod(tmp, 0o644)
os.replace(tmp, path)
print("changed")
PY
}

have_systemd() { [[ -d /run/systemd/system ]]; }

engine_up() { docker info >/dev/null 2>&1; }

STARTED_PID=""  # dockerd started by this script (no systemd), so a crash is noticed at once

wait_engine() {
  local i
  for ((i = 0; i < 120; i++)); do
    engine_up && return 0
    if [[ -n "$STARTED_PID" ]] && ! kill -0 "$STARTED_PID" 2>/dev/null; then
      tail -n 20 "$DOCKERD_LOG" >&2 || true
      die "dockerd exited during start-up (last lines of $DOCKERD_LOG above)"
    fi
    sleep 0.5
  done
  tail -n 20 "$DOCKERD_LOG" >&2 || true
  die "the Docker engine did not come up within 60 s (last lines of $DOCKERD_LOG above)"
}

start_dockerd() {
  if have_systemd; then
    systemctl start docker
  else
    # Detached from this shell so it outlives the script (and CI steps).
    setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
    STARTED_PID=$!
  fi
}

dockerd_pid() {
  local pid
  pid="$(cat /var/run/docker.pid 2>/dev/null || true)"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && printf '%s' "$pid"
}

engine_has_runsc() {
  docker info --format '{{ range $name, $_ := .Runtimes }}{{ $name }} {{ end }}' 2>/dev/null | grep -qw runsc
}

# Make the running engine pick up a changed daemon.json.  `runtimes` is one of the options dockerd reloads
# on SIGHUP, which keeps running containers alive; a full restart is the fallback.
apply_daemon_config() {
  local pid
  if pid="$(dockerd_pid)"; then
    log "engine: reloading daemon.json (SIGHUP to dockerd $pid)"
    kill -HUP "$pid"
    local i
    for ((i = 0; i < 20; i++)); do
      engine_has_runsc && return
      sleep 0.25
    done
  fi
  log "engine: restarting to apply daemon.json"
  if have_systemd; then
    systemctl restart docker
  elif pid="$(dockerd_pid)"; then
    kill -TERM "$pid"
    local i
    for ((i = 0; i < 120; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -0 "$pid" 2>/dev/null && die "dockerd $pid did not stop within 60 s"
    start_dockerd
  fi
}

ensure_engine() {
  local changed="$1"
  if engine_up; then
    if [[ "$changed" == changed ]]; then apply_daemon_config; fi
  else
    log "engine: starting dockerd (log: $DOCKERD_LOG)"
    start_dockerd
  fi
  wait_engine
  if [[ -x "$RUNSC" ]] && ! engine_has_runsc; then
    log "warning: runsc is in $DAEMON_JSON but the engine does not list it; restart dockerd to load it"
  fi
  log "engine: $(docker version --format 'Docker {{ .Server.Version }}') up, runtimes:" \
    "$(docker info --format '{{ range $name, $_ := .Runtimes }}{{ $name }} {{ end }}')"
}

ensure_venv() {
  local want
  want="$( { sha256sum "$REPO/pyproject.toml"; python3 --version; } | sha256sum | cut -d' ' -f1)"
  if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    log "venv: up to date ($VENV)"
    return
  fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "venv: creating $VENV"
    python3 -m venv "$VENV"
  fi
  log "venv: pip install -e '.[dev]' (a minute on a cold cache)"
  local pip_log="$VENV/.toolcell-pip-install.log"
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -e "${REPO}[dev]" >"$pip_log" 2>&1; then
    tail -n 30 "$pip_log" >&2
    die "pip install failed (log: $pip_log)"
  fi
  printf '%s\n' "$want" >"$STAMP"
}

# `toolcell` on PATH for the README's commands: /usr/local/bin/toolcell -> the venv's console script, unless
# another toolcell is already on PATH (an install of the reader's own: pipx, pip) or the name is taken.
readonly CLI_LINK=/usr/local/bin/toolcell
ensure_cli_link() {
  local target="$VENV/bin/toolcell" found
  if [[ -L "$CLI_LINK" && "$(readlink "$CLI_LINK")" == "$target" ]]; then
    log "cli: $CLI_LINK -> $target"
    return
  fi
  if [[ -L "$CLI_LINK" && ! -e "$CLI_LINK" ]]; then
    log "cli: replacing $CLI_LINK, a dangling link to $(readlink "$CLI_LINK") (a removed checkout)"
    rm -f "$CLI_LINK"
  fi
  found="$(command -v toolcell || true)"
  if [[ -n "$found" ]]; then
    log "cli: toolcell on PATH is $found; $CLI_LINK not made (use $target for this checkout)"
    return
  fi
  if [[ -e "$CLI_LINK" || -L "$CLI_LINK" ]]; then
    log "cli: $CLI_LINK exists and is not ours; left alone (use $target)"
    return
  fi
  mkdir -p "$(dirname "$CLI_LINK")"
  ln -s "$target" "$CLI_LINK"
  log "cli: linked $CLI_LINK -> $target: toolcell is on PATH"
}

main() {
  [[ "$(id -u)" == 0 ]] || die "run as root (it installs packages and starts the Docker engine)"
  command -v dpkg-query >/dev/null || die "this needs a Debian (bookworm) machine"
  ensure_packages
  local changed
  changed="$(register_runsc)"
  if [[ "$changed" == changed ]]; then log "runsc: registered in $DAEMON_JSON (runtime name runsc)"; fi
  ensure_engine "$changed"
  ensure_venv
  ensure_cli_link
  log "images: building (skipped when unchanged)"
  bash "$REPO/images/build.sh"
  log "done in $((SECONDS - T0)) s"
}

main "$@"
