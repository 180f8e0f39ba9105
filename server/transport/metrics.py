"""/metrics: counters and gauges of a node, in Prometheus' text format."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from events.bound import Bound
from events.relay.projector import Projector

if TYPE_CHECKING:
    from server.fanout.receiver import Fanout
    from server.services import Services


class Metrics:
    """Counters for /metrics (Prometheus text format)."""

    ACK_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

    def __init__(self) -> None:
        self.started = time.time()
        self.frames_in = 0
        self.frames_out = 0
        self.resyncs = 0
        self.bad_frames = 0
        self.internal_errors = 0
        self.acks = 0
        self.ack_buckets = [0] * len(self.ACK_BUCKETS_S)
        self.ack_seconds = 0.0

    def observe_ack(self, seconds: float) -> None:
        self.acks += 1
        self.ack_seconds += seconds
        for i, bound in enumerate(self.ACK_BUCKETS_S):
            if seconds <= bound:
                self.ack_buckets[i] += 1

    def render(self, services: Services, fanout: Fanout,
               read_bound: tuple[Bound, int] | None = None) -> str:
        """The text format; `read_bound` is the log's read bound and the events it holds back."""
        lines = [
            "# TYPE taskcast_connections gauge",
            f"taskcast_connections {len(services.connections)}",
            "# TYPE taskcast_subscriptions gauge",
            f"taskcast_subscriptions {services.hub.subscription_count()}",
            "# TYPE taskcast_frames_in_total counter",
            f"taskcast_frames_in_total {self.frames_in}",
            "# TYPE taskcast_frames_out_total counter",
            f"taskcast_frames_out_total {self.frames_out}",
            "# TYPE taskcast_updates_routed_total counter",
            f"taskcast_updates_routed_total {services.hub.routed}",
            "# TYPE taskcast_resyncs_total counter",
            f"taskcast_resyncs_total {self.resyncs}",
            "# TYPE taskcast_bad_frames_total counter",
            f"taskcast_bad_frames_total {self.bad_frames}",
            "# TYPE taskcast_internal_errors_total counter",
            f"taskcast_internal_errors_total {self.internal_errors}",
            "# TYPE taskcast_degraded_updates_total counter",
            f"taskcast_degraded_updates_total {Projector.degraded_total}",
            "# TYPE taskcast_fanout_errors_total counter",
            f"taskcast_fanout_errors_total {fanout.errors}",
            "# TYPE taskcast_gaps_filled_total counter",
            f"taskcast_gaps_filled_total {fanout.gaps_filled}",
            "# TYPE taskcast_relay_lag_seconds gauge",
            f"taskcast_relay_lag_seconds {fanout.relay_lag_s:.6f}",
            "# TYPE taskcast_relay_last_message_age_seconds gauge",
            f"taskcast_relay_last_message_age_seconds "
            f"{time.monotonic() - fanout.last_message_at:.3f}",
            "# TYPE taskcast_ack_seconds histogram",
        ]
        for bound, count in zip(self.ACK_BUCKETS_S, self.ack_buckets, strict=True):
            lines.append(f'taskcast_ack_seconds_bucket{{le="{bound}"}} {count}')
        lines += [f'taskcast_ack_seconds_bucket{{le="+Inf"}} {self.acks}',
                  f"taskcast_ack_seconds_sum {self.ack_seconds}",
                  f"taskcast_ack_seconds_count {self.acks}"]
        if read_bound is not None:
            lines += bound_lines(*read_bound)
        return "\n".join(lines) + "\n"


def bound_lines(bound: Bound, behind: int) -> list[str]:
    """How far the log's read bound is behind the head, and which taskcast writer holds it
    (invariant 10: only those can). The holder's gauges are 0 while nothing holds it;
    the cluster xmin lag is what v1's bound would lag (foreign transactions included)."""
    holder = bound.holder
    gauges = [
        ("taskcast_read_bound_lag_xids", bound.lag_xids),
        ("taskcast_read_bound_events_behind", behind),
        ("taskcast_read_bound_writers", len(bound.writers)),
        ("taskcast_read_bound_holder_age_seconds", f"{holder.age_s:.3f}" if holder else 0),
        ("taskcast_read_bound_holder_pid", holder.pid if holder else 0),
        ("taskcast_read_bound_holder_xid", holder.xid if holder else 0),
        ("taskcast_cluster_xmin_lag_xids", bound.head - bound.cluster_xmin),
    ]
    return [line for name, value in gauges for line in (f"# TYPE {name} gauge", f"{name} {value}")]
