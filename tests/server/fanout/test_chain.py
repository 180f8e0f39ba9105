"""The gap detector decides what a node fills from the log; the relay's wire format."""

from __future__ import annotations

from events.ids import Position, TaskId
from events.relay.batch import Batch, Update, decode_batch, encode_batch
from server.fanout.chain import plan


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
