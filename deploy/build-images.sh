#!/usr/bin/env bash
# Builds plinth's container images locally, with no registry and no base image:
#
#   plinth-server:$TAG  the server binary, the shared libraries `ldd` lists, the dynamic loader
#   plinth-agent:$TAG   the agent binary, likewise
#   plinth-tools:$TAG   both binaries plus a static busybox (a shell for one-shot jobs: cluster
#                       membership, join tokens, demo workloads)
#
# Each image is a root filesystem assembled here and loaded with `docker import` (the
# equivalent of `FROM scratch` + COPY, keeping file owners), so nothing is pulled. Usage:
#
#   deploy/build-images.sh                 # debug binaries (fast if already built)
#   PROFILE=release deploy/build-images.sh # release binaries (compiles RocksDB again: ~10 min)
#   TAG=v1 deploy/build-images.sh
#   NO_BUILD=1 deploy/build-images.sh      # use binaries already in $CARGO_TARGET_DIR
#
# Needs: docker, cargo (unless NO_BUILD=1), ldd, and for plinth-tools a static busybox
# (Debian: apt-get install busybox-static).
set -euo pipefail
cd "$(dirname "$0")/.."

TAG="${TAG:-dev}"
PROFILE="${PROFILE:-debug}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/plinth-target}"
BIN_DIR="$CARGO_TARGET_DIR/$PROFILE"
BUSYBOX="${BUSYBOX:-$(command -v busybox || true)}"

if [[ "${NO_BUILD:-0}" != 1 ]]; then
  echo "==> cargo build ($PROFILE): plinth-server, plinth-agent" >&2
  args=(build -q -p plinth-server -p plinth-agent --bin plinth-server --bin plinth-agent)
  [[ "$PROFILE" == release ]] && args+=(--release)
  cargo "${args[@]}"
fi
for b in plinth-server plinth-agent; do
  [[ -x "$BIN_DIR/$b" ]] || { echo "missing $BIN_DIR/$b (build it, or unset NO_BUILD)" >&2; exit 1; }
done

WORK="$(mktemp -d /tmp/plinth-images.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

# Copies a binary and everything it loads (ldd: libraries and the loader) into a rootfs.
add_binary() {
  local root="$1" src="$2" dest="$3"
  install -D -m 0755 "$src" "$root$dest"
  # "libfoo.so => /lib/.../libfoo.so (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)"
  ldd "$src" | awk '/=> \// {print $3} /^[ \t]*\/[^ ]+ \(/ {print $1}' | while read -r lib; do
    [[ -e "$root$lib" ]] && continue
    install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
  done
}

# The minimum a process expects: /tmp, /etc/passwd and /etc/group (the images run as a
# non-root user by default), CA certificates are not needed (SPIFFE trust comes from bundles).
base_rootfs() {
  local root="$1"
  mkdir -p "$root/tmp" "$root/etc" "$root/var/lib/plinth" "$root/run/plinth/server" \
    "$root/run/plinth/agent" "$root/shared"
  chmod 1777 "$root/tmp"
  # Volumes mounted here start with these owners: the server and the jobs run as uid 1000.
  chown -R 1000:1000 "$root/var/lib/plinth" "$root/run/plinth/server" "$root/shared"
  chmod 0700 "$root/var/lib/plinth"
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
plinth:x:1000:1000:plinth:/var/lib/plinth:/sbin/nologin
workload:x:1001:1001:workload:/tmp:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
plinth:x:1000:
workload:x:1001:
nogroup:x:65534:
EOF
  echo "hosts: files dns" >"$root/etc/nsswitch.conf"
}

build_image() {
  local name="$1" root="$2" entry="$3"
  # `docker import` of a tar keeps file owners (a Dockerfile COPY would make everything root's).
  tar -C "$root" --numeric-owner -cf - . | docker import \
    --change "ENTRYPOINT [\"$entry\"]" \
    --change 'ENV PATH=/usr/local/bin:/bin' \
    --change "LABEL org.opencontainers.image.title=$name" \
    - "$name:$TAG" >/dev/null
  echo "built $name:$TAG ($(docker image inspect -f '{{.Size}}' "$name:$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
}

# plinth-server
R="$WORK/rootfs-plinth-server"
base_rootfs "$R"
add_binary "$R" "$BIN_DIR/plinth-server" /usr/local/bin/plinth-server
build_image plinth-server "$R" /usr/local/bin/plinth-server

# plinth-agent
R="$WORK/rootfs-plinth-agent"
base_rootfs "$R"
add_binary "$R" "$BIN_DIR/plinth-agent" /usr/local/bin/plinth-agent
build_image plinth-agent "$R" /usr/local/bin/plinth-agent

# plinth-tools: both binaries and a shell.
if [[ -z "$BUSYBOX" ]] || ldd "$BUSYBOX" >/dev/null 2>&1; then
  echo "plinth-tools needs a static busybox (apt-get install busybox-static); skipped" >&2
  exit 1
fi
R="$WORK/rootfs-plinth-tools"
base_rootfs "$R"
add_binary "$R" "$BIN_DIR/plinth-server" /usr/local/bin/plinth-server
add_binary "$R" "$BIN_DIR/plinth-agent" /usr/local/bin/plinth-agent
install -D -m 0755 "$BUSYBOX" "$R/bin/busybox"
for app in sh cat cp echo grep sed sleep mkdir ls rm seq date test tr cut head tail wc id env; do
  ln -s busybox "$R/bin/$app"
done
build_image plinth-tools "$R" /bin/sh
