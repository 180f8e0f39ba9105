"""The relay's transport: which Redis a URL names, and how partitions fall on the slots."""

from __future__ import annotations

import pytest
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from events.ids import Position, TaskId
from events.relay.batch import Update, decode_batch, encode_parts, partition_of
from events.relay.bus import (
    PARTITIONS,
    ClusterBus,
    PlainBus,
    bus_for,
    cluster_nodes,
    connect,
    shard_channel,
)


def test_a_cluster_url_names_its_nodes_and_credentials() -> None:
    """redis+cluster:// lists seed nodes, IPv6 in brackets, and an optional user:password."""
    assert cluster_nodes("redis+cluster://127.0.0.1:7000,[::1]:7001/") == \
        (None, None, [("127.0.0.1", 7000), ("::1", 7001)])
    assert cluster_nodes("redis+cluster://me:s%40cret@h:1") == ("me", "s@cret", [("h", 1)])
    assert cluster_nodes("redis://127.0.0.1:6379/0") is None


@pytest.mark.parametrize("url", ["redis+cluster://", "redis+cluster://h:0", "redis+cluster://h:x",
                                 "redis+cluster://h:1/2", "redis+cluster://h:1?timeout=3"])
def test_a_bad_cluster_url_is_refused(url: str) -> None:
    """A node that is not host:port, a database other than 0, options: ValueError."""
    with pytest.raises(ValueError):
        cluster_nodes(url)


async def test_the_url_picks_the_bus() -> None:
    """A plain URL is one partition on the relay's channel; a cluster URL, PARTITIONS shards."""
    plain, cluster = connect("redis://127.0.0.1:1/0"), connect("redis+cluster://127.0.0.1:1")
    try:
        assert isinstance(bus_for(plain, "c"), PlainBus) and bus_for(plain, "c").partitions == 1
        bus = bus_for(cluster, "c")
        assert isinstance(bus, ClusterBus) and bus.partitions == PARTITIONS
    finally:
        await plain.aclose()
        await cluster.aclose()


async def test_the_clients_speak_resp2_whatever_redis_py_defaults_to() -> None:
    """Both kinds of client speak RESP2: under RESP3 redis-py formats every pub/sub message
    as text for a debug line, at any log level (redis/redis-py#4230; a fifth of a node's CPU)."""
    plain, cluster = connect("redis://127.0.0.1:1/0"), connect("redis+cluster://127.0.0.1:1")
    try:
        assert plain.get_connection_kwargs()["protocol"] == 2
        assert cluster.get_connection_kwargs()["protocol"] == 2
    finally:
        await plain.aclose()
        await cluster.aclose()


def test_partitions_take_equal_shares_of_the_slots() -> None:
    """Each partition's shard channel hashes into its own 1/PARTITIONS of the slots (so the
    masters of a cluster share them), whatever the relay's channel is called."""
    share = REDIS_CLUSTER_HASH_SLOTS // PARTITIONS
    for name in ("taskcast:events", "odd{name}"):
        slots = [key_slot(shard_channel(name, p).encode()) for p in range(PARTITIONS)]
        assert [slot // share for slot in slots] == list(range(PARTITIONS))


def test_a_batch_is_split_by_scope_with_one_chain_per_partition() -> None:
    """Each partition's message has the batch's prev and head and only its scopes' events;
    a scope's events are all in one partition, in order."""
    updates = [Update(Position(10 + i), TaskId(f"t{i}"), f"s:{i % 5}", 1, b"}") for i in range(20)]
    messages = encode_parts(Position(9), updates, Position(29), PARTITIONS)
    assert len(messages) == PARTITIONS
    got: list[Update] = []
    for p, message in enumerate(messages):
        batch = decode_batch(message)
        assert (batch.prev, batch.head) == (9, 29)
        assert all(partition_of(u.scope, PARTITIONS) == p for u in batch.updates)
        got += batch.updates
    assert sorted(got, key=lambda u: u.position) == updates
