#!/usr/bin/env bash
# Build toolcell's container images offline (no registry):
#
#   toolcell/debian:bookworm  debootstrap --variant=minbase rootfs, cleaned, `docker import`ed
#   toolcell/python:bookworm  images/python/Dockerfile on top: user tool (10001), no setuid/setgid, tools
#   toolcell/supervisor:<ver> images/supervisor/Dockerfile on the base: the supervisor (toolcell serve) in a
#                             venv, installed --no-index from wheels built on the host (pinned by
#                             images/supervisor/requirements.lock; pip on the host may use PyPI), user 10002
#   rootfs store              the runner images' root filesystems unpacked for the oci engine (no daemon at
#                             run time): $TOOLCELL_ROOTFS_DIR/<image id>/rootfs, index.json maps names to ids
#   toolcell/mcp-<name>:<ver> the stock MCP servers listed in images/mcp-servers.txt (`toolcell images mcp
#                             --from`): packages fetched on the host (PyPI wheels, npm), built with no network on
#                             the Python image, unpacked too; pinned, so a re-run with the images present
#                             fetches nothing.  npm servers are skipped (with a warning) when the host has no
#                             node/npm.
#
# Each image carries the label io.toolcell.inputs-hash=<sha256 of its inputs>; a build is skipped when the
# existing image's label matches.  The debootstrap tarball is cached under $TOOLCELL_CACHE_DIR keyed by
# the same hash, so a rebuilt engine re-imports it without touching the mirror.  Needs root (debootstrap).
#
# Environment (all optional):
#   TOOLCELL_DEBIAN_MIRROR  Debian mirror        (default http://deb.debian.org/debian)
#   TOOLCELL_CACHE_DIR      tarball cache        (default /var/cache/toolcell)
#   TOOLCELL_FORCE_REBUILD  1 = ignore labels and the tarball cache
#   TOOLCELL_ROOTFS_DIR     the oci engine's rootfs store (default /var/lib/toolcell/rootfs)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly HERE
readonly SUITE=bookworm
readonly MIRROR="${TOOLCELL_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
readonly CACHE_DIR="${TOOLCELL_CACHE_DIR:-/var/cache/toolcell}"
readonly FORCE="${TOOLCELL_FORCE_REBUILD:-0}"
readonly BASE_IMAGE=toolcell/debian:bookworm
readonly PYTHON_IMAGE=toolcell/python:bookworm
REPO="$(cd "$HERE/.." && pwd)"
readonly REPO
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/pyproject.toml" | head -n 1)"
readonly VERSION
readonly SUPERVISOR_IMAGE="toolcell/supervisor:$VERSION"
# The Python that builds the wheels (pip wheel); scripts/setup.sh creates it before running this script.
readonly BUILD_PYTHON="${TOOLCELL_BUILD_PYTHON:-$REPO/.venv/bin/python}"
readonly LABEL=io.toolcell.inputs-hash
# Where the oci engine finds unpacked root filesystems (engine.oci.rootfs_dir).
readonly ROOTFS_DIR="${TOOLCELL_ROOTFS_DIR:-/var/lib/toolcell/rootfs}"

# What the runner needs: Python 3 with the whole standard library as Debian splits it.  No compilers, no
# network tools.  Changing this list changes the base hash and so rebuilds both images.
readonly PACKAGES=(
  ca-certificates
  libpython3-stdlib
  python3
  python3-distutils
  python3-gdbm
  python3-lib2to3
  python3-venv
  tzdata
)

log() { printf 'images: %s\n' "$*" >&2; }
die() { printf 'images: error: %s\n' "$*" >&2; exit 1; }

sha256() { sha256sum | cut -d' ' -f1; }

image_label() {  # image -> value of its inputs-hash label, empty when the image is missing
  docker image inspect --format "{{ index .Config.Labels \"$LABEL\" }}" "$1" 2>/dev/null || true
}

human_size() {  # image -> e.g. "142.3 MB"
  local bytes
  bytes="$(docker image inspect --format '{{ .Size }}' "$1")"
  awk -v b="$bytes" 'BEGIN { printf "%.1f MB", b / 1000000 }'
}

report() {  # image state -> one line per image
  printf '%-26s %-10s %s\n' "$1" "$2" "$(human_size "$1")"
}

# Runs in a throwaway directory; its own text is part of the base hash (see base_hash).
make_rootfs() {  # target_dir
  local root="$1"
  local include
  include="$(IFS=,; echo "${PACKAGES[*]}")"
  if ! debootstrap --variant=minbase --components=main --include="$include" \
    --arch="$(dpkg --print-architecture)" "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1; then
    tail -n 30 "$root.log" >&2
    die "debootstrap failed (last 30 lines of its log above)"
  fi
  # Future dpkg runs inside the image (if any) skip docs too.
  cat >"$root/etc/dpkg/dpkg.cfg.d/toolcell-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$root/etc/apt/sources.list"
  # Clean: package lists, caches, docs (keep licences), man pages, translations, logs, machine identity.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian "$root"/usr/share/linda \
    "$root"/var/log/* "$root"/tmp/* "$root"/var/tmp/* "$root"/root/.cache
  find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  : >"$root/etc/machine-id"
  rm -f "$root/etc/hostname" "$root/etc/resolv.conf" "$root/var/lib/dbus/machine-id"
}

base_hash() {
  {
    printf 'suite=%s\nmirror=%s\narch=%s\n' "$SUITE" "$MIRROR" "$(dpkg --print-architecture)"
    printf 'pkg=%s\n' "${PACKAGES[@]}"
    declare -f make_rootfs
  } | sha256
}

python_hash() {  # base_hash -> hash of base + Dockerfile + every file under images/python
  {
    printf 'base=%s\n' "$1"
    (cd "$HERE/python" && find . -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 \
      | LC_ALL=C sort -z | xargs -0 sha256sum)
  } | sha256
}

supervisor_hash() {  # base_hash -> hash of base + images/supervisor + pyproject + runtime sources
  {
    printf 'base=%s\nversion=%s\n' "$1" "$VERSION"
    (cd "$REPO" && find images/supervisor runtime pyproject.toml -type f ! -name '*.pyc' ! -path '*/__pycache__/*' \
      -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
  } | sha256
}

build_supervisor() {  # hash
  local hash="$1"
  if [[ "$FORCE" != 1 && "$(image_label "$SUPERVISOR_IMAGE")" == "$hash" ]]; then
    report "$SUPERVISOR_IMAGE" "up-to-date"
    return
  fi
  [[ -x "$BUILD_PYTHON" ]] || die "no Python to build wheels with at $BUILD_PYTHON (run scripts/setup.sh first)"
  log "docker build $SUPERVISOR_IMAGE (wheels from requirements.lock) ..."
  local ctx out
  ctx="$(mktemp -d "$CACHE_DIR/supervisor.XXXXXX")"
  # shellcheck disable=SC2064  # expand now: $ctx is local
  trap "rm -rf '$ctx'" EXIT
  cp "$HERE/supervisor/Dockerfile" "$HERE/supervisor/toolcell.yaml" "$HERE/supervisor/requirements.lock" "$ctx/"
  # Build from a clean copy of the sources, so nothing (build/, *.egg-info) lands in the checkout.
  mkdir -p "$ctx/src" "$ctx/wheels"
  cp "$REPO/pyproject.toml" "$ctx/src/"
  (cd "$REPO" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - runtime) | tar -C "$ctx/src" -xf -
  if ! out="$("$BUILD_PYTHON" -m pip wheel --disable-pip-version-check --quiet --wheel-dir "$ctx/wheels" \
    -c "$HERE/supervisor/requirements.lock" "$ctx/src" 2>&1)"; then
    printf '%s\n' "$out" >&2
    die "pip wheel for $SUPERVISOR_IMAGE failed"
  fi
  rm -rf "$ctx/src"
  if ! out="$(DOCKER_BUILDKIT=0 docker build --network=none --rm --force-rm \
    --label "$LABEL=$hash" --label org.opencontainers.image.title=toolcell-supervisor \
    --label "org.opencontainers.image.version=$VERSION" \
    --tag "$SUPERVISOR_IMAGE" "$ctx" 2>&1)"; then
    printf '%s\n' "$out" >&2
    die "docker build $SUPERVISOR_IMAGE failed"
  fi
  rm -rf "$ctx"
  trap - EXIT
  report "$SUPERVISOR_IMAGE" "built"
}

readonly MCP_SERVERS="$HERE/mcp-servers.txt"

build_mcp_servers() {
  [[ -f "$MCP_SERVERS" ]] || return 0
  [[ -x "$BUILD_PYTHON" ]] || die "no Python to run toolcell with at $BUILD_PYTHON (run scripts/setup.sh first)"
  local list="$MCP_SERVERS" out status=0
  local args=()
  [[ "$FORCE" == 1 ]] && args+=(--force)
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    log "warning: node/npm not installed: skipping the npm servers in ${MCP_SERVERS##*/}"
    list="$(mktemp)"
    grep -Ev '^[[:space:]]*npm[[:space:]]' "$MCP_SERVERS" >"$list" || true
  fi
  out="$("$BUILD_PYTHON" -m toolcell images mcp --from "$list" --store "$ROOTFS_DIR" "${args[@]}" 2>&1)" || status=$?
  [[ "$list" == "$MCP_SERVERS" ]] || rm -f "$list"
  if ((status != 0)); then
    printf '%s\n' "$out" >&2
    die "building the MCP server images listed in $MCP_SERVERS failed"
  fi
  # One line per image: name, state and time, size.
  printf '%s\n' "$out" | awk '/^toolcell\/mcp-/ { image = $1; state = $2; seconds = $4 }
    /^  size / { printf "%-26s %-10s %s %s (%s s)\n", image, state, $2, $3, seconds }'
}

build_base() {  # hash
  local hash="$1" tarball="$CACHE_DIR/debian-$SUITE-$1.tar"
  if [[ "$FORCE" != 1 && "$(image_label "$BASE_IMAGE")" == "$hash" ]]; then
    report "$BASE_IMAGE" "up-to-date"
    return
  fi
  if [[ "$FORCE" == 1 || ! -s "$tarball" ]]; then
    command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
    [[ "$(id -u)" == 0 ]] || die "debootstrap needs root"
    log "debootstrap $SUITE from $MIRROR (about a minute) ..."
    local work
    work="$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")"
    # shellcheck disable=SC2064  # expand now: $work is local
    trap "rm -rf '$work'" EXIT
    make_rootfs "$work/root"
    tar --numeric-owner --xattrs --acls -C "$work/root" -cf "$work/rootfs.tar" .
    mv -f "$work/rootfs.tar" "$tarball"
    rm -rf "$work"
    trap - EXIT
    # Older tarballs are dead weight once a new one exists.
    find "$CACHE_DIR" -maxdepth 1 -name "debian-$SUITE-*.tar" ! -name "${tarball##*/}" -delete
  else
    log "re-importing cached rootfs ${tarball##*/}"
  fi
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL $LABEL=$hash" \
    --change 'LABEL org.opencontainers.image.title=toolcell-debian' \
    --change 'CMD ["/bin/bash"]' \
    --message "toolcell $SUITE minbase rootfs" \
    "$tarball" "$BASE_IMAGE" >/dev/null
  report "$BASE_IMAGE" "built"
}

build_python() {  # hash
  local hash="$1"
  if [[ "$FORCE" != 1 && "$(image_label "$PYTHON_IMAGE")" == "$hash" ]]; then
    report "$PYTHON_IMAGE" "up-to-date"
    return
  fi
  log "docker build $PYTHON_IMAGE ..."
  # The classic builder resolves FROM against the local image store and never needs a registry.  Its
  # output (and newer CLIs' deprecation notice) is shown only when the build fails.
  local out
  if ! out="$(DOCKER_BUILDKIT=0 docker build --network=none --rm --force-rm \
    --label "$LABEL=$hash" --label org.opencontainers.image.title=toolcell-python \
    --tag "$PYTHON_IMAGE" "$HERE/python" 2>&1)"; then
    printf '%s\n' "$out" >&2
    die "docker build $PYTHON_IMAGE failed"
  fi
  report "$PYTHON_IMAGE" "built"
}

main() {
  command -v docker >/dev/null || die "docker CLI is missing (run scripts/setup.sh)"
  docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (run scripts/setup.sh)"
  mkdir -p "$CACHE_DIR"
  # One build at a time (tests and setup may race).
  exec 9>"$CACHE_DIR/build.lock"
  flock 9
  local bhash phash
  bhash="$(base_hash)"
  phash="$(python_hash "$bhash")"
  build_base "$bhash"
  build_python "$phash"
  build_supervisor "$(supervisor_hash "$bhash")"
  build_mcp_servers
  # Superseded builds of our images are left dangling; drop them (only ours: they carry the label).
  docker image prune --force --filter "label=$LABEL" >/dev/null 2>&1 || true
  unpack_rootfs
}

# The oci engine runs the same images with no daemon: each runner image's root filesystem is unpacked once
# into a content-addressed directory (keyed by the image id; skipped when present).
unpack_rootfs() {
  local out
  if ! out="$("$BUILD_PYTHON" -m toolcell images unpack --store "$ROOTFS_DIR" "$BASE_IMAGE" "$PYTHON_IMAGE" 2>&1)"; then
    printf '%s\n' "$out" >&2
    die "unpacking the root filesystems into $ROOTFS_DIR failed"
  fi
  log "rootfs store $ROOTFS_DIR: $BASE_IMAGE $PYTHON_IMAGE unpacked"
}

main "$@"
