"""/metrics of a node, through prometheus_client (its registry is the node's own).

The counters the node's hot paths bump are plain integers here (a frame costs one add, no
lock), read into their families at scrape time with the values the node's parts hold (the
hub, the fan-out); the ack latency is a prometheus_client Histogram.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Histogram
from prometheus_client.core import Metric

from events.bound import Bound
from events.metrics import Scrape, counter, gauge, registry
from events.relay.projector import Projector

if TYPE_CHECKING:
    from server.fanout.receiver import Fanout
    from server.services import Services


class Metrics:
    """A node's counters, and its /metrics (Prometheus text format)."""

    ACK_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

    def __init__(self) -> None:
        self.frames_in = 0
        self.frames_out = 0
        self.resyncs = 0
        self.bad_frames = 0
        self.internal_errors = 0
        self.registry = registry()
        self.ack = Histogram("taskcast_ack_seconds", "From a command's frame to its ack (committed)",
                             buckets=self.ACK_BUCKETS_S, registry=self.registry)

    def observe_ack(self, seconds: float) -> None:
        self.ack.observe(seconds)

    def render(self, services: Services, fanout: Fanout,
               read_bound: tuple[Bound, int] | None = None) -> str:
        """The text format; `read_bound` is the log's read bound and the events it holds back."""
        families = [*self._families(services, fanout), *(bound_families(*read_bound) if read_bound else ())]
        return Scrape(self.registry, families).render().decode()

    def _families(self, services: Services, fanout: Fanout) -> Iterator[Metric]:
        yield gauge("taskcast_connections", "Open websocket sessions", len(services.connections))
        yield gauge("taskcast_subscriptions", "Subscriptions of this node's sockets",
                    services.hub.subscription_count())
        yield counter("taskcast_frames_in", "Frames received", self.frames_in)
        yield counter("taskcast_frames_out", "Frames sent", self.frames_out)
        yield counter("taskcast_updates_routed", "Updates routed to subscriptions", services.hub.routed)
        yield counter("taskcast_resyncs", "`resync` frames sent (a slow consumer, a gap)", self.resyncs)
        yield counter("taskcast_bad_frames", "Frames refused at the edge", self.bad_frames)
        yield counter("taskcast_internal_errors", "Requests that failed inside the node",
                      self.internal_errors)
        yield counter("taskcast_degraded_updates", "Updates sent degraded (could not be folded or "
                      "encoded), in this process", Projector.degraded_total)
        yield counter("taskcast_fanout_errors", "Relay messages whose routing failed", fanout.errors)
        yield counter("taskcast_gaps_filled", "Gaps in the relay's chain filled from the log",
                      fanout.gaps_filled)
        yield gauge("taskcast_relay_lag_seconds", "From the relay's publication of the last batch to "
                    "its arrival here", fanout.relay_lag_s)
        yield gauge("taskcast_relay_last_message_age_seconds", "Since the last relay message arrived",
                    time.monotonic() - fanout.last_message_at)


def bound_families(bound: Bound, behind: int) -> list[Metric]:
    """How far the log's read bound is behind the head, and which taskcast writer holds it
    (invariant 10: only those can). The holder's gauges are 0 while nothing holds it;
    the cluster xmin lag is what v1's bound would lag (foreign transactions included)."""
    holder = bound.holder
    return [
        gauge("taskcast_read_bound_lag_xids", "Transactions between the read bound and the head",
              bound.lag_xids),
        gauge("taskcast_read_bound_events_behind", "Committed events the read bound holds back", behind),
        gauge("taskcast_read_bound_writers", "taskcast writers in flight", len(bound.writers)),
        gauge("taskcast_read_bound_holder_age_seconds", "Age of the writer holding the bound",
              holder.age_s if holder else 0),
        gauge("taskcast_read_bound_holder_pid", "PostgreSQL pid of the writer holding the bound",
              holder.pid if holder else 0),
        gauge("taskcast_read_bound_holder_xid", "Transaction id of the writer holding the bound",
              holder.xid if holder and holder.xid else 0),
        gauge("taskcast_cluster_xmin_lag_xids", "Transactions between the cluster's xmin and the head",
              bound.head - bound.cluster_xmin),
    ]
