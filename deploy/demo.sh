#!/usr/bin/env bash
# plinth's main job on an embedded default, end to end on this machine:
#   a single-node plinth server (Raft on RocksDB in a data dir), an agent attested with a join
#   token, a registration entry for the current user, and an X509-SVID fetched through the SPIFFE
#   Workload API and shown (then checked with openssl against the trust bundle).
# Everything lives in a temporary directory and every process is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

bash .ci/setup
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/plinth-target}"
echo "==> building plinth-server and plinth-agent (the first build compiles RocksDB: ~10 min on 2 cores)"
cargo build -q -p plinth-server -p plinth-agent
BIN="$CARGO_TARGET_DIR/debug"

WORK="$(mktemp -d /tmp/plinth-demo.XXXXXX)"
chmod 700 "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ "${KEEP:-0}" == 1 ]]; then echo "(kept $WORK)"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
API_PORT="$(free_port)"
RAFT_PORT="$(free_port)"
TD="example.org"
SOCK="$WORK/server/api.sock"

cat >"$WORK/server.toml" <<EOF
[server]
trust_domain = "$TD"
data_dir = "$WORK/server-data"
socket_path = "$SOCK"
bind_address = "127.0.0.1"
bind_port = $API_PORT

[cluster]
node_id = 1
bind_address = "127.0.0.1:$RAFT_PORT"
bootstrap = true
# Peers would authenticate each other with server SVIDs over mTLS (the default); a single
# node has none, so nothing more is needed here.

[key_manager]
type = "disk"
keys_path = "$WORK/server-keys"

[node_attestor.join_token]
EOF

echo "==> starting plinth-server (trust domain $TD, data in $WORK/server-data)"
"$BIN/plinth-server" run -config "$WORK/server.toml" >"$WORK/server.log" 2>&1 &
PIDS+=($!)
for i in $(seq 1 100); do
  if "$BIN/plinth-server" healthcheck -socketPath "$SOCK" >/dev/null 2>&1; then break; fi
  if ! kill -0 "${PIDS[0]}" 2>/dev/null; then cat "$WORK/server.log"; echo "server exited" >&2; exit 1; fi
  sleep 0.2
done
"$BIN/plinth-server" healthcheck -socketPath "$SOCK"

TOKEN="$("$BIN/plinth-server" token generate -socketPath "$SOCK" -ttl 600 | sed 's/^Token: //')"
"$BIN/plinth-server" bundle show -socketPath "$SOCK" >"$WORK/bundle.pem"
AGENT_ID="spiffe://$TD/spire/agent/join_token/$TOKEN"
WORKLOAD_ID="spiffe://$TD/demo/workload"

echo "==> registering $WORKLOAD_ID for processes of uid $(id -u) under the agent"
"$BIN/plinth-server" entry create -socketPath "$SOCK" \
  -parentID "$AGENT_ID" -spiffeID "$WORKLOAD_ID" -selector "unix:uid:$(id -u)"

AGENT_SOCK="$WORK/agent/public/api.sock"
cat >"$WORK/agent.toml" <<EOF
[agent]
trust_domain = "$TD"
server_addresses = ["127.0.0.1:$API_PORT"]
data_dir = "$WORK/agent-data"
socket_path = "$AGENT_SOCK"
trust_bundle_path = "$WORK/bundle.pem"

[node_attestor.join_token]

[workload_attestor.unix]
EOF

echo "==> starting plinth-agent (join token attestation)"
"$BIN/plinth-agent" run -config "$WORK/agent.toml" -joinToken "$TOKEN" >"$WORK/agent.log" 2>&1 &
PIDS+=($!)

echo "==> fetching an X509-SVID through the Workload API at unix://$AGENT_SOCK"
mkdir -p "$WORK/svid"
fetched=0
for i in $(seq 1 150); do
  if "$BIN/plinth-agent" api fetch x509 -socketPath "$AGENT_SOCK" -write "$WORK/svid" >"$WORK/fetch.out" 2>&1; then fetched=1; break; fi
  if ! kill -0 "${PIDS[1]}" 2>/dev/null; then cat "$WORK/agent.log"; echo "agent exited" >&2; exit 1; fi
  sleep 0.2
done
cat "$WORK/fetch.out"
if [[ $fetched != 1 ]]; then echo "no SVID after 30 s; agent log:" >&2; tail -20 "$WORK/agent.log" >&2; exit 1; fi
echo
echo "==> the SVID, as openssl sees it"
openssl x509 -in "$WORK/svid/svid.0.pem" -noout -subject -dates -ext subjectAltName,keyUsage,basicConstraints
echo -n "openssl verify against the trust bundle: "
openssl verify -CAfile "$WORK/svid/bundle.0.pem" "$WORK/svid/svid.0.pem"
echo
echo "==> attested agents"
"$BIN/plinth-server" agent list -socketPath "$SOCK"
echo "Demo complete: server, agent, entry and an SVID fetched through the Workload API."
