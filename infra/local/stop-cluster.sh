#!/usr/bin/env bash
# Stop what start-cluster.sh started, by its own PIDs and temp folder (never `ray stop`, which
# would stop every Ray on this machine).
set -uo pipefail
state="${RAYMERGE_LOCAL_STATE:-${TMPDIR:-/tmp}/raymerge-local}"
for name in ray moto; do
  [[ -f "$state/$name.pid" ]] && kill -- "-$(cat "$state/$name.pid")" 2>/dev/null
  rm -f "$state/$name.pid"
done
pkill -f -- "$state/ray" 2>/dev/null  # GCS, raylet and agents named by their temp folder
echo stopped
