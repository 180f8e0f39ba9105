"""Following a Redis pub/sub channel for good: reconnect with backoff, never a stuck cancel."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from events.aio import pause, raise_if_cancelling

log = logging.getLogger("taskcast.pubsub")

RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 2.0


async def follow(redis: Redis, channel: str, handle: Callable[[bytes], Awaitable[None]],
                 *, on_subscribed: Callable[[], None] | None = None) -> None:
    """Pass each message of `channel` to `handle`, in order, until cancelled. A lost
    connection is logged and re-subscribed with exponential backoff; messages published
    meanwhile are lost (Redis is only the fast path: callers repair from the log).

    It polls `get_message` with a timeout rather than iterating `listen()`: redis-py's
    pub/sub can swallow a cancellation, which is honoured here after each wait.
    """
    delay = RECONNECT_MIN_S
    while True:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            delay = RECONNECT_MIN_S
            if on_subscribed is not None:
                on_subscribed()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                raise_if_cancelling()
                if message is not None and message["type"] == "message":
                    try:
                        await handle(message["data"])
                    except Exception:  # one message's failure is its own (invariant 9)
                        log.exception("handling a message of %s failed", channel)
        except (RedisError, OSError) as exc:
            log.warning("subscription to %s lost, reconnecting: %s", channel, exc)
        finally:
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            except (RedisError, OSError):
                pass
        await pause(delay)
        delay = min(delay * 2, RECONNECT_MAX_S)
