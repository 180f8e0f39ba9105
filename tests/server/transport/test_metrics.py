"""A node's /metrics: what Prometheus reads, in its format, with the types it expects."""

from __future__ import annotations

from cli.process import Process
from tests.conftest import ws_url
from tests.scraping import scrape
from tests.waiting import eventually_async
from tests.wsclient import Client

NODE_FAMILIES = {
    "taskcast_connections": "gauge", "taskcast_subscriptions": "gauge",
    "taskcast_frames_in": "counter", "taskcast_frames_out": "counter",
    "taskcast_updates_routed": "counter", "taskcast_resyncs": "counter",
    "taskcast_bad_frames": "counter", "taskcast_internal_errors": "counter",
    "taskcast_degraded_updates": "counter", "taskcast_fanout_errors": "counter",
    "taskcast_gaps_filled": "counter", "taskcast_relay_lag_seconds": "gauge",
    "taskcast_relay_last_message_age_seconds": "gauge", "taskcast_ack_seconds": "histogram",
    "taskcast_read_bound_lag_xids": "gauge", "taskcast_read_bound_events_behind": "gauge",
    "taskcast_read_bound_writers": "gauge", "taskcast_read_bound_holder_age_seconds": "gauge",
    "taskcast_read_bound_holder_pid": "gauge", "taskcast_read_bound_holder_xid": "gauge",
    "taskcast_cluster_xmin_lag_xids": "gauge", "process_resident_memory_bytes": "gauge",
}


async def test_node_metrics_parse_with_every_family_and_its_type(taskcast: Process) -> None:
    """/metrics parses with prometheus_client's parser and has every family of the node, each
    of its type; the counters and the ack histogram follow what a client did."""
    client = await Client.open(ws_url(taskcast))
    ack = await client.request({"type": "create", "kind": "demo", "scope": "project:1",
                                "input": {"steps": 1, "step_ms": 1}, "subscribe": True})
    assert ack["type"] == "ack", ack
    await client.until(lambda f: f["type"] == "update" and f["event"]["type"] == "task.completed")
    families = await scrape(taskcast.settings.port)
    assert {name: families.type(name) for name in NODE_FAMILIES} == NODE_FAMILIES
    assert families.value("taskcast_connections") == 1
    assert families.value("taskcast_subscriptions") == 1
    assert families.value("taskcast_frames_in") >= 2  # hello, create
    assert families.value("taskcast_ack_seconds", "taskcast_ack_seconds_count") == 1
    assert families.value("taskcast_ack_seconds", "taskcast_ack_seconds_bucket", le="+Inf") == 1

    async def routed() -> bool:
        return (await scrape(taskcast.settings.port)).value("taskcast_updates_routed") >= 3

    await eventually_async(routed)
    await client.close()
