"""The gap detector decides what a node fills from the log, and merges partitions in log
order; the relay's wire format."""

from __future__ import annotations

from events.ids import Position, TaskId
from events.relay.batch import Batch, Update, decode_batch, encode_batch
from server.fanout.chain import STALL_S, Merge, plan


def _u(pos: int) -> Update:
    return Update(Position(pos), TaskId("t"), "s", pos, b"}")


def test_the_next_message_in_the_chain_is_routed_as_is() -> None:
    """prev == head: nothing missed."""
    decision = plan(Position(5), Batch(Position(5), Position(7), [_u(6), _u(7)]))
    assert decision.fill_to is None and [u.position for u in decision.route] == [6, 7]


def test_a_broken_chain_fills_up_to_prev_first() -> None:
    """prev > head: a message was lost; fill (head, prev] before routing."""
    decision = plan(Position(3), Batch(Position(5), Position(7), [_u(6), _u(7)]))
    assert decision.fill_to == 5 and [u.position for u in decision.route] == [6, 7]


def test_a_republished_message_is_not_routed_twice() -> None:
    """prev < head (a relay took over from an older cursor): only what is new is routed."""
    decision = plan(Position(6), Batch(Position(4), Position(7), [_u(5), _u(6), _u(7)]))
    assert decision.fill_to is None and [u.position for u in decision.route] == [7]


def test_a_heartbeat_ahead_of_the_node_fills_the_lost_last_message() -> None:
    """An empty batch whose head is past the node's: the last message was lost."""
    assert plan(Position(3), Batch(Position(9), Position(9), [])).fill_to == 9
    assert plan(Position(9), Batch(Position(9), Position(9), [])).fill_to is None


def test_batches_round_trip() -> None:
    """encode_batch and decode_batch agree, blobs included."""
    updates = [Update(Position(2**70 + 1), TaskId("tsk_a"), "s:1", 3, b',"x":1}'),
               Update(Position(2**70 + 2), TaskId("tsk_b"), "s:2", 1, b"}")]
    batch = decode_batch(encode_batch(Position(2**70), updates))
    assert batch == Batch(Position(2**70), Position(2**70 + 2), updates)


def _b(prev: int, head: int, *positions: int) -> Batch:
    return Batch(Position(prev), Position(head), [_u(p) for p in positions])


def test_partitions_are_merged_in_log_order_once_each_has_spoken() -> None:
    """An update waits until every partition has passed it, then all come out in log order."""
    merge = Merge(3)
    merge.offer(0, _b(0, 4, 2, 4), Position(0), now=0.0)
    merge.offer(1, _b(0, 4, 3), Position(0), now=0.0)
    assert merge.ready(Position(0), now=0.0) == ([], Position(0))  # partition 2 has not spoken
    merge.offer(2, _b(0, 4, 1), Position(0), now=0.0)
    ready, head = merge.ready(Position(0), now=0.0)
    assert [u.position for u in ready] == [1, 2, 3, 4] and head == 4
    assert merge.owed is None


def test_a_broken_partition_chain_owes_a_fill_and_holds_what_follows() -> None:
    """A partition whose prev is ahead lost a message: nothing past it is routed until the
    node has filled from the log."""
    merge = Merge(2)
    merge.offer(0, _b(4, 6, 6), Position(2), now=0.0)
    merge.offer(1, _b(2, 6, 5), Position(2), now=0.0)
    assert merge.owed == 4 and merge.ready(Position(2), now=0.0) == ([], Position(2))
    ready, head = merge.ready(Position(4), now=0.0)  # the node filled up to 4
    assert [u.position for u in ready] == [5, 6] and head == 6


def test_a_stalled_partition_is_filled_from_the_log() -> None:
    """A partition that stays behind the others for STALL_S (its shard lost) owes a fill up
    to what the others reached, instead of holding every partition back."""
    merge = Merge(2)
    merge.offer(0, _b(0, 5, 5), Position(0), now=0.0)
    assert merge.ready(Position(0), now=0.0) == ([], Position(0))
    merge.offer(0, _b(5, 7, 7), Position(0), now=STALL_S / 2)
    assert merge.owed is None
    merge.offer(0, _b(7, 8), Position(0), now=STALL_S)
    assert merge.owed == 8
