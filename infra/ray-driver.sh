#!/usr/bin/env bash
# Run a command (a Prefect flow run, `fastface evaluate …`) as a Ray driver of the cluster at $RAY_ADDRESS.
#
# A Ray driver needs a raylet on its own machine, so this joins the cluster first as a node
# WITHOUT resources (no actor is ever placed here: the pools run on the GPU nodes), runs the
# command with RAY_ADDRESS pointing at the cluster, and takes the node out again when the
# command ends. The Prefect Kubernetes job of prefect.yaml (weekly-paper) runs its flow through
# this script; tests/test_cluster_ray.py runs `fastface evaluate --config configs/ci.yaml`
# through it against a cluster of `ray start` processes.
#
# Environment: RAY_ADDRESS=<head>:6379 (the GCS address, not ray://); with token authentication
# (Ray ≥ 2.52; on by default for new clusters from 2.61) RAY_AUTH_MODE=token and the cluster's
# RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH), the same on every node. RAY_DRIVER_NODE_ARGS adds
# arguments to `ray start` (e.g. free ports when several nodes share one machine).
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the GCS address of the cluster head, <host>:6379}"
log="$(mktemp -t fastface-ray-driver.XXXXXX)"
# shellcheck disable=SC2086
ray start --address="$RAY_ADDRESS" --num-cpus=0 --num-gpus=0 --block ${RAY_DRIVER_NODE_ARGS:-} >"$log" 2>&1 &
node=$!
stop_node() { kill -TERM "$node" 2>/dev/null || true; wait "$node" 2>/dev/null || true; rm -f "$log"; }
trap stop_node EXIT
for _ in $(seq 1 300); do
  if grep -q "Ray runtime started" "$log"; then break; fi
  if ! kill -0 "$node" 2>/dev/null; then cat "$log" >&2; echo "ray-driver.sh: could not join $RAY_ADDRESS" >&2; exit 1; fi
  sleep 0.5
done
grep -q "Ray runtime started" "$log" || { cat "$log" >&2; echo "ray-driver.sh: timed out joining $RAY_ADDRESS" >&2; exit 1; }
"$@"
