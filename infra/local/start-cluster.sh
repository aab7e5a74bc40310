#!/usr/bin/env bash
# Try the cluster flow on one machine: a Ray head (Jobs API on http://127.0.0.1:8265) and an S3
# endpoint (moto, http://127.0.0.1:5000), both bound to 127.0.0.1. Stop with stop-cluster.sh.
#   infra/local/start-cluster.sh && eval "$(infra/local/start-cluster.sh --env)"
#   raymerge submit job.yaml --wait
set -euo pipefail
state="${RAYMERGE_LOCAL_STATE:-${TMPDIR:-/tmp}/raymerge-local}"
if [[ "${1:-}" == "--env" ]]; then
  echo "export RAY_ADDRESS=http://127.0.0.1:8265 AWS_ENDPOINT_URL_S3=http://127.0.0.1:5000"
  echo "export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_DEFAULT_REGION=us-east-1"
  echo "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat "$state/token")"
  exit 0
fi
mkdir -p "$state"
[[ -f "$state/token" ]] || python -c "import secrets; print(secrets.token_hex(16))" > "$state/token"
RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$(cat "$state/token")" setsid ray start --head --block \
  --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --dashboard-port=8265 \
  --temp-dir="$state/ray" > "$state/ray.log" 2>&1 &
echo $! > "$state/ray.pid"
setsid python -m moto.server -H 127.0.0.1 -p 5000 > "$state/moto.log" 2>&1 &
echo $! > "$state/moto.pid"
for _ in $(seq 60); do
  curl -s -o /dev/null http://127.0.0.1:8265/api/version && break
  sleep 1
done
echo "Ray head and S3 endpoint started; state in $state"
