"""The hub routes each update to its subscriptions, framed once for all of them."""

from __future__ import annotations

from events.ids import ZERO, Position, TaskId
from events.relay.batch import Update
from server.fanout.hub import Hub, Subscription


class Socket:
    """A socket as the hub sees it: records what it was given."""

    def __init__(self, scopes: tuple[str, ...] = ("*",)) -> None:
        self.frames: list[bytes] = []
        self.resynced: list[str] = []
        self.scopes = scopes

    def write_update(self, sub: Subscription, before: Position, frame: bytes) -> None:
        self.frames.append(frame)

    def flush(self) -> None:
        pass

    def resync(self, sub: Subscription) -> None:
        self.resynced.append(sub.channel)

    def may_read(self, scope: str) -> bool:
        return "*" in self.scopes or scope in self.scopes


def _update(pos: int, task: str = "t1", scope: str = "s", version: int | None = None) -> Update:
    return Update(Position(pos), TaskId(task), scope, version or pos, b',"position":"p"}')


def _live(hub: Hub, socket: Socket, channel: str) -> Subscription:
    sub = Subscription(socket, channel)
    hub.add(sub)
    sub.go_live()
    return sub


def test_an_update_is_framed_once_for_every_subscriber_of_a_channel() -> None:
    """100 subscribers of one channel are written the very same bytes object."""
    hub = Hub()
    sockets = [Socket() for _ in range(100)]
    for s in sockets:
        _live(hub, s, "scope:s")
    hub.route([_update(1)])
    first = sockets[0].frames[0]
    assert all(len(s.frames) == 1 and s.frames[0] is first for s in sockets)
    assert b'"channel":"scope:s"' in first


def test_task_scope_and_all_channels_each_get_their_own_frame() -> None:
    """One event reaches task:, scope: and all subscribers, each frame naming its channel;
    `all` skips scopes the principal does not hold."""
    hub = Hub()
    by_task, by_scope, everything, outsider = Socket(), Socket(), Socket(), Socket(("other",))
    _live(hub, by_task, "task:t1")
    _live(hub, by_scope, "scope:s")
    _live(hub, everything, "all")
    _live(hub, outsider, "all")
    hub.route([_update(1)])
    assert b'"channel":"task:t1"' in by_task.frames[0]
    assert b'"channel":"scope:s"' in by_scope.frames[0]
    assert b'"channel":"all"' in everything.frames[0]
    assert outsider.frames == []


def test_a_catching_up_subscription_holds_live_updates_then_skips_what_it_has() -> None:
    """While catching up, live updates are held; going live delivers only what the catch-up
    did not (by position, and by version after a snapshot)."""
    hub = Hub()
    socket = Socket()
    sub = Subscription(socket, "scope:s")
    hub.add(sub)
    hub.route([_update(1), _update(2), _update(3)])
    assert socket.frames == []
    sub.deliver(_update(1), b"catch-up 1")
    sub.deliver(_update(2), b"catch-up 2")
    sub.go_live()
    assert socket.frames[:2] == [b"catch-up 1", b"catch-up 2"] and len(socket.frames) == 3

    snap = Subscription(Socket(), "scope:s", ZERO)
    snap.floor[TaskId("t1")] = 5
    snap.go_live()
    snap.offer(_update(10, version=5), b"old")
    snap.offer(_update(11, version=6), b"new")
    assert snap.sink.frames == [b"new"]  # type: ignore[attr-defined]


def test_an_update_already_routed_is_not_routed_again() -> None:
    """The hub's head drops positions at or before what it routed (a relay re-publishing)."""
    hub = Hub()
    socket = Socket()
    _live(hub, socket, "all")
    hub.route([_update(1), _update(2)])
    hub.route([_update(2), _update(3)])
    assert len(socket.frames) == 3 and hub.head == 3


def test_too_many_held_updates_resync_the_subscription() -> None:
    """A catch-up that falls too far behind is stopped with resync, never grows memory."""
    from server.fanout.hub import MAX_PENDING

    hub = Hub()
    socket = Socket()
    sub = Subscription(socket, "scope:s")
    hub.add(sub)
    hub.route([_update(i) for i in range(1, MAX_PENDING + 2)])
    assert socket.resynced == ["scope:s"] and sub.pending is None
