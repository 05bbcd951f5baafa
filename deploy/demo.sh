#!/usr/bin/env bash
# plinth's main job on an embedded default. Today: a CA for example.org issues an X509-SVID and a
# JWT-SVID, verifies both and prints them with the trust bundle. (It grows into a single-node
# server with RocksDB in a data dir, an agent, a registered entry and an SVID fetched through the
# Workload API as those parts land.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/plinth-target}"
cargo run -q -p plinth-spiffe --example demo
