"""Following a pub/sub channel: only cancellation ends it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from events.relay.follow import follow, subscribed
from tests.waiting import eventually_async


async def test_a_subscription_that_fails_with_any_exception_is_subscribed_again(
        servers: tuple[str, str]) -> None:
    """A non-Redis error while subscribing (uvloop's closed-handler RuntimeError in a
    failover) is retried like a lost connection; the follower does not die of it."""
    redis = Redis.from_url(servers[1])
    channel = f"follow-test-{uuid.uuid4().hex}"
    attempts = 0
    received: list[bytes] = []

    @asynccontextmanager
    async def subscribe() -> AsyncIterator[PubSub]:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")
        async with subscribed(redis, channel) as pubsub:
            yield pubsub

    async def handle(message: bytes) -> None:
        received.append(message)

    follower = asyncio.create_task(follow(subscribe, channel, handle))
    try:
        async def delivered() -> bool:
            await redis.publish(channel, b"hello")
            return bool(received) and not follower.done()

        await eventually_async(delivered, within=10, poll_s=0.05)
        assert attempts == 2
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await redis.aclose()
