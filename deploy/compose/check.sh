#!/usr/bin/env bash
# End-to-end check of the compose deployment: builds the images, brings the cluster up, waits
# (bounded) until every service is healthy, checks that each demo workload got its SVID, kills
# the Raft leader and checks that the others elect a leader and still serve entries, brings it
# back, and tears everything down (also on failure). Usage: deploy/compose/check.sh
# (NO_BUILD=1 to reuse binaries already built; PLINTH_HEALTH_PORT to move server1's /ready).
set -euo pipefail
cd "$(dirname "$0")"
export PLINTH_HEALTH_PORT="${PLINTH_HEALTH_PORT:-18080}"
if docker compose version >/dev/null 2>&1; then DC=(docker compose); else DC=(docker-compose); fi
P="plinth-check-$$"
C=("${DC[@]}" -p "$P" -f docker-compose.yml)
SOCK=/run/plinth/server/api.sock

cleanup() {
  local rc=$?
  if ((rc != 0)); then
    echo "check failed; last logs:" >&2
    "${C[@]}" logs --tail 20 >&2 || true
  fi
  "${C[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  exit "$rc"
}
trap cleanup EXIT

bash ../build-images.sh
"${C[@]}" up -d

wait_healthy() { # every long-running service healthy, within 180 s
  for _ in $(seq 1 90); do
    local ps
    ps="$("${C[@]}" ps)"
    if ! grep -qE "starting|unhealthy|Restarting|Exit [1-9]" <<<"$ps" &&
      [[ "$(grep -c "(healthy)" <<<"$ps")" -ge 7 ]]; then
      return 0
    fi
    sleep 2
  done
  "${C[@]}" ps >&2
  echo "services not healthy in time" >&2
  return 1
}
wait_healthy
echo "==> all services healthy"

for w in 1 2; do
  logs="$("${C[@]}" logs "workload$w")"
  grep -q "spiffe://example.org/demo/agent$w/workload" <<<"$logs" ||
    { echo "workload$w has no SVID" >&2; exit 1; }
done
echo "==> both workloads hold their SVIDs"

leader="$("${C[@]}" exec -T server1 plinth-server cluster status -socketPath "$SOCK" |
  sed -n 's/^Leader *: *//p' | tr -d '\r')"
echo "==> killing the leader, server$leader"
"${C[@]}" kill "server$leader" >/dev/null 2>&1
other=1; [[ "$leader" == 1 ]] && other=2
for _ in $(seq 1 30); do
  new="$("${C[@]}" exec -T "server$other" plinth-server cluster status -socketPath "$SOCK" |
    sed -n 's/^Leader *: *//p' | tr -d '\r')" || true
  [[ -n "$new" && "$new" != 0 && "$new" != "$leader" ]] && break
  sleep 1
done
[[ -n "$new" && "$new" != "$leader" ]] || { echo "no new leader" >&2; exit 1; }
"${C[@]}" exec -T "server$other" plinth-server entry count -socketPath "$SOCK"
echo "==> new leader: server$new"
"${C[@]}" start "server$leader" >/dev/null 2>&1
wait_healthy
echo "==> server$leader is back; compose deployment OK"
