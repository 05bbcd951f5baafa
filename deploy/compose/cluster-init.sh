#!/bin/sh
# One-shot set-up of the compose cluster, run by the cluster-init service (plinth-tools image)
# against server1's admin socket once server1 is healthy:
#   1. mints a join kit (server SVID, key, bundle) for server2 and server3, which they need to
#      talk Raft over mTLS, and adds them to the cluster (`plinth-server cluster add`);
#   2. writes the trust bundle and, per agent, a join token and an agent config to /shared;
#   3. registers the demo workloads (uid 1001) and the agents' own health check (uid 0).
# Safe to run again: members already present are re-added as no-ops, agents that already
# have a config keep it.
set -eu
TD="${PLINTH_TRUST_DOMAIN:-example.org}"
SOCK=/run/plinth/server/api.sock
S="plinth-server"

retry() { # retry N command...: bounded retries, 2 s apart
  n="$1"; shift
  i=0
  until "$@"; do
    i=$((i + 1))
    if [ "$i" -ge "$n" ]; then echo "cluster-init: giving up on: $*" >&2; return 1; fi
    sleep 2
  done
}

for n in 2 3; do
  kit="/shared/kit-$n"
  if [ ! -f "$kit/svid.pem" ]; then
    echo "cluster-init: minting the join kit of server$n (its first server SVID)"
    retry 30 $S x509 mint -spiffeID "spiffe://$TD/spire/server" -write "$kit.tmp" -socketPath "$SOCK"
    mv "$kit.tmp" "$kit"
  fi
done
for n in 2 3; do
  echo "cluster-init: adding server$n"
  retry 60 $S cluster add -nodeID "$n" -address "server$n:8082" -socketPath "$SOCK"
done
$S cluster status -socketPath "$SOCK"

retry 30 $S bundle show -socketPath "$SOCK" >/shared/bundle.pem.tmp
mv /shared/bundle.pem.tmp /shared/bundle.pem

for a in agent1 agent2; do
  if [ -f "/shared/$a.toml" ]; then
    echo "cluster-init: $a already has a config"
    continue
  fi
  token="$(retry 30 $S token generate -ttl 3600 -socketPath "$SOCK" | sed 's/^Token: //')"
  agent_id="spiffe://$TD/spire/agent/join_token/$token"
  retry 30 $S entry create -socketPath "$SOCK" -parentID "$agent_id" \
    -spiffeID "spiffe://$TD/demo/$a/workload" -selector unix:uid:1001
  retry 30 $S entry create -socketPath "$SOCK" -parentID "$agent_id" \
    -spiffeID "spiffe://$TD/demo/$a/healthcheck" -selector unix:uid:0
  cat >"/shared/$a.toml.tmp" <<EOT
[agent]
trust_domain = "$TD"
server_addresses = ["server1:8081", "server2:8081", "server3:8081"]
data_dir = "/var/lib/plinth/agent"
socket_path = "/run/plinth/agent/api.sock"
trust_bundle_path = "/shared/bundle.pem"

[node_attestor.join_token]
token = "$token"

[workload_attestor.unix]
EOT
  mv "/shared/$a.toml.tmp" "/shared/$a.toml"
  echo "cluster-init: $a will attest as $agent_id"
done
echo "cluster-init: done"
