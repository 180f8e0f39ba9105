"""The waker: one hint per burst of pokes, and it stops when cancelled, whenever that lands."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from events.relay.bus import wake_channel
from events.relay.waker import Waker


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_cancel_landing_in_the_publish_stops_the_waker(redis: Redis) -> None:
    """redis-py's send (asyncio.wait_for on Python 3.11) can swallow a cancellation that
    arrives while a hint is published; the waker still stops, rather than wait for a poke
    forever (which held Process.stop until its time box, then left a pending task that
    failed a later test when it was garbage-collected)."""
    publishing = asyncio.Event()
    real = redis.publish

    async def publish(*args: Any, **kwargs: Any) -> Any:
        publishing.set()
        return await real(*args, **kwargs)

    redis.publish = publish  # type: ignore[method-assign]
    # The cancel lands a few loop turns into the publish: each turn is tried, so one of them
    # is the send's wait_for whatever the connection's state (connecting, connected).
    for turns in range(8):
        waker = Waker(redis, f"taskcast:test:{os.getpid()}:waker")
        publishing.clear()
        running = asyncio.create_task(waker.run())
        waker.poke()
        await asyncio.wait_for(publishing.wait(), 5)
        for _ in range(turns):
            await asyncio.sleep(0)  # one loop turn, not a wait for time
        running.cancel()
        done, _ = await asyncio.wait({running}, timeout=5)
        if not done:
            running.cancel()  # do not leave it behind
            await asyncio.wait({running}, timeout=5)
        assert done, f"the waker did not stop after a cancel {turns} turns into its publish"
        assert running.cancelled()


async def test_a_burst_of_pokes_sends_hints(redis: Redis) -> None:
    """Pokes are coalesced: a burst publishes at least one hint and at most one per poke."""
    channel = f"taskcast:test:{os.getpid()}:burst"
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(wake_channel(channel))
    waker = Waker(redis, channel)
    running = asyncio.create_task(waker.run())
    try:
        for _ in range(5):
            waker.poke()
        message = None
        async with asyncio.timeout(5):
            while message is None:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        assert message["channel"] == wake_channel(channel).encode()
    finally:
        running.cancel()
        await asyncio.wait({running}, timeout=5)
        await pubsub.aclose()  # type: ignore[no-untyped-call]
