"""Following a Redis pub/sub channel for good: reconnect with backoff, never a stuck cancel."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from events.aio import pause, raise_if_cancelling

log = logging.getLogger("taskcast.pubsub")

RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 2.0

_MESSAGES = ("message", "smessage")
_DROPPED = ("unsubscribe", "sunsubscribe")  # the server ended it (a shard's slot moved)


@asynccontextmanager
async def subscribed(redis: Redis, channel: str, *, sharded: bool = False) -> AsyncIterator[PubSub]:
    """A pub/sub connection of `redis` subscribed to `channel` (SSUBSCRIBE when `sharded`)."""
    pubsub = redis.pubsub()
    try:
        await (pubsub.ssubscribe(channel) if sharded else pubsub.subscribe(channel))
        yield pubsub
    finally:
        with contextlib.suppress(RedisError, OSError):
            await pubsub.aclose()  # type: ignore[no-untyped-call]


async def follow(subscribe: Callable[[], AbstractAsyncContextManager[PubSub]], channel: str,
                 handle: Callable[[bytes], Awaitable[None]]) -> None:
    """Pass each message of `channel` to `handle`, in order, until cancelled. A lost
    connection is logged and subscribed anew (`subscribe()`: a shard's subscriber finds the
    master that owns the channel's slot then) with exponential backoff; messages published
    meanwhile are lost (Redis is only the fast path: callers repair from the log). Any
    other exception is logged and treated the same: only cancellation ends it.

    It polls `get_message` with a timeout rather than iterating `listen()`: redis-py's
    pub/sub can swallow a cancellation, which is honoured here after each wait.
    """
    delay = RECONNECT_MIN_S
    while True:
        try:
            async with subscribe() as pubsub:
                delay = RECONNECT_MIN_S
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    raise_if_cancelling()
                    if message is None:
                        continue
                    if message["type"] in _DROPPED:
                        raise RedisError(f"the server unsubscribed {channel}")
                    if message["type"] in _MESSAGES:
                        try:
                            await handle(message["data"])
                        except Exception:  # one message's failure is its own (invariant 9)
                            log.exception("handling a message of %s failed", channel)
        except (RedisError, OSError) as exc:
            log.warning("subscription to %s lost, reconnecting: %s", channel, exc)
        except Exception:
            # Anything else is a bug of ours or of the client (uvloop's "handler is closed"
            # RuntimeError while redis-py reconnects in a failover): this subscription's
            # problem, never the follower's end (invariant 9).
            log.exception("subscription to %s failed, reconnecting", channel)
        await pause(delay)
        delay = min(delay * 2, RECONNECT_MAX_S)
