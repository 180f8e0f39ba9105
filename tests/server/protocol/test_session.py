"""The session's rules, tested directly: it is pure, frames in and actions out."""

from __future__ import annotations

from typing import Any, cast

import pytest

from events.errors import BadRequest
from events.ids import Position
from events.log import EventLog
from server.fanout.hub import Subscription
from server.protocol.auth import mint
from server.protocol.frames import Request
from server.protocol.session import Close, Run, Send, Session, SessionState
from server.services import Services
from server.settings import Settings

SECRET = "a-secret-for-tests-that-is-32-bytes-long"


class Peer:
    def send(self, frame: dict[str, Any]) -> None: ...
    def writable(self) -> bool:
        return True
    async def drained(self) -> None: ...
    def write_update(self, sub: Subscription, before: Position, frame: bytes) -> None: ...
    def flush(self) -> None: ...
    def resync(self, sub: Subscription) -> None: ...
    def may_read(self, scope: str) -> bool:
        return True


def _session(**settings: Any) -> Session:
    services = Services(Settings(**settings), cast(EventLog, EventLog(cast(Any, None))), {}, {})
    return Session(services, Peer())


def _req(type_: str, id_: int | None = 1, **fields: Any) -> Request:
    return Request(type_, id_, fields)


def _codes(actions: list[Any]) -> list[Any]:
    return [a.frame.get("code") or a.frame["type"] if isinstance(a, Send) else a for a in actions]


def test_before_hello_only_ping_is_served() -> None:
    """Every frame but ping is `unauthorized` until hello is answered."""
    session = _session()
    assert _codes(session.receive(_req("get", task="t"), 0.0)) == ["unauthorized"]
    assert _codes(session.receive(_req("ping"), 0.0)) == ["pong"]
    assert session.state is SessionState.AWAITING_HELLO


def test_hello_opens_once_and_admission_is_released_once() -> None:
    """hello answers welcome and counts the principal once; a second hello is bad_request;
    closing releases the count once, however often it is called."""
    session = _session()
    (welcome,) = session.receive(_req("hello"), 0.0)
    assert isinstance(welcome, Send) and welcome.frame["type"] == "welcome"
    assert session.services.admitted() == {"anonymous": 1}
    assert _codes(session.receive(_req("hello", 2), 0.0)) == ["bad_request"]
    assert session.services.admitted() == {"anonymous": 1}
    assert session.receive(_req("get", 3, task="t"), 0.0) == [Run(_req("get", 3, task="t"))]
    session.closed()
    session.closed()
    assert session.services.admitted() == {} and session.state is SessionState.CLOSED
    assert session.receive(_req("ping"), 0.0) == []


@pytest.mark.parametrize(("token", "code"), [
    (None, 4401), ("not-a-jwt", 4401), (mint(SECRET, "a", []), 4403)])
def test_a_refused_token_closes_without_admission(token: str | None, code: int) -> None:
    """No token, a bad one, or one granting nothing: closed, and nothing is counted."""
    session = _session(secret=SECRET)
    (action,) = session.receive(_req("hello", token=token), 0.0)
    assert isinstance(action, Close) and action.code == code
    assert session.services.admitted() == {}


def test_a_principal_over_its_connection_limit_is_closed_4429() -> None:
    """The limit counts sessions of one principal across the node."""
    first = _session(max_connections_per_principal=1)
    first.receive(_req("hello"), 0.0)
    second = Session(first.services, Peer())
    (action,) = second.receive(_req("hello"), 0.0)
    assert action == Close(4429, "too many connections for this principal")


def test_frames_over_the_rate_are_refused_then_the_socket_is_closed() -> None:
    """Over rate_per_s: `rate_limited` for each frame with an id; still over in the two
    windows after: close 4429."""
    session = _session(rate_per_s=3)
    assert [_codes(session.receive(_req("ping", i), 0.0)) for i in range(5)] == \
        [["pong"], ["pong"], ["pong"], ["rate_limited"], ["rate_limited"]]
    for window in (1.0, 2.0):
        for i in range(5):
            actions = session.receive(_req("ping", i), window)
    assert actions == [Close(4429, "too many frames")]


def test_subscriptions_per_socket_are_limited() -> None:
    """The subscription past max_subscriptions is bad_request; replacing one is not."""
    session = _session(max_subscriptions=2)
    session.receive(_req("hello"), 0.0)
    for channel in ("all", "scope:a"):
        session.add_subscription(Subscription(session.conn, channel))
    session.add_subscription(Subscription(session.conn, "all"))  # replaces, does not add
    with pytest.raises(BadRequest):
        session.add_subscription(Subscription(session.conn, "scope:b"))
    assert sorted(session.subscriptions) == ["all", "scope:a"]
