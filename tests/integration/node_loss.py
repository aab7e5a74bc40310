"""Helper process for test_fault_tolerance: a 3-node local Ray cluster (head without CPUs, two
1-CPU workers, all on 127.0.0.1) runs a job; once the first shards are done, one worker node is
removed (its raylet and workers killed). Writes the finished manifest's shard digests as JSON.

Usage: python -m tests.integration.node_loss JOB_YAML RESULT_JSON
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def main(job_path: str, result_path: str) -> None:
    # Ray rewrites a loopback address given to ray.init(address=...) into the machine's
    # network address unless clustering beyond loopback is off; tests stay on 127.0.0.1.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator import run_job
    from orchestrator.config.schema import load_config

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    doomed = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()

    cfg = load_config(job_path)
    progress = os.path.join(cfg.output.uri, "raymerge-progress.json")
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(r=run_job(cfg)))
    job.start()
    while job.is_alive():
        if os.path.exists(progress) and json.load(open(progress))["shards"]:
            break
        time.sleep(0.01)
    killed = job.is_alive()
    if killed:
        cluster.remove_node(doomed, allow_graceful=False)
    job.join()
    manifest = result["r"].manifest
    with open(result_path, "w") as f:
        json.dump({"killed_mid_job": killed, "units": len(manifest["shards"]),
                   "shards": {s["file"]: s["sha256"] for s in manifest["shards"]}}, f)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
