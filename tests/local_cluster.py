"""A real multi-node Ray cluster on this machine, on 127.0.0.1 only, for the cluster tests.

Run as a process of its own (``python tests/local_cluster.py INFO.json --workers 2``): it starts a
head node (no CPUs, so every task runs on a worker node; dashboard for ``ray job submit``; Ray
Client server for ``ray://``) and worker nodes, each a separate raylet with its own resources,
through ``ray.cluster_utils.Cluster`` as Ray's own tests do. It writes the addresses, the auth
token and each node's raylet pid to INFO.json, and shuts the cluster down on SIGTERM.

Every process of the cluster and every driver the tests start gets:
- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray then advertises and listens on 127.0.0.1 instead
  of this machine's network interface (nothing leaves the loopback);
- ``RAY_AUTH_MODE=token`` and a fresh ``RAY_AUTH_TOKEN``, as docs/cluster.md tells operators;
- short health checks, so a killed node is declared dead in seconds, not half a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import sys
import time

# Settings every process of the cluster, and every driver of it, must share.
CLUSTER_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "token",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_DEDUP_LOGS": "0",
}
NODE_MEMORY = 150 * 2**20  # object store per node: small, the tests move little data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_job_agent(dashboard: str, timeout: float = 180) -> None:
    """Submit a no-op job until one succeeds: the head's job agent starts after the dashboard,
    and a submission before it is up fails with "No available agent to submit job"."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            client = JobSubmissionClient(dashboard)
            job = client.submit_job(entrypoint="true")
            while client.get_job_status(job) not in (
                JobStatus.SUCCEEDED,
                JobStatus.FAILED,
                JobStatus.STOPPED,
            ):
                time.sleep(0.5)
            return
        except Exception as e:  # noqa: BLE001 - retried until the deadline, then raised
            if time.monotonic() > deadline:
                raise
            print(f"job agent not ready: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
            time.sleep(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("info")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2, help="logical CPUs per worker node")
    args = ap.parse_args()
    os.environ.update(CLUSTER_ENV)
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    os.environ.pop("RAY_ADDRESS", None)

    from ray.cluster_utils import Cluster

    dashboard, client = free_port(), free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args=dict(
            node_ip_address="127.0.0.1", num_cpus=0, include_dashboard=True, dashboard_host="127.0.0.1",
            dashboard_port=dashboard, ray_client_server_port=client, object_store_memory=NODE_MEMORY,
            # The job agent's HTTP port defaults to a fixed 52365: another Ray on this machine (the
            # test session's own, a second test cluster) would hold it, and jobs could not be submitted.
            dashboard_agent_listen_port=free_port(),
        ),
    )  # fmt: skip
    workers = [
        cluster.add_node(node_ip_address="127.0.0.1", num_cpus=args.cpus, object_store_memory=NODE_MEMORY)
        for _ in range(args.workers)
    ]
    cluster.wait_for_nodes()
    _wait_for_job_agent(f"http://127.0.0.1:{dashboard}")

    def pids(node) -> dict:
        return {name: [p.process.pid for p in procs] for name, procs in node.all_processes.items()}

    info = {
        "gcs": cluster.address,
        "client": f"ray://127.0.0.1:{client}",
        "dashboard": f"http://127.0.0.1:{dashboard}",
        "token": os.environ["RAY_AUTH_TOKEN"],
        "head": {"node_id": cluster.head_node.node_id, "pids": pids(cluster.head_node)},
        "workers": [{"node_id": w.node_id, "pids": pids(w)} for w in workers],
    }
    tmp = args.info + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, args.info)

    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    while not stop:
        signal.pause()
    cluster.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
