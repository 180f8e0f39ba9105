"""The relay's transport: one Redis server, or a Redis Cluster through sharded pub/sub.

`REDIS_URL` picks it (`connect`):
- `redis://`, `rediss://`, `unix://`: one server. One partition: the relay's channel,
  PUBLISH and SUBSCRIBE, as it always was (`PlainBus`).
- `redis+cluster://[user:password@]host:port[,host:port...]`: a Redis (or Valkey) Cluster,
  7.0 or later, reached through any of the nodes named (`ClusterBus`). The events are
  split into `PARTITIONS` partitions by the scope of their task (`batch.partition_of`: crc32
  of the scope, stable across processes and versions, unlike `hash()`); each partition is a
  shard channel, `{<tag>}<channel>`, published with SPUBLISH and followed with SSUBSCRIBE
  on the master that owns its slot. A sharded message stays on its shard, where PUBLISH
  in a cluster is copied to every node over the cluster bus: the masters share the load.
  The tags are chosen so the partitions' slots are spread evenly over the 16384 slots
  (with three masters and the default slot ranges: partitions 0-5, 6-10, 11-15).

Every relay batch is published to every partition, with that partition's part of its
events (often none): each partition's `prev` chain then says "nothing else of mine up to
`head`", which is what lets a node merge the partitions back into log order
(server/fanout/chain.py). A task's events, and a scope's, are all in one partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol
from urllib.parse import unquote

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import RedisClusterException, RedisError

from events.relay.follow import follow, subscribed

PARTITIONS = 16  # of a Redis Cluster; fixed: changing it re-partitions every scope
CLUSTER_SCHEME = "redis+cluster://"
PUBLISH_TIMEOUT_S = 2.0  # a batch's SPUBLISHes, all partitions; then Redis is down for it

Client = Redis | RedisCluster
Handle = Callable[[bytes], Awaitable[None]]


def wake_channel(channel: str) -> str:
    """The wake-up hints' channel (events/relay/waker.py) on one Redis."""
    return f"{channel}:wake"


def cluster_nodes(url: str) -> tuple[str | None, str | None, list[tuple[str, int]]] | None:
    """(username, password, [(host, port)...]) of a `redis+cluster://` URL; None for any
    other scheme. Raises ValueError naming what is wrong."""
    if not url.startswith(CLUSTER_SCHEME):
        return None
    rest = url[len(CLUSTER_SCHEME):]
    userinfo, _, hosts = rest.rpartition("@")
    hosts = hosts.rstrip("/").removesuffix("/0")
    if any(c in hosts for c in "/?#"):
        raise ValueError("a cluster URL has no database, path or options (database 0 only)")
    user, _, password = userinfo.partition(":")
    nodes = []
    for part in hosts.split(","):
        host, sep, port = part.strip().rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{part!r} is not host:port")
        nodes.append((host, int(port)))
    return unquote(user) or None, unquote(password) or None, nodes


def check_url(url: str) -> None:
    """Raise ValueError unless `url` is a Redis URL taskcast can connect to."""
    if cluster_nodes(url) is None and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must be redis://, rediss://, unix:// or redis+cluster://host:port[,...]")


# RESP2, whatever redis-py's default: with RESP3 (its default since 8.0) every pub/sub
# message goes through a push handler that formats the whole message for a debug line
# before the log level is checked (redis/redis-py#4230, fixed after 8.1.0). A node spent
# a fifth of its CPU there during a drain (py-spy); nothing here needs RESP3.
PROTOCOL = 2


def connect(url: str) -> Client:
    """A client of the Redis `url` names (see the module docstring). Raises ValueError."""
    cluster = cluster_nodes(url)
    if cluster is None:
        return Redis.from_url(url, protocol=PROTOCOL)
    user, password, nodes = cluster
    # No backoff, one retry (on the slots' new owner after a failover): a publish that
    # fails is repaired from the log by the nodes, and must not hold the relay back.
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], username=user,
                        password=password, require_full_coverage=False, retry=Retry(NoBackoff(), 1),
                        protocol=PROTOCOL)


class Bus(Protocol):
    """The relay's channels on one Redis or on a Redis Cluster."""

    partitions: int

    async def publish(self, messages: Sequence[bytes]) -> None:
        """`messages[p]` to partition p. Raises RedisError, OSError, TimeoutError when
        any of them could not be sent (the others were)."""

    async def send(self, partition: int, message: bytes) -> None:
        """One message to one partition. Raises RedisError, OSError."""

    async def follow_partition(self, partition: int, handle: Handle) -> None:
        """Each message of `partition` to `handle`, until cancelled (events/relay/follow.py)."""

    async def hint(self) -> None:
        """A wake-up hint to the relay (events/relay/waker.py). Raises as `publish`."""

    async def follow_hints(self, handle: Handle) -> None: ...


def bus_for(redis: Client, channel: str) -> Bus:
    return ClusterBus(redis, channel) if isinstance(redis, RedisCluster) else PlainBus(redis, channel)


class PlainBus:
    partitions = 1

    def __init__(self, redis: Redis, channel: str) -> None:
        self.redis = redis
        self.channel = channel

    async def publish(self, messages: Sequence[bytes]) -> None:
        (message,) = messages
        await self.send(0, message)

    async def send(self, partition: int, message: bytes) -> None:
        await self.redis.publish(self.channel, message)

    async def follow_partition(self, partition: int, handle: Handle) -> None:
        await follow(lambda: subscribed(self.redis, self.channel), self.channel, handle)

    async def hint(self) -> None:
        await self.redis.publish(wake_channel(self.channel), b"")

    async def follow_hints(self, handle: Handle) -> None:
        channel = wake_channel(self.channel)
        await follow(lambda: subscribed(self.redis, channel), channel, handle)


def _tags(partitions: int) -> list[str]:
    """One hash tag per partition, the first whose slot falls in that partition's equal
    share of the slots."""
    share = REDIS_CLUSTER_HASH_SLOTS // partitions
    tags = []
    for p in range(partitions):
        n = 0
        while key_slot(f"{p}.{n}".encode()) // share != p:
            n += 1
        tags.append(f"{p}.{n}")
    return tags


_TAGS = _tags(PARTITIONS)


def shard_channel(channel: str, partition: int) -> str:
    """Partition `partition`'s shard channel. The tag comes first: the first {...} of a name
    is its hash tag, whatever `channel` holds."""
    return f"{{{_TAGS[partition]}}}{channel}"


class ClusterBus:
    partitions = PARTITIONS

    def __init__(self, cluster: RedisCluster, channel: str) -> None:
        self.cluster = cluster
        self.channels = [shard_channel(channel, p) for p in range(PARTITIONS)]
        self.hints = shard_channel(wake_channel(channel), 0)

    async def publish(self, messages: Sequence[bytes]) -> None:
        # One pipeline: redis-py sends each master its SPUBLISHes in one write, all masters
        # at once (a task per SPUBLISH cost several times as much, and raced on a new client).
        async with asyncio.timeout(PUBLISH_TIMEOUT_S), self.cluster.pipeline(transaction=False) as pipe:
            for channel, message in zip(self.channels, messages, strict=True):
                pipe.spublish(channel, message)
            await pipe.execute()

    async def send(self, partition: int, message: bytes) -> None:
        await self.cluster.spublish(self.channels[partition], message)

    async def follow_partition(self, partition: int, handle: Handle) -> None:
        await follow(self._subscriber(self.channels[partition]), self.channels[partition], handle)

    async def hint(self) -> None:
        await self.cluster.spublish(self.hints, b"")

    async def follow_hints(self, handle: Handle) -> None:
        await follow(self._subscriber(self.hints), self.hints, handle)

    def _subscriber(self, channel: str) -> Callable[[], AbstractAsyncContextManager[PubSub]]:
        """Subscribes `channel`; after a loss, on the slots as they are then (not every time:
        each refresh makes the client reconnect everything, in-flight commands included)."""
        attempts = itertools.count()
        return lambda: self._subscribed(channel, refresh=next(attempts) > 0)

    @asynccontextmanager
    async def _subscribed(self, channel: str, *, refresh: bool) -> AsyncIterator[PubSub]:
        """SSUBSCRIBE `channel` on the master that owns its slot (with `refresh`, as the
        cluster says now: after a failover, the promoted replica)."""
        try:
            await self.cluster.initialize()  # once: the client's first connection
            if refresh:
                await self.cluster.nodes_manager.initialize()
            node = self.cluster.get_node_from_key(channel)
        except RedisClusterException as exc:  # not a RedisError: follow would not retry it
            raise RedisError(f"cannot find the master of {channel}: {exc}") from exc
        if node is None:
            raise RedisError(f"no master owns the slot of {channel}")
        kwargs = node.connection_kwargs
        client = Redis(host=node.host, port=int(node.port), username=kwargs.get("username"),
                       password=kwargs.get("password"), protocol=PROTOCOL)
        try:
            async with subscribed(client, channel, sharded=True) as pubsub:
                yield pubsub
        finally:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
